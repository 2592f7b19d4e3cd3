from django.urls import path

from . import views

urlpatterns = [
    path("characters/load", views.LoadView.as_view()),
    path("chat/reset", views.ResetView.as_view()),
    path("chat/back", views.BackView.as_view()),
    path("chat/tamper", views.TamperView.as_view()),
    path("debug/token", views.TokenView.as_view()),
]
