"""Personas: who the person is in a chat.

A persona's name is `{{user}}` and the person's speaker label in the chat;
its description is read by the model in the chat's header, after the
character's persona (inference/prompt.py). A chat (one per character, as in
the legacy API) speaks as the persona chosen for it (Character.chosen_persona),
else as the owner's default persona, else as the character's own user_name
with no description, exactly as before personas existed.

The header is read once, when a conversation starts, so whatever changes the
persona a chat speaks as (choosing one, editing or deleting it, another
default) restarts that chat's conversation, as editing the character does:
character_changed under the character's lock, in the same transaction as the
change. A reply running in one of those chats refuses the change (BUSY) and
nothing is changed.
"""

import contextlib

from django.db import IntegrityError, transaction

from characters.avatars import parse_avatar, replace_avatar
from characters.models import Character
from characters.services import get_character
from characters.signals import character_changed
from locks import services as locks
from rpserver.errors import ApiError

from .models import Persona

MAX_PERSONAS = 50  # per account: a person needs a handful, a script would make thousands


def persona_of_chat(character):
    """The Persona `character`'s chat speaks as (chosen, else the owner's default), or None."""
    if character.chosen_persona_id is not None:
        return Persona.objects.filter(pk=character.chosen_persona_id).first()
    return Persona.objects.filter(owner_id=character.owner_id, is_default=True).first()


def get_persona(owner, persona_id):
    persona = Persona.objects.filter(owner=owner, pk=persona_id).first()
    if persona is None:
        raise ApiError("persona does not exist")
    return persona


def list_personas(owner):
    return list(owner.personas.all())


def chats_speaking_as(owner, persona):
    """The owner's characters whose chat speaks as `persona` now."""
    chats = Character.objects.filter(owner=owner, chosen_persona=persona)
    if persona.is_default:
        chats = chats | Character.objects.filter(owner=owner, chosen_persona=None)
    return list(chats)


@contextlib.contextmanager
def restarting(characters, held=()):
    """Hold every character's lock and a transaction; the characters' conversations are discarded
    (their header is read again, with the new persona) when the block completes without error.
    `held`: the lock names the caller holds already (an account import)."""
    with contextlib.ExitStack() as stack:
        for character in characters:
            if character.lock_name not in held:
                stack.enter_context(locks.held(character.lock_name))
        with transaction.atomic():
            yield
            for character in characters:
                character_changed.send(sender=Character, character=character)


def save_persona(owner, name, description, avatar=None, is_default=None, persona=None, held=()):
    """Create a persona (`persona` None) or change one; returns it.

    `avatar`: None keeps it, "" removes it, a data URL replaces it.
    `is_default`: True makes it the owner's one default (the old one stops
    being it), False stops it being the default, None leaves that as it is.
    The chats that speak as it before or after restart (module docstring); `held`: the lock names of
    those the caller holds already (restarting).
    """
    image = parse_avatar(avatar) if avatar else None
    if persona is None:
        if owner.personas.count() >= MAX_PERSONAS:
            raise ApiError(f"an account can keep at most {MAX_PERSONAS} personas")
        persona = Persona(owner=owner)
    # Restarted: the chats that speak as it, when what they read of it changes; the chats without a
    # choice of their own, when the default changes.
    affected = []
    if persona.pk and (name, description) != (persona.name, persona.description):
        affected += chats_speaking_as(owner, persona)
    if is_default is not None and is_default != persona.is_default:
        affected += list(Character.objects.filter(owner=owner, chosen_persona=None))
    old_default = owner.personas.filter(is_default=True).exclude(pk=persona.pk).first() if is_default else None
    try:
        with restarting(unique(affected), held):
            if old_default is not None:
                Persona.objects.filter(pk=old_default.pk).update(is_default=False)
            persona.name = name
            persona.description = description
            if is_default is not None:
                persona.is_default = is_default
            replace_avatar(persona, avatar, image)
            persona.save()
    except IntegrityError:
        raise ApiError(f"a persona named {name!r} already exists")
    return persona


def unique(characters):
    seen = {}
    for character in characters:
        seen.setdefault(character.pk, character)
    return sorted(seen.values(), key=lambda character: character.pk)  # one lock order for everyone


def delete_persona(owner, persona_id):
    """Delete a persona; the chats that spoke as it fall back to the default (or to none) and restart."""
    persona = get_persona(owner, persona_id)
    with restarting(unique(chats_speaking_as(owner, persona))):
        persona.delete()


def choose_persona(owner, character_name, persona_id):
    """The chat with `character_name` speaks as persona `persona_id` from now on (None: the default);
    its conversation restarts if that changes who it speaks as. Returns the character."""
    character = get_character(owner, character_name)
    persona = get_persona(owner, persona_id) if persona_id is not None else None
    before = character.chat_persona
    character.chosen_persona = persona
    del character.chat_persona  # read again: the choice, else the default
    changed = (before and before.pk) != (character.chat_persona and character.chat_persona.pk)
    with restarting([character] if changed else []):
        Character.objects.filter(pk=character.pk).update(chosen_persona=persona)
    return character
