from django.urls import path

from . import views

urlpatterns = [
    path("api/v1/lorebooks", views.LorebooksView.as_view()),
    path("api/v1/lorebooks/import", views.ImportLorebookView.as_view()),
    path("api/v1/lorebooks/<int:lorebook_id>", views.LorebookView.as_view()),
    path("api/v1/lorebooks/<int:lorebook_id>/delete", views.DeleteLorebookView.as_view()),
    path("api/v1/lorebooks/<int:lorebook_id>/export", views.ExportLorebookView.as_view()),
]
