"""Characters: create, overwrite, delete, and the defaults of new accounts."""

from django.core.files.base import ContentFile
from django.db import transaction

from rpserver.envelope import ApiError
from rpserver.files import delete_file_on_commit

from .avatars import parse_avatar
from .defaults import DEFAULT_CHARACTERS
from .models import Character


def get_character(owner, name):
    """The owner's character called `name`; other users' characters do not exist here."""
    character = Character.objects.filter(owner=owner, name=name).first()
    if character is None:
        raise ApiError("character does not exist")
    return character


def save_character(owner, name, user_name, greeting, persona, example_message="", use_qa=False, avatar=None):
    """Create or overwrite the owner's character `name`.

    Overwriting discards the character's conversation and cached prompt
    states (the prompt the model read has changed). `avatar` None keeps the
    stored avatar, "" removes it, a data URL replaces it. Refused while a
    reply is being generated for the character.
    """
    from chat.services import discard_conversations

    image = parse_avatar(avatar) if avatar else None
    with transaction.atomic():
        character = Character.objects.select_for_update().filter(owner=owner, name=name).first()
        if character is None:
            character = Character(owner=owner, name=name)
        else:
            discard_conversations(character)
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
    """Delete a character with its conversation and every stored state and avatar."""
    from chat.services import discard_conversations

    with transaction.atomic():
        character = get_character(owner, name)
        discard_conversations(character)
        character.delete()


def give_default_characters(sender, instance, created, raw=False, **kwargs):
    """post_save receiver on the user model: new accounts get the default characters."""
    if not created or raw:
        return
    Character.objects.bulk_create(
        Character(owner=instance, **fields) for fields in DEFAULT_CHARACTERS
    )
