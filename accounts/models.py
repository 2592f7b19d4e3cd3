import hashlib

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.db import models


class User(AbstractUser):
    """A person with an account, or a guest (`tmp-<hex>`) made by /login/tmp."""

    is_guest = models.BooleanField(default=False, db_index=True)
    last_seen = models.DateTimeField(null=True, blank=True, db_index=True)


def token_digest(key):
    """Tokens are stored hashed: a leaked database does not leak live tokens."""
    return hashlib.sha256(key.encode()).hexdigest()


class ApiToken(models.Model):
    """A login token. The key itself is shown once, at login; only its digest is kept."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="tokens")
    digest = models.CharField(max_length=64, unique=True)
    created = models.DateTimeField(auto_now_add=True)
    last_used = models.DateTimeField(db_index=True)

    def __str__(self):
        return f"token of {self.user} (last used {self.last_used:%Y-%m-%d %H:%M})"
