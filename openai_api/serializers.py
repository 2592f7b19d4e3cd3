"""Reading OpenAI request bodies into what the services need, or OpenAIError (400) naming the field.

Every field OpenAI's SDKs and SillyTavern send is honoured, ignored on
purpose (IGNORED; listed in docs/openai.md), or accepted only at its neutral
value (NEUTRAL: any other value is a 400 naming the field, never a silent
difference); any other field is ignored, as OpenAI's clients send many.
Sampling maps onto rpserver's sampler (inference/sampling.py, where the
steps' order is), with the meaning llama.cpp's server and
text-generation-webui give the fields:

* temperature 0 (or top_p 0, or do_sample false) is greedy: only the most
  likely token (min_p 1); temperature goes up to 5;
* min_p (default 0.05), top_k (0 or -1: off), typical_p (1: off), XTC
  (xtc_threshold, xtc_probability), top_p;
* presence_penalty and frequency_penalty (-2 to 2): OpenAI's, subtracted from
  the logit of a token in the penalty window (once, and once per use);
  repetition_penalty: a token in the window has its logit divided by it
  (multiplied when negative); the window is the reply, or with
  repetition_penalty_range (0: all) / repeat_last_n (-1: all, 0: penalties
  off) the last tokens of the prompt and the reply;
* DRY (dry_multiplier, dry_base, dry_allowed_length, dry_sequence_breakers,
  dry_penalty_last_n) and Mirostat v2 (mirostat_mode 2, mirostat_tau,
  mirostat_eta);
* a negative seed is a random one.
"""

import dataclasses
import functools
import json
import math

from django.conf import settings

from inference import prompt as prompt_format
from inference.sampling import SamplingSettings
from inference.tokenizer import world_tokenizer

from .errors import OpenAIError

# Mirostat off: mu = 2 x tau never drops a token and rate 0 never moves it.
NO_MIROSTAT = {"tau": 1e9, "rate": 0.0}
DEFAULT_MIN_P = 0.05
MAX_STOPS = 16
MAX_CHOICES = 8  # n: the choices share one read of the prompt, each a row of the batch
MAX_LOGPROBS = 20  # top_logprobs (chat), logprobs (completions)
CHAT_ROLES = ("system", "developer", "user", "assistant")
DEFAULT_DRY_BREAKERS = ("\n", ":", "\"", "*")  # llama.cpp's and text-generation-webui's
WHOLE_CONTEXT = 2**31  # a penalty window or DRY range as long as any prompt

# Fields that change nothing here, whatever their value (docs/openai.md says why).
IGNORED = (
    "model", "user", "store", "metadata", "service_tier", "parallel_tool_calls", "reasoning_effort",
    "api_type", "api_server", "truncation_length", "num_ctx", "skip_special_tokens", "add_bos_token",
    "include_reasoning", "sampler_priority", "sampler_order", "temperature_last", "max_tokens_second",
    "ban_eos_token", "min_keep", "rep_pen_slope", "early_stopping", "dynatemp_low", "dynatemp_high",
    "dynatemp_exponent", "smoothing_curve", "xtc_min_keep", "ignore_eos",
)


def _empty(value):
    return value in (None, "", [], {}, False)


# Fields accepted at their neutral value only: {name: (is it neutral?, the neutral value, in words)}.
NEUTRAL = {
    "echo": (_empty, "false"),
    "suffix": (_empty, "empty"),
    "tools": (_empty, "empty"),
    "functions": (_empty, "empty"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), '"none"'),
    "response_format": (lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"), '{"type": "text"}'),
    "grammar": (_empty, "empty"),
    "grammar_string": (_empty, "empty"),
    "json_schema": (_empty, "empty"),
    "negative_prompt": (_empty, "empty"),
    "guidance_scale": (lambda v: v in (None, 1, 1.0), "1"),
    "banned_strings": (_empty, "empty"),
    "custom_token_bans": (_empty, "empty"),
    "top_a": (lambda v: v in (None, 0, 0.0), "0"),
    "tfs": (lambda v: v in (None, 1, 1.0), "1"),
    "tfs_z": (lambda v: v in (None, 1, 1.0), "1"),
    "epsilon_cutoff": (lambda v: v in (None, 0, 0.0), "0"),
    "eta_cutoff": (lambda v: v in (None, 0, 0.0), "0"),
    "smoothing_factor": (lambda v: v in (None, 0, 0.0), "0"),
    "dynamic_temperature": (_empty, "false"),
    "dynatemp_range": (lambda v: v in (None, 0, 0.0), "0"),
    "encoder_repetition_penalty": (lambda v: v in (None, 1, 1.0), "1"),
    "no_repeat_ngram_size": (lambda v: v in (None, 0), "0"),
    "penalty_alpha": (lambda v: v in (None, 0, 0.0), "0"),
    "num_beams": (lambda v: v in (None, 1), "1"),
    "length_penalty": (lambda v: v in (None, 1, 1.0), "1"),
    "min_tokens": (lambda v: v in (None, 0), "0"),
    "skew": (lambda v: v in (None, 0, 0.0), "0"),
    "nsigma": (lambda v: v in (None, 0, 0.0), "0"),
    "top_n_sigma": (lambda v: v is None or (isinstance(v, (int, float)) and v <= 0), "0 or -1"),
}


@dataclasses.dataclass
class ReplyOptions:
    """What every completion request sets, chat or raw."""

    model: str
    sampling: SamplingSettings
    max_tokens: int
    stop: tuple
    seed: int | None
    stream: bool
    include_usage: bool
    logit_bias: dict
    user: str
    n: int = 1
    top_logprobs: int | None = None  # None: no logprobs; else how many alternatives each token lists


@dataclasses.dataclass
class ChatRequest:
    options: ReplyOptions
    turns: list  # [(speaker, text)]
    reply_speaker: str


@dataclasses.dataclass
class CompletionRequest:
    options: ReplyOptions
    prompt: str | None
    prompt_tokens: list | None  # a prompt given as token ids


def number(data, name, low, high, default, integer=False, low_inclusive=True):
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        kind = "an integer" if integer else "a number"
        raise OpenAIError(f"{name} must be {kind}, got {value!r}", param=name)
    if not math.isfinite(value) or value > high or value < low or (value == low and not low_inclusive):
        bracket = "[" if low_inclusive else "("
        raise OpenAIError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value}", param=name)
    return int(value) if integer else float(value)


def flag(data, name, default=False):
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise OpenAIError(f"{name} must be true or false, got {value!r}", param=name)
    return value


def text_field(data, name, default=""):
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise OpenAIError(f"{name} must be a string, got {type(value).__name__}", param=name)
    return value


def alias(data, *names):
    """The first of `names` the request sets (clients of other servers spell some fields their way)."""
    return next((name for name in names if data.get(name) is not None), names[0])


def check_neutral(data):
    for name, (neutral, words) in NEUTRAL.items():
        if name in data and not neutral(data[name]):
            raise OpenAIError(f"{name} is not supported by rpserver: leave it out or send {words}", param=name)


@functools.lru_cache(maxsize=64)
def breaker_tokens(breakers):
    """The tokens DRY's repeats never extend across: those whose text holds a sequence breaker."""
    needles = [b.encode("utf-8") for b in breakers if b]
    return frozenset(token for token, piece in world_tokenizer().pieces.items()
                     if any(needle in piece for needle in needles))


def dry_breakers(data):
    value = data.get("dry_sequence_breakers")
    if value is None:
        return DEFAULT_DRY_BREAKERS
    if isinstance(value, str):  # SillyTavern sends the list as JSON text
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, list) or not all(isinstance(b, str) for b in value):
        raise OpenAIError("dry_sequence_breakers must be a list of strings (or that list as JSON text)",
                          param="dry_sequence_breakers")
    return tuple(value)


def penalty_window(data):
    """The penalty window's length in tokens of prompt and reply (None: the reply), and whether the
    penalties apply at all (llama.cpp's repeat_last_n 0 turns them off)."""
    if data.get("repetition_penalty_range") is not None:  # text-generation-webui: 0 is the whole context
        size = number(data, "repetition_penalty_range", 0, WHOLE_CONTEXT, 0, integer=True)
        return (size or WHOLE_CONTEXT), True
    if data.get("repeat_last_n") is not None:  # llama.cpp: -1 is the whole context, 0 turns them off
        size = number(data, "repeat_last_n", -1, WHOLE_CONTEXT, -1, integer=True)
        return (WHOLE_CONTEXT if size < 0 else size or None), size != 0
    return None, True


def sampling_settings(data):
    temperature = number(data, "temperature", 0.0, 5.0, 1.0)
    min_p = number(data, "min_p", 0.0, 1.0, DEFAULT_MIN_P)
    top_p = number(data, "top_p", 0.0, 1.0, 1.0)
    top_k = number(data, "top_k", -1, 2**31, 0, integer=True)
    typical = alias(data, "typical_p", "typical")
    typical_p = number(data, typical, 0.0, 1.0, 1.0, low_inclusive=False)
    frequency = number(data, "frequency_penalty", -2.0, 2.0, 0.0)
    presence = number(data, "presence_penalty", -2.0, 2.0, 0.0)
    repetition = number(data, alias(data, "repetition_penalty", "repeat_penalty"), 0.0, 10.0, 1.0,
                        low_inclusive=False)
    window, penalties_on = penalty_window(data)
    if not penalties_on:
        frequency, presence, repetition = 0.0, 0.0, 1.0
    xtc_threshold = number(data, "xtc_threshold", 0.0, 1.0, 0.1)
    xtc_probability = number(data, "xtc_probability", 0.0, 1.0, 0.0)
    dry = {
        "dry_multiplier": number(data, "dry_multiplier", 0.0, 100.0, 0.0),
        "dry_base": number(data, "dry_base", 1.0, 100.0, 1.75),
        "dry_allowed_length": number(data, "dry_allowed_length", 1, 10_000, 2, integer=True),
    }
    dry_last_n = number(data, "dry_penalty_last_n", -1, WHOLE_CONTEXT, -1, integer=True)
    breakers = dry_breakers(data)
    if dry_last_n == 0:  # llama.cpp: 0 turns DRY off
        dry["dry_multiplier"] = 0.0
    if dry["dry_multiplier"]:
        dry["dry_range"] = None if dry_last_n < 0 else dry_last_n
        dry["dry_breakers"] = breaker_tokens(breakers)
    mode = number(data, alias(data, "mirostat_mode", "mirostat"), 0, 2, 0, integer=True)
    if mode == 1:
        raise OpenAIError("mirostat_mode 1 (Mirostat v1) is not supported by rpserver: use 2 (Mirostat v2) or 0",
                          param=alias(data, "mirostat_mode", "mirostat"))
    tau = number(data, "mirostat_tau", 0.0, 20.0, 5.0)
    eta = number(data, "mirostat_eta", 0.0, 1.0, 0.1)
    mirostat = {"tau": tau, "rate": eta} if mode == 2 else NO_MIROSTAT
    if temperature == 0 or top_p == 0 or data.get("do_sample") is False:
        # Greedy: only the most likely token survives min_p 1.
        temperature, min_p, top_p = 1.0, 1.0, 1.0
    flag(data, "do_sample", True)
    return SamplingSettings(
        min_p=min_p, temperature=temperature, presence_penalty=0.0, frequency_penalty=frequency,
        presence_offset=presence, repetition_penalty=repetition, penalty_range=window, top_p=top_p,
        top_k=max(top_k, 0), typical_p=typical_p, xtc_threshold=xtc_threshold, xtc_probability=xtc_probability,
        **dry, **mirostat)


def stop_strings(data):
    stops = []
    for name in ("stop", "stopping_strings"):  # stopping_strings: text-generation-webui's name
        value = data.get(name)
        if value is None:
            continue
        listed = [value] if isinstance(value, str) else value
        if not isinstance(listed, list) or not all(isinstance(s, str) for s in listed):
            raise OpenAIError(f"{name} must be a string or a list of strings", param=name)
        stops += listed
    stops = list(dict.fromkeys(s for s in stops if s))
    if len(stops) > MAX_STOPS:
        raise OpenAIError(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", param="stop")
    return tuple(stops)


def logit_bias(data):
    value = data.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OpenAIError("logit_bias must be an object mapping token ids to numbers", param="logit_bias")
    bias = {}
    for token, amount in value.items():
        try:
            token_id = int(token)
        except (TypeError, ValueError):
            raise OpenAIError(f"logit_bias keys must be token ids, got {token!r}", param="logit_bias")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not -100 <= amount <= 100:
            raise OpenAIError(f"logit_bias values must be numbers in [-100, 100], got {amount!r}", param="logit_bias")
        bias[token_id] = float(amount)
    return bias


def top_logprobs(data, kind):
    """How many alternatives each sampled token lists (None: no logprobs). Chat: logprobs true and
    top_logprobs; completions: logprobs, a count."""
    if kind == "chat":
        wanted = flag(data, "logprobs")
        count = number(data, "top_logprobs", 0, MAX_LOGPROBS, 0, integer=True)
        if data.get("top_logprobs") is not None and not wanted:
            raise OpenAIError("top_logprobs needs logprobs: true", param="top_logprobs")
        return count if wanted else None
    if data.get("logprobs") is None:
        return None
    return number(data, "logprobs", 0, MAX_LOGPROBS, 0, integer=True)


def seed(data):
    name = alias(data, "seed", "sampler_seed")
    value = number(data, name, -2**63, 2**64 - 1, None, integer=True)
    return None if value is None or value < 0 else value  # a negative seed: a random one


def reply_options(data, kind):
    if not isinstance(data, dict):
        raise OpenAIError("the request body must be a JSON object")
    check_neutral(data)
    n = number(data, "n", 1, MAX_CHOICES, 1, integer=True)
    if data.get("best_of") is not None and number(data, "best_of", 1, MAX_CHOICES, n, integer=True) != n:
        raise OpenAIError("best_of must equal n on rpserver (every choice generated is returned)", param="best_of")
    limit = settings.RPSERVER["MAX_REPLY_TOKENS"]
    name = alias(data, "max_completion_tokens", "max_tokens", "max_new_tokens", "n_predict", "num_predict")
    # Longer replies than the server allows are cut at its limit (finish_reason "length").
    # llama.cpp's n_predict -1 means "no limit": the server's.
    if name in ("n_predict", "num_predict") and data.get(name) == -1:
        max_tokens = limit
    else:
        max_tokens = min(number(data, name, 1, 2**31, limit, integer=True), limit)
    stream_options = data.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise OpenAIError("stream_options must be an object", param="stream_options")
    return ReplyOptions(
        model=text_field(data, "model"), sampling=sampling_settings(data), max_tokens=max_tokens,
        stop=stop_strings(data), seed=seed(data), stream=flag(data, "stream"),
        include_usage=flag(stream_options, "include_usage"), logit_bias=logit_bias(data),
        user=text_field(data, "user"), n=n, top_logprobs=top_logprobs(data, kind),
    )


def message_text(message, index):
    """A message's content as text: a string, or a list of text parts."""
    content = message.get("content")
    param = f"messages[{index}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError("only text content parts are supported ({\"type\": \"text\", \"text\": ...})",
                                  param=param)
            texts.append(part["text"])
        return "\n".join(texts)
    raise OpenAIError("content must be a string or a list of text parts", param=param)


def chat_request(data):
    options = reply_options(data, "chat")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("messages must be a non-empty list of messages", param="messages")
    turns, reply_speaker = [], prompt_format.speaker_name("assistant")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise OpenAIError("each message must be an object with a role and content", param=f"messages[{index}]")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise OpenAIError(f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                              param=f"messages[{index}].role")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise OpenAIError("name must be a string", param=f"messages[{index}].name")
        speaker = prompt_format.speaker_name(role, name)
        turns.append((speaker, message_text(message, index)))
        if role == "assistant":
            reply_speaker = speaker
    return ChatRequest(options, turns, reply_speaker)


def completion_request(data):
    options = reply_options(data, "text")
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise OpenAIError("prompt must not be empty", param="prompt")
        return CompletionRequest(options, prompt, None)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return CompletionRequest(options, None, prompt)
    raise OpenAIError("prompt must be a non-empty string or a list of token ids (one prompt per request)",
                      param="prompt")


@dataclasses.dataclass
class TokenizeRequest:
    text: str | None  # llama-server's `content`, vLLM's `prompt`
    chat: ChatRequest | None  # vLLM's `messages`: the prompt a chat request would read
    with_pieces: bool


def tokenize_request(data):
    """llama-server's {"content", "with_pieces"} or vLLM's {"prompt"} / {"messages"}."""
    if not isinstance(data, dict):
        raise OpenAIError("the request body must be a JSON object")
    with_pieces = flag(data, "with_pieces")
    if data.get("messages") is not None:
        return TokenizeRequest(None, chat_request({"messages": data["messages"]}), with_pieces)
    name = alias(data, "content", "prompt")
    value = data.get(name)
    if not isinstance(value, str):
        raise OpenAIError("send the text to tokenize as `content` (or `prompt`), or a chat as `messages`",
                          param=name)
    return TokenizeRequest(value, None, with_pieces)


def detokenize_request(data):
    """{"tokens": [ids]}: the token ids to turn back into text."""
    if not isinstance(data, dict):
        raise OpenAIError("the request body must be a JSON object")
    tokens = data.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise OpenAIError("tokens must be a list of token ids", param="tokens")
    return tokens
