from django.urls import path

from . import views

urlpatterns = [
    path("api/v1/account/export", views.ExportAccountView.as_view()),
    path("api/v1/account/import", views.ImportAccountView.as_view()),
]
