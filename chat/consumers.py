"""The streaming routes (/chat/reply, /chat/resay): Server-Sent Events over Channels.

Each frame is "\\n\\ndata: " + the whole reply so far, flushed as soon as a
token arrives. Errors before the stream starts are ordinary JSON envelopes.
A client that disconnects cancels its reply in the engine.
"""

import asyncio
import json
import logging

from channels.db import database_sync_to_async
from channels.generic.http import AsyncHttpConsumer
from django.http import QueryDict

from accounts.auth import authenticate_legacy
from rpserver.cors import cors_headers
from rpserver.envelope import ApiError, envelope, validation_message

from . import services
from .serializers import ReplySerializer, SamplingSerializer

logger = logging.getLogger(__name__)

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def frame(text):
    return ("\n\ndata: " + text).encode("utf-8")


def parse_body(scope, body):
    """The request's fields from a form-encoded or JSON body."""
    headers = dict(scope.get("headers", []))
    content_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
    try:
        if content_type == "application/json":
            data = json.loads(body or b"{}")
            if not isinstance(data, dict):
                raise ApiError("the JSON body must be an object")
            return data
        return QueryDict(body, encoding="utf-8") if body else QueryDict()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(f"the request body could not be read: {exc}")


class StreamConsumer(AsyncHttpConsumer):
    """Shared parts: parsing, authentication, envelopes, SSE and disconnects."""

    serializer_class = SamplingSerializer

    async def __call__(self, scope, receive, send):
        self._receive = receive  # read directly while streaming, to see a disconnect
        await super().__call__(scope, receive, send)

    async def send_envelope(self, body):
        headers = [(b"content-type", b"application/json")] + cors_headers(self.scope)
        await self.send_response(200, json.dumps(body, ensure_ascii=False).encode(), headers=headers)

    async def handle(self, body):
        method = self.scope["method"]
        if method == "OPTIONS":
            await self.send_response(200, b"", headers=cors_headers(self.scope, preflight=True))
            return
        if method != "POST":
            await self.send_envelope(envelope(message=f"method {method} is not allowed here, use POST", code=400))
            return
        try:
            data = parse_body(self.scope, body)
            user = await self.authenticate(data)
            form = self.serializer_class(data=data)
            if not form.is_valid():
                raise ApiError(validation_message(form.errors))
            stream = await self.start(user, form)
        except ApiError as exc:
            await self.send_envelope(envelope(message=exc.message, code=exc.code))
            return
        except Exception:
            logger.exception("could not start a reply")
            await self.send_envelope(envelope(message="internal server error", code=500))
            return
        await self.send_headers(status=200, headers=SSE_HEADERS + cors_headers(self.scope))
        await self.stream(stream)

    async def authenticate(self, data):
        headers = dict(self.scope.get("headers", []))
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        return await database_sync_to_async(authenticate_legacy)(authorization, data)

    async def stream(self, stream):
        """Send the frames; stop generating if the client disconnects first."""
        sending = asyncio.ensure_future(self.send_frames(stream))
        disconnect = asyncio.ensure_future(self.wait_for_disconnect())
        await asyncio.wait([sending, disconnect], return_when=asyncio.FIRST_COMPLETED)
        if not sending.done():
            logger.info("client disconnected: reply cancelled")
            sending.cancel()
        disconnect.cancel()
        for task in (sending, disconnect):
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                logger.exception("reply stream failed")

    async def send_frames(self, stream):
        sent = None
        try:
            async for text in stream:
                if text != sent:
                    await self.send_body(frame(text), more_body=True)
                    sent = text
            if stream.text != sent:
                await self.send_body(frame(stream.text), more_body=True)
        finally:
            await self.send_body(b"", more_body=False)

    async def wait_for_disconnect(self):
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return


class ReplyConsumer(StreamConsumer):
    serializer_class = ReplySerializer

    async def start(self, user, form):
        fields = form.validated_data
        return await services.start_reply(user, fields["character_name"], fields["prompt"], form.sampling)


class ResayConsumer(StreamConsumer):
    async def start(self, user, form):
        return await services.start_resay(user, form.validated_data["character_name"], form.sampling)
