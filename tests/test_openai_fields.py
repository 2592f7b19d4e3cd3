"""Every field OpenAI's SDKs and SillyTavern send, through the official `openai` client against the real server.

Each sampler field is checked to change the reply (a field the server ignored
would leave it as it was), streamed and not; the sampler's arithmetic itself
is tests/test_sampling.py's.
"""

import math
import uuid

import httpx
import openai
import pytest
from conftest import Api, Server, make_user

from inference.tokenizer import world_tokenizer
from openai_api.serializers import IGNORED, MAX_CHOICES, NEUTRAL

# A logit_bias that bans every token holding a line break: the reply cannot end its turn by itself.
NO_LINE_BREAKS = {str(token): -100 for token, piece in world_tokenizer().pieces.items() if b"\n" in piece}


@pytest.fixture(scope="module")
def fields_server():
    running = Server(env={"RPSERVER_MAX_REPLY_TOKENS": "200", "RPSERVER_REPLIES_PER_MINUTE": "1000"},
                     name="openai-fields-server").start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def key(fields_server):
    return make_user(Api(fields_server.url), "fields").token


@pytest.fixture(scope="module")
def client(fields_server, key):
    return openai.OpenAI(base_url=f"{fields_server.url}/v1", api_key=key, max_retries=0, timeout=120)


def stats(server, key):
    answer = httpx.get(f"{server.url}/v1/debug/stats", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def messages(text="Tell me about the sea."):
    """A conversation no other test sends (so no other test's cached states apply)."""
    return [{"role": "system", "content": f"You are a terse lighthouse keeper. ({uuid.uuid4().hex})"},
            {"role": "user", "content": text}]


# The chat fields the `openai` package takes as arguments; the others go in extra_body.
OPENAI_CHAT_FIELDS = {"max_tokens", "logit_bias", "temperature", "top_p", "seed", "presence_penalty",
                      "frequency_penalty", "n", "logprobs", "top_logprobs", "stop"}


def chat(client, conversation, stream=False, **fields):
    """The reply's text (the first choice's), streamed or not."""
    fields.setdefault("max_tokens", 16)
    fields.setdefault("logit_bias", NO_LINE_BREAKS)
    extra = {name: fields.pop(name) for name in list(fields) if name not in OPENAI_CHAT_FIELDS}
    if extra:
        fields["extra_body"] = extra
    if not stream:
        return client.chat.completions.create(model="rwkv", messages=conversation, **fields).choices[0].message.content
    chunks = client.chat.completions.create(model="rwkv", messages=conversation, stream=True, **fields)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# ---- sampling fields --------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_top_p_zero_and_temperature_zero_are_both_greedy(client, stream):
    conversation = messages()
    greedy = chat(client, conversation, stream=stream, temperature=0)
    assert chat(client, conversation, stream=stream, top_p=0, temperature=2.0, seed=1) == greedy
    assert chat(client, conversation, stream=stream, top_k=1, temperature=2.0, seed=1) == greedy
    # The same hot draw without top_p 0 is not greedy: the assertions above would fail if top_p were ignored.
    assert chat(client, conversation, stream=stream, temperature=2.0, seed=1) != greedy


# A field the server ignored would give the baseline's reply (same prompt, same seed).
SAMPLER_FIELDS = [
    {"temperature": 5.0},
    {"presence_penalty": -2.0},
    {"presence_penalty": 2.0},
    {"frequency_penalty": 2.0},
    {"repetition_penalty": 1.8, "repetition_penalty_range": 0},
    {"top_k": 3},
    {"typical_p": 0.3},
    {"min_p": 0.5},
    {"mirostat_mode": 2, "mirostat_tau": 1.0, "mirostat_eta": 0.5},
    {"xtc_threshold": 0.05, "xtc_probability": 1.0},
]
BASELINE = {"max_tokens": 24, "seed": 11, "temperature": 1.0, "min_p": 0.0}


@pytest.fixture(scope="module")
def baseline(client):
    """A conversation, and its reply with the baseline's settings (the same twice: the seed fixes it)."""
    conversation = messages("Say something about ships and storms.")
    reply = chat(client, conversation, **BASELINE)
    assert chat(client, conversation, stream=True, **BASELINE) == reply
    return conversation, reply


@pytest.mark.parametrize("fields", SAMPLER_FIELDS, ids=lambda f: ",".join(f))
def test_each_sampler_field_changes_the_reply(client, baseline, fields):
    conversation, reply = baseline
    assert chat(client, conversation, **{**BASELINE, **fields}) != reply


def test_the_sampler_fields_change_a_streamed_reply_alike(client, baseline):
    conversation, _ = baseline
    fields = {**BASELINE, "top_k": 5, "typical_p": 0.9, "presence_penalty": -1.0, "repetition_penalty": 1.3,
              "repetition_penalty_range": 64, "xtc_probability": 0.5, "mirostat_mode": 2}
    assert chat(client, conversation, stream=True, **fields) == chat(client, conversation, **fields)


@pytest.mark.parametrize("stream", [False, True])
def test_a_negative_seed_is_a_random_one(client, stream):
    conversation = messages()
    fixed = {chat(client, conversation, stream=stream, seed=5, temperature=1.5) for _ in range(3)}
    assert len(fixed) == 1
    random = {chat(client, conversation, stream=stream, seed=-1, temperature=1.5) for _ in range(3)}
    assert len(random) > 1


def longest_repeat(tokens):
    """The length of the longest run of tokens that also appears earlier in `tokens`."""
    best = 0
    for start in range(len(tokens)):
        for earlier in range(start):
            length = 0
            while start + length < len(tokens) and tokens[earlier + length] == tokens[start + length]:
                length += 1
            best = max(best, length)
    return best


@pytest.mark.parametrize("stream", [False, True])
def test_dry_stops_a_repetition_that_appears_without_it(client, stream):
    conversation = messages()
    # Three words far above all others: greedy, the tiny model loops on one of them.
    bias = {**NO_LINE_BREAKS, **{str(world_tokenizer().encode(word)[0]): 30 for word in (" la", " sea", " and")}}

    def reply_tokens(**fields):
        text = chat(client, conversation, stream=stream, max_tokens=48, temperature=0, logit_bias=bias, **fields)
        return world_tokenizer().encode(text)

    assert longest_repeat(reply_tokens()) >= 20
    assert longest_repeat(reply_tokens(dry_multiplier=4.0, dry_base=2.0, dry_sequence_breakers=[])) <= 6


# ---- n -----------------------------------------------------------------------------------------------


def test_n_choices_are_different_replies_from_one_read_of_the_prompt(fields_server, key, client):
    conversation = messages("Name three colours of the sky.")
    before = stats(fields_server, key)
    answer = client.chat.completions.create(model="rwkv", messages=conversation, n=3, max_tokens=12, seed=7,
                                            temperature=1.5, logit_bias=NO_LINE_BREAKS)
    after = stats(fields_server, key)
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    texts = [choice.message.content for choice in answer.choices]
    assert len(set(texts)) == 3
    usage = answer.usage
    assert usage.prompt_tokens_details.cached_tokens == 0 and usage.completion_tokens == 3 * 12
    read = after["engine"]["tokens_read"] - before["engine"]["tokens_read"]
    rereads = after["openai"]["canonical_tokens"] - before["openai"]["canonical_tokens"]
    assert read - rereads == usage.prompt_tokens  # the prompt was read once, not three times
    # Streamed, the choices come interleaved, each chunk naming its choice; the same seed, the same replies.
    chunks = list(client.chat.completions.create(model="rwkv", messages=conversation, n=3, max_tokens=12, seed=7,
                                                 temperature=1.5, logit_bias=NO_LINE_BREAKS, stream=True))
    streamed = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1, 2}
    assert [streamed[i] for i in range(3)] == texts


def test_n_has_a_maximum(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="rwkv", messages=messages(), n=MAX_CHOICES + 1)
    assert caught.value.body["param"] == "n"


def test_a_raw_completion_gives_n_choices(client):
    answer = client.completions.create(model="rwkv", prompt=f"Once upon a time {uuid.uuid4().hex}", n=2,
                                       max_tokens=10, seed=3, temperature=1.5, logit_bias=NO_LINE_BREAKS,
                                       extra_body={"min_p": 0.0})
    assert [choice.index for choice in answer.choices] == [0, 1]
    assert answer.choices[0].text != answer.choices[1].text


# ---- logprobs ----------------------------------------------------------------------------------------


def check_chat_logprobs(content, text, greedy):
    spelled = b"".join(bytes(entry.bytes) for entry in content).decode("utf-8", errors="replace")
    assert spelled.strip() == text  # the entries are the reply's tokens
    for entry in content:
        tops = entry.top_logprobs
        assert len(tops) == 5
        assert [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        assert sum(math.exp(t.logprob) for t in tops) <= 1.0 + 1e-6
        assert entry.logprob <= tops[0].logprob + 1e-6
        if greedy:  # the sampled token is the most likely one
            assert (entry.token, entry.logprob) == (tops[0].token, tops[0].logprob)
        matching = [t for t in tops if t.token == entry.token]
        assert not matching or abs(matching[0].logprob - entry.logprob) < 1e-6


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_are_the_sampled_tokens_with_the_most_likely_ones(client, stream):
    conversation = messages()
    # No logit_bias: the logprobs are the model's own distribution, so greedy picks the top one.
    request = {"model": "rwkv", "messages": conversation, "max_tokens": 10, "logprobs": True, "top_logprobs": 5,
               "temperature": 0}
    if not stream:
        answer = client.chat.completions.create(**request)
        content, text = answer.choices[0].logprobs.content, answer.choices[0].message.content
        assert len(content) >= answer.usage.completion_tokens - 1
    else:
        chunks = list(client.chat.completions.create(**request, stream=True))
        content = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content
    check_chat_logprobs(content, text, greedy=True)
    # Sampled (hot), the sampled token need not be among the top five, but never beats the first.
    hot = client.chat.completions.create(**{**request, "temperature": 2.0, "seed": 4, "logit_bias": NO_LINE_BREAKS},
                                         extra_body={"min_p": 0.0})
    check_chat_logprobs(hot.choices[0].logprobs.content, hot.choices[0].message.content, greedy=False)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_come_in_the_completions_shape(client, stream):
    request = {"model": "rwkv", "prompt": f"The lighthouse {uuid.uuid4().hex} stood", "max_tokens": 8,
               "logprobs": 3, "temperature": 0, "logit_bias": NO_LINE_BREAKS}
    if not stream:
        choice = client.completions.create(**request).choices[0]
        tokens, offsets = choice.logprobs.tokens, choice.logprobs.text_offset
        values, tops, text = choice.logprobs.token_logprobs, choice.logprobs.top_logprobs, choice.text
    else:
        chunks = [c.choices[0] for c in client.completions.create(**request, stream=True) if c.choices]
        parts = [c.logprobs for c in chunks if c.logprobs and c.logprobs.tokens]
        tokens = [t for p in parts for t in p.tokens]
        offsets = [o for p in parts for o in p.text_offset]
        values = [v for p in parts for v in p.token_logprobs]
        tops = [t for p in parts for t in p.top_logprobs]
        text = "".join(c.text for c in chunks)
    assert len(tokens) == 8 and "".join(tokens).strip() == text
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    for value, top in zip(values, tops):
        assert 1 <= len(top) <= 3 and sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-6
        assert value <= max(top.values()) + 1e-6


# ---- refused and ignored fields ----------------------------------------------------------------------


@pytest.mark.parametrize("fields, param", [
    ({"mirostat_mode": 1}, "mirostat_mode"),
    ({"top_a": 0.5}, "top_a"),
    ({"grammar_string": "root ::= \"x\""}, "grammar_string"),
    ({"echo": True}, "echo"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"dry_sequence_breakers": "not json"}, "dry_sequence_breakers"),
    ({"logprobs": 21}, "logprobs"),
])
def test_a_refused_field_gets_400_naming_it(client, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="rwkv", prompt="hi", max_tokens=2, extra_body=fields)
    assert caught.value.body["param"] == param and param in caught.value.body["message"]


# What SillyTavern 1.12's Text Completion sends in its "Default (Oobabooga)" mode with its default preset.
SILLYTAVERN_OOBABOOGA = {
    "max_new_tokens": 12, "max_tokens": 12, "logprobs": 10, "temperature": 0.7, "top_p": 0.9, "typical_p": 1,
    "typical": 1, "sampler_seed": -1, "min_p": 0, "repetition_penalty": 1.1, "frequency_penalty": 0,
    "presence_penalty": 0, "top_k": 40, "skew": 0, "min_tokens": 0, "length_penalty": 1, "early_stopping": False,
    "add_bos_token": True, "smoothing_factor": 0, "smoothing_curve": 1, "dry_allowed_length": 2,
    "dry_multiplier": 0, "dry_base": 1.75, "dry_sequence_breakers": "[\"\\n\",\":\",\"\\\"\",\"*\"]",
    "dry_penalty_last_n": 0, "max_tokens_second": 0, "stopping_strings": ["\nUser:"], "stop": ["\nUser:"],
    "truncation_length": 4096, "ban_eos_token": False, "skip_special_tokens": True, "include_reasoning": True,
    "top_a": 0, "tfs": 1, "mirostat_mode": 0, "mirostat_tau": 5, "mirostat_eta": 0.1, "custom_token_bans": "",
    "banned_strings": [], "api_type": "ooba", "api_server": "http://127.0.0.1:8000", "sampler_priority": [
        "repetition_penalty", "presence_penalty", "frequency_penalty", "dry", "temperature", "top_k", "top_p",
        "typical_p", "min_p", "mirostat", "xtc"],
    "repetition_penalty_range": 0, "encoder_repetition_penalty": 1, "no_repeat_ngram_size": 0, "penalty_alpha": 0,
    "temperature_last": True, "do_sample": True, "seed": -1, "guidance_scale": 1, "negative_prompt": "",
    "grammar_string": "", "repeat_penalty": 1.1, "tfs_z": 1, "repeat_last_n": 0, "n_predict": 12, "num_predict": 12,
    "num_ctx": 4096, "mirostat": 0, "ignore_eos": False, "rep_pen_slope": 1, "xtc_threshold": 0.1,
    "xtc_probability": 0, "nsigma": 0, "top_n_sigma": 0, "min_keep": 0, "epsilon_cutoff": 0, "eta_cutoff": 0,
    "dynamic_temperature": False, "dynatemp_low": 0.5, "dynatemp_high": 1.5, "dynatemp_exponent": 1,
}


@pytest.mark.parametrize("stream", [False, True])
def test_sillytaverns_text_completion_body_is_accepted(fields_server, key, stream):
    body = {**SILLYTAVERN_OOBABOOGA, "model": "rwkv", "stream": stream,
            "prompt": f"User: Hello there! ({uuid.uuid4().hex})\nMira:"}
    answer = httpx.post(f"{fields_server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                        timeout=60)
    assert answer.status_code == 200, answer.text
    if not stream:
        choice = answer.json()["choices"][0]
        assert choice["logprobs"]["tokens"] and len(choice["logprobs"]["top_logprobs"][0]) <= 10
    else:
        assert answer.text.rstrip().endswith("data: [DONE]")


def test_the_docs_list_every_ignored_and_neutral_only_field():
    from conftest import ROOT

    docs = (ROOT / "docs" / "openai.md").read_text()
    missing = [name for name in (*IGNORED, *NEUTRAL) if f"`{name}`" not in docs]
    assert not missing


# ---- /tokenize, /detokenize, /v1/models, unknown routes ------------------------------------------------


def test_tokenize_and_detokenize_answer_in_llama_servers_and_vllms_shapes(fields_server, key, client):
    headers = {"Authorization": f"Bearer {key}"}
    text = "Hello, Mira! 你好"
    tokens = world_tokenizer().encode(text)
    for route in ("/tokenize", "/v1/tokenize"):
        for body in ({"content": text}, {"model": "rwkv", "prompt": text}):
            answer = httpx.post(f"{fields_server.url}{route}", json=body, headers=headers)
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"tokens": tokens, "count": len(tokens), "max_model_len": 65536}
    pieces = httpx.post(f"{fields_server.url}/tokenize", json={"content": "Hello", "with_pieces": True},
                        headers=headers).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hello" and [p["id"] for p in pieces] == world_tokenizer().encode("Hello")
    # A chat's messages: the tokens the chat completion reads, as its usage counts them.
    conversation = messages()
    counted = httpx.post(f"{fields_server.url}/tokenize", json={"messages": conversation}, headers=headers).json()
    answer = client.chat.completions.create(model="rwkv", messages=conversation, max_tokens=1)
    assert counted["count"] == answer.usage.prompt_tokens
    back = httpx.post(f"{fields_server.url}/detokenize", json={"tokens": tokens}, headers=headers).json()
    assert back == {"content": text, "prompt": text}


@pytest.mark.parametrize("route, body, status, param", [
    ("/tokenize", {"content": 3}, 400, "content"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/v1/embeddings", {"input": "x"}, 404, None),
    ("/v1/audio/speech", {}, 404, None),
])
def test_these_routes_answer_errors_in_openais_shape(fields_server, key, route, body, status, param):
    answer = httpx.post(f"{fields_server.url}{route}", json=body, headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == status
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    unauthorised = httpx.post(f"{fields_server.url}/tokenize", json={"content": "x"})
    assert unauthorised.status_code == 401 and "error" in unauthorised.json()


def test_models_report_the_context_window(client):
    model = client.models.list().data[0]
    assert model.max_model_len == model.context_length == model.meta["n_ctx_train"] == 65536


# ---- the access log ----------------------------------------------------------------------------------


def access_lines(server, marker):
    return [line.split("rpserver.access: ", 1)[1] for line in server.log().splitlines()
            if "rpserver.access: " in line and marker in line]


def test_every_request_and_every_refusal_gets_one_access_log_line(fields_server):
    from django.contrib.auth import get_user_model

    from accounts.services import issue_api_key

    name = f"logged-{uuid.uuid4().hex[:8]}"
    user = get_user_model().objects.create_user(username=name, password="secret-pw")
    key = issue_api_key(user, name="tavern")
    logged = openai.OpenAI(base_url=f"{fields_server.url}/v1", api_key=key, max_retries=0)
    answer = logged.chat.completions.create(model="rwkv", messages=messages(), max_tokens=3,
                                            logit_bias=NO_LINE_BREAKS)
    with pytest.raises(openai.BadRequestError):
        logged.completions.create(model="rwkv", prompt="hi", extra_body={"top_a": 0.5})
    lines = access_lines(fields_server, f"user={name}")
    # The line is written before the answer's last byte goes out: both are there once each.
    assert len(lines) == 2, lines
    usage = answer.usage
    assert lines[0].startswith(f"POST /v1/chat/completions 200 user={name} key=tavern prompt={usage.prompt_tokens} "
                               f"cached={usage.prompt_tokens_details.cached_tokens} generated=3 ms=")
    assert lines[1].startswith(f"POST /v1/completions 400 user={name} key=tavern ms=")
    assert 'error="top_a is not supported by rpserver' in lines[1]
    # A refusal before any route (the pipeline's): the path and the status.
    marker = f"/v1/nowhere-{uuid.uuid4().hex}"
    httpx.post(f"{fields_server.url}{marker}", content=b"{bad json", headers={"content-type": "application/json"})
    assert len(access_lines(fields_server, f"POST {marker} 400 - ms=")) == 1


# ---- the cache for raw completions ---------------------------------------------------------------------


def test_a_story_re_sent_with_more_at_its_end_resumes_from_its_last_checkpoint(client):
    from openai_api.services import CHECKPOINT_SPACING

    story = f"{uuid.uuid4().hex} " + "The keeper climbed the stairs and lit the lamp again. " * 60
    first = client.completions.create(model="rwkv", prompt=story, max_tokens=2, logit_bias=NO_LINE_BREAKS)
    assert first.usage.prompt_tokens > 2 * CHECKPOINT_SPACING + 8
    longer = client.completions.create(model="rwkv", prompt=story + "Then she wrote in her logbook.",
                                       max_tokens=2, logit_bias=NO_LINE_BREAKS)
    # Everything up to the last checkpoint inside the first prompt was cached.
    last_mark = (first.usage.prompt_tokens - 2) // CHECKPOINT_SPACING * CHECKPOINT_SPACING
    assert longer.usage.prompt_tokens_details.cached_tokens == last_mark
