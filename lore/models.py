from django.conf import settings
from django.db import models

from characters.models import MAX_NAME_LENGTH


class Lorebook(models.Model):
    """A stand-alone lorebook (world info): its JSON kept as it came, in SillyTavern's world-info
    shape ({"entries": {"<uid>": {...}}}) or the card spec's character_book shape
    ({"entries": [...]}), read through lore.entries. An active book is read in all its owner's chats;
    a character's own book (the card's character_book) only in that character's."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="lorebooks")
    name = models.CharField(max_length=MAX_NAME_LENGTH)
    data = models.JSONField(default=dict)
    active = models.BooleanField(default=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["owner", "name"], name="unique_lorebook_name_per_owner")]
        ordering = ["created", "pk"]

    def __str__(self):
        return f"{self.name} ({self.owner})"
