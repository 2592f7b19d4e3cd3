from django.urls import path

from . import views

urlpatterns = [
    path("login", views.LoginView.as_view()),
    path("login/tmp", views.GuestLoginView.as_view()),
    path("signup", views.SignupView.as_view()),
    path("logout", views.LogoutView.as_view()),
]
