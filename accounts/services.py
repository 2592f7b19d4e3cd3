"""Accounts: users, guests, sign-up, log-in, tokens and API keys."""

import secrets
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import authenticate, password_validation
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from limits import services as limits
from rpserver.errors import ApiError

from .models import ApiToken, User, token_digest

# A token's last use is written at most this often, to keep reads cheap.
TOUCH_INTERVAL = timedelta(minutes=1)


def token_ttl():
    return timedelta(hours=settings.RPSERVER["TOKEN_TTL_HOURS"])


def new_token(user, kind=ApiToken.LOGIN, name=""):
    key = secrets.token_hex(16)
    ApiToken.objects.create(user=user, digest=token_digest(key), kind=kind, name=name, last_used=timezone.now())
    return key


def issue_token(user):
    """A new log-in token for `user`; their expired log-in tokens are dropped."""
    now = timezone.now()
    ApiToken.objects.filter(user=user, kind=ApiToken.LOGIN, last_used__lt=now - token_ttl()).delete()
    User.objects.filter(pk=user.pk).update(last_seen=now)
    return new_token(user)


def issue_api_key(user, name=""):
    """A new API key for `user` (Authorization: Bearer <key>); it lasts until revoked."""
    return new_token(user, ApiToken.API_KEY, name)


def revoke_token(key):
    """Log out: the token stops working at once."""
    ApiToken.objects.filter(digest=token_digest(key)).delete()


def log_in(user_name, password, address):
    """Check a password and issue a token, or raise ApiError (400 wrong, 429 backing off).

    The answers tell nothing about which names have accounts: a wrong password
    and a name no account has (or a guest's, which has no password) get the
    same message and code, count the same failures against the name and the
    address (so the backoff starts at the same attempt for both), and cost
    the same work: Django's authenticate() runs the password hasher once for
    an unknown name or an unusable password too (ModelBackend and
    verify_password), and in a backoff nothing is hashed for either
    (tests/test_accounts.py holds all of it).
    """
    limits.check_login_allowed(user_name, address)
    user = authenticate(username=user_name, password=password)
    if user is None or user.is_guest:
        limits.login_failed(user_name, address)
        raise ApiError("wrong user name or password")
    limits.login_succeeded(user_name)
    return user, issue_token(user)


def create_guest(address, accept_language=""):
    """A fresh guest account (default characters included, in the request's language) and its token."""
    limits.check_guest_rate(address)
    with transaction.atomic():
        user = User(username=f"tmp-{secrets.token_hex(16)}", is_guest=True)
        user.accept_language = accept_language  # read by the starter characters' post_save receiver
        user.set_unusable_password()
        user.save()
        return user, issue_token(user)


def check_password_rules(password, user):
    """Django's password validators (AUTH_PASSWORD_VALIDATORS), as one ApiError."""
    try:
        password_validation.validate_password(password, user)
    except ValidationError as exc:
        raise ApiError(" ".join(exc.messages))


def create_user(user_name, password, accept_language=""):
    """A new account with a password, checked by the password validators; its starter characters
    speak the language of `accept_language` (an Accept-Language header; none: the legacy set)."""
    user = User(username=user_name)
    user.accept_language = accept_language
    try:
        user.full_clean(exclude=["password"])
    except ValidationError as exc:
        if User.objects.filter(username=user_name).exists():
            raise ApiError(f"user {user_name} already exists")
        raise ApiError(" ".join(exc.messages))
    check_password_rules(password, user)
    user.set_password(password)
    try:
        with transaction.atomic():
            user.save()
    except IntegrityError:  # the same name signed up at the same moment
        raise ApiError(f"user {user_name} already exists")
    return user


def sign_up(user_name, password, address, accept_language=""):
    """A new account and its first token (POST /signup)."""
    if not settings.RPSERVER["ALLOW_SIGNUP"]:
        raise ApiError("sign-up is turned off on this server", code=403)
    limits.check_signup_rate(address)
    user = create_user(user_name, password, accept_language)
    return user, issue_token(user)


def user_for_token(key):
    """The user a token belongs to; ApiError(403) when it is wrong or expired."""
    token = ApiToken.objects.select_related("user").filter(digest=token_digest(key)).first()
    if token is None:
        raise ApiError("invalid token, please log in again", code=403)
    now = timezone.now()
    if token.kind == ApiToken.LOGIN and token.last_used < now - token_ttl():
        token.delete()
        raise ApiError("token expired, please log in again", code=403)
    if token.last_used < now - TOUCH_INTERVAL:
        ApiToken.objects.filter(pk=token.pk).update(last_used=now)
        User.objects.filter(pk=token.user_id).update(last_seen=now)
    if not token.user.is_active:
        raise ApiError("this account is disabled", code=403)
    # Which key, for the access log (rpserver/pipeline.py): an API key's name; a login token has none.
    token.user.api_key_name = token.name if token.kind == ApiToken.API_KEY else None
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
