"""/api/v1/account/export and /import: a whole account (characters, personas, lorebooks, chats) as one zip.

Exported from one account and imported into a fresh one, everything comes
back: each character's card and avatar, the personas (avatar, default, the
one a character's chat speaks as), the lorebooks, every chat with its
swipes. Names already taken are reused when the same, else renamed. A
hostile file (not a zip, a zip bomb, a path out of the folder, a bad chat
inside) is refused with a 400 and stores nothing.
"""

import base64
import io
import json
import zipfile

import httpx
from PIL import Image

from characters.models import Character
from chat.models import Conversation, Round
from conftest import CHARACTER, make_user
from lore.models import Lorebook
from personas.models import Persona

LOREBOOK = {"name": "Harbour", "entries": {"0": {"uid": 0, "key": ["lamp"], "keysecondary": [], "content": "The lamp is old.",
                                                 "constant": False, "selective": False, "order": 100, "disable": False}}}


def rest(client):
    return httpx.Client(base_url=client.url, timeout=300, headers={"Authorization": f"Token {client.token}"})


def picture(color):
    output = io.BytesIO()
    Image.new("RGB", (8, 12), color).save(output, "PNG")
    return "data:image/png;base64," + base64.b64encode(output.getvalue()).decode()


def export_account(client):
    answer = rest(client).get("/api/v1/account/export")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/zip"
    return answer.content


def post_account(client, file):
    return rest(client).post("/api/v1/account/import", json={"file": base64.b64encode(file).decode()})


def import_ok(client, file):
    answer = post_account(client, file)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def chat_messages(client, character):
    """Each chat of a character (main first) as [(is_user, mes, swipes, swipe_id)], from its export."""
    chats = rest(client).get("/api/v1/chats", params={"character": character}).json()["data"]["chats"]
    result = []
    for chat in chats:
        lines = rest(client).get(f"/api/v1/chats/{chat['id']}/export").content.decode().splitlines()
        result.append([(m["is_user"], m["mes"], m.get("swipes"), m.get("swipe_id")) for m in map(json.loads, lines[1:])])
    return result


def account_of(client):
    """What the account holds, as comparable values (not ids or dates)."""
    characters = {c.name: (c.user_name, c.greeting, c.persona, c.example_message, c.use_qa, c.avatar_type,
                           c.chosen_persona.name if c.chosen_persona else None)
                  for c in Character.objects.filter(owner__username=client.user_name)}
    personas = {p.name: (p.description, p.is_default, bool(p.avatar)) for p in Persona.objects.filter(owner__username=client.user_name)}
    lorebooks = {b.name: (b.active, b.data) for b in Lorebook.objects.filter(owner__username=client.user_name)}
    return characters, personas, lorebooks


def stored_for(client):
    owner = {"owner__username": client.user_name}
    return (Character.objects.filter(**owner).count(), Persona.objects.filter(**owner).count(),
            Lorebook.objects.filter(**owner).count(), Conversation.objects.filter(**owner).count(),
            Round.objects.filter(conversation__owner__username=client.user_name).count())


def test_an_account_comes_back_whole_in_a_fresh_account(api):
    alice = make_user(api, "alice")
    http = rest(alice)
    persona = http.post("/api/v1/personas", json={"name": "Robin", "description": "{{user}} is a sailor.",
                                                 "avatar": picture((0, 90, 200))}).json()["data"]
    http.post("/api/v1/personas", json={"name": "Ann", "description": "Ann paints.", "default": True})
    alice.ok("/characters/save", **CHARACTER, avatar=picture((200, 30, 60)))
    assert http.post("/api/v1/characters/Mira/persona", json={"persona": persona["id"]}).status_code == 200
    alice.ok("/characters/save", bot="Ivo", user="friend", greeting="Ahoy.", bot_persona="{{char}} keeps a lighthouse.")
    http.post("/api/v1/lorebooks/import", json={"file": base64.b64encode(json.dumps(LOREBOOK).encode()).decode(),
                                                "active": False})
    alice.reply("Mira", "one")
    alice.reply("Mira", "two")
    chat_id = http.get("/api/v1/chats", params={"character": "Mira"}).json()["data"]["chats"][0]["id"]
    view = http.get(f"/api/v1/chats/{chat_id}").json()["data"]
    http.post(f"/api/v1/chats/{chat_id}/edit", data={"round": view["messages"][2]["round"], "role": "character",
                                                      "text": "The lamp is lit."})
    http.post(f"/api/v1/chats/{chat_id}/fork", data={"round": view["messages"][2]["round"]})
    alice.reply("Ivo", "hello")
    file = export_account(alice)
    assert zipfile.ZipFile(io.BytesIO(file)).testzip() is None

    bob = make_user(api, "bob")  # a fresh account: it has the starter characters alice has too
    report = import_ok(bob, file)
    assert report["chats"] == 3  # Mira's main chat and fork, Ivo's (the starters were never opened)
    assert all(c["stored_as"] == c["name"] for c in report["characters"])  # the starters: the same, reused
    assert account_of(bob) == account_of(alice)
    for character in ("Mira", "Ivo"):
        assert chat_messages(bob, character) == chat_messages(alice, character)
    assert len(chat_messages(bob, "Mira")) == 2  # the main chat and the fork
    # The restored chat goes on: the model reads from the imported states.
    assert bob.reply("Mira", "three") is not None
    assert bob.chat("Mira")[-1][0] == "three"


def test_names_taken_by_something_else_are_renamed_and_the_same_ones_reused(api):
    alice = make_user(api, "alice")
    alice.ok("/characters/save", **CHARACTER)
    rest(alice).post("/api/v1/personas", json={"name": "Robin", "description": "a sailor"})
    file = export_account(alice)
    bob = make_user(api, "bob")
    bob.ok("/characters/save", **{**CHARACTER, "bot_persona": "{{char}} is someone else."})
    rest(bob).post("/api/v1/personas", json={"name": "Robin", "description": "a baker"})
    report = import_ok(bob, file)
    assert {"name": "Mira", "stored_as": "Mira (2)", "reused": False} in report["characters"]
    assert report["personas"] == [{"name": "Robin", "stored_as": "Robin (2)", "reused": False}]
    assert Character.objects.get(owner__username=bob.user_name, name="Mira").persona == "{{char}} is someone else."
    again = import_ok(bob, file)  # the same file again: what it holds is there already, under its new names
    assert {"name": "Mira", "stored_as": "Mira (2)", "reused": True} in again["characters"]
    assert again["personas"] == [{"name": "Robin", "stored_as": "Robin (2)", "reused": True}]
    assert Character.objects.filter(owner__username=bob.user_name, name__startswith="Mira").count() == 2


def zipped(members):
    output = io.BytesIO()
    with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return output.getvalue()


def manifest(**parts):
    return json.dumps({"format": "rpserver-account", "version": 1, "characters": [], "personas": [], "lorebooks": [],
                       **parts})


CARD = json.dumps({"spec": "chara_card_v2", "data": {"name": "Nia", "first_mes": "Hi.", "description": "Nia sings."}})


def test_hostile_account_files_are_refused_and_store_nothing(api):
    bob = make_user(api, "bob")
    good_chat = {"file": "chats/1/1.jsonl", "main": True}
    cases = [
        (b"not a zip at all", "this is not an account file"),
        (zipped({"readme.txt": "hello"}), "it holds no rpserver-account.json"),
        (zipped({"rpserver-account.json": manifest(), "../../x": "escaped"}), "holds a file outside its own folder"),
        (zipped({"rpserver-account.json": manifest(), "/etc/x": "escaped"}), "holds a file outside its own folder"),
        (zipped({"rpserver-account.json": b" " * (64 * 1024 * 1024)}), "rpserver-account.json in the account file is too large"),
        (zipped({"rpserver-account.json": json.dumps({"format": "other"})}), "this is not an account file of this version"),
        (zipped({"rpserver-account.json": manifest(characters=[{"card": "characters/1.json", "chats": [good_chat]}]),
                 "characters/1.json": CARD, "chats/1/1.jsonl": b"[1]"}), "line 1 of the chat file is not a chat message"),
        (zipped({"rpserver-account.json": manifest(characters=[{"card": "characters/1.json", "chats": [good_chat]}]),
                 "characters/1.json": CARD, "chats/1/1.jsonl": b" " * (64 * 1024 * 1024)}), "chats/1/1.jsonl in the account file is too large"),
        (zipped({"rpserver-account.json": manifest(characters=[{"card": "characters/1.json"}])}), "is missing"),
        (zipped({"rpserver-account.json": manifest(characters=[{"card": "characters/1.json"}]),
                 "characters/1.json": "{}"}), "not a character card"),
        (zipped({"rpserver-account.json": manifest(lorebooks=[{"name": "L", "file": "lorebooks/1.json"}],
                                                   characters=[{"card": "characters/1.json"}]),
                 "lorebooks/1.json": json.dumps(LOREBOOK), "characters/1.json": "{}"}), "not a character card"),
        (zipped({"rpserver-account.json": manifest(personas=[{"name": "a\nb"}])}), "a persona's name"),
    ]
    before = stored_for(bob)
    for file, message in cases:
        answer = post_account(bob, file)
        assert answer.status_code == 400 and message in answer.json()["message"], (message, answer.text)
        assert stored_for(bob) == before, message
