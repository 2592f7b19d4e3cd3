"""A whole account as one file: a zip of its characters (as cards), personas, lorebooks and chats.

The file (docs/import-export.md#a-whole-account):

    rpserver-account.json       the manifest: what is in the file and how the parts fit
    characters/<n>.png|json     each character as a card (characters.cards), its avatar the PNG
    personas/<n>.<ext>          a persona's avatar
    lorebooks/<n>.json          a lorebook's JSON, as lore/ keeps it
    chats/<n>/<m>.jsonl         a character's chats (chat.transfer), the main one first

Every member is named by a number: nothing a person typed becomes a path.
The states are not in the file (a chat's text is read again on import).
Import is all or nothing (import_account).

Import is hostile-file safe as a CHARX card is (characters.cards): the
number of members is bounded, a member named outside the archive's folder
refuses the file, each member is read counting its real size against its
kind's limit (a zip bomb stops there), and the whole file is read and
checked, every card, persona, lorebook and chat, before anything is stored.
"""

import base64
import dataclasses
import io
import json
import re
import struct
import zipfile

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from characters import cards
from characters import services as characters
from characters.avatars import clean_avatar
from characters.models import Character
from characters.serializers import NameField
from chat import transfer
from chat.lease import LOST, db
from chat.models import Conversation, Round
from inference.runtime import get_engine
from limits import services as limits
from locks import services as locks
from lore import services as lore
from lore.models import Lorebook
from personas import services as personas
from personas.models import Persona
from personas.serializers import PersonaSerializer
from rpserver.errors import ApiError
from rpserver.files import deleted_on_rollback
from statecache.blobs import blob_io, delete_states

MANIFEST = "rpserver-account.json"
FORMAT = "rpserver-account"
VERSION = 1
CONTAINER = "the account file"
# An account holds at most 50 personas and 100 lorebooks; characters and chats are not bounded,
# but a file with more members than this is not an account a person made.
MAX_MEMBERS = 5000


def limit(name):
    return settings.RPSERVER[name]


# ---- export ------------------------------------------------------------------------------


def export_account(owner):
    """(zip bytes, file name) of the owner's whole account (module docstring)."""
    manifest = {"format": FORMAT, "version": VERSION, "exported": timezone.now().isoformat(),
                "characters": [], "personas": [], "lorebooks": []}
    output = io.BytesIO()
    with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as archive:
        persona_numbers = {}
        for number, persona in enumerate(Persona.objects.filter(owner=owner).order_by("pk"), 1):
            persona_numbers[persona.pk] = number
            entry = {"name": persona.name, "description": persona.description, "default": persona.is_default,
                     "avatar": None}
            image = stored_file(persona.avatar)
            if image is not None:
                entry["avatar"] = f"personas/{number}.{persona.avatar.name.rsplit('.', 1)[-1]}"
                archive.writestr(entry["avatar"], image)
            manifest["personas"].append(entry)
        for number, lorebook in enumerate(Lorebook.objects.filter(owner=owner).order_by("pk"), 1):
            entry = {"name": lorebook.name, "active": lorebook.active, "file": f"lorebooks/{number}.json"}
            archive.writestr(entry["file"], json.dumps(lorebook.data, ensure_ascii=False, indent=2))
            manifest["lorebooks"].append(entry)
        for number, character in enumerate(Character.objects.filter(owner=owner).order_by("pk"), 1):
            file_format = "png" if character.avatar else "json"
            card, _, _ = characters.export_card(owner, character.name, file_format)
            entry = {"name": character.name, "card": f"characters/{number}.{file_format}",
                     "persona": persona_numbers.get(character.chosen_persona_id), "chats": []}
            archive.writestr(entry["card"], card)
            conversations = Conversation.objects.filter(character=character, head__isnull=False) \
                .select_related("character").order_by("is_fork", "pk")
            for chat_number, conversation in enumerate(conversations, 1):
                lines = transfer.chat_lines(conversation)
                chat = {"file": f"chats/{number}/{chat_number}.jsonl", "main": not conversation.is_fork}
                archive.writestr(chat["file"], "\n".join(json.dumps(line, ensure_ascii=False) for line in lines))
                entry["chats"].append(chat)
            manifest["characters"].append(entry)
        archive.writestr(MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=2))
    return output.getvalue(), f"{owner.username} - {transfer.st_date(timezone.now())}.zip"


def stored_file(field_file):
    if not field_file:
        return None
    try:
        with field_file.open("rb") as stored:
            return stored.read()
    except OSError:
        return None


# ---- reading an account file ---------------------------------------------------------------


@dataclasses.dataclass
class AccountFile:
    """An account file, read and checked: nothing of it is stored yet."""

    characters: list  # [(manifest entry, card bytes, [(chat rounds, is main)])]
    personas: list  # [(name, description, default, avatar bytes or None)]
    lorebooks: list  # [(name, active, book)]


def read_account_file(file):
    """The AccountFile in `file` (zip bytes); ApiError saying what is wrong otherwise."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(file))
        members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, struct.error):
        raise ApiError("this is not an account file: expected the zip file an account export gives")
    if len(members) > MAX_MEMBERS:
        raise ApiError(f"{CONTAINER} holds too many files (more than {MAX_MEMBERS})")
    for member in members:
        cards.check_member_name(member.filename, CONTAINER)
    names = {member.filename: member for member in members}

    def member(path, max_bytes, what):
        if not isinstance(path, str) or path not in names:
            raise ApiError(f"{CONTAINER} is damaged: {what} ({str(path)[:80]!r}) is missing")
        return cards.read_member(archive, names[path], max_bytes, what=path, container=CONTAINER)

    if MANIFEST not in names:
        raise ApiError(f"this is not an account file: it holds no {MANIFEST}")
    manifest = cards.load_json_object(member(MANIFEST, limit("MAX_CARD_JSON_BYTES"), "the manifest"),
                                      f"{MANIFEST} in {CONTAINER}", "a manifest")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ApiError(f"this is not an account file of this version (format {FORMAT!r}, version {VERSION})")
    entries = {key: manifest.get(key, []) for key in ("characters", "personas", "lorebooks")}
    for key, value in entries.items():
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise ApiError(f"{MANIFEST}: {key} must be a list of objects")

    read_personas = []
    for entry in entries["personas"]:
        form = PersonaSerializer(data={"name": entry.get("name"), "description": entry.get("description", "")})
        if not form.is_valid():
            field, errors = next(iter(form.errors.items()))
            raise ApiError(f"{MANIFEST}: a persona's {field}: {errors[0]}")
        avatar = None
        if entry.get("avatar") is not None:
            avatar = member(entry["avatar"], limit("MAX_AVATAR_BYTES"), "a persona's avatar")
            clean_avatar(avatar)  # ApiError now, not half-way through storing
        read_personas.append((form.validated_data["name"], form.validated_data["description"],
                              entry.get("default") is True, avatar))

    read_lorebooks = []
    for entry in entries["lorebooks"]:
        book = lore.parse_lorebook(member(entry.get("file"), limit("MAX_CARD_JSON_BYTES"), "a lorebook"))
        read_lorebooks.append((checked_name(entry.get("name"), "a lorebook's name"), entry.get("active") is not False,
                               book))

    read_characters = []
    for entry in entries["characters"]:
        card_file = member(entry.get("card"), limit("MAX_CARD_FILE_BYTES"), "a character's card")
        card = cards.read_card(card_file)
        fields = cards.character_fields(card.data)
        characters.check_card_fields(fields)
        characters.card_picture(card.image)
        chats = entry.get("chats", [])
        if not isinstance(chats, list) or not all(isinstance(chat, dict) for chat in chats):
            raise ApiError(f"{MANIFEST}: a character's chats must be a list of objects")
        read_chats = [(transfer.parse_chat_file(member(chat.get("file"), limit("MAX_CHAT_FILE_BYTES"), "a chat")),
                       chat.get("main") is True) for chat in chats]
        persona = entry.get("persona")
        if persona is not None and (not isinstance(persona, int) or not 1 <= persona <= len(read_personas)):
            raise ApiError(f"{MANIFEST}: a character's persona must be the number of one of the file's personas")
        read_characters.append(({"name": fields["name"], "persona": persona}, card_file, read_chats))
    return AccountFile(read_characters, read_personas, read_lorebooks)


def checked_name(value, what):
    if not isinstance(value, str):
        raise ApiError(f"{MANIFEST}: {what} must be text")
    try:
        return NameField().run_validation(value)
    except Exception as exc:  # a DRF ValidationError: its detail says what is wrong
        raise ApiError(f"{MANIFEST}: {what}: {getattr(exc, 'detail', [exc])[0]}")


# ---- storing it -------------------------------------------------------------------------------


def free_name(name, taken):
    """`name`, or `name (2)`, `name (3)` ... : the first not in `taken` (the documented rename)."""
    if name not in taken:
        return name
    number = 2
    while f"{name} ({number})"[:64] in taken:
        number += 1
    return f"{name[:64 - len(f' ({number})')]} ({number})"


def same_or_renamed(name, names):
    """The names among `names` that are `name` or one of its renames (free_name), in order."""
    pattern = re.compile(re.escape(name[:50]) + r".* \(\d+\)$")
    return [taken for taken in sorted(names) if taken == name or pattern.fullmatch(taken)]


@dataclasses.dataclass
class PlannedPersona:
    name: str  # as in the file
    stored_as: str
    reused: object  # the account's Persona that is the same, or None: a new one
    description: str
    default: bool  # becomes the account's default
    avatar: bytes | None
    persona: object  # the Persona the chats speak as: `reused`, or an unsaved one


@dataclasses.dataclass
class PlannedCharacter:
    name: str  # as in the file
    stored_as: str
    reused: object  # the account's Character that reads the same, or None: a new one
    card_file: bytes
    persona: int | None  # the file's number of the persona it chose
    chats: list  # [(chat rounds, is main)], main first
    character: object  # the Character its chats are read for: `reused`, or an unsaved one


@dataclasses.dataclass
class AccountPlan:
    """What storing an AccountFile will do, decided before anything is stored (plan_account)."""

    personas: list  # [PlannedPersona]
    lorebooks: list  # [(name in the file, stored name, reused, active, book)]
    characters: list  # [PlannedCharacter]
    lock_names: list  # the existing characters' locks the import holds: reused, or restarted by a new default


def plan_account(owner, account):
    """Decide what an AccountFile makes in the owner's account (names already taken: reused when the
    same, else renamed, free_name), reading the database only."""
    planned_personas = []
    taken = set(Persona.objects.filter(owner=owner).values_list("name", flat=True))
    default_now = Persona.objects.filter(owner=owner, is_default=True).first()
    # A new default restarts every chat without a persona of its own (personas/): the file's default
    # becomes the account's only where that loses nothing (no default yet, no chat past its greeting).
    keeps_default = default_now is not None or Round.objects.filter(conversation__owner=owner, index__gt=0).exists()
    for name, description, default, avatar in account.personas:
        same = Persona.objects.filter(owner=owner, name__in=same_or_renamed(name, taken),
                                      description=description).order_by("pk").first()
        if same is not None:
            planned_personas.append(PlannedPersona(name, same.name, same, description, False, None, same))
            continue
        stored_as = free_name(name, taken)
        taken.add(stored_as)
        becomes_default = default and not keeps_default
        keeps_default = keeps_default or becomes_default
        planned_personas.append(PlannedPersona(name, stored_as, None, description, becomes_default, avatar,
                                               Persona(owner=owner, name=stored_as, description=description)))
    new_default = next((planned.persona for planned in planned_personas if planned.default), None)
    default_after = new_default or default_now

    planned_lorebooks = []
    taken = set(Lorebook.objects.filter(owner=owner).values_list("name", flat=True))
    for name, active, book in account.lorebooks:
        same = [book_ for book_ in Lorebook.objects.filter(owner=owner, name__in=same_or_renamed(name, taken))
                if book_.data == book]
        if same:
            planned_lorebooks.append((name, same[0].name, True, active, book))
            continue
        stored_as = free_name(name, taken)
        taken.add(stored_as)
        planned_lorebooks.append((name, stored_as, False, active, book))

    planned_characters = []
    taken = set(Character.objects.filter(owner=owner).values_list("name", flat=True))
    for entry, card_file, read_chats in account.characters:
        name = entry["name"]
        same = [character for character in Character.objects.filter(owner=owner,
                                                                     name__in=same_or_renamed(name, taken))
                if reads_the_same(character, card_file)]
        chats = sorted(read_chats, key=lambda chat: not chat[1])  # the main chat first
        if same:
            character = same[0]
            persona = personas.persona_of_chat(character) if character.chosen_persona_id else default_after
            planned_characters.append(PlannedCharacter(name, character.name, character, card_file, None, chats,
                                                       with_chat_persona(character, persona)))
            continue
        stored_as = free_name(name, taken)
        taken.add(stored_as)
        character = characters.card_character(owner, cards.read_card(card_file), stored_as)
        persona = planned_personas[entry["persona"] - 1].persona if entry["persona"] is not None else default_after
        planned_characters.append(PlannedCharacter(name, stored_as, None, card_file, entry["persona"], chats,
                                                   with_chat_persona(character, persona)))

    locked = {planned.reused.pk: planned.reused for planned in planned_characters if planned.reused is not None}
    if new_default is not None:  # save_persona restarts these chats (the import holds their locks already)
        locked |= {character.pk: character
                   for character in Character.objects.filter(owner=owner, chosen_persona=None)}
    lock_names = [character.lock_name for character in personas.unique(locked.values())]
    return AccountPlan(planned_personas, planned_lorebooks, planned_characters, lock_names)


def with_chat_persona(character, persona):
    """`character`, whose chat speaks as `persona` (as it will once the import is stored)."""
    character.chat_persona = persona
    return character


def lock_all(names):
    """Take the locks `names` (in that order) for the import: [[name, key]]; locks.Busy (answered BUSY)
    if one is taken, and then none is held."""
    held = []
    try:
        for name in names:
            held.append([name, locks.acquire(name)])
    except BaseException:
        release_all(held)
        raise
    return held


def release_all(held):
    for name, key in held:
        locks.release(name, key)
    held.clear()


def store_account(owner, plan, chats, model_id, held):
    """Store an AccountPlan (its personas, lorebooks, characters) and its chats (`chats`: [(planned
    character, chat rounds, is main, (planned rounds, state blobs))], read by the model) in one
    transaction, which also releases the locks `held`; returns what was renamed or reused.

    If anything fails, the transaction rolls back, the avatars written are deleted
    (deleted_on_rollback) and the caller deletes the state blobs: the account is as it was."""
    report = {"characters": [], "personas": [], "lorebooks": []}
    with deleted_on_rollback(), transaction.atomic():
        for name, key in held:
            try:
                locks.check(name, key)
            except locks.Lost:
                raise ApiError(LOST)
        lock_names = {name for name, _ in held}
        persona_ids = []
        for planned in plan.personas:
            stored = planned.reused
            if stored is None:
                avatar = base64.b64encode(planned.avatar).decode() if planned.avatar else None
                stored = personas.save_persona(owner, planned.stored_as, planned.description, avatar=avatar,
                                               is_default=True if planned.default else None, held=lock_names)
            persona_ids.append(stored.pk)
            report["personas"].append({"name": planned.name, "stored_as": planned.stored_as,
                                       "reused": planned.reused is not None})
        for name, stored_as, reused, active, book in plan.lorebooks:
            if not reused:
                lore.save_lorebook(owner, book, name=stored_as, active=active)
            report["lorebooks"].append({"name": name, "stored_as": stored_as, "reused": reused})
        for planned in plan.characters:
            if planned.reused is None:
                character = characters.import_card(owner, planned.card_file, name=planned.stored_as)
                if planned.persona is not None:
                    Character.objects.filter(pk=character.pk).update(chosen_persona=persona_ids[planned.persona - 1])
            report["characters"].append({"name": planned.name, "stored_as": planned.stored_as,
                                         "reused": planned.reused is not None})
        for planned, rounds, is_main, (planned_rounds, blobs) in chats:
            character = characters.get_character(owner, planned.stored_as)
            if token_lists(transfer.plan_rounds(character, rounds)) != token_lists(planned_rounds):
                raise ApiError(CHANGED)
            transfer.store_chat(character, planned_rounds, blobs, model_id, make_main=is_main)
        for name, key in held:
            locks.release(name, key)
    held.clear()
    return report


CHANGED = ("the account was changed while its file was read (a character or persona it uses was edited "
           "meanwhile): nothing was imported, import the file again")


def token_lists(planned):
    return [item.round.token_list for item in planned]


def reads_the_same(character, card_file):
    """Whether `character` is what the card would make, for the model (a starter character a fresh
    account has, exported from another; one imported before): then the file's chats go to it
    instead of to a renamed copy."""
    fields = cards.character_fields(cards.read_card(card_file).data)
    return all(getattr(character, field) == value for field, value in fields.items() if field != "name")


async def import_account(owner, file):
    """Import an account file (zip bytes) into the owner's account; returns what was stored.

    All or nothing. The whole file is read and checked first (read_account_file): a bad file raises
    ApiError. Then what it makes is decided (plan_account: names already taken are reused when the
    same, else renamed) and the locks of the existing characters it touches are taken (a reply
    running for one: BUSY). The model reads each chat's text once (chat.transfer.read_chat), for
    characters not stored yet too, writing the states the policy keeps; then everything is stored
    in one transaction (store_account). A failure anywhere (the model, a quota, a lock lost) stores
    nothing and deletes every file written: the account is as it was before.
    """
    account = await db(read_account_file)(file)
    await db(limits.check_reply_rate)(owner)  # one reply's worth, as a chat
    plan = await db(plan_account)(owner, account)
    held = await db(lock_all)(plan.lock_names)
    chats, blobs = [], []
    try:
        for planned in plan.characters:
            for rounds, is_main in planned.chats:
                read = await transfer.read_chat(owner, planned.character, rounds)
                blobs += read[1].values()
                chats.append((planned, rounds, is_main, read))
        report = await db(store_account)(owner, plan, chats, get_engine().model_id, held)
    except BaseException:
        await blob_io(delete_states)(blobs)
        raise
    finally:
        if held:
            await db(release_all)(held)
    return report | {"chats": len(chats)}
