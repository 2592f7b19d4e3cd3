"""Characters: create, overwrite, delete, and the defaults of new accounts."""

import contextlib

from django.conf import settings
from django.core.files.base import ContentFile
from django.db import transaction

from locks import services as locks
from rpserver.errors import BUSY, ApiError
from rpserver.files import delete_file_on_commit

from .avatars import parse_avatar
from .defaults import DEFAULT_CHARACTERS
from .models import Character
from .signals import character_changed


def get_character(owner, name):
    """The owner's character called `name`; other users' characters do not exist here."""
    character = Character.objects.filter(owner=owner, name=name).first()
    if character is None:
        raise ApiError("character does not exist")
    return character


@contextlib.contextmanager
def character_locked(character):
    """Hold the character's lock (the one its conversation's changes take); BUSY if a reply runs."""
    try:
        key = locks.acquire(character.lock_name)
    except locks.Busy:
        raise ApiError(BUSY)
    try:
        yield
    finally:
        locks.release(character.lock_name, key)


def check_guest_quota(owner, creating, image):
    """Guests may keep GUEST_MAX_CHARACTERS characters, with avatars of GUEST_MAX_AVATAR_BYTES each."""
    if not owner.is_guest:
        return
    limits = settings.RPSERVER["LIMITS"]
    if creating and owner.characters.count() >= limits["GUEST_MAX_CHARACTERS"]:
        raise ApiError(f"a guest can keep at most {limits['GUEST_MAX_CHARACTERS']} characters: "
                       "delete one, or sign up")
    if image is not None and len(image[0]) > limits["GUEST_MAX_AVATAR_BYTES"]:
        raise ApiError(f"a guest's avatar can be at most {limits['GUEST_MAX_AVATAR_BYTES'] // 1024} KB "
                       "once stored: use a smaller picture, or sign up")


def save_character(owner, name, user_name, greeting, persona, example_message="", use_qa=False, avatar=None):
    """Create or overwrite the owner's character `name`.

    Overwriting discards the character's conversation and cached prompt
    states (character_changed: the prompt the model read has changed).
    `avatar` None keeps the stored avatar, "" removes it, a data URL
    replaces it. Refused while a reply is being generated for the character.
    """
    image = parse_avatar(avatar) if avatar else None
    character = Character.objects.filter(owner=owner, name=name).first()
    check_guest_quota(owner, creating=character is None, image=image)
    if character is None:
        character = Character(owner=owner, name=name)
        lock = contextlib.nullcontext()
    else:
        lock = character_locked(character)
    with lock, transaction.atomic():
        if character.pk is not None:
            character_changed.send(sender=Character, character=character)
        character.user_name = user_name
        character.greeting = greeting
        character.persona = persona
        character.example_message = example_message
        character.use_qa = use_qa
        if avatar is not None:
            delete_file_on_commit(character.avatar)
            character.avatar = None
            character.avatar_type = ""
        if image is not None:
            data, mime, extension = image
            character.avatar_type = mime
            character.avatar.save(f"avatar.{extension}", ContentFile(data), save=False)
        character.save()
    return character


def delete_character(owner, name):
    """Delete a character with its conversation and every stored state and avatar
    (the rows go by cascade, their files with them)."""
    character = get_character(owner, name)
    with character_locked(character), transaction.atomic():
        character_changed.send(sender=Character, character=character)
        character.delete()


def give_default_characters(sender, instance, created, raw=False, **kwargs):
    """post_save receiver on the user model: new accounts get the default characters."""
    if not created or raw:
        return
    Character.objects.bulk_create(
        Character(owner=instance, **fields) for fields in DEFAULT_CHARACTERS
    )
