from django.db import models

from .blobs import state_name

STORE_DIR = "store"  # blobs that rounds store live under states/store/
CACHE_OWNER = "cache"  # those the shared cache spills under states/cache/ (rows of the same store)


def spilled_state_path(instance, filename):
    """(Named by migration 0001.)"""
    return state_name(CACHE_OWNER)


def stored_state_path(instance, filename):
    return state_name(STORE_DIR)


class StoredState(models.Model):
    """A state in the one state store: every RWKV state rpserver keeps on disk.

    `digest` is the SHA-256 of the exact token prefix the state follows (the
    tokens as little-endian uint32, as chat rounds store them), `state_model`
    the fingerprint of the model that computed it: a state is a pure function
    of its tokens and its model, so one row is shared by whoever needs the
    state after the same prefix of the same model (the rounds of a chat and
    of its forks, the swipes of one reply, the OpenAI door's cache).

    A row is held by its pins (statecache.store): the rounds whose
    `pre_state`/`post_state` name its blob, and `cached` when the shared
    cache keeps it (least recently used out once the cached rows outgrow
    RPSERVER_STATE_CACHE_DISK_MB). A row nobody holds is deleted, its blob
    with it.
    """

    digest = models.CharField(max_length=64)
    state_model = models.CharField(max_length=32)
    tokens = models.PositiveIntegerField(help_text="length of the token prefix")
    nbytes = models.PositiveBigIntegerField()
    state = models.FileField(upload_to=stored_state_path)
    cached = models.BooleanField(default=True, help_text="held by the shared state cache")
    last_used = models.DateTimeField(db_index=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["digest", "state_model"], name="unique_stored_state")]
        indexes = [models.Index(fields=["state"], name="stored_state_blob")]

    def __str__(self):
        return f"{self.tokens}-token state {self.digest[:12]}"
