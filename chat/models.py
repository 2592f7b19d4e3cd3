import array

from django.conf import settings
from django.db import models

from characters.models import Character

from statecache.blobs import state_name


def state_path(instance, filename):
    """Where a state blob assigned through the FileField goes (statecache.blobs names them)."""
    return state_name(instance.owner_id)


def decode_tokens(raw):
    """A Round's `tokens` bytes as a list of token ids."""
    return array.array("I", bytes(raw)).tolist()


class Conversation(models.Model):
    """A chat of one user with one character: a tree of rounds with one current path.

    Each character has one main conversation (the legacy API's chat); forks
    (`is_fork`) are further chats with the same character, made from a point
    of another chat. `head` is the end of the current path (the legacy
    API's last round); the path is `head` and its ancestors. `undo_round`
    is the root of the last deleted subtree (its rounds are `deleted`) and
    `undo_head` where the path ended before, until another change makes
    the deletion final.

    Changes to any of a character's conversations run under its character's
    lock (Character.lock_name, see locks.services).
    """

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    character = models.ForeignKey(Character, on_delete=models.CASCADE, related_name="conversations")
    is_fork = models.BooleanField(default=False)
    forked_from = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="forks")
    head = models.ForeignKey("Round", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    undo_round = models.ForeignKey("Round", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    undo_head = models.ForeignKey("Round", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["character"], condition=models.Q(is_fork=False),
                                               name="one_main_conversation_per_character")]

    def __str__(self):
        return f"{self.owner} with {self.character.name}"


class Round(models.Model):
    """One [user_msg, bot_msg] pair, and exactly what the model read for it: a node of the tree.

    A round hangs under the round before it (`parent`; round 0, the header
    and greeting, under none) and `index` is its depth. Rounds with the same
    parent are alternatives: those with the same user text are the
    alternatives (swipes) of the character's reply, those with different
    user texts the alternatives of the person's message. `chosen` is the
    child the path went through last (switching to an alternative follows
    these down to the end of that branch). A round whose reply is not
    written yet (a person's edited message) has no tokens after
    `reply_start`. `deleted` rounds are hidden until the deletion is undone
    or made final (Conversation.undo_round).

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
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE, related_name="children")
    chosen = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    deleted = models.BooleanField(default=False)
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
        ordering = ["index", "pk"]

    @property
    def owner_id(self):
        return self.conversation.owner_id

    @property
    def token_list(self):
        return decode_tokens(self.tokens)

    @property
    def has_reply(self):
        return len(self.tokens) > 4 * self.reply_start

    def set_tokens(self, tokens):
        self.tokens = array.array("I", tokens).tobytes()

    def __str__(self):
        return f"round {self.index} of {self.conversation}"
