"""The /v1/ routes: OpenAI's API as Channels consumers (streams and plain answers alike).

The request pipeline (rpserver/pipeline.py) has checked the body's size,
parsed the JSON and adds the CORS and security headers. Each route
authenticates (`Authorization: Bearer <key>`), parses its fields
(serializers.py) and calls one function in services.py. Errors come back in
OpenAI's shape with a real HTTP status: ours with the field they are about
(errors.py), the pipeline's and the rate limits' through
envelope.error_response. A stream is Server-Sent Events in OpenAI's chunk
format ending with `data: [DONE]`; a client that goes away cancels its reply
in the engine.
"""

import json
import logging

from channels.db import database_sync_to_async
from django.conf import settings

from accounts.auth import token_from
from accounts.services import user_for_token
from replies import services as replies
from rpserver.errors import ApiError
from rpserver.pipeline import note_access, note_caller
from rpserver.streams import SSE_HEADERS, ApiConsumer

from . import serializers, services
from .errors import OpenAIError

logger = logging.getLogger(__name__)

def authenticate(authorization):
    """The user behind `Authorization: Bearer <key>` (an API key or a login token);
    None when no key is given and RPSERVER_OPENAI_ANONYMOUS allows that."""
    key = token_from(authorization, {})
    if not key:
        if not (authorization or "").strip() and settings.RPSERVER["OPENAI_ANONYMOUS"]:
            return None
        raise OpenAIError("missing API key: send the header 'Authorization: Bearer <key>' "
                          "(make a key with `manage.py createapikey USER`)", status=401, code="invalid_api_key")
    try:
        return user_for_token(key)
    except ApiError as exc:
        raise OpenAIError(f"incorrect API key: {exc.message}", status=401, code="invalid_api_key")


class OpenAIConsumer(ApiConsumer):
    """/v1/'s part of a consumer: authentication, and errors with their field (param) in OpenAI's shape.
    The method check, the error handler, the JSON sender and the disconnect race are ApiConsumer's."""

    methods = ("POST",)
    method_status = 405

    async def refuse(self, exc):
        if isinstance(exc, OpenAIError):
            await self.send_json(exc.body(), status=exc.status)
        else:  # the rate limits, in OpenAI's shape through envelope.error_response
            await super().refuse(exc)

    async def respond(self, fields):
        user = await database_sync_to_async(authenticate)(self.header(b"authorization"))
        note_caller(self.scope, user)
        await self.answer(user, fields)

    async def answer(self, user, data):
        raise NotImplementedError

    # ---- completions -------------------------------------------------------------

    async def complete(self, user, start, request, chunk, whole):
        """Start a completion as a running reply (replies: the reply rate, the user's share of the
        engine, cancel on disconnect), and answer with it: streamed chunks, or one body once done."""
        await database_sync_to_async(replies.check_rate)(user)
        reply = await replies.start(user.pk if user is not None else None, lambda: start(request))
        if reply.work.options.stream:
            await self.send_headers(status=200, headers=SSE_HEADERS)
            await self.until_disconnect(self.chunks(reply, chunk), reply)
        else:
            await self.until_disconnect(self.whole(reply, whole), reply)

    async def whole(self, reply, whole):
        completion = reply.work
        try:
            async for _ in reply:
                pass
            self.note_usage(completion)
        except Exception:
            logger.exception("completion %s failed", completion.id)
            await self.send_json(OpenAIError("internal server error", status=500).body(), status=500)
            return
        await self.send_json(whole(completion))

    async def chunks(self, reply, chunk):
        completion = reply.work
        try:
            for choice in completion.choices:
                await self.event(chunk(completion, choice, None, first=True))
            async for choice, delta in reply:
                await self.event(chunk(completion, choice, delta))
            self.note_usage(completion)
            for choice in completion.choices:
                await self.event(chunk(completion, choice, completion.rests[choice.index], finish=True))
            if completion.options.include_usage:
                await self.event({**envelope(completion, chunk_object(chunk)), "choices": [],
                                  "usage": completion.usage.as_dict()})
            await self.send_body(b"data: [DONE]\n\n", more_body=True)
        finally:
            await self.send_body(b"", more_body=False)

    def note_usage(self, completion):
        usage = completion.usage
        note_access(self.scope, prompt=usage.prompt_tokens, cached=usage.cached_tokens,
                    generated=usage.completion_tokens)

    async def event(self, payload):
        if payload is None:
            return
        await self.send_body(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n", more_body=True)


def chunk_object(chunk):
    return "chat.completion.chunk" if chunk is chat_chunk else "text_completion"


def envelope(completion, kind):
    return {"id": completion.id, "object": kind, "created": completion.created, "model": completion.model,
            "system_fingerprint": completion.fingerprint}


def logprobs(completion, choice):
    """The logprobs of the choice's tokens not yet sent, in the API's shape (None when not asked for)."""
    return choice.new_logprobs(completion.kind) if completion.options.top_logprobs is not None else None


def chat_chunk(completion, choice, delta, first=False, finish=False):
    if first:
        content, choice_logprobs = {"role": "assistant", "content": ""}, None
    else:
        content, choice_logprobs = ({"content": delta} if delta else {}), logprobs(completion, choice)
    body = {"index": choice.index, "delta": content, "logprobs": choice_logprobs,
            "finish_reason": choice.finish_reason if finish else None}
    return {**envelope(completion, "chat.completion.chunk"), "choices": [body]}


def chat_whole(completion):
    choices = [{"index": choice.index, "message": {"role": "assistant", "content": choice.text, "refusal": None},
                "logprobs": logprobs(completion, choice), "finish_reason": choice.finish_reason}
               for choice in completion.choices]
    return {**envelope(completion, "chat.completion"), "choices": choices, "usage": completion.usage.as_dict()}


def text_chunk(completion, choice, delta, first=False, finish=False):
    if first:  # a raw completion's stream has no role chunk
        return None
    body = {"index": choice.index, "text": delta or "", "logprobs": logprobs(completion, choice),
            "finish_reason": choice.finish_reason if finish else None}
    return {**envelope(completion, "text_completion"), "choices": [body]}


def text_whole(completion):
    choices = [{"index": choice.index, "text": choice.text, "logprobs": logprobs(completion, choice),
                "finish_reason": choice.finish_reason} for choice in completion.choices]
    return {**envelope(completion, "text_completion"), "choices": choices, "usage": completion.usage.as_dict()}


class ChatCompletionsConsumer(OpenAIConsumer):
    async def answer(self, user, data):
        request = serializers.chat_request(data)
        await self.complete(user, services.start_chat, request, chat_chunk, chat_whole)


class CompletionsConsumer(OpenAIConsumer):
    async def answer(self, user, data):
        request = serializers.completion_request(data)
        await self.complete(user, services.start_completion, request, text_chunk, text_whole)


class ModelsConsumer(OpenAIConsumer):
    methods = ("GET",)

    async def answer(self, user, data):
        await self.send_json({"object": "list", "data": services.models()})


class TokenizeConsumer(OpenAIConsumer):
    async def answer(self, user, data):
        await self.send_json(services.tokenize(serializers.tokenize_request(data)))


class DetokenizeConsumer(OpenAIConsumer):
    async def answer(self, user, data):
        await self.send_json(services.detokenize(serializers.detokenize_request(data)))


class DebugStatsConsumer(OpenAIConsumer):
    """The engine's counters and the state cache's, for tests and operators (any valid key)."""

    methods = ("GET",)

    async def answer(self, user, data):
        await self.send_json(services.debug_stats(user))


class NotFoundConsumer(OpenAIConsumer):
    methods = ("GET", "POST")

    async def handle(self, body):  # noqa: ARG002 - every method, every body
        error = OpenAIError(f"no such route: {self.scope['method']} {self.scope['path']}", status=404)
        note_access(self.scope, error=error.message)
        await self.refuse(error)
