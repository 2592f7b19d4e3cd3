"""/api/v1/account/export and /import: a whole account (characters, personas, lorebooks, chats) as one zip.

Exported from one account and imported into a fresh one, everything comes
back: each character's card and avatar, the personas (avatar, default, the
one a character's chat speaks as), the lorebooks, every chat with its
swipes. Names already taken are reused when the same, else renamed. A
hostile file (not a zip, a zip bomb, a path out of the folder, a bad chat
inside) is refused with a 400 and stores nothing. An import is all or
nothing: one that fails half-way (a quota reached by its last character
after the model read its chats and its avatars were written; a reply running
for a character it reuses) leaves the account's rows and files exactly as
they were.
"""

import base64
import io
import json
import zipfile

import httpx
from django.conf import settings
from PIL import Image

from accounts.models import User
from characters.models import Character
from characters.services import export_card
from chat.models import Conversation, Round
from conftest import CHARACTER, Api, make_user, running_reply
from lore.models import Lorebook
from personas.models import Persona
from statecache.models import StoredState

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


# ---- all or nothing -------------------------------------------------------------------------


def png_bytes(color):
    return base64.b64decode(picture(color).split(",", 1)[1])


def chat_file(*pairs):
    """A SillyTavern chat file: the header, then each (person's message, reply)."""
    lines = [{"user_name": "you", "character_name": "x", "create_date": "2026-01-01@00h00m00s", "chat_metadata": {}}]
    for message, reply in pairs:
        lines += [{"name": "you", "is_user": True, "mes": message}, {"name": "x", "is_user": False, "mes": reply}]
    return "\n".join(json.dumps(line) for line in lines)


def card(name, **fields):
    return json.dumps({"spec": "chara_card_v2", "data": {"name": name, "first_mes": f"I am {name}.",
                                                         "description": f"{name} keeps bees.", **fields}})


def everything_of(client):
    """The account's rows (every field that matters, by value) and the files under the media folder
    (avatars, the state store's blobs), for comparing before and after. The shared state cache's
    spilled states (states/cache/) are the server's, not the account's, and left out."""
    owner = {"owner__username": client.user_name}
    rows = (sorted(Character.objects.filter(**owner).values_list("name", "persona", "greeting", "avatar",
                                                                  "chosen_persona__name")),
            sorted(Persona.objects.filter(**owner).values_list("name", "description", "is_default", "avatar")),
            sorted(Lorebook.objects.filter(**owner).values_list("name", "active")),
            sorted(Conversation.objects.filter(**owner).values_list("pk", "is_fork", "head_id")),
            sorted(Round.objects.filter(conversation__owner__username=client.user_name)
                   .values_list("pk", "bot_text", "pre_state", "post_state")),
            sorted(StoredState.objects.filter(cached=False).values_list("state", flat=True)))
    media = settings.MEDIA_ROOT
    files = sorted(str(path.relative_to(media)) for path in media.rglob("*")
                   if path.is_file() and not str(path.relative_to(media)).startswith("states/cache/"))
    return rows, files


def tokens_read(client):
    stats = httpx.get(f"{client.url}/v1/debug/stats", headers={"Authorization": f"Bearer {client.token}"})
    return stats.json()["engine"]["tokens_read"]


def test_an_import_that_fails_at_its_last_character_stores_nothing_and_leaves_no_file(guest):
    """A guest may keep GUEST_MAX_CHARACTERS characters: a file whose last new character is one too
    many fails in the storing transaction, after the model read the first character's chats (their
    states written to the store), and after its persona's avatar, its lorebook and its other
    characters were stored. Everything goes, files included."""
    quota = settings.RPSERVER["LIMITS"]["GUEST_MAX_CHARACTERS"]
    room = quota - Character.objects.filter(owner__username=guest.user_name).count()
    assert room >= 1
    guest.ok("/characters/save", **CHARACTER)  # something of the account's own, with a chat and states
    guest.reply("Mira", "the bees are loud today")
    room -= 1
    members = {"personas/1.png": png_bytes((10, 200, 40)), "lorebooks/1.json": json.dumps(LOREBOOK),
               "chats/1/1.jsonl": chat_file(("where are the bees?", "In the orchard."), ("and the honey?", "Soon.")),
               "chats/1/2.jsonl": chat_file(("a second chat", "Yes."))}
    characters = []
    for number in range(1, room + 2):  # one more than the guest may keep
        members[f"characters/{number}.json"] = card(f"Keeper {number}")
        characters.append({"card": f"characters/{number}.json", "persona": 1,
                           "chats": [{"file": "chats/1/1.jsonl", "main": True},
                                     {"file": "chats/1/2.jsonl", "main": False}] if number == 1 else []})
    members["rpserver-account.json"] = manifest(
        personas=[{"name": "Beekeeper", "description": "{{user}} wears a veil.", "default": True,
                   "avatar": "personas/1.png"}],
        lorebooks=[{"name": "Hives", "active": True, "file": "lorebooks/1.json"}], characters=characters)
    before, read_before = everything_of(guest), tokens_read(guest)

    answer = post_account(guest, zipped(members))
    assert answer.status_code == 400, answer.text
    assert answer.json()["message"].startswith(f"a guest can keep at most {quota} characters")
    assert tokens_read(guest) > read_before  # the model did read the chats: their states were written
    assert everything_of(guest) == before
    # The account works on as before.
    assert guest.reply("Mira", "still here?") is not None


def test_an_import_reusing_a_character_whose_reply_is_running_is_refused_and_stores_nothing(endless_server):
    """A character the file holds is the account's own (reused): while a reply runs for it, the
    import is told BUSY, the reply is not disturbed, and nothing of the file is stored."""
    bob = make_user(Api(endless_server.url), "bob")
    bob.ok("/characters/save", **CHARACTER)
    mira_card, _, _ = export_card(User.objects.get(username=bob.user_name), "Mira", "json")
    members = {"characters/1.json": card("Nia"), "characters/2.json": mira_card,
               "personas/1.png": png_bytes((90, 20, 200)), "chats/1/1.jsonl": chat_file(("hi", "Hello.")),
               "chats/2/1.jsonl": chat_file(("and you?", "Fine."))}
    members["rpserver-account.json"] = manifest(
        personas=[{"name": "Rook", "description": "a crow", "avatar": "personas/1.png"}],
        characters=[{"card": "characters/1.json", "chats": [{"file": "chats/1/1.jsonl", "main": True}]},
                    {"card": "characters/2.json", "chats": [{"file": "chats/2/1.jsonl", "main": True}]}])
    with running_reply(bob, character_name="Mira", prompt="tell me about the sea"):
        before = everything_of(bob)
        answer = post_account(bob, zipped(members))
        assert answer.status_code == 400 and answer.json()["message"].startswith("a reply is already being"), \
            answer.text
        assert everything_of(bob) == before


def test_a_new_characters_chat_is_read_as_the_stored_character_reads_it(api):
    """The model reads a new character's chats before the character is stored (the plan): what it
    read must be the header the stored character has (here with a card's system prompt and the
    file's persona), or the import would be refused as changed meanwhile."""
    carol = make_user(api, "carol")
    members = {"characters/1.json": card("Oda", system_prompt="Write as {{char}}.", post_history_instructions="Be brief."),
               "chats/1/1.jsonl": chat_file(("hello Oda", "Hello."), ("bees?", "Many.")),
               "personas/1.png": png_bytes((1, 2, 3))}
    members["rpserver-account.json"] = manifest(
        personas=[{"name": "Wren", "description": "{{user}} is small.", "default": True, "avatar": "personas/1.png"}],
        characters=[{"card": "characters/1.json", "persona": 1, "chats": [{"file": "chats/1/1.jsonl", "main": True}]}])
    report = import_ok(carol, zipped(members))
    assert report["chats"] == 1
    assert [turn[0] for turn in carol.chat("Oda")][-2:] == ["hello Oda", "bees?"]
    assert carol.reply("Oda", "more?") is not None
