from django.urls import path

from . import views

urlpatterns = [
    path("login", views.LoginView.as_view()),
    path("login/tmp", views.GuestLoginView.as_view()),
]
