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

import asyncio
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
from replies import services as replies
from statecache.services import state_cache

from .errors import OpenAIError

logger = logging.getLogger(__name__)

# A cold history keeps a state at a message end at least this many tokens
# after the last one kept, so that an edit deep in a long history that was
# never cached does not re-read it all.
SNAPSHOT_SPACING = 1024

# A raw completion's prompt keeps a state every this many tokens (start_completion), and so does a chat
# message longer than this (start_chat).
CHECKPOINT_SPACING = 256

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


@dataclasses.dataclass
class Choice:
    """One of a completion's n replies, as the client sees it."""

    index: int
    generation: object  # the engine's Generation
    text: str = ""
    finish_reason: str | None = None
    logprobs_sent: int = 0  # of generation.logprobs, already in a chunk
    logprobs_offset: int = 0  # where the next token's text starts (completions' text_offset)

    def new_logprobs(self, kind):
        """The logprobs of the sampled tokens not yet sent, in the shape of the API (chat or text)."""
        entries = self.generation.logprobs[self.logprobs_sent:]
        self.logprobs_sent += len(entries)
        if kind == "chat":
            return chat_logprobs(entries)
        answer = text_logprobs(entries, self.logprobs_offset)
        self.logprobs_offset += sum(len(text) for text in answer["tokens"])
        return answer


class Completion:
    """A reply in progress, with its n choices: the work of a replies.RunningReply, whose
    updates are (choice, new text) pairs as they come; when they run out, `finish()` gives
    each choice its final text (`rests`: what was not yet sent) and caches the states.

    Cancelled (`cancel()`) when the client goes away: the engine frees the
    replies and nothing is cached after the prompt.
    """

    def __init__(self, kind, options, tokens, cached, state, keep_at, canonical):
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.kind = kind
        self.created = int(time.time())
        self.model = model_name()
        self.fingerprint = get_engine().model_id
        self.options = options
        self.tokens = tokens
        self.usage = Usage(len(tokens), cached)
        self.canonical = canonical  # chat: cache the state after the reply as it is re-sent
        self._start = state  # the cached state the job starts from (after `cached` tokens)
        # States to keep, as positions in the job's tokens: message ends, and the state before the last token.
        self._keep_at = keep_at
        self._pre_reply = len(tokens) - 1 - cached
        generations = get_engine().generate_choices(
            options.n, state, tokens[cached:], options.sampling, options.max_tokens, seed=options.seed,
            snapshot_at=set(keep_at) | {self._pre_reply}, stop=options.stop, logit_bias=options.logit_bias or None,
            history=tokens[:cached], top_logprobs=options.top_logprobs)
        self.choices = [Choice(index, generation) for index, generation in enumerate(generations)]
        self.rests = {}  # after finish(): {choice index: the end of its text not yet in an update}

    @property
    def text(self):
        return self.choices[0].text

    @property
    def finish_reason(self):
        return self.choices[0].finish_reason

    async def updates(self):
        """(choice, new text) as the engine streams each choice's reply, choices interleaved."""
        if len(self.choices) == 1:
            async for delta in self._choice_deltas(self.choices[0]):
                yield self.choices[0], delta
            return
        merged = asyncio.Queue()

        async def pump(choice):
            try:
                async for delta in self._choice_deltas(choice):
                    await merged.put((choice, delta, None))
            except Exception as exc:  # noqa: BLE001 - raised on the reader's side
                await merged.put((choice, None, exc))
            await merged.put((choice, None, None))

        pumps = [asyncio.ensure_future(pump(choice)) for choice in self.choices]
        try:
            running = len(pumps)
            while running:
                choice, delta, error = await merged.get()
                if error is not None:
                    raise error
                if delta is None:
                    running -= 1
                else:
                    yield choice, delta
        finally:
            for task in pumps:
                task.cancel()

    @staticmethod
    async def _choice_deltas(choice):
        async for text in choice.generation:
            if text.startswith(choice.text) and len(text) > len(choice.text):
                delta, choice.text = text[len(choice.text):], text
                yield delta

    def cancel(self):
        for choice in self.choices:
            choice.generation.cancel()

    async def stopped(self):
        pass  # nothing is kept of a completion its client left

    async def release(self):
        pass  # a completion holds no lock

    async def finish(self):
        """After the last update: each choice's final text and the rest of it not yet yielded
        (`rests`); the states are cached."""
        self.rests = rests = {}
        self.usage.completion_tokens = 0
        for choice in self.choices:
            reply = choice.generation.reply
            choice.finish_reason = "length" if reply.finish_reason is FinishReason.LENGTH else "stop"
            self.usage.completion_tokens += min(len(reply.tokens), self.options.max_tokens)
            rests[choice.index] = reply.text[len(choice.text):] if reply.text.startswith(choice.text) else ""
            choice.text = reply.text if reply.text.startswith(choice.text) else choice.text
        counters["replies"] += 1
        await self._remember(self.choices[0].generation.reply)

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


def token_text(token):
    """A token's text for logprobs, and its bytes (a token can hold part of a character)."""
    piece = world_tokenizer().pieces.get(token, b"")
    return piece.decode("utf-8", errors="replace"), list(piece)


def chat_logprobs(entries):
    """OpenAI's chat `logprobs.content` for engine entries (token, logprob, [(token, logprob)])."""
    content = []
    for token, logprob, top in entries:
        text, raw = token_text(token)
        alternatives = []
        for other, other_logprob in top:
            other_text, other_raw = token_text(other)
            alternatives.append({"token": other_text, "logprob": other_logprob, "bytes": other_raw})
        content.append({"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": alternatives})
    return {"content": content, "refusal": None}


def text_logprobs(entries, offset):
    """The completions API's `logprobs` for engine entries; offset: where the first token's text starts
    in the choice's text."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token, logprob, top in entries:
        text, _ = token_text(token)
        tokens.append(text)
        token_logprobs.append(logprob)
        top_logprobs.append({token_text(other)[0]: other_logprob for other, other_logprob in top})
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def check_length(tokens, param):
    limit = settings.RPSERVER["OPENAI_MAX_PROMPT_TOKENS"]
    if len(tokens) > limit:
        raise OpenAIError(f"the prompt is {len(tokens)} tokens long; this server reads at most {limit} "
                          "(RPSERVER_OPENAI_MAX_PROMPT_TOKENS)", param=param)


def inside_long_messages(ends, spacing=CHECKPOINT_SPACING):
    """The positions every `spacing` tokens of the prompt that fall inside a message longer than `spacing`."""
    marks, start = [], 0
    for end in ends:
        if end - start > spacing:
            marks += range((start // spacing + 1) * spacing, end, spacing)
        start = end
    return marks


async def start_chat(request):
    """Begin the reply to a chat request (serializers.ChatRequest); returns a Completion.

    States are looked up and kept at message ends, and every CHECKPOINT_SPACING tokens inside a long
    message, so that a long message re-sent with its end changed (an edited story, a lore entry at its
    end) is read from the last checkpoint it shares."""
    tokens, ends = chat_prompt(request.turns, request.reply_speaker)
    check_length(tokens, "messages")
    marks = inside_long_messages(ends)
    cached, state = await state_cache().longest(tokens, sorted(ends + marks) + [len(tokens) - 1])
    kept = sorted(set(spaced(ends, cached)) | {mark for mark in marks if mark > cached})
    keep_at = [at - cached for at in kept if at < len(tokens) - 1]
    return Completion("chat", request.options, tokens, cached, state, keep_at, canonical=True)


async def start_completion(request):
    """Begin a raw text completion (serializers.CompletionRequest); returns a Completion.

    A raw prompt has no message boundaries: a state is kept every CHECKPOINT_SPACING tokens of it, so
    that a story re-sent with more at its end (a client's Text Completion mode) resumes from the last one
    it shares and reads at most CHECKPOINT_SPACING tokens it had read before."""
    tokens = completion_prompt(request)
    check_length(tokens, "prompt")
    marks = list(range(CHECKPOINT_SPACING, len(tokens) - 1, CHECKPOINT_SPACING))
    cached, state = await state_cache().longest(tokens, marks + [len(tokens) - 1])
    keep_at = [mark - cached for mark in marks if mark > cached]
    return Completion("text", request.options, tokens, cached, state, keep_at, canonical=False)


def context_window():
    """The longest prompt rpserver reads (an RNN has no window of its own: only this limit)."""
    return settings.RPSERVER["OPENAI_MAX_PROMPT_TOKENS"]


def models():
    """/v1/models' entry, with the context window in the fields clients read: vLLM's max_model_len,
    context_length (OpenRouter, LM Studio), llama-server's meta.n_ctx_train."""
    engine, window = get_engine(), context_window()
    return [{"id": model_name(), "object": "model", "created": 0, "owned_by": "rpserver",
             "rwkv_version": engine.backend.version, "fingerprint": engine.model_id,
             "max_model_len": window, "context_length": window, "meta": {"n_ctx_train": window,
                                                                          "n_vocab": engine.backend.vocab_size}}]


def tokenize(request):
    """The tokens of a text, or of the prompt a chat request would read, in llama-server's shape
    ({"tokens"}) and vLLM's ({"tokens", "count", "max_model_len"}) at once."""
    if request.chat is not None:
        tokens, _ = chat_prompt(request.chat.turns, request.chat.reply_speaker)
    else:
        tokens = list(world_tokenizer().encode(request.text))
    listed = tokens
    if request.with_pieces:
        listed = [{"id": token, "piece": token_text(token)[0]} for token in tokens]
    return {"tokens": listed, "count": len(tokens), "max_model_len": context_window()}


def detokenize(tokens):
    """The text of token ids: llama-server's {"content"} and vLLM's {"prompt"}."""
    vocab = get_engine().backend.vocab_size
    if any(not 0 <= t < vocab for t in tokens):
        raise OpenAIError(f"token ids must be in [0, {vocab - 1}]", param="tokens")
    text = world_tokenizer().decode(tokens)
    return {"content": text, "prompt": text}


def debug_stats(user):
    """The engine's and the state cache's counters, and the replies running in this process: all of
    them, and the caller's (what counts against their RPSERVER_MAX_REPLIES_PER_USER, on both doors)."""
    return {"engine": get_engine().stats(), "state_cache": state_cache().stats(), "openai": dict(counters),
            "replies": {"running": replies.replies_running(),
                        "yours": replies.replies_running(user.pk if user is not None else None)}}
