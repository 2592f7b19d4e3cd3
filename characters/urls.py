from django.urls import path

from . import views

urlpatterns = [
    path("characters/list", views.ListView.as_view()),
    path("characters/get", views.GetView.as_view()),
    path("characters/save", views.SaveView.as_view()),
    path("characters/del", views.DeleteView.as_view()),
]
