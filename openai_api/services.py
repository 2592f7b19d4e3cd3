"""Completions for the OpenAI-compatible API: messages -> tokens -> cached state -> engine -> cache.

A request's prompt is encoded turn by turn (inference/prompt.py's chat
template), so a history re-sent by a client encodes to exactly the tokens it
did last time, and the shared state cache (statecache) finds the state after
the longest prefix it already has: the end of a message, or everything but
the prompt's last token (a regenerated reply). The engine reads only the
tokens after it, in the same batch as every other reply.

After a reply, two states are kept for the next request: the one before the
prompt's last token (regenerate), and the one after the reply as the client
will send it back, as an assistant message (`" " + text + "\\n\\n"`). When
the tokens the model sampled are not the ones that text encodes to (the
model spelled a word differently, a stop string cut the reply), that state
is read from the pre-reply state.
"""

import dataclasses
import functools
import logging
import re
import time
import uuid

from django.conf import settings

from inference import prompt as prompt_format
from inference.engine import FinishReason
from inference.runtime import get_engine
from inference.tokenizer import world_tokenizer
from statecache.services import state_cache

from .errors import OpenAIError

logger = logging.getLogger(__name__)

# A cold history keeps a state at a message end at least this many tokens
# after the last one kept, so that an edit deep in a long history that was
# never cached does not re-read it all.
SNAPSHOT_SPACING = 1024

# Tokens read to turn a reply into the state after its canonical form (for tests and /v1/debug/stats).
counters = {"canonical_reads": 0, "canonical_tokens": 0, "replies": 0}


@functools.lru_cache(maxsize=65536)
def encode_part(text):
    """The tokens of one part of a turn (memoised: clients re-send the same turns every request)."""
    return tuple(world_tokenizer().encode(text))


def model_name():
    """The name /v1/models lists: RPSERVER_OPENAI_MODEL_NAME, else the checkpoint's file name."""
    configured = settings.RPSERVER["OPENAI_MODEL_NAME"]
    if configured:
        return configured
    found = re.match(r"RWKV-\d+ (\S+?)(?:\.pth)?,? ", get_engine().backend.description + " ")
    return found.group(1) if found else "rwkv"


def chat_prompt(turns, reply_speaker):
    """(tokens, ends of the messages in them) of a chat: each part of each turn encoded on its own."""
    tokens, ends = [], []
    for speaker, text in turns:
        for part in prompt_format.chat_turn_parts(speaker, text):
            tokens += encode_part(part)
        ends.append(len(tokens))
    tokens += encode_part(f"{reply_speaker}:")
    return tokens, ends


def completion_prompt(request):
    tokens = list(request.prompt_tokens) if request.prompt_tokens is not None else \
        list(world_tokenizer().encode(request.prompt))
    vocab = get_engine().backend.vocab_size
    if any(not 0 < t < vocab for t in tokens):
        raise OpenAIError(f"prompt token ids must be in [1, {vocab - 1}]", param="prompt")
    return tokens


def spaced(ends, start, spacing=SNAPSHOT_SPACING):
    """Message ends after `start` worth keeping a state at: the first (a system prompt or
    character card, shared by many chats), the last, and one every `spacing` tokens."""
    ends = [end for end in ends if end > start]
    kept, last = ends[:1], ends[0] if ends else start
    for end in ends[1:]:
        if end - last >= spacing or end == ends[-1]:
            kept.append(end)
            last = end
    return kept


@dataclasses.dataclass
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int = 0

    def as_dict(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class Completion:
    """A reply in progress: iterate for the new text as it comes (deltas), then `await finish()`.

    Cancel it (`cancel()`) when the client goes away: the engine frees the
    reply and nothing is cached after the prompt.
    """

    def __init__(self, kind, options, tokens, cached, state, keep_at, canonical):
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_name()
        self.fingerprint = get_engine().model_id
        self.options = options
        self.tokens = tokens
        self.usage = Usage(len(tokens), cached)
        self.canonical = canonical  # chat: cache the state after the reply as it is re-sent
        self.text = ""
        self.finish_reason = None
        self._start = state  # the cached state the job starts from (after `cached` tokens)
        # States to keep, as positions in the job's tokens: message ends, and the state before the last token.
        self._keep_at = keep_at
        self._pre_reply = len(tokens) - 1 - cached
        self.generation = get_engine().generate(
            state, tokens[cached:], options.sampling, options.max_tokens, seed=options.seed,
            snapshot_at=set(keep_at) | {self._pre_reply}, stop=options.stop, logit_bias=options.logit_bias or None)

    async def deltas(self):
        """The reply's new text, piece by piece, as the engine streams it."""
        async for text in self.generation:
            if text.startswith(self.text) and len(text) > len(self.text):
                delta, self.text = text[len(self.text):], text
                yield delta

    def cancel(self):
        self.generation.cancel()

    async def finish(self):
        """After the last delta: the final text (any rest is yielded by deltas() first), cache the states."""
        reply = self.generation.reply
        self.finish_reason = "length" if reply.finish_reason is FinishReason.LENGTH else "stop"
        self.usage.completion_tokens = min(len(reply.tokens), self.options.max_tokens)
        rest = reply.text[len(self.text):] if reply.text.startswith(self.text) else ""
        self.text = reply.text if reply.text.startswith(self.text) else self.text
        counters["replies"] += 1
        await self._remember(reply)
        return rest

    async def _remember(self, reply):
        cache, engine = state_cache(), get_engine()
        cached = self.usage.cached_tokens
        for at in self._keep_at:
            cache.put(self.tokens[:cached + at], reply.snapshots[at])
        pre = reply.snapshots[self._pre_reply] if self._pre_reply > 0 else self._start
        cache.put(self.tokens[:-1], pre)
        if not self.canonical:
            return
        canonical = list(encode_part(prompt_format.reply_part(reply.text)))
        if canonical == list(reply.tokens):
            after = reply.state
        else:
            after, _ = await engine.read(pre, self.tokens[-1:] + canonical)
            counters["canonical_reads"] += 1
            counters["canonical_tokens"] += 1 + len(canonical)
        cache.put(self.tokens + canonical, after)


def check_length(tokens, param):
    limit = settings.RPSERVER["OPENAI_MAX_PROMPT_TOKENS"]
    if len(tokens) > limit:
        raise OpenAIError(f"the prompt is {len(tokens)} tokens long; this server reads at most {limit} "
                          "(RPSERVER_OPENAI_MAX_PROMPT_TOKENS)", param=param)


async def start_chat(request):
    """Begin the reply to a chat request (serializers.ChatRequest); returns a Completion."""
    tokens, ends = chat_prompt(request.turns, request.reply_speaker)
    check_length(tokens, "messages")
    cached, state = await state_cache().longest(tokens, ends + [len(tokens) - 1])
    keep_at = [end - cached for end in spaced(ends, cached) if end < len(tokens) - 1]
    return Completion("chat", request.options, tokens, cached, state, keep_at, canonical=True)


async def start_completion(request):
    """Begin a raw text completion (serializers.CompletionRequest); returns a Completion."""
    tokens = completion_prompt(request)
    check_length(tokens, "prompt")
    cached, state = await state_cache().longest(tokens, [len(tokens) - 1])
    return Completion("text", request.options, tokens, cached, state, [], canonical=False)


def models():
    engine = get_engine()
    return [{"id": model_name(), "object": "model", "created": 0, "owned_by": "rpserver",
             "rwkv_version": engine.backend.version, "fingerprint": engine.model_id}]


def debug_stats():
    return {"engine": get_engine().stats(), "state_cache": state_cache().stats(), "openai": dict(counters)}
