from django.urls import path

from . import views

urlpatterns = [
    path("api/v1/personas", views.PersonasView.as_view()),
    path("api/v1/personas/<int:persona_id>", views.PersonaView.as_view()),
    path("api/v1/personas/<int:persona_id>/delete", views.DeletePersonaView.as_view()),
    path("api/v1/characters/<path:name>/persona", views.ChatPersonaView.as_view()),
]
