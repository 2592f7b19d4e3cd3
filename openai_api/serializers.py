"""Reading OpenAI request bodies into what the services need, or OpenAIError (400) naming the field.

Unknown fields are ignored, as OpenAI's clients send many. Sampling maps
onto rpserver's sampler (inference/sampling.py) with Mirostat off:

* temperature 0 (greedy) keeps only the most likely token (min_p 1);
* min_p (an extension, default 0.05) drops tokens below min_p x the top
  probability before temperature applies;
* presence_penalty 0-2: a token already used in the reply has its logit
  divided by (1 + presence_penalty) (rpserver's penalty, not OpenAI's
  subtraction; negative values are refused);
* frequency_penalty -2 to 2: OpenAI's, frequency_penalty x (times used in
  the reply) subtracted from a token's logit;
* top_p (0, 1]: the most likely tokens whose probabilities first add up to
  top_p, after min_p and temperature.
"""

import dataclasses
import math

from django.conf import settings

from inference import prompt as prompt_format
from inference.sampling import SamplingSettings

from .errors import OpenAIError

# Mirostat off: mu = 2 x tau never drops a token and rate 0 never moves it.
NO_MIROSTAT = {"tau": 1e9, "rate": 0.0}
DEFAULT_MIN_P = 0.05
MAX_STOPS = 16
CHAT_ROLES = ("system", "developer", "user", "assistant")


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


def sampling_settings(data):
    temperature = number(data, "temperature", 0.0, 2.0, 1.0)
    min_p = number(data, "min_p", 0.0, 1.0, DEFAULT_MIN_P)
    top_p = number(data, "top_p", 0.0, 1.0, 1.0, low_inclusive=False)
    frequency = number(data, "frequency_penalty", -2.0, 2.0, 0.0)
    presence = number(data, "presence_penalty", -2.0, 2.0, 0.0)
    if presence < 0:
        raise OpenAIError("presence_penalty must be in [0, 2] on rpserver (negative values are not supported)",
                          param="presence_penalty")
    if temperature == 0:  # greedy: only the most likely token survives min_p 1
        temperature, min_p = 1.0, 1.0
    return SamplingSettings(min_p=min_p, temperature=temperature, presence_penalty=presence,
                            frequency_penalty=frequency, top_p=top_p, **NO_MIROSTAT)


def stop_strings(data):
    value = data.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise OpenAIError("stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise OpenAIError(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", param="stop")
    return tuple(s for s in stops if s)


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


def reply_options(data):
    if not isinstance(data, dict):
        raise OpenAIError("the request body must be a JSON object")
    if number(data, "n", 1, 1_000_000, 1, integer=True) != 1:
        raise OpenAIError("n must be 1: rpserver generates one choice per request", param="n")
    for unsupported in ("logprobs", "echo"):
        if data.get(unsupported) not in (None, False, 0):
            raise OpenAIError(f"{unsupported} is not supported by rpserver", param=unsupported)
    if data.get("tools") or data.get("functions"):
        raise OpenAIError("tools are not supported by rpserver", param="tools")
    limit = settings.RPSERVER["MAX_REPLY_TOKENS"]
    name = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    # Longer replies than the server allows are cut at its limit (finish_reason "length").
    max_tokens = min(number(data, name, 1, 2**31, limit, integer=True), limit)
    stream_options = data.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise OpenAIError("stream_options must be an object", param="stream_options")
    seed = data.get("seed")
    if seed is not None:
        seed = number(data, "seed", -2**63, 2**64 - 1, None, integer=True) % 2**64
    return ReplyOptions(
        model=text_field(data, "model"), sampling=sampling_settings(data), max_tokens=max_tokens,
        stop=stop_strings(data), seed=seed, stream=flag(data, "stream"),
        include_usage=flag(stream_options, "include_usage"), logit_bias=logit_bias(data),
        user=text_field(data, "user"),
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
    options = reply_options(data)
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
    options = reply_options(data)
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
