"""Accounts: users, guests and tokens."""

import secrets
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import authenticate
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from rpserver.envelope import ApiError

from .models import ApiToken, User, token_digest

# A token's last use is written at most this often, to keep reads cheap.
TOUCH_INTERVAL = timedelta(minutes=1)


def token_ttl():
    return timedelta(hours=settings.RPSERVER["TOKEN_TTL_HOURS"])


def issue_token(user):
    """A new random token for `user`; expired tokens of theirs are dropped."""
    now = timezone.now()
    ApiToken.objects.filter(user=user, last_used__lt=now - token_ttl()).delete()
    key = secrets.token_hex(16)
    ApiToken.objects.create(user=user, digest=token_digest(key), last_used=now)
    User.objects.filter(pk=user.pk).update(last_seen=now)
    return key


def log_in(user_name, password):
    """Check a password and issue a token, or raise ApiError (code 400)."""
    user = authenticate(username=user_name, password=password)
    if user is None or user.is_guest:
        raise ApiError("wrong user name or password")
    return user, issue_token(user)


def create_guest():
    """A fresh guest account (default characters included) and its token."""
    with transaction.atomic():
        user = User(username=f"tmp-{secrets.token_hex(16)}", is_guest=True)
        user.set_unusable_password()
        user.save()
        return user, issue_token(user)


def create_user(user_name, password):
    """A new account with a password (the original server used files in user/)."""
    if User.objects.filter(username=user_name).exists():
        raise ApiError(f"user {user_name} already exists")
    user = User(username=user_name)
    user.set_password(password)
    user.save()
    return user


def user_for_token(key):
    """The user a token belongs to; ApiError(403) when it is wrong or expired."""
    token = ApiToken.objects.select_related("user").filter(digest=token_digest(key)).first()
    if token is None:
        raise ApiError("invalid token, please log in again", code=403)
    now = timezone.now()
    if token.last_used < now - token_ttl():
        token.delete()
        raise ApiError("token expired, please log in again", code=403)
    if token.last_used < now - TOUCH_INTERVAL:
        ApiToken.objects.filter(pk=token.pk).update(last_used=now)
        User.objects.filter(pk=token.user_id).update(last_seen=now)
    if not token.user.is_active:
        raise ApiError("this account is disabled", code=403)
    return token.user


def idle_guests(idle_hours):
    """Guests not seen for more than `idle_hours` hours."""
    cutoff = timezone.now() - timedelta(hours=idle_hours)
    seen_before = Q(last_seen__lt=cutoff) | Q(last_seen__isnull=True, date_joined__lt=cutoff)
    return User.objects.filter(seen_before, is_guest=True)


def purge_guest(user):
    """Delete a guest with everything of theirs; stored files go with the rows."""
    with transaction.atomic():
        user.delete()
