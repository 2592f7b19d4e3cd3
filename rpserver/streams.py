"""The base of every route served by a Channels consumer (the streams).

The pipeline (rpserver/pipeline.py) has already checked the body's size,
parsed its fields (request_fields) and adds the CORS and security headers to
whatever is sent here. A consumer's `respond(fields)` authenticates and calls
one service function; it answers with `send_json`, or starts a stream of
Server-Sent Events with `stream(frames)`. An ApiError anywhere becomes the
route's error answer (envelope.error_response); any other exception is a
server fault: code 500, logged once.
"""

import asyncio
import json
import logging

from channels.generic.http import AsyncHttpConsumer

from .envelope import error_response
from .errors import ApiError
from .pipeline import header, request_fields

logger = logging.getLogger(__name__)

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: pass each frame on at once
]


class ApiConsumer(AsyncHttpConsumer):
    methods = ("POST",)

    async def __call__(self, scope, receive, send):
        self._receive = receive  # read directly while streaming, to see a disconnect
        await super().__call__(scope, receive, send)

    async def send_json(self, body, status=200):
        await self.send_response(status, json.dumps(body, ensure_ascii=False).encode(),
                                 headers=[(b"content-type", b"application/json")])

    async def send_error(self, message, code):
        status, content_type, body = error_response(self.scope["path"], message, code)
        await self.send_response(status, body, headers=[(b"content-type", content_type)])

    async def handle(self, body):
        method = self.scope["method"]
        try:
            if method not in self.methods:
                raise ApiError(f"method {method} is not allowed here, use {' or '.join(self.methods)}")
            await self.respond(request_fields(self.scope))
        except ApiError as exc:
            await self.send_error(exc.message, exc.code)
        except Exception:
            logger.exception("server fault on %s", self.scope["path"])
            await self.send_error("internal server error", 500)

    async def respond(self, fields):
        raise NotImplementedError

    def header(self, name):
        return header(self.scope, name)

    async def stream(self, frames):
        """Send `frames` (an async iterator of bytes) as an event stream; if the
        client disconnects first, stop iterating it (which cancels its work)."""
        await self.send_headers(status=200, headers=SSE_HEADERS)
        sending = asyncio.ensure_future(self.send_frames(frames))
        disconnect = asyncio.ensure_future(self.wait_for_disconnect())
        await asyncio.wait([sending, disconnect], return_when=asyncio.FIRST_COMPLETED)
        if not sending.done():
            logger.info("client disconnected: %s cancelled", self.scope["path"])
            sending.cancel()
        disconnect.cancel()
        for task in (sending, disconnect):
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                logger.exception("stream on %s failed", self.scope["path"])

    async def send_frames(self, frames):
        try:
            async for frame in frames:
                await self.send_body(frame, more_body=True)
        finally:
            await self.send_body(b"", more_body=False)

    async def wait_for_disconnect(self):
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return
