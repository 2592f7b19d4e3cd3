from django.urls import path

from . import views

urlpatterns = [
    path("", views.index),
    path("web/config", views.config),
    path("web/characters", views.GalleryView.as_view()),
    path("web/chat", views.ChatView.as_view()),
]
