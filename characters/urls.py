from django.urls import path

from . import views

urlpatterns = [
    path("characters/list", views.ListView.as_view()),
    path("characters/get", views.GetView.as_view()),
    path("characters/save", views.SaveView.as_view()),
    path("characters/del", views.DeleteView.as_view()),
    path("api/v1/characters/import", views.ImportCardView.as_view()),
    # <path:...>: a character's name may hold "/" ("a/b"), sent as %2F.
    path("api/v1/characters/<path:name>/export", views.ExportCardView.as_view()),
]
