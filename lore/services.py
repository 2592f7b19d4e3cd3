"""Lore: lorebooks in and out, and the lore the model reads at a turn.

RWKV reads forward and keeps what it read in its state, so lore is read
where the conversation is: just before the person's message, at the turn
whose messages mention an entry's key, and not again while it is recent
(lore.entries.choose). Nothing already read is read again, and a lorebook
can change at any time without restarting a chat: the next turn reads the
new entries. (A transformer front end puts the lore near the top of the
prompt and has the whole history after it read again at every turn.)
"""

import json

from django.db import IntegrityError, transaction

from characters.cards import CardError, check_values, load_json_object
from characters.serializers import NameField
from inference import prompt as prompt_format
from inference.runtime import get_engine
from rpserver.errors import ApiError

from . import entries as lore_entries
from .models import Lorebook

MAX_LOREBOOKS = 100  # per account
MAX_ENTRIES = 2000  # per book


def character_books(character):
    """The lorebooks a character's chat reads: the card's own character_book, then the owner's active books."""
    books = []
    own = (character.card or {}).get("character_book")
    if isinstance(own, dict) and own.get("entries"):
        books.append(own)
    return books + character.chat_lorebooks


def active_lorebooks(owner_id):
    return [book.data for book in Lorebook.objects.filter(owner_id=owner_id, active=True)]


def lore_for_turn(character, conversation, prompt, user, bot):
    """The text the model reads before the person's message `prompt` at this turn ("" when none):
    the chosen entries' contents (lore.entries.choose), names substituted, one line each, then a
    blank line. Reads the conversation's last rounds (the scan window); call it on the database thread.
    """
    books = character_books(character)
    if not books:
        return ""
    window = max(lore_entries.scan_depth(book) for book in books)
    rounds = list(conversation.rounds.filter(index__gt=0).order_by("-index")[:window])
    tokenizer = get_engine().tokenizer
    messages, read = [], []
    for round_ in rounds:  # newest first; a round's lore was read just before its person's message
        messages += [round_.bot_text, round_.user_text or ""]
        read += ["", tokenizer.decode(round_.token_list[:round_.reply_start])]

    def render(content):
        return prompt_format.clean_turn(prompt_format.substitute(with_macros(content), user, bot))

    chosen = lore_entries.choose(books, prompt, messages, read, render)
    return "\n".join(chosen) + prompt_format.TURN_END if chosen else ""


def with_macros(text):
    from characters.cards import with_macros as card_macros

    return card_macros(text)


# ---- lorebooks in and out ---------------------------------------------------------------


def parse_lorebook(file):
    """A lorebook's JSON object from a file's bytes (SillyTavern world info or a character_book)."""
    from django.conf import settings

    limit = settings.RPSERVER["MAX_CARD_JSON_BYTES"]
    if len(file) > limit:
        raise CardError(f"the lorebook is too large: the limit is {limit // 1024} KB")
    book = load_json_object(file, "the lorebook file", "a lorebook")
    check_book(book)
    return book


def check_book(book):
    raw = book.get("entries")
    if not isinstance(raw, (dict, list)):
        raise ApiError("this is not a lorebook: it has no entries (SillyTavern world info or a character_book)")
    items = list(raw.values()) if isinstance(raw, dict) else raw
    if len(items) > MAX_ENTRIES:
        raise ApiError(f"the lorebook has too many entries: the limit is {MAX_ENTRIES}")
    if not all(isinstance(item, dict) for item in items):
        raise ApiError("the lorebook's entries must be objects")
    check_values(book, 1, "the lorebook")


def book_name(book, name):
    """The name to keep a book under: the one given, else the book's own, else "Lorebook"."""
    if name:
        return name
    own = book.get("name")
    return NameField().run_validation(own.strip()[:64]) if isinstance(own, str) and own.strip() else "Lorebook"


def save_lorebook(owner, book, name=None, active=True, lorebook=None):
    """Create a lorebook from `book` (a checked JSON object), or replace one's content
    (`lorebook` given, `book` None keeps it). Chats need no restart: lore is read turn by turn."""
    if lorebook is None:
        if owner.lorebooks.count() >= MAX_LOREBOOKS:
            raise ApiError(f"an account can keep at most {MAX_LOREBOOKS} lorebooks")
        lorebook = Lorebook(owner=owner)
    if book is not None:
        check_book(book)
        lorebook.data = book
    lorebook.name = book_name(lorebook.data, name) if (name or lorebook.pk is None) else lorebook.name
    if active is not None:
        lorebook.active = active
    try:
        with transaction.atomic():
            lorebook.save()
    except IntegrityError:
        raise ApiError(f"a lorebook named {lorebook.name!r} already exists")
    return lorebook


def get_lorebook(owner, lorebook_id):
    lorebook = Lorebook.objects.filter(owner=owner, pk=lorebook_id).first()
    if lorebook is None:
        raise ApiError("lorebook does not exist")
    return lorebook


def delete_lorebook(owner, lorebook_id):
    get_lorebook(owner, lorebook_id).delete()


def export_lorebook(owner, lorebook_id):
    """(JSON bytes, file name) of a lorebook, as it came (with the edits made here)."""
    lorebook = get_lorebook(owner, lorebook_id)
    return json.dumps(lorebook.data, ensure_ascii=False, indent=2).encode(), f"{lorebook.name}.json"
