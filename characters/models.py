import uuid

from django.conf import settings
from django.db import models
from django.utils.functional import cached_property

MAX_NAME_LENGTH = 64


def avatar_path(character, filename):
    """Avatars are named by random ids: nothing a user typed reaches a path."""
    extension = filename.rsplit(".", 1)[-1] if "." in filename else "bin"
    return f"avatars/{character.owner_id}/{uuid.uuid4().hex}.{extension}"


class Character(models.Model):
    """A character a user chats with; its name is unique for its owner."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="characters")
    name = models.CharField(max_length=MAX_NAME_LENGTH)
    user_name = models.CharField(max_length=MAX_NAME_LENGTH, help_text="how the character addresses the user")
    greeting = models.TextField()
    persona = models.TextField()
    example_message = models.TextField(blank=True)
    use_qa = models.BooleanField(default=False, help_text="prompt with User/Assistant instead of the names")
    avatar = models.FileField(upload_to=avatar_path, blank=True)
    avatar_type = models.CharField(max_length=32, blank=True)
    # The character card it was imported from (characters/cards.py): its `data` object as it came,
    # every field and unknown extension kept, given back on export; {} for a character made here.
    card = models.JSONField(default=dict, blank=True)
    card_spec = models.CharField(max_length=32, blank=True, help_text="chara_card_v1/v2/v3, or empty")
    # The persona this chat speaks as (personas/), chosen for it; None: the owner's default, if any.
    chosen_persona = models.ForeignKey("personas.Persona", null=True, blank=True, on_delete=models.SET_NULL,
                                       related_name="chats")
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["owner", "name"], name="unique_character_name_per_owner")]
        ordering = ["created", "pk"]

    def __str__(self):
        return f"{self.name} ({self.owner})"

    # What a chat reads besides the character, owned by the apps above this one (personas/, lore/):
    # each registers its reader here in its AppConfig.ready(), so that characters imports neither.
    chat_readers = {}

    @cached_property
    def chat_persona(self):
        """The Persona this character's chat speaks as (personas/: its own choice, else the owner's
        default), or None (then the character's user_name). characters.services.get_character reads it
        on the database thread, so that the chat's async code finds it cached."""
        reader = self.chat_readers.get("persona")
        return reader(self) if reader is not None else None

    @cached_property
    def chat_lorebooks(self):
        """The owner's active lorebooks' JSON (lore/), read in this character's chat; read on the
        database thread by get_character, as chat_persona is."""
        reader = self.chat_readers.get("lorebooks")
        return reader(self) if reader is not None else []

    @property
    def lock_name(self):
        """The lock (locks.services) over the character and its conversation."""
        return f"character:{self.pk}"
