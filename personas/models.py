import uuid

from django.conf import settings
from django.db import models

from characters.models import MAX_NAME_LENGTH


def avatar_path(persona, filename):
    """Named by random ids, as characters' avatars are: nothing a user typed reaches a path."""
    extension = filename.rsplit(".", 1)[-1] if "." in filename else "bin"
    return f"avatars/{persona.owner_id}/persona-{uuid.uuid4().hex}.{extension}"


class Persona(models.Model):
    """Who the person is in a chat: the name the characters call them ({{user}}, their speaker
    label) and a description the model reads. At most one per owner is the default, used by
    every chat that has not chosen one (Character.chosen_persona)."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="personas")
    name = models.CharField(max_length=MAX_NAME_LENGTH)
    description = models.TextField(blank=True)
    avatar = models.FileField(upload_to=avatar_path, blank=True)
    avatar_type = models.CharField(max_length=32, blank=True)
    is_default = models.BooleanField(default=False)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="unique_persona_name_per_owner"),
            models.UniqueConstraint(fields=["owner"], condition=models.Q(is_default=True),
                                    name="one_default_persona_per_owner"),
        ]
        ordering = ["created", "pk"]

    def __str__(self):
        return f"{self.name} ({self.owner})"
