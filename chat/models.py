import array

from django.conf import settings
from django.db import models

from characters.models import Character

from .snapshots import state_name


def state_path(instance, filename):
    """Where a state blob assigned through the FileField goes (chat.snapshots names them)."""
    return state_name(instance.owner_id)


def decode_tokens(raw):
    """A Round's `tokens` bytes as a list of token ids."""
    return array.array("I", bytes(raw)).tolist()


class Conversation(models.Model):
    """The chat of one user with one character (one per character, as in the legacy API).

    Changes to it run under its character's lock (Character.lock_name, see locks.services).
    """

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    character = models.OneToOneField(Character, on_delete=models.CASCADE, related_name="conversation")
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    def __str__(self):
        return f"{self.owner} with {self.character.name}"


class Round(models.Model):
    """One [user_msg, bot_msg] pair, and exactly what the model read for it.

    `tokens` is the round's part of the context: the user turn (for round 0,
    the character header) ending in "<Bot>:", then the reply with its closing
    blank line. `reply_start` is where the reply begins in it.

    Snapshots (FileFields, safetensors): `post_state` is the state after the
    round, `pre_state` the state after all but the last token before the
    reply (from which the reply is regenerated or overwritten). Only recent
    rounds and periodic checkpoints keep them; the others are rebuilt from
    the nearest earlier snapshot by re-reading the tokens in between.
    """

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="rounds")
    index = models.PositiveIntegerField()
    user_text = models.TextField(null=True, blank=True)
    bot_text = models.TextField(blank=True)
    tokens = models.BinaryField()
    reply_start = models.PositiveIntegerField()
    state_model = models.CharField(max_length=32, blank=True, help_text="fingerprint of the model of the snapshots")
    pre_state = models.FileField(upload_to=state_path, blank=True)
    post_state = models.FileField(upload_to=state_path, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["conversation", "index"], name="unique_round_index")]
        ordering = ["index"]

    @property
    def owner_id(self):
        return self.conversation.owner_id

    @property
    def token_list(self):
        return decode_tokens(self.tokens)

    def set_tokens(self, tokens):
        self.tokens = array.array("I", tokens).tobytes()

    def __str__(self):
        return f"round {self.index} of {self.conversation}"
