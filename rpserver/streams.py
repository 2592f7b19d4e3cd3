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
from .pipeline import header, note_access, request_fields

logger = logging.getLogger(__name__)

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: pass each frame on at once
]


class ApiConsumer(AsyncHttpConsumer):
    """One door's consumer (the legacy streams, OpenAI's /v1/): the method check, the error handler,
    the JSON sender and the race between a running reply and the client's disconnect live here once."""

    methods = ("POST",)
    method_status = 400  # the status of a method not allowed (the legacy envelope's code; /v1/: 405)

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
                raise ApiError(f"method {method} is not allowed here, use {' or '.join(self.methods)}",
                               code=self.method_status)
            await self.respond(request_fields(self.scope))
        except ApiError as exc:
            note_access(self.scope, error=exc.message)
            await self.refuse(exc)
        except Exception:
            logger.exception("server fault on %s", self.scope["path"])
            await self.send_error("internal server error", 500)

    async def refuse(self, exc):
        """Answer an ApiError in the route's shape (envelope.error_response)."""
        await self.send_error(exc.message, exc.code)

    async def respond(self, fields):
        raise NotImplementedError

    def header(self, name):
        return header(self.scope, name)

    async def stream(self, frames, reply=None):
        """Send `frames` (an async iterator of bytes) as an event stream; if the
        client disconnects first, stop iterating it and cancel `reply` (see until_disconnect)."""
        await self.send_headers(status=200, headers=SSE_HEADERS)
        await self.until_disconnect(self.send_frames(frames), reply)

    async def until_disconnect(self, work, reply=None):
        """Run `work` (a coroutine answering the request) until it is done or the client disconnects.

        `reply`, the running reply the work serves (replies.RunningReply: its `cancel()` and
        `close()`), is cancelled in the engine as soon as the client is gone, and closed before
        this returns, whichever came first: its end (the share given back, the lock let go) does
        not wait for the abandoned iteration to be collected."""
        working = asyncio.ensure_future(work)
        disconnect = asyncio.ensure_future(self.wait_for_disconnect())
        try:
            await asyncio.wait([working, disconnect], return_when=asyncio.FIRST_COMPLETED)
            if not working.done():
                logger.info("client disconnected: %s cancelled", self.scope["path"])
                if reply is not None:
                    reply.cancel()
        finally:
            # Also when this answer is cancelled itself (the server stopping): the work is ended
            # before the reply is closed, which cannot happen while the work is iterating it.
            for task in (working, disconnect):
                task.cancel()
            for task in (working, disconnect):
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:
                    logger.exception("answer on %s failed", self.scope["path"])
            if reply is not None:
                try:
                    await reply.close()
                except Exception:  # the answer has begun: its end is logged, not sent
                    logger.exception("ending the reply on %s failed", self.scope["path"])

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
