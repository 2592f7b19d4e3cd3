"""Lore (world info): an entry is read at the turn whose messages mention its key, just before the
person's message, and not again while it is recent; lorebooks in and out (/api/v1/lorebooks)."""

import base64
import copy
import json

from conftest import CHARACTER
from lore.models import Lorebook
from test_cards import V3_CARD, import_ok

LIGHTHOUSE = "The lighthouse is 200 years old."

# SillyTavern's world-info shape, with the fields it writes that rpserver does not read.
WORLD = {
    "name": "Coast",
    "entries": {
        "0": {"uid": 0, "key": ["harbour"], "keysecondary": [], "comment": "", "content": "The harbour freezes in winter.",
              "constant": False, "selective": False, "order": 20, "position": 0, "disable": False,
              "probability": 100, "useProbability": True, "depth": 4, "group": "", "extensions": {"x": 1}},
        "1": {"uid": 1, "key": ["harbour"], "keysecondary": [], "content": "{{char}} was born by the harbour.",
              "constant": False, "selective": False, "order": 10, "disable": False},
        "2": {"uid": 2, "key": ["ship"], "keysecondary": ["storm", "gale"], "content": "Ships sink in storms.",
              "constant": False, "selective": True, "order": 30, "disable": False},
        "3": {"uid": 3, "key": [], "content": "It is always foggy.", "constant": True, "order": 0, "disable": False},
        "4": {"uid": 4, "key": ["harbour"], "content": "Never read: disabled.", "order": 5, "disable": True},
    },
}


def auth(client):
    return {"Authorization": f"Token {client.token}"}


def import_book(client, book, **fields):
    file = base64.b64encode(json.dumps(book).encode()).decode()
    return client.http.post("/api/v1/lorebooks/import", json={"file": file, **fields}, headers=auth(client))


def context(client, name):
    return client.context(name)["token_state"]


def test_an_entry_is_read_at_the_turn_its_key_is_mentioned_and_not_again_while_recent(guest):
    import_ok(guest, json.dumps(V3_CARD).encode())  # its character_book: "lighthouse"/"beacon", scan depth 4
    book = copy.deepcopy(V3_CARD)
    book["data"]["character_book"]["scan_depth"] = 2
    import_ok(guest, json.dumps(book).encode(), name="Keeper")

    guest.reply("Keeper", "hello")
    assert LIGHTHOUSE not in context(guest, "Keeper")
    guest.reply("Keeper", "tell me about the Lighthouse")
    text = context(guest, "Keeper")
    assert text.count(LIGHTHOUSE) == 1
    assert f"\n\n{LIGHTHOUSE}\n\nUser: tell me about the Lighthouse\n\nKeeper:" in text
    assert guest.chat("Keeper")[2][0] == "tell me about the Lighthouse"  # the chat shows the message alone

    guest.reply("Keeper", "and the beacon?")  # mentioned again, read two messages ago: not repeated
    assert context(guest, "Keeper").count(LIGHTHOUSE) == 1

    # The last two messages (scan depth 2) mention it and it was last read four messages ago: read again.
    guest.reply("Keeper", "thanks")
    text = context(guest, "Keeper")
    assert text.count(LIGHTHOUSE) == 2 and f"{LIGHTHOUSE}\n\nUser: thanks\n\nKeeper:" in text


def test_the_read_lore_stays_where_it_was_read(guest):
    import_ok(guest, json.dumps(V3_CARD).encode())
    guest.reply("Sable", "the lighthouse")
    before = context(guest, "Sable")
    guest.reply("Sable", "nothing here")
    after = context(guest, "Sable")
    assert after.startswith(before) and after.count(LIGHTHOUSE) == 1  # nothing read is read again


def test_an_active_world_info_book_is_read_in_every_chat_in_order(guest):
    guest.ok("/characters/save", **CHARACTER)
    answer = import_book(guest, WORLD)
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"] | {"id": 0} == {"id": 0, "name": "Coast", "active": True, "entries": 5}
    guest.reply("Mira", "hi")  # the constant entry only
    assert "It is always foggy.\n\nfriend: hi\n\nMira:" in context(guest, "Mira")
    guest.reply("Mira", "a ship by the harbour")  # harbour's two entries, in their order; ship needs a storm
    text = context(guest, "Mira")
    assert ("Mira was born by the harbour.\nThe harbour freezes in winter.\n\nfriend: a ship by the harbour" in text)
    assert "Ships sink" not in text and "Never read" not in text
    guest.reply("Mira", "a ship in a STORM")
    assert "Ships sink in storms.\n\nfriend: a ship in a STORM" in context(guest, "Mira")


def test_a_lorebook_comes_back_as_it_came_and_changes_take_effect_at_the_next_turn(guest):
    guest.ok("/characters/save", **CHARACTER)
    book_id = import_book(guest, WORLD).json()["data"]["id"]
    exported = guest.http.get(f"/api/v1/lorebooks/{book_id}/export", headers=auth(guest))
    assert exported.status_code == 200 and exported.json() == WORLD
    assert "Coast.json" in exported.headers["content-disposition"]

    guest.reply("Mira", "the harbour")
    edited = copy.deepcopy(WORLD)
    edited["entries"]["1"]["content"] = "{{char}} left the harbour."
    answer = guest.http.post(f"/api/v1/lorebooks/{book_id}", json={"data": edited}, headers=auth(guest))
    assert answer.status_code == 200 and answer.json()["data"]["data"] == edited
    rounds = len(guest.chat("Mira"))
    guest.reply("Mira", "the harbour again")  # no restart; the new entry is new text, so it is read
    assert len(guest.chat("Mira")) == rounds + 1
    assert "Mira left the harbour.\n\nfriend: the harbour again" in context(guest, "Mira")

    guest.http.post(f"/api/v1/lorebooks/{book_id}", json={"active": False}, headers=auth(guest))
    guest.reply("Mira", "foggy harbour?")
    assert "foggy.\n\nfriend: foggy harbour?" not in context(guest, "Mira")
    assert guest.http.post(f"/api/v1/lorebooks/{book_id}/delete", headers=auth(guest)).status_code == 200
    assert guest.http.get("/api/v1/lorebooks", headers=auth(guest)).json()["data"]["lorebooks"] == []


def test_hostile_lorebooks_are_refused_and_store_nothing(guest):
    cases = [(b"not json", "not valid JSON"), (b"[1, 2]", "must be an object"),
             (json.dumps({"name": "x"}).encode(), "no entries"),
             (json.dumps({"entries": {"0": {"content": "x" * (1024 * 1024)}}}).encode(), "too large"),
             (b'{"entries": ' + b"[" * 50 + b"]" * 50 + b"}", "nested too deeply")]
    for file, message in cases:
        answer = guest.http.post("/api/v1/lorebooks/import", json={"file": base64.b64encode(file).decode()},
                                 headers=auth(guest))
        assert answer.status_code == 400 and message in answer.json()["message"], (message, answer.text)
    assert Lorebook.objects.filter(owner__username=guest.user_name).count() == 0


def test_another_persons_lorebook_is_not_theirs(guest, alice):
    book_id = import_book(alice, WORLD).json()["data"]["id"]
    for method, route in [("GET", f"/api/v1/lorebooks/{book_id}"), ("GET", f"/api/v1/lorebooks/{book_id}/export"),
                          ("POST", f"/api/v1/lorebooks/{book_id}/delete")]:
        answer = guest.http.request(method, route, headers=auth(guest))
        assert answer.status_code == 400 and answer.json()["message"] == "lorebook does not exist"
    assert Lorebook.objects.filter(pk=book_id).exists()
