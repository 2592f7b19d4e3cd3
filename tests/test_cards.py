"""/api/v1/characters/import and /export: character cards (V1, V2, V3; JSON, PNG, CHARX) in and out.

The cards are written here, by hand, with every field of the specs and an
extension key no tool knows: a round trip (import, then export) must give
back every value as it came. Each hostile file gets a clear 400 and leaves
the account exactly as it was.
"""

import base64
import copy
import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
from django.conf import settings
from PIL import Image

from characters.models import Character
from conftest import CHARACTER

LORE_BOOK = {
    "name": "Harbour lore",
    "description": "What the harbour town knows",
    "scan_depth": 4,
    "token_budget": 512,
    "recursive_scanning": False,
    "extensions": {"some_tool": {"x": 1}},
    "entries": [{
        "keys": ["lighthouse", "beacon"], "secondary_keys": ["night"], "content": "The lighthouse is 200 years old.",
        "extensions": {"depth": 4}, "enabled": True, "insertion_order": 100, "case_sensitive": False,
        "name": "lighthouse", "priority": 10, "id": 1, "comment": "the tower", "selective": False,
        "constant": False, "position": "before_char",
    }],
}

V3_DATA = {
    "name": "Sable",
    "description": "{{char}} is a fox spirit who keeps a tea house for <USER>.",
    "personality": "Sly, warm, \"quoted\"\nand fond of riddles",
    "scenario": "A rainy night at <BOT>'s tea house.",
    "first_mes": "*pours tea* Welcome, {{user}}. I am {{Char}}.",
    "mes_example": "<START>\n{{user}}: Who are you?\n{{char}}: A guest, like you.\nShe smiles.\n"
                   "<START>\n<USER>: Tea?\n<BOT>: Always.",
    "creator_notes": "Notes for humans ✿",
    "system_prompt": "Write {{char}}'s next reply.",
    "post_history_instructions": "Stay in character.",
    "alternate_greetings": ["*bows* Back again, {{user}}?", "The kettle sings."],
    "tags": ["fox", "tea", "狐"],
    "creator": "the tests",
    "character_version": "1.2",
    "extensions": {"talkativeness": "0.5", "fav": False, "world": "", "depth_prompt": {"prompt": "x", "depth": 4},
                   "unknown_tool_key": {"nested": [1, 2.5, None, {"deep": "value"}]}},
    "character_book": LORE_BOOK,
    "nickname": "Sab",
    "group_only_greetings": ["Hello, everyone."],
    "creator_notes_multilingual": {"en": "Notes", "fr": "Des notes"},
    "source": ["https://example.org/sable"],
    "creation_date": 1700000000,
    "modification_date": 1700000123,
    "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}],
}
V3_CARD = {"spec": "chara_card_v3", "spec_version": "3.0", "data": V3_DATA}
V3_ONLY = ("nickname", "group_only_greetings", "creator_notes_multilingual", "source", "creation_date",
           "modification_date", "assets")
V2_DATA = {key: value for key, value in V3_DATA.items() if key not in V3_ONLY} | {"name": "Sable two"}
V2_CARD = {"spec": "chara_card_v2", "spec_version": "2.0", "data": V2_DATA}
V1_CARD = {"name": "Old Tom", "description": "{{char}} is a retired sailor.", "personality": "gruff",
           "scenario": "The docks.", "first_mes": "Ahoy, {{user}}.", "mes_example": "{{user}}: Hi\n{{char}}: Hm."}


def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def picture(size=(6, 9), color=(200, 30, 60), mode="RGB"):
    output = io.BytesIO()
    Image.new(mode, size, color).save(output, "PNG")
    return output.getvalue()


def with_text_chunks(png, chunks):
    """`png` with tEXt chunks [(keyword, text bytes)] inserted before its IEND."""
    end = png.rindex(b"IEND") - 4
    return png[:end] + b"".join(png_chunk(b"tEXt", key + b"\x00" + text) for key, text in chunks) + png[end:]


def b64json(card):
    return base64.b64encode(json.dumps(card).encode())


def text_chunks(png):
    """{keyword: text} of a PNG's tEXt chunks, read independently of the server's code."""
    position, found = 8, {}
    while position < len(png):
        length, kind = struct.unpack(">I4s", png[position:position + 8])
        body = png[position + 8:position + 8 + length]
        if kind == b"tEXt":
            key, text = body.split(b"\x00", 1)
            found[key.decode()] = text
        position += 12 + length
    return found


def charx(card, members=None):
    output = io.BytesIO()
    with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as archive:
        if card is not None:
            archive.writestr("card.json", json.dumps(card))
        for name, data in (members or {}).items():
            archive.writestr(name, data)
    return output.getvalue()


def post_card(client, file, **fields):
    return client.http.post("/api/v1/characters/import", json={"file": base64.b64encode(file).decode(), **fields},
                            headers={"Authorization": f"Token {client.token}"})


def import_ok(client, file, **fields):
    answer = post_card(client, file, **fields)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def export(client, name, **params):
    answer = client.http.get(f"/api/v1/characters/{name}/export", params=params,
                             headers={"Authorization": f"Token {client.token}"})
    assert answer.status_code == 200, answer.text
    return answer


def exported_json(client, name, spec="v3"):
    answer = export(client, name, format="json", spec=spec)
    assert answer.headers["content-type"] == "application/json"
    return answer.json()


# ---- round trips ----------------------------------------------------------------------


def test_a_v3_json_card_comes_back_with_every_value(guest):
    assert import_ok(guest, json.dumps(V3_CARD).encode()) == {"name": "Sable", "spec": "chara_card_v3"}
    assert exported_json(guest, "Sable") == V3_CARD


def test_a_v2_json_card_comes_back_with_every_value_and_as_v3(guest):
    import_ok(guest, json.dumps(V2_CARD).encode())
    assert exported_json(guest, "Sable two", spec="v2") == V2_CARD
    as_v3 = exported_json(guest, "Sable two")
    assert as_v3 == {"spec": "chara_card_v3", "spec_version": "3.0", "data": V2_DATA | {"group_only_greetings": []}}


def test_a_v1_json_card_keeps_its_six_fields(guest):
    import_ok(guest, json.dumps(V1_CARD).encode())
    data = exported_json(guest, "Old Tom", spec="v2")["data"]
    assert {key: data[key] for key in V1_CARD} == V1_CARD
    assert data["alternate_greetings"] == [] and data["extensions"] == {}


def test_a_png_card_prefers_ccv3_and_exports_both_chunks_on_its_own_picture(guest):
    image = picture()
    stale_v2 = copy.deepcopy(V2_CARD)
    stale_v2["data"]["name"] = "Sable"
    stale_v2["data"]["description"] = "an older version"
    card = with_text_chunks(image, [(b"chara", b64json(stale_v2)), (b"ccv3", b64json(V3_CARD))])
    import_ok(guest, card)
    exported = export(guest, "Sable", format="png")
    assert exported.headers["content-type"] == "image/png"
    assert "Sable.png" in exported.headers["content-disposition"]
    chunks = text_chunks(exported.content)
    assert json.loads(base64.b64decode(chunks["ccv3"])) == V3_CARD
    v2 = json.loads(base64.b64decode(chunks["chara"]))
    assert v2["spec"] == "chara_card_v2" and v2["data"] == {k: v for k, v in V3_DATA.items() if k not in V3_ONLY}
    with Image.open(io.BytesIO(exported.content)) as back, Image.open(io.BytesIO(image)) as original:
        assert back.size == original.size and back.convert("RGB").tobytes() == original.convert("RGB").tobytes()
    # ...and the exported PNG is itself a card that imports the same.
    import_ok(guest, exported.content, name="Sable again")
    assert exported_json(guest, "Sable again")["data"] == V3_DATA | {"name": "Sable again"}


def test_a_charx_card_comes_back_with_every_value_and_its_icon_as_avatar(guest):
    data = V3_DATA | {"name": "Sable X",
                      "assets": [{"type": "icon", "uri": "embeded://assets/icon/images/main.png", "name": "main",
                                  "ext": "png"}]}
    card = {"spec": "chara_card_v3", "spec_version": "3.0", "data": data}
    icon = picture(color=(10, 200, 10))
    import_ok(guest, charx(card, {"assets/icon/images/main.png": icon, "x_meta/1.json": "{}"}))
    assert exported_json(guest, "Sable X") == card
    avatar = guest.ok("/characters/get", character_name="Sable X")["avatar"]
    stored = base64.b64decode(avatar.split(",", 1)[1])
    with Image.open(io.BytesIO(stored)) as back:
        assert back.convert("RGB").getpixel((0, 0)) == (10, 200, 10)


def test_the_model_reads_the_cards_persona_greeting_and_example_dialogue(guest):
    import_ok(guest, json.dumps(V3_CARD).encode())
    assert guest.chat("Sable") == [[None, "*pours tea* Welcome, User. I am Sab."]]
    text = guest.context("Sable")["token_state"]
    assert text == (
        "Write Sab's next reply.\n\n"  # system_prompt: first
        "User: Who are you?\n\nSable: A guest, like you.\nShe smiles.\n\nUser: Tea?\n\nSable: Always.\n\n"
        "Sab is a fox spirit who keeps a tea house for User.\n\n"
        "Sab's personality: Sly, warm, \"quoted\"\nand fond of riddles\n\n"
        "Scenario: A rainy night at Sab's tea house.\n\n"
        "Stay in character.\n\n"  # post_history_instructions: last, just before the greeting
        "Sable: *pours tea* Welcome, User. I am Sab.\n\n"
    )


def test_the_cards_system_prompt_is_read_first_and_its_post_history_instructions_once_before_the_greeting(guest):
    card = copy.deepcopy(V3_CARD)
    card["data"].update(name="Wren", nickname="", character_book=None, mes_example="",
                        description="{{char}} is a wren.", personality="", scenario="", first_mes="Tweet, {{user}}.",
                        system_prompt="{{original}}\n  You play <BOT>, talking with <user>.  ",
                        post_history_instructions="Reply as {{char}} in one short line.\n\n\n\nNever speak for {{user}}.")
    del card["data"]["character_book"]
    import_ok(guest, json.dumps(card).encode())
    persona = guest.http.post("/api/v1/personas", json={"name": "Robin", "description": "{{user}} is a sailor.",
                                                          "default": True},
                              headers={"Authorization": f"Token {guest.token}"})
    assert persona.status_code == 200, persona.text
    header = ("You play Wren, talking with Robin.\n\n"
              "Wren is a wren.\n\n"
              "Robin is a sailor.\n\n"
              "Reply as Wren in one short line.\n\nNever speak for Robin.\n\n"
              "Wren: Tweet, Robin.\n\n")
    assert guest.context("Wren")["token_state"] == header
    # Read once: later turns add the person's message and the reply, and nothing of the card again.
    guest.reply("Wren", "hello")
    guest.reply("Wren", "and again")
    text = guest.context("Wren")["token_state"]
    assert text.startswith(header + "Robin: hello\n\nWren:")
    assert text.count("one short line") == 1 and text.count("You play Wren") == 1
    # The export gives both back as they came.
    data = exported_json(guest, "Wren")["data"]
    assert (data["system_prompt"], data["post_history_instructions"]) == (
        card["data"]["system_prompt"], card["data"]["post_history_instructions"])


def test_an_edited_character_exports_what_it_is_now(guest):
    import_ok(guest, json.dumps(V1_CARD).encode())
    guest.ok("/characters/save", bot="Old Tom", user="friend", greeting="Ahoy again.",
             bot_persona="{{char}} sells maps now.", example_message="{{user}}: Hi\n\n{{char}}: Go away.")
    data = exported_json(guest, "Old Tom")["data"]
    assert (data["description"], data["personality"], data["scenario"]) == ("{{char}} sells maps now.", "", "")
    assert data["first_mes"] == "Ahoy again."
    assert data["mes_example"] == "<START>\n{{user}}: Hi\n{{char}}: Go away."
    assert data["extensions"]["rpserver"] == {"user_name": "friend", "use_qa": False}


def test_a_character_made_here_exports_as_a_card_on_a_generated_picture(guest):
    guest.ok("/characters/save", **CHARACTER)
    png = export(guest, "Mira").content
    with Image.open(io.BytesIO(png)) as placeholder:
        assert placeholder.size == (400, 600)
    data = json.loads(base64.b64decode(text_chunks(png)["ccv3"]))["data"]
    assert data["name"] == "Mira" and data["description"] == CHARACTER["bot_persona"]
    assert data["first_mes"] == CHARACTER["greeting"]
    import_ok(guest, png, name="Mira two")  # with how Mira addresses the person (extensions.rpserver)
    assert guest.chat("Mira two") == [[None, "Hi friend! I'm Mira two."]]


def test_a_name_with_a_slash_is_exported_by_its_escaped_name(guest):
    import_ok(guest, json.dumps(V1_CARD).encode(), name="a/b 小雪")
    assert exported_json(guest, "a%2Fb 小雪")["data"]["name"] == "a/b 小雪"


# ---- refused ----------------------------------------------------------------------------


def avatar_files(client):
    owner = Character.objects.filter(owner__username=client.user_name).values_list("owner_id", flat=True).first()
    folder = Path(settings.MEDIA_ROOT) / "avatars" / str(owner)
    return sorted(folder.iterdir()) if folder.exists() else []


def assert_refused(client, file, message, status=400, **fields):
    characters, files = Character.objects.filter(owner__username=client.user_name).count(), avatar_files(client)
    answer = post_card(client, file, **fields)
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["code"] == status and message in body["message"], body
    assert Character.objects.filter(owner__username=client.user_name).count() == characters
    assert avatar_files(client) == files


def test_a_file_that_is_not_a_card_is_refused(guest):
    assert_refused(guest, b"GIF89a not a card at all", "not a character card")


def test_a_png_without_a_card_is_refused(guest):
    assert_refused(guest, picture(), "holds no character card")


def test_a_png_whose_chunk_is_not_base64_is_refused(guest):
    assert_refused(guest, with_text_chunks(picture(), [(b"chara", b"{not base64!}")]), "not base64")


def test_a_png_whose_chunk_is_not_json_is_refused(guest):
    chunk = base64.b64encode(b"\x00\xffnot json")
    assert_refused(guest, with_text_chunks(picture(), [(b"ccv3", chunk)]), "not valid JSON")


def test_a_truncated_png_is_refused(guest):
    card = with_text_chunks(picture(), [(b"ccv3", b64json(V3_CARD))])
    assert_refused(guest, card[:-30], "damaged")


def test_json_nested_to_exhaust_the_parser_is_refused(guest):
    assert_refused(guest, b'{"spec": "chara_card_v2", "data": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
                   "nested too deeply")


def test_json_nested_past_the_card_depth_is_refused(guest):
    deep = {"name": "Deep", "first_mes": "hi", "extensions": {}}
    node = deep["extensions"]
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    assert_refused(guest, json.dumps({"spec": "chara_card_v2", "data": deep}).encode(), "nested too deeply")


def test_json_over_the_size_limit_is_refused(guest):
    huge = {"spec": "chara_card_v2", "data": V2_DATA | {"creator_notes": "x" * (settings.RPSERVER["MAX_CARD_JSON_BYTES"])}}
    assert_refused(guest, json.dumps(huge).encode(), "the card is too large")


def test_a_card_over_the_persona_limit_is_refused(guest):
    long = V2_DATA | {"description": "y" * (settings.RPSERVER["MAX_PERSONA_CHARS"] + 1)}
    assert_refused(guest, json.dumps({"spec": "chara_card_v2", "data": long}).encode(), "may be at most")


def test_a_card_whose_fields_have_the_wrong_types_is_refused(guest):
    bad = V2_DATA | {"alternate_greetings": "not a list"}
    assert_refused(guest, json.dumps({"spec": "chara_card_v2", "data": bad}).encode(), "must be a list")


def test_a_charx_zip_bomb_is_refused(guest):
    output = io.BytesIO()
    with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("card.json", b" " * (64 * 1024 * 1024))  # 64 MB of spaces, ~64 KB compressed
    assert_refused(guest, output.getvalue(), "too large")


def test_a_charx_with_a_path_out_of_its_folder_is_refused(guest):
    assert_refused(guest, charx(V3_CARD, {"../../x": b"escaped"}), "outside its own folder")


def test_a_charx_without_a_card_is_refused(guest):
    assert_refused(guest, charx(None, {"readme.txt": b"hello"}), "no card.json")


def test_a_card_whose_picture_is_over_the_pixel_limit_is_refused(guest):
    side = int(settings.RPSERVER["MAX_AVATAR_PIXELS"] ** 0.5) + 100
    big = picture(size=(side, side), color=0, mode="1")  # a few KB on disk, past the limit once decoded
    assert_refused(guest, with_text_chunks(big, [(b"ccv3", b64json(V3_CARD))]), "pixels")


def test_a_card_named_like_an_existing_character_is_refused_and_changes_nothing(guest):
    guest.ok("/characters/save", **{**CHARACTER, "bot": "Sable"})
    before = guest.ok("/characters/get", character_name="Sable")
    assert_refused(guest, json.dumps(V3_CARD).encode(), "already exists")
    assert guest.ok("/characters/get", character_name="Sable") == before


def test_a_file_that_is_not_base64_is_refused(guest):
    answer = guest.http.post("/api/v1/characters/import", json={"file": "%%%"},
                             headers={"Authorization": f"Token {guest.token}"})
    assert answer.status_code == 400 and "base64" in answer.json()["message"]


def test_cards_need_a_valid_token(guest):
    answer = guest.http.post("/api/v1/characters/import", json={"file": "e30="},
                             headers={"Authorization": "Token wrong"})
    assert answer.status_code == 403 and answer.json()["code"] == 403
    answer = guest.http.get("/api/v1/characters/Mira/export", headers={"Authorization": "Token wrong"})
    assert answer.status_code == 403


def test_another_users_character_cannot_be_exported(guest, alice):
    guest.ok("/characters/save", **CHARACTER)
    answer = alice.http.get("/api/v1/characters/Mira/export", headers={"Authorization": f"Token {alice.token}"},
                            params={"format": "json"})
    assert answer.status_code == 400 and answer.json()["message"] == "character does not exist"


@pytest.mark.parametrize("params,message", [({"format": "gif"}, "format"), ({"spec": "v9"}, "spec")])
def test_an_unknown_export_format_is_refused(guest, params, message):
    guest.ok("/characters/save", **CHARACTER)
    answer = guest.http.get("/api/v1/characters/Mira/export", params=params,
                            headers={"Authorization": f"Token {guest.token}"})
    assert answer.status_code == 400 and message in answer.json()["message"]
