import hashlib

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.db import models


class User(AbstractUser):
    """A person with an account, or a guest (`tmp-<hex>`) made by /login/tmp."""

    is_guest = models.BooleanField(default=False, db_index=True)
    last_seen = models.DateTimeField(null=True, blank=True, db_index=True)

    def save(self, *args, **kwargs):
        # set_password() keeps the new raw password in _password until the
        # save: a changed password (admin, createuser, a future UI) revokes
        # every token issued under the old one. (Re-hashing at log-in with a
        # newer hasher clears _password first, so it revokes nothing.)
        password_changed = self._password is not None and self.pk is not None
        super().save(*args, **kwargs)
        if password_changed:
            self.tokens.all().delete()


def token_digest(key):
    """Tokens are stored hashed: a leaked database does not leak live tokens."""
    return hashlib.sha256(key.encode()).hexdigest()


class ApiToken(models.Model):
    """A token: a log-in's (expires when unused for RPSERVER_TOKEN_TTL_HOURS) or an
    API key (`createapikey`, the admin; lasts until revoked). The key itself is
    shown once; only its digest is kept."""

    LOGIN = "login"
    API_KEY = "api"
    KINDS = [(LOGIN, "log-in token"), (API_KEY, "API key")]

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="tokens")
    digest = models.CharField(max_length=64, unique=True)
    kind = models.CharField(max_length=8, choices=KINDS, default=LOGIN)
    name = models.CharField(max_length=100, blank=True, help_text="what an API key is for")
    created = models.DateTimeField(auto_now_add=True)
    last_used = models.DateTimeField(db_index=True)

    def __str__(self):
        what = f"API key {self.name!r}" if self.kind == self.API_KEY else "token"
        return f"{what} of {self.user} (last used {self.last_used:%Y-%m-%d %H:%M})"
