"""The conversation tree's REST API (/api/v1/chats/...): swipes, switches, edits, deletes and undo,
forks, continue, Stop, impersonate, on the real server and the random-weight model.

After every operation the property test checks the two invariants of
docs/conversation-tree.md: what the model has read (/debug/token) is exactly
the current path's tokens, in the documented format, and every state kept
for a round of the path equals the state read from scratch from that text.
"""

import asyncio
import collections
import json
import random
import signal
import threading

import httpx
import pytest

from chat.models import Conversation, Round
from chat.services import BUSY
from chat.tree import path_of
from conftest import CHARACTER, ENDLESS_MODEL, Api, Server, assert_same_state, server_precision
from inference.runtime import get_engine
from statecache.blobs import load_state

HEADER = "friend: How are you?\n\nMira: Fine, thank you.\n\nMira is a calm lighthouse keeper who talks to friend.\n\nMira:"


class TreeApi:
    """A client of the REST API for one person, with the legacy Api beside it."""

    def __init__(self, legacy):
        self.legacy = legacy
        self.http = httpx.Client(base_url=legacy.url, timeout=120,
                                 headers={"Authorization": f"Token {legacy.token}"})

    def get(self, route):
        answer = self.http.get(route)
        return answer.status_code, answer.json()

    def post(self, route, **fields):
        answer = self.http.post(route, data=fields)
        return answer.status_code, answer.json()

    def ok(self, route, **fields):
        status, body = self.post(route, **fields) if fields or not route.endswith(("chats", "context")) \
            else self.get(route)
        assert (status, body["code"]) == (200, 200), body
        return body["data"]

    def chat(self, chat_id):
        status, body = self.get(f"/api/v1/chats/{chat_id}")
        assert status == 200, body
        return body["data"]

    def main_chat(self, character="Mira"):
        status, body = self.get(f"/api/v1/chats?character={character}")
        assert status == 200, body
        return body["data"]["chats"][0]["id"]

    def stream(self, route, **fields):
        """(frames, None) or (None, envelope)."""
        with self.http.stream("POST", route, data=fields) as answer:
            raw = answer.read().decode()
            if answer.headers["content-type"].startswith("application/json"):
                return None, json.loads(raw)
        return raw.split("\n\ndata: ")[1:], None

    def stop_after_first_frame(self, route, **fields):
        """Start a stream and go away once its first frame came (Stop); the frames seen."""
        with self.http.stream("POST", route, data=fields) as answer:
            if answer.headers["content-type"].startswith("application/json"):
                return None
            seen = b""
            for chunk in answer.iter_raw():
                seen += chunk
                if b"data: " in seen:
                    break
        return seen.decode(errors="replace").split("\n\ndata: ")[1:]

    def when_free(self, call):
        """Run `call()` (-> (status, body)) until the chat's lock is free again: a stopped stream's
        server side stores what it wrote before it lets go (answers "busy" until then)."""
        for _ in range(1200):
            status, body = call()
            if not (status == 400 and "already being generated" in body.get("message", "")):
                return status, body
            threading.Event().wait(0.05)  # a poll's pace, not a synchronisation: the answer decides
        raise AssertionError("the chat stayed busy for a minute")


@pytest.fixture
def tree(mira):
    return TreeApi(mira)


def messages(view):
    return [(m["role"], m["text"]) for m in view["messages"]]


def current_path(chat_id):
    return path_of(Conversation.objects.get(pk=chat_id))


def assert_invariants(tree, chat_id):
    """The context is exactly the path's text, in the documented format; every stored state of the
    path equals the state read from scratch from its text."""
    path = current_path(chat_id)
    tokens = [t for round_ in path for t in round_.token_list]
    context = tree.ok(f"/api/v1/chats/{chat_id}/context")
    engine = get_engine()
    assert context == {"token_count": len(tokens), "token_state": engine.tokenizer.decode(tokens)}
    text = context["token_state"]
    assert text.startswith(HEADER)
    position = len(HEADER)
    for round_ in path[1:]:  # the documented format: "<User>: <prompt>\n\n<Bot>: <reply>\n\n"
        turn = f"\n\nfriend: {round_.user_text}\n\nMira:"
        position = text.index(turn, position - 2) + len(turn)
        if round_.has_reply:
            assert round_.bot_text in text[position:]  # (a generated reply may start without a space)
    assert text.endswith("\n\n") or not path[-1].has_reply
    backend = engine.backend
    read, compared = 0, 0
    for round_ in path:
        start, read = read, read + len(round_.token_list)
        for field, upto in (("pre_state", start + round_.reply_start - 1), ("post_state", read)):
            name = getattr(round_, field).name
            if name and round_.state_model == backend.model_id:
                kept = load_state(name, backend)
                assert kept is not None, (round_.pk, field)
                from_scratch = asyncio.run(engine.read(None, tokens[:upto]))[0]
                assert_same_state(kept, from_scratch, server_precision())
                compared += 1
    return compared


def test_a_swipe_on_an_old_message_keeps_the_old_branch_and_switching_back_reads_nothing(tree, server):
    chat_id = tree.main_chat()
    for prompt in ("one", "two", "three"):
        tree.legacy.reply("Mira", prompt)
    view = tree.chat(chat_id)
    first_reply = view["messages"][2]  # greeting, "one", its reply
    assert (first_reply["role"], first_reply["position"], len(first_reply["alternatives"])) == ("character", 1, 1)
    frames, error = tree.stream(f"/api/v1/chats/{chat_id}/swipe", round=first_reply["round"])
    assert error is None and frames
    view = tree.chat(chat_id)
    assert messages(view)[:2] == [("character", "Hi friend! I'm Mira."), ("user", "one")]
    assert messages(view)[2] == ("character", frames[-1]) and len(view["messages"]) == 3
    assert view["messages"][2]["position"] == 2 and len(view["messages"][2]["alternatives"]) == 2
    assert_invariants(tree, chat_id)
    stats = httpx.get(f"{server.url}/v1/debug/stats", headers={"Authorization": f"Bearer {tree.legacy.token}"})
    read_before = stats.json()["engine"]["tokens_read"]
    view = tree.ok(f"/api/v1/chats/{chat_id}/switch", round=first_reply["round"])
    assert [text for _, text in messages(view)][1:] == ["one", first_reply["text"], "two", view["messages"][4]["text"],
                                                        "three", view["messages"][6]["text"]]
    stats = httpx.get(f"{server.url}/v1/debug/stats", headers={"Authorization": f"Bearer {tree.legacy.token}"})
    assert stats.json()["engine"]["tokens_read"] == read_before  # switching read no token
    assert tree.legacy.chat("Mira")[1:] == [["one", first_reply["text"]], ["two", view["messages"][4]["text"]],
                                            ["three", view["messages"][6]["text"]]]
    assert_invariants(tree, chat_id)
    # Every round on the path remembers where it went last: back to the greeting, then a switch to it
    # follows the long branch again (not the newer, shorter one).
    long_path = tree.legacy.chat("Mira")
    tree.legacy.ok("/chat/back", character_name="Mira", log_index=0)
    view = tree.ok(f"/api/v1/chats/{chat_id}/switch", round=view["messages"][0]["round"])
    assert tree.legacy.chat("Mira") == long_path


def test_edits_deletes_undo_and_forks(tree):
    chat_id = tree.main_chat()
    tree.legacy.reply("Mira", "hello")
    tree.legacy.reply("Mira", "how are you")
    view = tree.chat(chat_id)
    hello = view["messages"][1]
    view = tree.ok(f"/api/v1/chats/{chat_id}/edit", round=hello["round"], role="user", text="good evening")
    assert messages(view)[1:] == [("user", "good evening"), ("character", "")]
    assert view["messages"][1]["position"] == 2 and view["messages"][2]["pending"]
    assert tree.legacy.chat("Mira")[1:] == [["good evening", ""]]
    assert tree.post(f"/api/v1/chats/{chat_id}/reply", prompt="x")[1]["message"].startswith("the last message is yours")
    frames, _ = tree.stream(f"/api/v1/chats/{chat_id}/swipe", round=view["messages"][1]["round"])
    assert tree.legacy.chat("Mira")[1:] == [["good evening", frames[-1]]]
    assert_invariants(tree, chat_id)
    view = tree.ok(f"/api/v1/chats/{chat_id}/edit", round=view["messages"][2]["round"], role="character",
                   text="  The lamp is lit.  ")
    assert messages(view)[2] == ("character", "The lamp is lit.") and view["messages"][2]["position"] == 2
    assert tree.ok(f"/api/v1/chats/{chat_id}/context")["token_state"].endswith(
        "friend: good evening\n\nMira: The lamp is lit.\n\n")
    assert_invariants(tree, chat_id)
    # Delete the person's message and what follows; undo brings it back until another change.
    view = tree.ok(f"/api/v1/chats/{chat_id}/delete", round=view["messages"][1]["round"])
    assert messages(view) == [("character", "Hi friend! I'm Mira.")] and view["can_undo"]
    view = tree.ok(f"/api/v1/chats/{chat_id}/undo")
    assert messages(view)[1:] == [("user", "good evening"), ("character", "The lamp is lit.")]
    assert tree.post(f"/api/v1/chats/{chat_id}/undo")[1]["message"] == "there is nothing to undo"
    assert tree.post(f"/api/v1/chats/{chat_id}/delete", round=view["messages"][0]["round"])[0] == 400
    # A fork shares the original's stored states: no blob is copied.
    fork = tree.ok(f"/api/v1/chats/{chat_id}/fork", round=view["messages"][2]["round"])
    assert fork["is_fork"] and fork["forked_from"] == chat_id and messages(fork) == messages(view)
    original_blobs = {r.post_state.name for r in current_path(chat_id) if r.post_state}
    fork_blobs = {r.post_state.name for r in current_path(fork["id"]) if r.post_state}
    assert fork_blobs and fork_blobs == original_blobs
    tree.stream(f"/api/v1/chats/{fork['id']}/reply", prompt="only in the fork")
    assert len(tree.chat(fork["id"])["messages"]) == 5 and len(tree.chat(chat_id)["messages"]) == 3
    assert_invariants(tree, fork["id"])
    assert_invariants(tree, chat_id)
    tree.ok(f"/api/v1/chats/{fork['id']}/discard")
    assert tree.get(f"/api/v1/chats/{fork['id']}")[0] == 404
    assert_invariants(tree, chat_id)  # the shared blobs stayed with the original


def test_continue_extends_a_reply_and_impersonate_drafts_without_storing(tree):
    chat_id = tree.main_chat()
    tree.legacy.reply("Mira", "tell me")
    view = tree.ok(f"/api/v1/chats/{chat_id}/edit", round=tree.chat(chat_id)["messages"][2]["round"],
                   role="character", text="Once upon a time")
    frames, _ = tree.stream(f"/api/v1/chats/{chat_id}/continue", round=view["messages"][2]["round"])
    continued = tree.chat(chat_id)["messages"][2]
    assert continued["text"].startswith("Once upon a time") and continued["position"] == 3
    assert frames[0].startswith("Once upon a time")
    assert_invariants(tree, chat_id)
    context = tree.ok(f"/api/v1/chats/{chat_id}/context")
    frames, _ = tree.stream(f"/api/v1/chats/{chat_id}/impersonate")
    assert frames is not None
    assert tree.ok(f"/api/v1/chats/{chat_id}/context") == context


def test_bad_requests_get_clear_errors(tree, bob):
    chat_id = tree.main_chat()
    assert tree.post(f"/api/v1/chats/{chat_id}/switch")[1]["message"] == "missing parameter: round"
    assert tree.post(f"/api/v1/chats/{chat_id}/switch", round="x")[1]["message"] == "round: A valid integer is required."
    assert tree.post(f"/api/v1/chats/{chat_id}/switch", round=10**9) == (
        404, {"data": None, "message": "round does not exist in this chat", "code": 404})
    assert tree.post(f"/api/v1/chats/{chat_id}/edit", round=1, role="narrator", text="x")[1]["message"] == \
        'role: "narrator" is not a valid choice.'
    other = TreeApi(bob)
    assert other.get(f"/api/v1/chats/{chat_id}") == (404, {"data": None, "message": "chat does not exist",
                                                          "code": 404})
    frames, error = other.stream(f"/api/v1/chats/{chat_id}/swipe", round=1)
    assert error == {"data": None, "message": "chat does not exist", "code": 404}
    assert tree.get(f"/api/v1/chats?character=Nobody")[1]["message"] == "character does not exist"


def test_random_sequences_of_operations_keep_the_context_and_the_states_exact(tree):
    rng = random.Random(19)
    chats = [tree.main_chat()]
    applied = collections.Counter()
    for step in range(60):
        chat_id = chats[0] if rng.random() < 0.5 else rng.choice(chats)  # the main chat has back and reset too
        view = tree.chat(chat_id)
        path = view["messages"]
        pick = rng.choice(path)
        characters = [m for m in path if m["role"] == "character"]
        op = rng.choice(["reply", "reply", "swipe", "switch", "switch", "edit", "delete", "undo", "fork",
                         "continue", "stop", "back", "reset"])
        base = f"/api/v1/chats/{chat_id}"
        if op == "reply":
            frames, error = tree.stream(f"{base}/reply", prompt=f"turn {step}")
            assert frames is not None or error["message"].startswith("the last message is yours")
        elif op == "swipe":
            frames, error = tree.stream(f"{base}/swipe", round=rng.choice(characters)["round"])
            assert error is None
        elif op == "switch":
            alternatives = [m for m in path if len(m["alternatives"]) > 1]
            target = rng.choice(alternatives) if alternatives else pick
            tree.ok(f"{base}/switch", round=rng.choice(target["alternatives"]))
        elif op == "edit":
            role = "character" if pick["role"] == "character" or rng.random() < 0.5 else "user"
            if role == "user" and pick["role"] != "user":
                users = [m for m in path if m["role"] == "user"]
                if not users:
                    continue
                pick = rng.choice(users)
            tree.ok(f"{base}/edit", round=pick["round"], role=role, text=f"edited {step}")
        elif op == "delete":
            users = [m for m in path if m["role"] == "user"]
            if not users:
                continue
            tree.ok(f"{base}/delete", round=rng.choice(users)["round"])
        elif op == "undo":
            status, body = tree.post(f"{base}/undo")
            assert status == 200 or body["message"] == "there is nothing to undo"
        elif op == "fork":
            chats.append(tree.ok(f"{base}/fork", round=rng.choice(path)["round"])["id"])
        elif op == "continue":
            target = rng.choice(characters)
            if not target["text"]:
                continue
            frames, error = tree.stream(f"{base}/continue", round=target["round"])
            assert error is None
        elif op == "stop":
            target = rng.choice(characters)
            tree.stop_after_first_frame(f"{base}/swipe", round=target["round"])
            tree.when_free(lambda: tree.post(f"{base}/undo"))  # a change that waits for the stored partial
        elif op == "back":
            if chat_id != chats[0]:
                continue
            rounds = len(tree.legacy.chat("Mira"))
            tree.legacy.ok("/chat/back", character_name="Mira", log_index=rng.randrange(rounds))
        elif op == "reset":
            if chat_id != chats[0]:
                continue
            tree.legacy.ok("/chat/reset", character_name="Mira")
        applied[op] += 1
        applied["states compared"] += assert_invariants(tree, chat_id)
        if chat_id == chats[0]:  # the legacy API's rounds are the current path
            shown = tree.chat(chat_id)["messages"]
            pairs = [[None, shown[0]["text"]]] + [[shown[i]["text"], shown[i + 1]["text"]]
                                                  for i in range(1, len(shown), 2)]
            assert tree.legacy.chat("Mira") == pairs
    assert applied["states compared"] > 30
    # Every kind of change ran (the seed is fixed, so this holds by construction).
    assert set(applied) - {"states compared"} == {"reply", "swipe", "switch", "edit", "delete", "undo", "fork",
                                                  "continue", "stop", "back", "reset"}, applied


# ---- Stop, two changes at once, a crash: on a server whose replies run until stopped ----


@pytest.fixture(scope="module")
def long_server():
    running = Server(model=ENDLESS_MODEL, env={"RPSERVER_MAX_REPLY_TOKENS": "1000"}, name="tree-long").start()
    yield running
    running.stop()


def long_tree(long_server):
    legacy = Api(long_server.url)
    data = legacy.ok("/login/tmp")
    legacy = Api(long_server.url, data["user_name"], data["token"])
    legacy.ok("/characters/save", **CHARACTER)
    legacy.chat("Mira")
    return TreeApi(legacy)


def test_stop_keeps_the_partial_reply_ready_to_continue_and_a_second_change_is_told_busy(long_server):
    tree = long_tree(long_server)
    chat_id = tree.main_chat()
    with tree.http.stream("POST", f"/api/v1/chats/{chat_id}/reply", data={"prompt": "tell me everything"}) as answer:
        chunks, seen = answer.iter_raw(), b""  # (kept: a dropped iterator closes the stream)
        while seen.count(b"data: ") < 2:
            seen += next(chunks)
        # While the reply runs, another change to the chat is refused at once, with a clear message.
        greeting = tree.chat(chat_id)["messages"][0]["round"]
        assert tree.post(f"/api/v1/chats/{chat_id}/edit", round=greeting, role="character", text="x") == (
            400, {"data": None, "message": BUSY, "code": 400})
    shown = seen.decode(errors="replace").split("\n\ndata: ")[1:]
    status, body = tree.when_free(lambda: tree.get(f"/api/v1/chats/{chat_id}") if not holds_lock(chat_id)
                                  else (400, {"message": BUSY}))
    kept = body["data"]["messages"]
    assert [m["role"] for m in kept] == ["character", "user", "character"]
    assert kept[2]["text"] and shown[-1].strip().startswith(kept[2]["text"][:len(shown[0].strip())])
    assert_invariants(tree, chat_id)
    # Continue it (and stop that too): the kept text is where it goes on from.
    with tree.http.stream("POST", f"/api/v1/chats/{chat_id}/continue", data={"round": kept[2]["round"]}) as answer:
        first = next(answer.iter_raw()).decode(errors="replace")
    assert first.split("\n\ndata: ")[1].startswith(kept[2]["text"])
    status, body = tree.when_free(lambda: tree.get(f"/api/v1/chats/{chat_id}") if not holds_lock(chat_id)
                                  else (400, {"message": BUSY}))
    continued = body["data"]["messages"][2]
    assert continued["text"].startswith(kept[2]["text"]) and continued["position"] in (1, 2)
    assert_invariants(tree, chat_id)


def holds_lock(chat_id):
    from locks.models import Lock

    conversation = Conversation.objects.select_related("character").get(pk=chat_id)
    return Lock.objects.filter(name=conversation.character.lock_name).exists()


def test_a_server_killed_during_a_swipe_leaves_the_tree_as_it_was(long_server):
    tree = long_tree(long_server)
    chat_id = tree.main_chat()
    tree.legacy.ok("/chat/tamper", character_name="Mira", message="Hello there.")
    before = tree.chat(chat_id)
    rounds_before = sorted(Round.objects.filter(conversation_id=chat_id).values_list("pk", "bot_text"))
    with tree.http.stream("POST", f"/api/v1/chats/{chat_id}/swipe",
                          data={"round": before["messages"][0]["round"]}) as answer:
        next(answer.iter_raw())
        long_server.process.send_signal(signal.SIGKILL)
        long_server.process.wait()
    long_server.process = None
    long_server.start()
    tree = TreeApi(tree.legacy)
    tree.legacy.http = httpx.Client(base_url=long_server.url, timeout=120)
    tree.http = httpx.Client(base_url=long_server.url, timeout=120,
                             headers={"Authorization": f"Token {tree.legacy.token}"})
    after = tree.chat(chat_id)
    assert after == before
    assert sorted(Round.objects.filter(conversation_id=chat_id).values_list("pk", "bot_text")) == rounds_before
    assert_invariants(tree, chat_id)
    # The dead process's lock went with it: the next change goes through.
    view = tree.ok(f"/api/v1/chats/{chat_id}/switch", round=before["messages"][0]["alternatives"][0])
    assert view["messages"][0]["text"] == "Hi friend! I'm Mira."


def test_a_cards_alternate_greetings_become_alternatives_of_the_first_message(tree):
    from characters.models import Character
    from chat.services import add_greeting_alternatives

    chat_id = tree.main_chat()
    character = Character.objects.get(owner__username=tree.legacy.user_name, name="Mira")
    add_greeting_alternatives(character, ["Ahoy, {{user}}!", "  ", "The lamp is lit."])
    greeting = tree.chat(chat_id)["messages"][0]
    assert (greeting["text"], greeting["position"], len(greeting["alternatives"])) == ("Hi friend! I'm Mira.", 1, 3)
    view = tree.ok(f"/api/v1/chats/{chat_id}/switch", round=greeting["alternatives"][1])
    assert messages(view) == [("character", "Ahoy, friend!")]
    assert tree.legacy.chat("Mira") == [[None, "Ahoy, friend!"]]
    tree.legacy.reply("Mira", "hello")
    assert tree.ok(f"/api/v1/chats/{chat_id}/context")["token_state"].startswith(f"{HEADER} Ahoy, friend!\n\n")
    assert_invariants(tree, chat_id)
