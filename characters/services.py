"""Characters: create, overwrite, delete, and the defaults of new accounts."""

import contextlib
import unicodedata

from django.conf import settings
from django.core.files.base import ContentFile
from django.db import IntegrityError, transaction

from locks import services as locks
from rpserver.errors import ApiError
from rpserver.files import delete_file_on_commit, delete_file_on_rollback

from . import cards
from .avatars import clean_avatar, parse_avatar, replace_avatar
from .defaults import starter_characters
from .models import MAX_NAME_LENGTH, Character
from .signals import character_changed


def get_character(owner, name):
    """The owner's character called `name`; other users' characters do not exist here."""
    character = Character.objects.filter(owner=owner, name=name).first()
    if character is None:
        raise ApiError("character does not exist")
    # Read here, on the database thread: the chat's async code uses them (personas/, lore/).
    character.chat_persona, character.chat_lorebooks
    return character


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
        lock = locks.held(character.lock_name)
    with lock, transaction.atomic():
        if character.pk is not None:
            character_changed.send(sender=Character, character=character)
        character.user_name = user_name
        character.greeting = greeting
        character.persona = persona
        character.example_message = example_message
        character.use_qa = use_qa
        replace_avatar(character, avatar, image)
        character.save()
    return character


def delete_character(owner, name):
    """Delete a character with its conversation and every stored state and avatar
    (the rows go by cascade, their files with them)."""
    character = get_character(owner, name)
    with locks.held(character.lock_name), transaction.atomic():
        character_changed.send(sender=Character, character=character)
        character.delete()


def give_default_characters(sender, instance, created, raw=False, **kwargs):
    """post_save receiver on the user model: new accounts get the default characters, in the language
    the account was created in (accounts.services sets `accept_language` on the new user)."""
    if not created or raw:
        return
    Character.objects.bulk_create(
        Character(owner=instance, **fields) for fields in starter_characters(getattr(instance, "accept_language", ""))
    )


# ---- character cards -----------------------------------------------------------------


def import_card(owner, file, name=None):
    """Create the owner's character from a card file (bytes: PNG, JSON or CHARX; characters.cards).

    The card's `data` is kept whole in Character.card for export; its fields
    map onto the character (cards.character_fields), its picture becomes the
    avatar. `name` imports it under another name. Everything is read and
    checked before anything is stored: a file that is not a sound card, over
    a limit, or named like an existing character raises ApiError and stores
    nothing. Returns the new Character.
    """
    card = cards.read_card(file)
    character = card_character(owner, card, name)
    check_card_fields({"name": character.name, "user_name": character.user_name, "persona": character.persona,
                       "greeting": character.greeting, "example_message": character.example_message})
    image = card_picture(card.image)
    check_guest_quota(owner, creating=True, image=image)
    if Character.objects.filter(owner=owner, name=character.name).exists():
        raise ApiError(exists_message(character.name))
    try:
        with transaction.atomic():
            if image is not None:
                data, mime, extension = image
                character.avatar_type = mime
                character.avatar.save(f"avatar.{extension}", ContentFile(data), save=False)
                delete_file_on_rollback(character.avatar)  # an account import's transaction may roll back
            character.save()
    except IntegrityError:  # the same name was imported or saved meanwhile
        delete_file_on_commit(character.avatar)
        raise ApiError(exists_message(character.name))
    return character


def card_character(owner, card, name=None):
    """The Character a card (cards.read_card) makes, not stored (import_card stores it); `name`
    instead of the card's."""
    fields = cards.character_fields(card.data)
    if name is not None:
        fields["name"] = name
    return Character(owner=owner, card=card.data, card_spec=card.spec, **fields)


def exists_message(name):
    return (f"a character named {name!r} already exists: delete it first, "
            "or import the card under another name")


def check_card_fields(fields):
    for field, what in (("name", "name"), ("user_name", "user name (extensions.rpserver.user_name)")):
        if len(fields[field]) > MAX_NAME_LENGTH:
            raise ApiError(f"the card's {what} is longer than {MAX_NAME_LENGTH} characters"
                           + (": import it under another name" if field == "name" else ""))
        if any(unicodedata.category(ch) == "Cc" for ch in fields[field]):
            raise ApiError(f"the card's {what} must not contain control characters such as newlines")
    limit = settings.RPSERVER["MAX_PERSONA_CHARS"]
    for field, what in (("persona", "description, personality and scenario together"),
                        ("greeting", "first message"), ("example_message", "example dialogue")):
        if len(fields[field]) > limit:
            raise ApiError(f"the card is too large: its {what} may be at most {limit} characters, "
                           f"it has {len(fields[field])}")


def card_picture(image):
    """The card's picture as a clean avatar (avatars.clean_avatar), or None when it has none."""
    if image is None:
        return None
    try:
        cleaned = clean_avatar(image)
    except ApiError as exc:
        raise ApiError(f"the card's picture is refused: {exc.message}")
    limit = settings.RPSERVER["MAX_AVATAR_BYTES"]
    if len(cleaned[0]) > limit:
        raise ApiError(f"the card's picture is too large: the limit is {limit // 1024} KB once stored")
    return cleaned


EXPORT_FORMATS = ("png", "json")
EXPORT_SPECS = ("v2", "v3")


def export_card(owner, name, file_format="png", spec="v3"):
    """(bytes, content type, file name) of the owner's character `name` as a card file.

    JSON: the card in `spec` (v3 or v2). PNG: the avatar (a generated picture
    when there is none) with both a V2 `chara` and a V3 `ccv3` chunk.
    """
    character = get_character(owner, name)
    data = cards.card_data(character)
    if file_format == "json":
        return cards.card_json(data, spec), "application/json", f"{name}.json"
    return cards.card_png(data, avatar_png(character)), "image/png", f"{name}.png"


def avatar_png(character):
    """The character's avatar as PNG bytes, or a generated placeholder when it has none."""
    if character.avatar:
        try:
            with character.avatar.open("rb") as stored:
                image = stored.read()
        except OSError:
            image = None
        if image is not None and image.startswith(cards.PNG_SIGNATURE):
            return image
        if image is not None:
            return cards.to_png(image)
    return cards.placeholder_png(character.name)
