"""The OpenAI-compatible API (/v1/), driven by the official `openai` client against the real server."""

import json
import uuid
from contextlib import contextmanager

import httpx
import openai
import pytest
from conftest import UNTIL_THE_READER_LEAVES, Api, Server, make_user, wait_for

from inference.tokenizer import world_tokenizer
from openai_api.services import CHECKPOINT_SPACING, chat_prompt

# A logit_bias that bans every token holding a line break: the reply cannot end its turn by itself.
NO_LINE_BREAKS = {str(token): -100 for token, piece in world_tokenizer().pieces.items() if b"\n" in piece}


@pytest.fixture(scope="module")
def oa_server():
    """A server whose replies run until their reader leaves when they never end their turn (see
    running_completion): every other request here gives its max_tokens."""
    running = Server(env={**UNTIL_THE_READER_LEAVES, "RPSERVER_REPLIES_PER_MINUTE": "1000",
                          "RPSERVER_OPENAI_MAX_PROMPT_TOKENS": "2000"},
                     name="openai-server").start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def key(oa_server):
    return make_user(Api(oa_server.url), "oa").token


@pytest.fixture(scope="module")
def client(oa_server, key):
    return openai.OpenAI(base_url=f"{oa_server.url}/v1", api_key=key, max_retries=0, timeout=120)


def stats(oa_server, key):
    answer = httpx.get(f"{oa_server.url}/v1/debug/stats", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    return answer.json()


@contextmanager
def running_completion(url, key, content="Speak at length."):
    """A streamed chat completion on `url` with `key`'s account, begun: a first piece of its reply has
    come, so it is in the engine's batch. It never ends its turn (no line break can be written) and
    asks for as many tokens as the server allows, so on oa_server it runs until the block ends and
    this reader leaves. Yields the rest of its lines."""
    body = {"model": "rwkv", "stream": True, "max_tokens": 2**31 - 1, "logit_bias": NO_LINE_BREAKS,
            "messages": [system(), {"role": "user", "content": content}]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=120) as answer:
        assert answer.status_code == 200, answer.read()
        lines = answer.iter_lines()  # (kept until the block ends: a dropped iterator closes the stream)
        for line in lines:
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        else:
            raise AssertionError("the stream ended before its first words")
        yield lines


def until_engine_idle(oa_server, key):
    """The engine's stats once no job is in it or waiting (a reply whose reader left is cancelled
    soon, not at once)."""
    def idle():
        engine = stats(oa_server, key)["engine"]
        return engine if not engine["running"] and not engine["waiting"] else None

    return wait_for(idle, "the engine to finish its jobs")


def system(text="You are a terse lighthouse keeper."):
    """A system message no other test sends (so no other test's cached states apply)."""
    return {"role": "system", "content": f"{text} ({uuid.uuid4().hex})"}


def chat(client, messages, **fields):
    fields.setdefault("max_tokens", 8)
    return client.chat.completions.create(model="rwkv", messages=messages, **fields)


def test_it_lists_the_served_model(client):
    models = client.models.list().data
    assert len(models) == 1
    assert models[0].id == "tiny-rwkv7" and models[0].owned_by == "rpserver"


def test_a_chat_completion_answers_with_the_reply_and_its_usage(client):
    messages = [system(), {"role": "user", "content": "Hello there!"}]
    answer = chat(client, messages, max_tokens=6, seed=1)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    tokens, _ = chat_prompt([("System", messages[0]["content"]), ("User", "Hello there!")], "Assistant")
    assert answer.usage.prompt_tokens == len(tokens)
    assert answer.usage.prompt_tokens_details.cached_tokens == 0
    assert 1 <= answer.usage.completion_tokens <= 6
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_a_streamed_chat_completion_comes_in_chunks_that_add_up_to_the_reply(client):
    messages = [system(), {"role": "user", "content": "Tell me about the sea."}]
    chunks = list(chat(client, messages, max_tokens=10, seed=5, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = chat(client, messages, max_tokens=10, seed=5)
    assert streamed == whole.choices[0].message.content


def test_a_stream_is_server_sent_events_ending_with_done(oa_server, key):
    body = {"model": "rwkv", "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", f"{oa_server.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=60) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        raw = answer.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_max_tokens_cuts_the_reply_with_finish_reason_length(client):
    answer = chat(client, [system(), {"role": "user", "content": "Talk."}], max_tokens=3, seed=2)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 3


def test_the_same_seed_gives_the_same_reply(client):
    messages = [system(), {"role": "user", "content": "Say something."}]
    first = chat(client, messages, max_tokens=12, seed=42, temperature=1.5)
    second = chat(client, messages, max_tokens=12, seed=42, temperature=1.5)
    assert first.choices[0].message.content == second.choices[0].message.content
    others = {chat(client, messages, max_tokens=12, seed=s, temperature=1.5).choices[0].message.content
              for s in (1, 2, 3)}
    assert len(others | {first.choices[0].message.content}) > 1


def test_a_stop_string_ends_the_reply_before_it(client):
    messages = [system(), {"role": "user", "content": "Go on."}]
    free = chat(client, messages, max_tokens=12, temperature=0, logit_bias=NO_LINE_BREAKS)
    assert free.choices[0].finish_reason == "length"
    free = free.choices[0].message.content
    assert len(free) >= 4, free
    stop = free[2:4]
    cut = chat(client, messages, max_tokens=12, temperature=0, logit_bias=NO_LINE_BREAKS, stop=[stop, "never-written"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == free[:free.index(stop)].strip()


def test_a_raw_completion_continues_the_prompt(client):
    answer = client.completions.create(model="rwkv", prompt="The lighthouse stood", max_tokens=5, seed=3)
    assert answer.object == "text_completion" and answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens == len(prompt_format_tokens("The lighthouse stood"))
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="rwkv", prompt="The lighthouse stood", max_tokens=5, seed=3, stream=True))
    assert streamed == answer.choices[0].text


def prompt_format_tokens(text):
    from inference.tokenizer import world_tokenizer

    return world_tokenizer().encode(text)


def test_a_wrong_key_gets_401_in_openai_shape(oa_server):
    bad = openai.OpenAI(base_url=f"{oa_server.url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model="rwkv", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401
    error = caught.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
    answer = httpx.get(f"{oa_server.url}/v1/models")
    assert answer.status_code == 401 and "Authorization: Bearer" in answer.json()["error"]["message"]


@pytest.mark.parametrize("fields, param, words", [
    ({"temperature": 5.5}, "temperature", "temperature must be in [0, 5]"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be in [1"),
    ({"n": 9}, "n", "n must be in [1, 8]"),
    ({"top_p": 1.5}, "top_p", "top_p must be in [0, 1]"),
    ({"frequency_penalty": 3}, "frequency_penalty", "frequency_penalty must be in [-2, 2]"),
    ({"stop": [1, 2]}, "stop", "stop must be a string or a list of strings"),
    ({"messages": []}, "messages", "messages must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "role must be one of"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", "only text"),
    ({"messages": [{"role": "user", "content": "many words " * 1500}]}, "messages", "this server reads at most 2000"),
])
def test_a_bad_field_gets_400_naming_it(client, fields, param, words):
    request = {"model": "rwkv", "messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**request)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param and words in caught.value.body["message"]
    assert caught.value.body["type"] == "invalid_request_error"


def test_a_body_that_is_not_json_and_an_unknown_route_get_openai_errors(oa_server, key):
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    answer = httpx.post(f"{oa_server.url}/v1/chat/completions", content=b"{not json", headers=headers)
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]["message"]
    answer = httpx.post(f"{oa_server.url}/v1/embeddings", json={}, headers=headers)
    assert answer.status_code == 404 and answer.json()["error"]["message"].startswith("no such route")


def test_a_client_that_disconnects_frees_the_engine(oa_server, key, client):
    before = until_engine_idle(oa_server, key)["tokens_generated"]
    with running_completion(oa_server.url, key):
        assert stats(oa_server, key)["engine"]["running"] == 1
    # Its reader left: the reply is cancelled, and the engine generates nothing more.
    engine = until_engine_idle(oa_server, key)
    assert engine["tokens_generated"] > before
    assert stats(oa_server, key)["engine"]["tokens_generated"] == engine["tokens_generated"]
    assert "cancelled" in oa_server.log()


def test_a_conversation_re_sent_whole_each_turn_reads_only_its_new_tokens(oa_server, key, client):
    messages = [system("You are Mira, a lighthouse keeper.")]
    turns = [("System", messages[0]["content"])]
    for turn in range(10):
        user_text = f"Turn {turn}: what do you see on the water tonight?"
        messages.append({"role": "user", "content": user_text})
        turns.append(("User", user_text))
        before = stats(oa_server, key)
        answer = chat(client, messages, max_tokens=10, seed=turn)
        after = stats(oa_server, key)
        tokens, ends = chat_prompt(turns, "Assistant")
        usage = answer.usage
        assert usage.prompt_tokens == len(tokens)
        # Everything up to the end of the previous reply was cached; only the new user turn is read.
        assert usage.prompt_tokens_details.cached_tokens == (ends[-2] if turn else 0)
        read = after["engine"]["tokens_read"] - before["engine"]["tokens_read"]
        rereads = after["openai"]["canonical_tokens"] - before["openai"]["canonical_tokens"]
        assert read == usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens + rereads
        if turn:
            assert read - rereads == len(tokens) - ends[-2] < 40
        reply = answer.choices[0].message.content
        messages.append({"role": "assistant", "content": reply})
        turns.append(("Assistant", reply))
    assert ends[-1] > 150  # by then, re-reading everything would cost several times the new turn


def test_an_edit_or_a_regenerate_reads_from_the_longest_cached_prefix(client):
    messages = [system(), {"role": "user", "content": "First question?"}]
    first = chat(client, messages, seed=1).choices[0].message.content
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "Second question?"}]
    answer = chat(client, messages, seed=2)
    tokens, ends = chat_prompt([("System", messages[0]["content"]), ("User", "First question?"),
                                ("Assistant", first), ("User", "Second question?")], "Assistant")
    regenerated = chat(client, messages, seed=3)
    assert regenerated.usage.prompt_tokens_details.cached_tokens == len(tokens) - 1
    messages[-1] = {"role": "user", "content": "An edited second question?"}
    edited = chat(client, messages, seed=4)
    assert edited.usage.prompt_tokens_details.cached_tokens == ends[2]
    del messages[1:]
    messages.append({"role": "user", "content": "A different first question?"})
    assert chat(client, messages, seed=5).usage.prompt_tokens_details.cached_tokens == ends[0]
    assert answer.usage.prompt_tokens_details.cached_tokens == ends[2]


def test_a_long_message_changed_at_its_end_is_read_from_its_last_checkpoint(client):
    # A story pasted as one message (~700 tokens), then re-sent with its last sentence changed: the
    # states kept every CHECKPOINT_SPACING tokens inside it serve the second request. (Message ends
    # alone would give only the system prompt's end.)
    story = " ".join(f"Day {day}: the lamp was lit at dusk and the ships passed safely." for day in range(50))
    messages = [system(), {"role": "user", "content": story + " The end."}]
    chat(client, messages, max_tokens=2)
    messages[1] = {"role": "user", "content": story + " But then a storm came."}
    answer = chat(client, messages, max_tokens=2)
    first, ends = chat_prompt([("System", messages[0]["content"]), ("User", story + " The end.")], "Assistant")
    second, _ = chat_prompt([("System", messages[0]["content"]), ("User", messages[1]["content"])], "Assistant")
    shared = next(n for n, (a, b) in enumerate(zip(first, second)) if a != b)
    checkpoint = shared // CHECKPOINT_SPACING * CHECKPOINT_SPACING
    assert ends[0] < checkpoint < ends[1] and ends[1] - ends[0] > 2 * CHECKPOINT_SPACING
    assert answer.usage.prompt_tokens_details.cached_tokens == checkpoint


def test_two_users_share_only_a_token_for_token_identical_prefix(oa_server, client):
    other = openai.OpenAI(base_url=f"{oa_server.url}/v1", api_key=make_user(Api(oa_server.url), "ob").token,
                          max_retries=0)
    shared = system("A shared character card.")
    chat(client, [shared, {"role": "user", "content": "Hi!"}])
    same = chat(other, [shared, {"role": "user", "content": "Hello!"}])
    tokens, ends = chat_prompt([("System", shared["content"])], "Assistant")
    assert same.usage.prompt_tokens_details.cached_tokens == ends[0]
    different = chat(other, [{**shared, "content": shared["content"].replace("card", "cards")},
                             {"role": "user", "content": "Hi!"}])
    assert different.usage.prompt_tokens_details.cached_tokens == 0


def test_names_name_the_speakers(client):
    messages = [system(), {"role": "user", "name": "Ann", "content": "Hi Mira.\n\n\nHow are you?"},
                {"role": "assistant", "name": "Mira", "content": "Fine."},
                {"role": "user", "name": "Ann", "content": "Good."}]
    answer = chat(client, messages)
    tokens, _ = chat_prompt([("System", messages[0]["content"]), ("Ann", "Hi Mira.\nHow are you?"),
                             ("Mira", "Fine."), ("Ann", "Good.")], "Mira")
    assert answer.usage.prompt_tokens == len(tokens)


def test_clients_of_different_users_share_the_batch(oa_server, key):
    keys = [make_user(Api(oa_server.url), f"c{i}").token for i in range(4)]
    until_engine_idle(oa_server, key)
    with running_completion(oa_server.url, keys[0], "Client 0"), running_completion(oa_server.url, keys[1], "Client 1"), \
            running_completion(oa_server.url, keys[2], "Client 2"), running_completion(oa_server.url, keys[3], "Client 3"):
        # All four are in the batch (each has written), and stay until their readers leave:
        # every pass from here on reads one row for each.
        begun = stats(oa_server, key)["engine"]["steps"]

        def two_passes_later():
            engine = stats(oa_server, key)["engine"]
            return engine if engine["steps"] >= begun + 2 else None

        engine = wait_for(two_passes_later, "two more forward passes")
    assert engine["running"] == 4 and engine["waiting"] == 0
    assert engine["last_batch_size"] == 4


def test_one_user_gets_at_most_their_share_of_the_engine(oa_server):
    key = make_user(Api(oa_server.url), "share").token
    # Both are running (RPSERVER_MAX_REPLIES_PER_USER=2, the default) until the block ends.
    with running_completion(oa_server.url, key), running_completion(oa_server.url, key):
        third = httpx.post(f"{oa_server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": "rwkv", "max_tokens": 4, "messages": [system(), {"role": "user", "content": "hi"}]},
                           timeout=60)
    assert third.status_code == 429
    error = third.json()["error"]
    assert error["type"] == "rate_limit_error" and "replies being generated" in error["message"]


def test_top_p_and_frequency_penalty_are_used(client):
    # SillyTavern's and most clients' presets send both.
    request = {"model": "rwkv", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "seed": 3}
    nucleus = client.chat.completions.create(**request, top_p=0.01)
    greedy = client.chat.completions.create(**request, temperature=0)
    assert nucleus.choices[0].message.content == greedy.choices[0].message.content  # only the top token
    # Greedy replies (deterministic) with " sea" favoured by 20 (a logit's own spread is a few units):
    # alone, it is the whole reply; with a strong frequency penalty (2 per use) it wins only until its
    # uses have cost about its favour, at most ~10 times, and other tokens come in between (the
    # arithmetic: test_sampling.py).
    sea = world_tokenizer().encode(" sea")[0]
    request = {**request, "max_tokens": 24, "temperature": 0, "logit_bias": {**NO_LINE_BREAKS, str(sea): 20}}
    plain = client.chat.completions.create(**request).choices[0].message.content
    penalised = client.chat.completions.create(**request, frequency_penalty=2).choices[0].message.content
    assert plain == " ".join(["sea"] * 24)
    assert penalised.startswith("sea") and penalised.count("sea") <= 12, penalised
