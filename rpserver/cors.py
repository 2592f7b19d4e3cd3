"""CORS headers for the Channels consumers, from django-cors-headers' own settings.

Django views get CORS from corsheaders' middleware; the streaming routes are
Channels consumers that bypass Django's middleware, so they ask here.
"""

from corsheaders.conf import conf


def cors_headers(scope, preflight=False):
    """The CORS response headers for a request's Origin, as (name, value) byte pairs."""
    headers = dict(scope.get("headers", []))
    origin = headers.get(b"origin", b"").decode("latin-1")
    if not origin:
        return []
    if conf.CORS_ALLOW_ALL_ORIGINS:
        allowed = "*"
    elif origin in conf.CORS_ALLOWED_ORIGINS:
        allowed = origin
    else:
        return []
    result = [(b"access-control-allow-origin", allowed.encode("latin-1")), (b"vary", b"origin")]
    if preflight:
        result += [
            (b"access-control-allow-methods", ", ".join(conf.CORS_ALLOW_METHODS).encode()),
            (b"access-control-allow-headers", ", ".join(conf.CORS_ALLOW_HEADERS).encode()),
            (b"access-control-max-age", str(conf.CORS_PREFLIGHT_MAX_AGE).encode()),
        ]
    return result
