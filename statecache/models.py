from django.db import models

from .blobs import state_name

CACHE_OWNER = "cache"  # blobs of the shared cache live under states/cache/


def spilled_state_path(instance, filename):
    return state_name(CACHE_OWNER)


class SpilledState(models.Model):
    """A state of the shared cache that left RAM, kept in the state store.

    `digest` is the SHA-256 of the exact token prefix the state follows (the
    tokens as little-endian uint32, as chat rounds store them), `state_model`
    the fingerprint of the model that computed it: a state is a pure function
    of its tokens and its model, so a row is shared by whoever sends the same
    prefix to the same model. The least recently used rows go first when the
    spilled states outgrow RPSERVER_STATE_CACHE_DISK_MB.
    """

    digest = models.CharField(max_length=64)
    state_model = models.CharField(max_length=32)
    tokens = models.PositiveIntegerField(help_text="length of the token prefix")
    nbytes = models.PositiveBigIntegerField()
    state = models.FileField(upload_to=spilled_state_path)
    last_used = models.DateTimeField(db_index=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["digest", "state_model"], name="unique_spilled_state")]

    def __str__(self):
        return f"{self.tokens}-token state {self.digest[:12]}"
