"""Reading the caller's identity from a request: the legacy token or an API key."""

from rest_framework import authentication, exceptions

from rpserver.errors import ApiError
from rpserver.pipeline import note_caller

from . import services


def token_from(headers_authorization, data):
    """The token from `Authorization: Token <key>` (or `Bearer <key>`), else from the `token` field."""
    parts = (headers_authorization or "").split()
    if len(parts) == 2 and parts[0].lower() in ("token", "bearer"):
        return parts[1]
    return str(data.get("token") or "").strip()


def authenticate_legacy(headers_authorization, data):
    """The user behind a request, checked against `user_name` when it is given.

    Raises ApiError(403) for a missing, wrong, expired or foreign token.
    """
    key = token_from(headers_authorization, data)
    if not key:
        raise ApiError("missing parameter: token, please log in", code=403)
    user = services.user_for_token(key)
    claimed = str(data.get("user_name") or "").strip()
    if claimed and claimed != user.username:
        raise ApiError("this token belongs to another user, please log in again", code=403)
    return user


def request_token(request):
    """The token a (DRF) request was authenticated with."""
    return token_from(request.headers.get("Authorization"), request.data)


class LegacyTokenAuthentication(authentication.BaseAuthentication):
    """DRF authentication for the legacy routes: token in the body or the header."""

    def authenticate(self, request):
        try:
            user = authenticate_legacy(request.headers.get("Authorization"), request.data)
        except ApiError as exc:
            raise exceptions.AuthenticationFailed(exc.message)
        note_caller(getattr(request._request, "scope", {}), user)
        return user, None

    def authenticate_header(self, request):
        return "Token"
