"""/characters/list, get, save, del: validation, avatars, ownership, discarding state."""

import base64
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from characters.models import Character
from chat.models import Conversation, Round
from conftest import CHARACTER

# A real 8x8 PNG, exactly as the server re-encodes it (so it comes back unchanged).
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFElEQVR4nGM8ISfHgA0wYRUdtBIA0MoBFD5jqJkAAAAASUVORK5CYII=")
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def stored_files(user_name):
    """Every stored file of a user's characters and conversations."""
    names = [c.avatar.name for c in Character.objects.filter(owner__username=user_name) if c.avatar]
    for r in Round.objects.filter(conversation__owner__username=user_name):
        names += [f.name for f in (r.pre_state, r.post_state) if f]
    return [Path(settings.MEDIA_ROOT) / name for name in names]


def test_it_saves_and_gives_back_a_character(guest):
    guest.ok("/characters/save", **CHARACTER, use_qa="1", avatar=PNG_URL)
    assert guest.ok("/characters/get", character_name="Mira") == {
        "user": "friend", "bot": "Mira", "greeting": CHARACTER["greeting"],
        "bot_persona": CHARACTER["bot_persona"], "example_message": CHARACTER["example_message"],
        "use_qa": True, "avatar": PNG_URL,
    }
    listed = guest.ok("/characters/list")["list"]
    assert {"char_name": "Mira", "file_name": "Mira", "avatar": PNG_URL} in listed


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("True", True),
                                            ("", False), ("0", False), ("false", False)])
def test_it_reads_use_qa_like_the_ui_sends_it(guest, value, expected):
    guest.ok("/characters/save", **CHARACTER, use_qa=value)
    assert guest.ok("/characters/get", character_name="Mira")["use_qa"] is expected


def test_use_qa_switches_the_prompt_names(guest):
    guest.ok("/characters/save", **CHARACTER, use_qa="1")
    text = guest.context("Mira")["token_state"]
    assert "User: How are you?" in text and text.endswith("Assistant: Hi User! I'm Assistant.\n\n")


@pytest.mark.parametrize("name", ["小雪 ❤", "Ann-Marie", "../../etc/passwd", "a/b\\c", "<script>x</script>", "  Zoë  "])
def test_any_name_a_person_types_is_a_name_and_never_a_path(guest, name):
    guest.ok("/characters/save", **{**CHARACTER, "bot": name}, avatar=PNG_URL)
    guest.chat(name.strip())
    guest.reply(name.strip(), "hello")
    assert guest.ok("/characters/get", character_name=name.strip())["bot"] == name.strip()
    for path in stored_files(guest.user_name):
        assert path.resolve().is_relative_to(Path(settings.MEDIA_ROOT).resolve())
        assert name.strip() not in str(path.relative_to(settings.MEDIA_ROOT))


@pytest.mark.parametrize("fields,message", [
    ({"bot": ""}, "bot must not be empty"),
    ({"bot": "x" * 65}, "bot: Ensure this field has no more than 64 characters."),
    ({"bot": "two\nlines"}, "bot: must not contain control characters such as newlines"),
    ({"greeting": None}, "missing parameter: greeting"),
    ({"use_qa": "maybe"}, "use_qa: must be true or false (1/0)"),
    ({"avatar": "data:image/png;base64,%%%"}, "avatar is not a base64-encoded image"),
    ({"avatar": "data:text/plain;base64," + base64.b64encode(b"hello").decode()},
     "avatar must be a PNG, JPEG, GIF or WebP image"),
    ({"avatar": "data:image/png;base64," + base64.b64encode(PNG + b"\x00" * 70000).decode()},
     "avatar is too large: the limit is 64 KB"),
])
def test_it_rejects_bad_character_fields(guest, fields, message):
    body = guest.call("/characters/save", **{k: v for k, v in {**CHARACTER, **fields}.items() if v is not None})
    assert body == {"data": None, "message": message, "code": 400}
    assert not Character.objects.filter(owner__username=guest.user_name, name="Mira").exists()


def test_it_rejects_an_oversized_persona(guest):
    body = guest.call("/characters/save", **{**CHARACTER, "bot_persona": "x" * 20001})
    assert body["code"] == 400 and body["message"].startswith("bot_persona:")


def test_saving_again_keeps_the_avatar_unless_told_otherwise(guest):
    guest.ok("/characters/save", **CHARACTER, avatar=PNG_URL)
    first = Character.objects.get(owner__username=guest.user_name, name="Mira").avatar.path
    guest.ok("/characters/save", **CHARACTER)
    assert guest.ok("/characters/get", character_name="Mira")["avatar"] == PNG_URL
    guest.ok("/characters/save", **CHARACTER, avatar="")
    assert guest.ok("/characters/get", character_name="Mira")["avatar"] == ""
    assert not Path(first).exists()


def a_prompt_of_its_own():
    """States are shared by whoever reads the same tokens (statecache.store): a prompt nobody else
    sends keeps this test's states its own, so that they go with its chat."""
    return f"hello {uuid.uuid4().hex}"


def test_overwriting_discards_the_conversation(mira):
    mira.reply("Mira", a_prompt_of_its_own())
    files = stored_files(mira.user_name)
    assert files and all(f.exists() for f in files)
    mira.ok("/characters/save", **{**CHARACTER, "greeting": "A new greeting."})
    assert mira.chat("Mira") == [[None, "A new greeting."]]
    assert not any(f.exists() for f in files)


def test_deleting_removes_the_character_its_chat_and_every_file(mira):
    mira.ok("/characters/save", **CHARACTER, avatar=PNG_URL)
    mira.reply("Mira", a_prompt_of_its_own())
    files = stored_files(mira.user_name)
    mira.ok("/characters/del", character_name="Mira")
    assert mira.call("/characters/get", character_name="Mira")["message"] == "character does not exist"
    assert not Conversation.objects.filter(owner__username=mira.user_name, character__name="Mira").exists()
    assert files and not any(f.exists() for f in files)


def test_one_user_cannot_reach_anothers_characters(alice, bob):
    alice.ok("/characters/save", **CHARACTER)
    alice.reply("Mira", "secret")
    for route, fields in [("/characters/get", {}), ("/characters/del", {}), ("/characters/load", {}),
                          ("/chat/reset", {}), ("/chat/back", {}), ("/debug/token", {}),
                          ("/chat/tamper", {"message": "hacked"})]:
        body = bob.call(route, character_name="Mira", **fields)
        assert body == {"data": None, "message": "character does not exist", "code": 400}, route
    body, _ = bob.stream("/chat/reply", character_name="Mira", prompt="hi")
    assert body["message"] == "character does not exist"
    assert alice.chat("Mira")[1][0] == "secret"
