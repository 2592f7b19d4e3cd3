"""The legacy API's answer shape: {"data", "message", "code"} at HTTP 200.

The Vue UI reads `code`, not the HTTP status, and shows `message` to the
person, so every failure on a legacy route (bad input, bad token, a server
fault, an unknown route) comes back as this envelope with a message written
for a person.
"""

import json
import logging

from django.http import HttpResponse
from rest_framework import exceptions, status
from rest_framework.response import Response

logger = logging.getLogger(__name__)

SUCCESS = "success"


class ApiError(Exception):
    """A request the caller got wrong (code 400) or may not make (code 403)."""

    def __init__(self, message, code=400):
        super().__init__(message)
        self.message = message
        self.code = code


def envelope(data=None, message=SUCCESS, code=200):
    return {"data": data, "message": message, "code": code}


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


def exception_handler(exc, context):
    """DRF's exception hook: every error becomes an envelope at HTTP 200."""
    if isinstance(exc, ApiError):
        return Response(envelope(message=exc.message, code=exc.code))
    if isinstance(exc, (exceptions.NotAuthenticated, exceptions.AuthenticationFailed,
                        exceptions.PermissionDenied)):
        return Response(envelope(message=str(exc.detail), code=403))
    if isinstance(exc, exceptions.ValidationError):
        return Response(envelope(message=validation_message(exc.detail), code=400))
    if isinstance(exc, exceptions.MethodNotAllowed):
        return Response(envelope(message=f"method {context['request'].method} is not allowed here, use POST", code=400))
    if isinstance(exc, exceptions.ParseError):
        return Response(envelope(message=f"the request body could not be read: {exc.detail}", code=400))
    if isinstance(exc, exceptions.APIException):
        return Response(envelope(message=str(exc.detail), code=exc.status_code))
    logger.exception("unhandled error in %s", context.get("view"))
    return Response(envelope(message="internal server error", code=500), status=status.HTTP_200_OK)


def not_found(request, exception=None):
    """handler404: unknown routes answer in the envelope too (real 404 status)."""
    return json_response(envelope(message=f"no such route: {request.path}", code=404), status=404)


class JsonErrorMiddleware:
    """Turns an exception escaping a non-DRF view on an API route into an envelope."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if request.path.startswith("/admin/"):
            return None
        logger.exception("unhandled error on %s", request.path)
        return json_response(envelope(message="internal server error", code=500))
