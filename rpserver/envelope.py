"""The answer shapes, and the one place that turns an error into an answer.

The legacy API's shape is {"data", "message", "code"} at HTTP 200: the Vue
UI reads `code`, not the HTTP status, and shows `message` to the person, so
every failure on a legacy route (bad input, bad token, a server fault, an
unknown route) comes back as this envelope with a message written for a
person. Under /v1/ (the OpenAI-compatible API) errors take OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, at the real HTTP status.
Under /api/ (rpserver's own REST API, docs/cards.md) errors are the
envelope at the real HTTP status (400, 403, 404).
"""

import json
import logging

from django.http import HttpResponse
from rest_framework import exceptions
from rest_framework.response import Response

from .errors import ApiError

logger = logging.getLogger(__name__)

SUCCESS = "success"


def envelope(data=None, message=SUCCESS, code=200):
    return {"data": data, "message": message, "code": code}


OPENAI_PREFIX = "/v1/"
# Routes outside /v1/ that OpenAI-compatible servers answer (llama-server's and vLLM's), in OpenAI's error shape.
OPENAI_ROOT_ROUTES = ("/tokenize", "/detokenize")
REST_PREFIX = "/api/"

# OpenAI's error `type` for each status.
OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
}


def openai_error(message, status, param=None, code=None):
    return {"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_payload(path, message, code, param=None):
    """(HTTP status, body) of an error on the route `path`."""
    if path.startswith(OPENAI_PREFIX) or path in OPENAI_ROOT_ROUTES:
        status = 401 if code == 403 and "token" in message else code
        return status, openai_error(message, status, param)
    if path.startswith(REST_PREFIX):  # rpserver's own REST API: the envelope at the real status
        return code, envelope(message=message, code=code)
    status = 404 if code == 404 else 200  # the legacy envelope is HTTP 200, but for unknown routes
    return status, envelope(message=message, code=code)


def error_response(path, message, code, param=None):
    """(HTTP status, content type, body bytes) of an error on the route `path`."""
    status, body = error_payload(path, message, code, param)
    return status, b"application/json", json.dumps(body, ensure_ascii=False).encode()


def ok(data=None):
    """A DRF success answer."""
    return Response(envelope(data))


def json_response(body, status=200):
    """A plain Django JSON answer, Chinese kept readable."""
    return HttpResponse(
        json.dumps(body, ensure_ascii=False), status=status, content_type="application/json"
    )


def validation_message(detail, prefix=""):
    """The first validation error of a DRF error tree, in words a person reads."""
    if isinstance(detail, dict):
        field, errors = next(iter(detail.items()))
        name = field if field != "non_field_errors" else ""
        return validation_message(errors, prefix=name)
    if isinstance(detail, list):
        return validation_message(detail[0], prefix)
    if getattr(detail, "code", None) == "required":
        return f"missing parameter: {prefix}"
    if getattr(detail, "code", None) in ("blank", "null"):
        return f"{prefix} must not be empty"
    return f"{prefix}: {detail}" if prefix else str(detail)


def drf_error(request, message, code):
    status, body = error_payload(request.path, message, code)
    return Response(body, status=status)


def exception_handler(exc, context):
    """DRF's exception hook: every error becomes the route's error answer."""
    request = context["request"]
    if isinstance(exc, ApiError):
        return drf_error(request, exc.message, exc.code)
    if isinstance(exc, (exceptions.NotAuthenticated, exceptions.AuthenticationFailed,
                        exceptions.PermissionDenied)):
        return drf_error(request, str(exc.detail), 403)
    if isinstance(exc, exceptions.ValidationError):
        return drf_error(request, validation_message(exc.detail), 400)
    if isinstance(exc, exceptions.MethodNotAllowed):
        return drf_error(request, f"method {request.method} is not allowed here, use POST", 400)
    if isinstance(exc, exceptions.ParseError):
        return drf_error(request, f"the request body could not be read: {exc.detail}", 400)
    if isinstance(exc, exceptions.Throttled):
        return drf_error(request, str(exc.detail), 429)
    if isinstance(exc, exceptions.APIException):
        return drf_error(request, str(exc.detail), exc.status_code)
    logger.exception("unhandled error in %s", context.get("view"))
    return drf_error(request, "internal server error", 500)


def not_found(request, exception=None):
    """handler404: unknown routes answer in the route's error shape too (real 404 status)."""
    status, content_type, body = error_response(request.path, f"no such route: {request.path}", 404)
    return HttpResponse(body, status=status, content_type=content_type.decode())


class JsonErrorMiddleware:
    """Turns an exception escaping a non-DRF view on an API route into the route's error answer."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if request.path.startswith("/admin/"):
            return None
        logger.exception("unhandled error on %s", request.path)
        status, content_type, body = error_response(request.path, "internal server error", 500)
        return HttpResponse(body, status=status, content_type=content_type.decode())
