"""One request pipeline for every route, view or stream.

An ASGI middleware around the whole application (rpserver/asgi.py), so the
Django/DRF views and the Channels stream consumers get, from one place:

* the body limit: a body over RPSERVER_MAX_BODY_BYTES is refused with code
  400, from its Content-Length before any of it is read, or as soon as the
  bytes read pass the limit (the HTTP server refuses it even earlier, while
  receiving: rpserver/server.py);
* body parsing: form-encoded, multipart (fields only) or a JSON object,
  with limits on the number of fields (RPSERVER_MAX_FIELDS) and on JSON
  nesting (RPSERVER_MAX_JSON_DEPTH); text with lone surrogates or NUL
  characters (which no database stores) is refused. The fields are put in
  the scope once; DRF reads them through FieldsParser, the consumers read
  them with request_fields();
* the error answer for all of the above (envelope.error_response: the
  legacy envelope, or OpenAI's error shape under /v1/);
* the headers: CORS on every route (preflights answered here), and
  X-Content-Type-Options/Referrer-Policy on every answer, streams included;
* a count of requests in flight, for a clean stop (rpserver/server.py);
* the access log: one line per request on the `rpserver.access` logger
  (method, path, status, the caller, prompt / cached / generated tokens,
  milliseconds), refusals included. Routes add what they learn (the caller,
  the tokens) with note_access(); the line is written as the answer's last
  byte goes out, so a client that has its answer finds the line logged.

Authentication is one function per credential (accounts.auth), used by the
DRF authentication class and the consumers alike.
"""

import io
import json
import logging
import time
from urllib.parse import parse_qsl

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.core.files.uploadhandler import MemoryFileUploadHandler
from django.http.multipartparser import MultiPartParser, MultiPartParserError
from rest_framework.parsers import BaseParser

from .envelope import error_response
from .errors import ApiError

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("rpserver.access")

SCOPE_KEY = "rpserver.fields"
ACCESS_KEY = "rpserver.access"  # the request's access-log facts (a dict routes add to)

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]
CORS_ALLOW_METHODS = b"GET, POST, OPTIONS"
CORS_ALLOW_HEADERS = b"accept, authorization, content-type, origin, x-requested-with"
CORS_MAX_AGE = b"86400"

in_flight = 0  # requests being answered now (for the clean stop)


def config(name):
    return settings.RPSERVER[name]


def is_api_path(path):
    """The admin has its own forms and cookies; every other route is the API's or the web client's."""
    return not path.startswith("/admin/")


# ---- headers -------------------------------------------------------------------


def header(scope, name):
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return ""


def cors_headers(scope, preflight=False):
    """CORS response headers for the request's Origin (RPSERVER_CORS_ORIGINS, or any)."""
    origin = header(scope, b"origin")
    if not origin or not is_api_path(scope["path"]):
        return []
    allowed = settings.CORS_ALLOWED_ORIGINS
    if allowed and origin not in allowed:
        return []
    result = [(b"access-control-allow-origin", b"*" if not allowed else origin.encode("latin-1")),
              (b"vary", b"origin")]
    if preflight:
        result += [(b"access-control-allow-methods", CORS_ALLOW_METHODS),
                   (b"access-control-allow-headers", CORS_ALLOW_HEADERS),
                   (b"access-control-max-age", CORS_MAX_AGE)]
    return result


def with_headers(send, scope):
    """`send`, adding the pipeline's headers to the response start (those the app did not set)."""
    extra = SECURITY_HEADERS + cors_headers(scope)

    async def sending(message):
        if message["type"] == "http.response.start":
            present = {name.lower() for name, _ in message.get("headers", [])}
            added = [(name, value) for name, value in extra if name not in present]
            message = {**message, "headers": list(message.get("headers", [])) + added}
        await send(message)

    return sending


async def answer(send, status, headers, body):
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def answer_error(send, path, message, code):
    status, content_type, body = error_response(path, message, code)
    await answer(send, status, [(b"content-type", content_type)], body)


# ---- the body ---------------------------------------------------------------------


def too_large_message():
    return f"the request body is too large: the limit is {config('MAX_BODY_BYTES') // 1024} KB"


async def read_body(scope, receive):
    """The whole body, read chunk by chunk; ApiError past the limit (without reading on)."""
    limit = config("MAX_BODY_BYTES")
    length = header(scope, b"content-length")
    if length.isdigit() and int(length) > limit:
        raise ApiError(too_large_message())
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(too_large_message())
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def checked_text(value, name):
    if "\x00" in value:
        raise ApiError(f"{name} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(f"{name} is not valid text (it holds a lone UTF-16 surrogate such as \\ud800)")
    return value


def check_json(value, name, depth):
    """Every string in a parsed JSON value is storable text; nesting within the limit."""
    if depth > config("MAX_JSON_DEPTH"):
        raise ApiError(f"the JSON body is nested too deeply (more than {config('MAX_JSON_DEPTH')} levels)")
    if isinstance(value, str):
        checked_text(value, name)
    elif isinstance(value, list):
        for item in value:
            check_json(item, name, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            checked_text(key, "a field name")
            check_json(item, key if depth == 1 else name, depth + 1)


def check_field_count(count):
    if count > config("MAX_FIELDS"):
        raise ApiError(f"too many fields in the request: the limit is {config('MAX_FIELDS')}")


def parse_json(body):
    try:
        data = json.loads(body)
    except RecursionError:
        raise ApiError(f"the JSON body is nested too deeply (more than {config('MAX_JSON_DEPTH')} levels)")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(f"the request body is not valid JSON: {exc}")
    if not isinstance(data, dict):
        raise ApiError(f"the JSON body must be an object ({{...}}), got {type(data).__name__}")
    check_field_count(len(data))
    check_json(data, "the body", 1)
    return data


def parse_form(body):
    try:
        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True,
                          max_num_fields=config("MAX_FIELDS"))
    except ValueError:
        raise ApiError(f"too many fields in the request: the limit is {config('MAX_FIELDS')}")
    return {key: checked_text(value, checked_text(key, "a field name")) for key, value in pairs}


def parse_multipart(scope, body):
    meta = {"CONTENT_TYPE": header(scope, b"content-type"), "CONTENT_LENGTH": str(len(body))}
    try:
        handlers = [MemoryFileUploadHandler()]  # only to notice files (refused below); the body is in memory already
        fields, files = MultiPartParser(meta, io.BytesIO(body), handlers, "utf-8").parse()
    except (MultiPartParserError, RequestDataTooBig, SuspiciousOperation, ValueError) as exc:
        raise ApiError(f"the multipart body could not be read: {exc}")
    if files:
        raise ApiError("file uploads are not accepted here: send an avatar as a data URL in a field")
    check_field_count(len(fields))
    return {key: checked_text(fields[key], checked_text(key, "a field name")) for key in fields}


def parse_fields(scope, body):
    """The request's fields (a dict) from its body, by its content type."""
    content_type = header(scope, b"content-type").split(";")[0].strip().lower()
    if not body:
        return {}
    if content_type == "application/json" or content_type.endswith("+json"):
        return parse_json(body)
    if content_type == "multipart/form-data":
        return parse_multipart(scope, body)
    return parse_form(body)


def request_fields(scope):
    """The fields the pipeline parsed from a request (for consumers)."""
    return scope.get(SCOPE_KEY) or {}


class FieldsParser(BaseParser):
    """DRF's parser for every content type: the fields the pipeline already parsed."""

    media_type = "*/*"

    def parse(self, stream, media_type=None, parser_context=None):
        return request_fields(parser_context["request"]._request.scope)


def client_address(request):
    """The caller's address (a DRF/Django request): the pipeline puts it in REMOTE_ADDR."""
    return request.META.get("REMOTE_ADDR") or "unknown"


# ---- the access log ----------------------------------------------------------------


def note_access(scope, **facts):
    """Add facts to the request's access-log line: user, key (an API key's name), prompt, cached,
    generated (tokens), error (what was refused)."""
    record = scope.get(ACCESS_KEY)
    if record is not None:
        record.update(facts)


def note_caller(scope, user):
    """The caller of a request, for its access-log line (None: anonymous)."""
    if user is not None:
        note_access(scope, user=user.username, key=getattr(user, "api_key_name", None))


ACCESS_FIELDS = ("user", "key", "prompt", "cached", "generated")


def access_line(scope, status, milliseconds, record):
    facts = " ".join(f"{name}={record[name]}" for name in ACCESS_FIELDS if record.get(name) is not None)
    error = f' error="{record["error"]}"' if record.get("error") else ""
    return f"{scope['method']} {scope['path']} {status} {facts or '-'} ms={milliseconds:.0f}{error}"


class AccessLog:
    """The access log of one request: `send` notes the status, and the line goes out with the last byte."""

    def __init__(self, scope, send):
        self.scope, self._send = scope, send
        self.started = time.perf_counter()
        self.status = None
        self.logged = False

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.write()
        await self._send(message)

    def write(self):
        if self.logged:
            return
        self.logged = True
        # 499 (nginx's "client closed request"): the client left before an answer started.
        status = self.status if self.status is not None else 499
        access_logger.info("%s", access_line(self.scope, status, 1000 * (time.perf_counter() - self.started),
                                              self.scope.get(ACCESS_KEY) or {}))


# ---- the middleware ----------------------------------------------------------------


class Pipeline:
    """The ASGI middleware: limits, parsing, errors and headers for every HTTP request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        global in_flight
        in_flight += 1
        scope = {**scope, ACCESS_KEY: {}}
        access = AccessLog(scope, send)
        try:
            await self.handle(scope, receive, access.send)
        finally:
            access.write()  # if no last byte went out (the client left)
            in_flight -= 1

    async def handle(self, scope, receive, send):
        path = scope["path"]
        send = with_headers(send, scope)
        if scope["method"] == "OPTIONS" and is_api_path(path):
            await answer(send, 200, cors_headers(scope, preflight=True), b"")
            return
        try:
            body = await read_body(scope, receive)
            if body is None:  # the client left before sending its body
                return
            if is_api_path(path):
                scope = {**scope, SCOPE_KEY: parse_fields(scope, body)}
        except ApiError as exc:
            note_access(scope, error=exc.message)
            await answer_error(send, path, exc.message, exc.code)
            return
        sent = False

        async def replay():
            # The body once, as the app expects it; then the real channel (a disconnect).
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
