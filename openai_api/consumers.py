"""The /v1/ routes: OpenAI's API as Channels consumers (streams and plain answers alike).

Each route parses and authorizes, then calls one function in services.py.
Errors come back in OpenAI's shape with a real HTTP status (errors.py). A
stream is Server-Sent Events in OpenAI's chunk format ending with
`data: [DONE]`; a client that goes away cancels its reply in the engine.
"""

import asyncio
import json
import logging

from channels.db import database_sync_to_async
from channels.generic.http import AsyncHttpConsumer
from django.conf import settings

from accounts.services import user_for_token
from rpserver.pipeline import cors_headers
from rpserver.envelope import ApiError

from . import serializers, services
from .errors import OpenAIError

logger = logging.getLogger(__name__)

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def authenticate(authorization):
    """The user behind `Authorization: Bearer <key>` (None when anonymous use is allowed and no key is given)."""
    parts = (authorization or "").split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        if not parts and settings.RPSERVER["OPENAI_ANONYMOUS"]:
            return None
        raise OpenAIError("missing API key: send the header 'Authorization: Bearer <key>'", status=401,
                          code="invalid_api_key")
    try:
        return user_for_token(parts[1])
    except ApiError as exc:
        raise OpenAIError(f"incorrect API key: {exc.message}", status=401, code="invalid_api_key")


class OpenAIConsumer(AsyncHttpConsumer):
    """Shared parts: methods, body, authentication, errors, CORS."""

    methods = ("POST",)

    async def __call__(self, scope, receive, send):
        self._receive = receive  # read directly while streaming, to see a disconnect
        await super().__call__(scope, receive, send)

    def header(self, name):
        return dict(self.scope.get("headers", [])).get(name, b"").decode("latin-1")

    async def send_json(self, body, status=200):
        await self.send_response(status, json.dumps(body, ensure_ascii=False).encode(),
                                 headers=JSON_HEADERS + cors_headers(self.scope))

    async def handle(self, body):
        method = self.scope["method"]
        if method == "OPTIONS":
            await self.send_response(204, b"", headers=cors_headers(self.scope, preflight=True))
            return
        try:
            if method not in self.methods:
                raise OpenAIError(f"method {method} is not allowed here, use {' or '.join(self.methods)}",
                                  status=405)
            if len(body) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
                raise OpenAIError(f"the request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes",
                                  status=413)
            user = await database_sync_to_async(authenticate)(self.header(b"authorization"))
            await self.answer(user, self.parse(body) if method == "POST" else {})
        except OpenAIError as exc:
            await self.send_json(exc.body(), status=exc.status)
        except Exception:
            logger.exception("OpenAI route %s failed", self.scope["path"])
            await self.send_json(OpenAIError("internal server error", status=500).body(), status=500)

    @staticmethod
    def parse(body):
        try:
            data = json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise OpenAIError(f"the request body is not valid JSON: {exc}")
        if not isinstance(data, dict):
            raise OpenAIError("the request body must be a JSON object")
        return data

    async def answer(self, user, data):
        raise NotImplementedError

    # ---- completions -------------------------------------------------------------

    async def reply(self, completion, chunk, whole):
        """Answer with a completion: streamed chunks, or one body once it is done."""
        if completion.options.stream:
            await self.send_headers(status=200, headers=SSE_HEADERS + cors_headers(self.scope))
            await self.until_disconnect(completion, self.stream(completion, chunk))
        else:
            await self.until_disconnect(completion, self.whole(completion, whole))

    async def whole(self, completion, whole):
        async for _ in completion.deltas():
            pass
        await completion.finish()
        await self.send_json(whole(completion))

    async def stream(self, completion, chunk):
        try:
            await self.event(chunk(completion, None, first=True))
            async for delta in completion.deltas():
                await self.event(chunk(completion, delta))
            rest = await completion.finish()
            await self.event(chunk(completion, rest, finish=True))
            if completion.options.include_usage:
                await self.event({**envelope(completion, chunk_object(chunk)), "choices": [],
                                  "usage": completion.usage.as_dict()})
            await self.send_body(b"data: [DONE]\n\n", more_body=True)
        finally:
            await self.send_body(b"", more_body=False)

    async def event(self, payload):
        if payload is None:
            return
        await self.send_body(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n", more_body=True)

    async def until_disconnect(self, completion, work):
        """Run `work`; if the client disconnects first, cancel the reply in the engine."""
        working = asyncio.ensure_future(work)
        disconnect = asyncio.ensure_future(self.wait_for_disconnect())
        await asyncio.wait([working, disconnect], return_when=asyncio.FIRST_COMPLETED)
        if not working.done():
            logger.info("client disconnected: completion %s cancelled", completion.id)
            completion.cancel()
            working.cancel()
        disconnect.cancel()
        for task in (working, disconnect):
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                logger.exception("completion %s failed", completion.id)

    async def wait_for_disconnect(self):
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return


def chunk_object(chunk):
    return "chat.completion.chunk" if chunk is chat_chunk else "text_completion"


def envelope(completion, kind):
    return {"id": completion.id, "object": kind, "created": completion.created, "model": completion.model,
            "system_fingerprint": completion.fingerprint}


def chat_chunk(completion, delta, first=False, finish=False):
    if first:
        content = {"role": "assistant", "content": ""}
    else:
        content = {"content": delta} if delta else {}
    choice = {"index": 0, "delta": content, "logprobs": None,
              "finish_reason": completion.finish_reason if finish else None}
    return {**envelope(completion, "chat.completion.chunk"), "choices": [choice]}


def chat_whole(completion):
    choice = {"index": 0, "message": {"role": "assistant", "content": completion.text, "refusal": None},
              "logprobs": None, "finish_reason": completion.finish_reason}
    return {**envelope(completion, "chat.completion"), "choices": [choice], "usage": completion.usage.as_dict()}


def text_chunk(completion, delta, first=False, finish=False):
    choice = {"index": 0, "text": delta or "", "logprobs": None,
              "finish_reason": completion.finish_reason if finish else None}
    return {**envelope(completion, "text_completion"), "choices": [choice]}


def text_whole(completion):
    choice = {"index": 0, "text": completion.text, "logprobs": None, "finish_reason": completion.finish_reason}
    return {**envelope(completion, "text_completion"), "choices": [choice], "usage": completion.usage.as_dict()}


class ChatCompletionsConsumer(OpenAIConsumer):
    async def answer(self, user, data):
        request = serializers.chat_request(data)
        await self.reply(await services.start_chat(request), chat_chunk, chat_whole)


class CompletionsConsumer(OpenAIConsumer):
    async def answer(self, user, data):
        request = serializers.completion_request(data)
        completion = await services.start_completion(request)
        if completion.options.stream:
            # A raw completion's stream has no role chunk: skip the first (empty) one.
            await self.send_headers(status=200, headers=SSE_HEADERS + cors_headers(self.scope))
            await self.until_disconnect(completion, self.stream(completion, text_stream_chunk))
        else:
            await self.until_disconnect(completion, self.whole(completion, text_whole))


def text_stream_chunk(completion, delta, first=False, finish=False):
    return text_chunk(completion, delta, finish=finish) if not first else None


class ModelsConsumer(OpenAIConsumer):
    methods = ("GET",)

    async def answer(self, user, data):
        await self.send_json({"object": "list", "data": services.models()})


class DebugStatsConsumer(OpenAIConsumer):
    """The engine's counters and the state cache's, for tests and operators (any valid key)."""

    methods = ("GET",)

    async def answer(self, user, data):
        await self.send_json(services.debug_stats())


class NotFoundConsumer(OpenAIConsumer):
    methods = ("GET", "POST")

    async def handle(self, body):
        error = OpenAIError(f"no such route: {self.scope['method']} {self.scope['path']}", status=404)
        await self.send_json(error.body(), status=404)
