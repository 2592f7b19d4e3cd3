"""/api/v1/personas: who the person is in a chat; its name is {{user}}, its description is read by the model."""

from characters.models import Character
from chat.models import Conversation
from conftest import CHARACTER
from personas.models import Persona
from test_characters import PNG_URL


def call(client, method, route, **body):
    answer = client.http.request(method, route, json=body if method == "POST" else None,
                                 headers={"Authorization": f"Token {client.token}"})
    return answer


def ok(client, method, route, **body):
    answer = call(client, method, route, **body)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def new_persona(client, name="Robin", description="{{user}} is a sailor who visits {{char}} on Sundays.", **extra):
    return ok(client, "POST", "/api/v1/personas", name=name, description=description, **extra)


def test_the_default_persona_is_who_the_person_is_in_a_new_chat(mira):
    mira.ok("/characters/save", **{**CHARACTER, "bot": "Ivo"})
    robin = new_persona(mira, avatar=PNG_URL, default=True)
    assert robin["default"] is True and robin["avatar"] == PNG_URL
    assert mira.chat("Ivo") == [[None, "Hi Robin! I'm Ivo."]]
    mira.reply("Ivo", "hello")
    assert mira.context("Ivo")["token_state"].startswith(
        "Robin: How are you?\n\nIvo: Fine, thank you.\n\n"
        "Ivo is a calm lighthouse keeper who talks to Robin.\n\n"
        "Robin is a sailor who visits Ivo on Sundays.\n\n"
        "Ivo: Hi Robin! I'm Ivo.\n\nRobin: hello\n\nIvo:")
    # Mira's chat was open before the default existed: a new default restarts it as Robin's too.
    assert mira.chat("Mira") == [[None, "Hi Robin! I'm Mira."]]


def test_a_chat_speaks_as_the_persona_chosen_for_it_and_only_that_chat_restarts(guest):
    guest.ok("/characters/save", **CHARACTER)
    guest.ok("/characters/save", **{**CHARACTER, "bot": "Ivo"})
    new_persona(guest, default=True)
    ash = new_persona(guest, name="Ash", description="{{user}} is a painter.")
    guest.reply("Mira", "first")
    guest.reply("Ivo", "first")
    chosen = ok(guest, "POST", "/api/v1/characters/Mira/persona", persona=ash["id"])
    assert chosen["chosen"] == ash["id"] and chosen["persona"]["name"] == "Ash"
    assert guest.chat("Mira") == [[None, "Hi Ash! I'm Mira."]]
    assert "Ash is a painter." in guest.context("Mira")["token_state"]
    ivo = guest.chat("Ivo")  # the other chat goes on
    assert ivo[0] == [None, "Hi Robin! I'm Ivo."] and ivo[1][0] == "first"
    # Back to the default.
    ok(guest, "POST", "/api/v1/characters/Mira/persona", persona=None)
    assert ok(guest, "GET", "/api/v1/characters/Mira/persona")["persona"]["name"] == "Robin"
    assert guest.chat("Mira") == [[None, "Hi Robin! I'm Mira."]]


def test_one_persona_is_the_default(guest):
    robin = new_persona(guest, default=True)
    ash = new_persona(guest, name="Ash", default=True)
    listed = ok(guest, "GET", "/api/v1/personas")["personas"]
    assert [(p["name"], p["default"]) for p in listed] == [("Robin", False), ("Ash", True)]
    assert Persona.objects.filter(pk__in=[robin["id"], ash["id"]], is_default=True).count() == 1


def test_editing_the_persona_restarts_the_chats_that_speak_as_it(guest):
    guest.ok("/characters/save", **CHARACTER)
    robin = new_persona(guest, default=True)
    guest.reply("Mira", "hello")
    assert len(guest.chat("Mira")) == 2
    ok(guest, "POST", f"/api/v1/personas/{robin['id']}", name="Robyn")
    assert guest.chat("Mira") == [[None, "Hi Robyn! I'm Mira."]]
    # A new picture changes nothing the model reads: the chat goes on.
    guest.reply("Mira", "again")
    ok(guest, "POST", f"/api/v1/personas/{robin['id']}", avatar=PNG_URL)
    assert len(guest.chat("Mira")) == 2


def test_deleting_the_persona_brings_back_the_characters_own_name_for_the_person(guest):
    guest.ok("/characters/save", **CHARACTER)
    robin = new_persona(guest, default=True)
    guest.reply("Mira", "hello")
    ok(guest, "POST", f"/api/v1/personas/{robin['id']}/delete")
    assert guest.chat("Mira") == [[None, "Hi friend! I'm Mira."]]
    assert ok(guest, "GET", "/api/v1/personas")["personas"] == []


def test_without_personas_the_chat_is_as_it_always_was(mira):
    assert mira.chat("Mira") == [[None, "Hi friend! I'm Mira."]]
    assert Character.objects.get(owner__username=mira.user_name, name="Mira").chat_persona is None


def test_personas_are_validated(guest):
    new_persona(guest)
    for body, message in [({"name": ""}, "name must not be empty"), ({"description": "x"}, "missing parameter: name"),
                          ({"name": "Robin"}, "already exists"), ({"name": "a\nb"}, "control characters"),
                          ({"name": "Zed", "avatar": "data:image/png;base64,AAAA"}, "avatar")]:
        answer = call(guest, "POST", "/api/v1/personas", **body)
        assert answer.status_code == 400 and message in answer.json()["message"], (body, answer.text)
    assert Persona.objects.filter(owner__username=guest.user_name).count() == 1


def test_a_persona_of_another_person_cannot_be_used_or_changed(guest, alice):
    guest.ok("/characters/save", **CHARACTER)
    theirs = new_persona(alice)
    for method, route, body in [("POST", "/api/v1/characters/Mira/persona", {"persona": theirs["id"]}),
                                ("POST", f"/api/v1/personas/{theirs['id']}", {"name": "Mine"}),
                                ("POST", f"/api/v1/personas/{theirs['id']}/delete", {})]:
        answer = call(guest, method, route, **body)
        assert answer.status_code == 400 and answer.json()["message"] == "persona does not exist"
    assert Persona.objects.get(pk=theirs["id"]).name == "Robin"
    answer = guest.http.get("/api/v1/personas", headers={"Authorization": "Token wrong"})
    assert answer.status_code == 403


def test_a_changed_persona_leaves_other_peoples_chats_alone(guest, alice):
    guest.ok("/characters/save", **CHARACTER)
    guest.reply("Mira", "hello")
    new_persona(alice, default=True)
    assert Conversation.objects.get(owner__username=guest.user_name, character__name="Mira").rounds.count() == 2
