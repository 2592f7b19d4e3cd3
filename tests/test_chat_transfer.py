"""/api/v1/chats/<id>/export and /api/v1/chats/import: chats in and out as SillyTavern's JSONL.

A chat exported and imported again gives the same messages and swipes; an
imported chat's text is read by the model once, in one pass (the engine's
`tokens_read` moves by exactly the path's tokens), what the model read is
the chat's text in the documented format, and every state kept for it
equals the state read from scratch. Every hostile file is refused with a
400 and stores nothing.
"""

import asyncio
import base64
import json
import uuid

import httpx
import pytest

from chat.models import Conversation, Round
from chat.tree import path_of
from conftest import CHARACTER, Api, assert_same_state, running_reply, server_precision
from inference.prompt import clean_turn
from inference.runtime import get_engine
from rpserver.errors import BUSY
from statecache.blobs import load_state


def rest(client):
    return httpx.Client(base_url=client.url, timeout=120, headers={"Authorization": f"Token {client.token}"})


def main_chat(client, character):
    answer = rest(client).get("/api/v1/chats", params={"character": character})
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]["chats"][0]["id"]


def export(client, chat_id):
    answer = rest(client).get(f"/api/v1/chats/{chat_id}/export")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/jsonl")
    assert answer.headers["content-disposition"].startswith("attachment; filename*=UTF-8''")
    return answer.content


def lines_of(file):
    return [json.loads(line) for line in file.decode().splitlines()]


def post_import(client, character, file):
    return rest(client).post("/api/v1/chats/import",
                             json={"character": character, "file": base64.b64encode(file).decode()})


def import_ok(client, character, file):
    answer = post_import(client, character, file)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def tokens_read(client):
    stats = httpx.get(f"{client.url}/v1/debug/stats", headers={"Authorization": f"Bearer {client.token}"})
    return stats.json()["engine"]["tokens_read"]


def shown(view):
    """A chat's messages as (role, text, [the texts of its alternatives], position)."""
    texts = {m["round"]: m["text"] for m in view["messages"]}
    rounds = {r.pk: r for r in Round.objects.filter(conversation_id=view["id"])}
    result = []
    for message in view["messages"]:
        if message["role"] == "user":
            result.append(("user", message["text"]))
        else:
            alternatives = [rounds[pk].bot_text for pk in message["alternatives"]]
            result.append(("character", texts[message["round"]], alternatives, message["position"]))
    return result


def assert_states_read_from_scratch(chat_id):
    """Every state kept for a round of the chat's path equals the state read from scratch from the
    path's text; returns how many were compared."""
    engine = get_engine()
    path = path_of(Conversation.objects.get(pk=chat_id))
    tokens = [t for round_ in path for t in round_.token_list]
    read, compared = 0, 0
    for round_ in path:
        start, read = read, read + len(round_.token_list)
        for field, upto in (("pre_state", start + round_.reply_start - 1), ("post_state", read)):
            name = getattr(round_, field).name
            if name and round_.state_model == engine.backend.model_id:
                from_scratch = asyncio.run(engine.read(None, tokens[:upto]))[0]
                assert_same_state(load_state(name, engine.backend), from_scratch, server_precision())
                compared += 1
    return compared


def stored_for(client):
    """What an account has stored of chats: its conversations, rounds and state blobs."""
    rounds = Round.objects.filter(conversation__owner__username=client.user_name)
    return (Conversation.objects.filter(owner__username=client.user_name).count(), rounds.count(),
            sorted(name for round_ in rounds for name in (round_.pre_state.name, round_.post_state.name) if name))


def new_character(client, name):
    """A character whose header no one has read before (its round 0 is not in the state cache)."""
    client.ok("/characters/save", bot=name, user="friend", greeting="Hello, {{user}}.",
              bot_persona=f"{{{{char}}}} keeps the archive {uuid.uuid4().hex[:8]}.")
    return name


# ---- export ----------------------------------------------------------------------------


def test_a_chat_exports_its_current_path_with_each_replys_alternatives_as_swipes(mira):
    chat_id = main_chat(mira, "Mira")
    first = mira.reply("Mira", "one")
    mira.reply("Mira", "two")
    view = rest(mira).get(f"/api/v1/chats/{chat_id}").json()["data"]
    swipe = rest(mira).post(f"/api/v1/chats/{chat_id}/swipe", data={"round": view["messages"][2]["round"]})
    second = swipe.text.split("\n\ndata: ")[-1]
    header, *messages = lines_of(export(mira, chat_id))
    assert header["user_name"] == "friend" and header["character_name"] == "Mira"
    assert header["chat_metadata"] == {} and "@" in header["create_date"]
    assert [(m["name"], m["is_user"], m["is_system"], m["mes"]) for m in messages] == [
        ("Mira", False, False, "Hi friend! I'm Mira."), ("friend", True, False, "one"), ("Mira", False, False, second)]
    greeting, _, reply = messages
    assert (greeting["swipes"], greeting["swipe_id"]) == (["Hi friend! I'm Mira."], 0)
    assert (reply["swipes"], reply["swipe_id"]) == ([first, second], 1)  # "two" was on the other branch
    assert len(reply["swipe_info"]) == 2 and all(isinstance(m["send_date"], str) for m in messages)


def test_another_persons_chat_cannot_be_exported(mira, alice):
    chat_id = main_chat(mira, "Mira")
    answer = rest(alice).get(f"/api/v1/chats/{chat_id}/export")
    assert answer.status_code == 404 and answer.json()["message"] == "chat does not exist"


# ---- import ----------------------------------------------------------------------------


def test_export_then_import_gives_the_same_messages_and_swipes_read_once(mira):
    chat_id = main_chat(mira, "Mira")
    mira.reply("Mira", "one")
    mira.reply("Mira", "two")
    view = rest(mira).get(f"/api/v1/chats/{chat_id}").json()["data"]
    rest(mira).post(f"/api/v1/chats/{chat_id}/swipe", data={"round": view["messages"][4]["round"]})
    mira.reply("Mira", "three")
    original = rest(mira).get(f"/api/v1/chats/{chat_id}").json()["data"]
    file = export(mira, chat_id)

    target = new_character(mira, "Archivist")
    before = tokens_read(mira)
    imported = import_ok(mira, target, file)
    read = tokens_read(mira) - before

    assert shown(imported) == shown(original)
    def messages(file):
        return [(m["is_user"], m["mes"], m.get("swipes"), m.get("swipe_id")) for m in lines_of(file)[1:]]

    assert messages(export(mira, imported["id"])) == messages(file)
    # The model read the path's text once: its tokens, no more (the header is new to the state cache).
    path = path_of(Conversation.objects.get(pk=imported["id"]))
    assert read == sum(len(round_.token_list) for round_ in path)
    # What it read is the chat's text in the documented format.
    context = rest(mira).get(f"/api/v1/chats/{imported['id']}/context").json()["data"]
    header = get_engine().tokenizer.decode(path[0].token_list[:path[0].reply_start])
    turns = "".join(f"friend: {clean_turn(m['text'])}\n\nArchivist:" if m["role"] == "user"
                    else f" {clean_turn(m['text'])}\n\n" for m in original["messages"])
    assert context["token_state"] == header + turns
    assert header.startswith("Archivist keeps the archive ") and header.endswith("Archivist:")
    assert assert_states_read_from_scratch(imported["id"]) >= 2
    # It is the character's main chat now: the legacy API shows it.
    assert [pair[1] for pair in mira.chat(target)] == [m["text"] for m in original["messages"] if m["role"] == "character"]


SILLYTAVERN_CHAT = [
    {"user_name": "Ann", "character_name": "Seraphina", "create_date": "2024-05-01@10h11m12s",
     "chat_metadata": {"integrity": "0b4c", "note_prompt": "", "tainted": False}},
    {"name": "Seraphina", "is_user": False, "is_system": False, "send_date": "May 1, 2024 10:11am",
     "mes": "*She waves.* Welcome!", "extra": {}, "swipe_id": 1,
     "swipes": ["Hello there.", "*She waves.* Welcome!"], "swipe_info": [{}, {}]},
    {"name": "Ann", "is_user": True, "is_system": False, "send_date": "May 1, 2024 10:12am", "mes": "Hi!\n\nWho are you?",
     "extra": {}},
    {"name": "Seraphina", "is_user": False, "is_system": False, "send_date": 1714558333000, "mes": "A guardian.",
     "extra": {"api": "openai"}, "swipe_id": 0, "swipes": ["A guardian.", "Nobody."], "swipe_info": []},
    {"name": "System", "is_user": False, "is_system": True, "mes": "(a hidden note)", "send_date": ""},
    {"name": "Ann", "is_user": True, "mes": "Where am I?", "send_date": ""},
]


def jsonl(objects):
    return "\n".join(json.dumps(line) for line in objects).encode()


def test_a_sillytavern_chat_is_read_as_written_with_its_swipes_and_a_last_message_awaiting_a_reply(mira):
    target = new_character(mira, "Sera")
    view = import_ok(mira, target, jsonl(SILLYTAVERN_CHAT))
    assert shown(view) == [
        ("character", "*She waves.* Welcome!", ["Hello there.", "*She waves.* Welcome!"], 2),
        ("user", "Hi!\n\nWho are you?"), ("character", "A guardian.", ["A guardian.", "Nobody."], 1),
        ("user", "Where am I?"), ("character", "", [""], 1)]
    assert view["messages"][-1]["pending"]
    context = rest(mira).get(f"/api/v1/chats/{view['id']}/context").json()["data"]["token_state"]
    assert context.endswith("\n\nSera: *She waves.* Welcome!\n\nfriend: Hi!\nWho are you?\n\nSera: A guardian.\n\n"
                            "friend: Where am I?\n\nSera:")
    assert assert_states_read_from_scratch(view["id"]) >= 1
    # Switching to the other greeting works: it is read when first used.
    greeting = view["messages"][0]
    switched = rest(mira).post(f"/api/v1/chats/{view['id']}/switch", data={"round": greeting["alternatives"][0]})
    assert switched.json()["data"]["messages"][0]["text"] == "Hello there."
    assert mira.reply(target, "hi")  # a reply from a greeting no one read yet


def test_a_main_chat_with_more_than_its_greeting_is_kept_as_another_chat(mira):
    mira.reply("Mira", "keep me")
    old = main_chat(mira, "Mira")
    view = import_ok(mira, "Mira", jsonl(SILLYTAVERN_CHAT))
    chats = rest(mira).get("/api/v1/chats", params={"character": "Mira"}).json()["data"]["chats"]
    assert [(c["id"], c["is_fork"]) for c in chats] == [(view["id"], False), (old, True)]
    assert rest(mira).get(f"/api/v1/chats/{old}").json()["data"]["messages"][1]["text"] == "keep me"


@pytest.mark.parametrize("file, message", [
    (b"\x89PNG\r\n\x1a\n", "the chat file is not UTF-8 text"),
    (b"\n  \n", "the chat file is empty"),
    (b"this is not json\n", "line 1 of the chat file is not valid JSON"),
    (jsonl(SILLYTAVERN_CHAT[:2]) + b"\n[1, 2]", "line 3 of the chat file is not a chat message"),
    (jsonl(SILLYTAVERN_CHAT[:1]), "the chat file holds no messages"),
    (jsonl([{"is_user": "yes", "mes": "x"}]), "line 1 of the chat file: is_user and is_system must be true or false"),
    (jsonl([{"is_user": False, "mes": 5}]), "line 1 of the chat file: mes (the message's text) must be text"),
    (jsonl([{"is_user": False, "mes": "x", "swipes": "x"}]), "line 1 of the chat file: swipes must be a list"),
    (jsonl([{"is_user": False, "mes": "x", "swipes": ["x"], "swipe_id": 3}]), "line 1 of the chat file: swipe_id must"),
    (jsonl([{"is_user": False, "mes": "x", "swipes": ["x"] * 101}]), "line 1 of the chat file: a message may have at"),
    (jsonl([{"is_user": True, "mes": "x" * 20001}]), "line 1 of the chat file: a message may be at most 20000"),
    (b'{"mes": ' + b"[" * 100000 + b"]" * 100000 + b"}", "line 1 of the chat file is nested too deeply"),
    (jsonl([{"is_user": True, "mes": "x"}] * 2001), "the chat file holds too many messages: the limit is 2000"),
    (b"{}" + b" " * (2 * 1024 * 1024), "the chat file is too large: the limit is 2048 KB"),
], ids=["not-text", "empty", "not-json", "not-an-object", "no-messages", "is_user", "mes", "swipes", "swipe_id",
        "too-many-swipes", "message-too-long", "nested", "too-many-messages", "too-large"])
def test_a_hostile_chat_file_is_refused_and_stores_nothing(mira, file, message):
    before = stored_for(mira)
    answer = post_import(mira, "Mira", file)
    assert answer.status_code == 400 and message in answer.json()["message"], answer.text
    assert stored_for(mira) == before


def test_a_chat_for_a_character_that_does_not_exist_or_not_base64_is_refused(mira):
    answer = post_import(mira, "Nobody", jsonl(SILLYTAVERN_CHAT))
    assert answer.status_code == 400 and answer.json()["message"] == "character does not exist"
    answer = rest(mira).post("/api/v1/chats/import", json={"character": "Mira", "file": "%%%"})
    assert answer.status_code == 400 and "base64" in answer.json()["message"]


def test_an_import_while_a_reply_runs_is_told_busy_and_stores_nothing(endless_server):
    login = Api(endless_server.url).ok("/login/tmp")
    guest = Api(endless_server.url, login["user_name"], login["token"])
    guest.ok("/characters/save", **CHARACTER)
    guest.chat("Mira")
    before = stored_for(guest)
    with running_reply(guest, character_name="Mira", prompt="tell me everything"):
        answer = post_import(guest, "Mira", jsonl(SILLYTAVERN_CHAT))
        assert (answer.status_code, answer.json()["message"]) == (400, BUSY)
        assert stored_for(guest) == before
