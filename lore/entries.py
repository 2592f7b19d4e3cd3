"""Lore entries: reading both lorebook shapes, and choosing what the model reads at a turn.

Two shapes of the same thing come in (and are kept as they came):

- the card spec's character_book: {"scan_depth", "entries": [{"keys",
  "secondary_keys", "content", "enabled", "insertion_order", "constant",
  "selective", "case_sensitive", ...}]};
- SillyTavern's world info: {"entries": {"<uid>": {"key", "keysecondary",
  "content", "disable", "order", "constant", "selective", "caseSensitive",
  ...}}}.

`entries(book)` reads either as Entry values; `choose` picks the entries a
turn reads (docs/cards.md, "Lore"): an enabled entry whose key (and, when it
is selective and has secondary keys, one of those too) is mentioned in the
person's message or the last `scan_depth` messages, or a constant entry;
minus those the model read within those same messages; in insertion order.
"""

import dataclasses
import re

DEFAULT_SCAN_DEPTH = 2  # SillyTavern's default: the new message and the last two
MAX_SCAN_DEPTH = 100
WORD = re.compile(r"\w", re.ASCII)


@dataclasses.dataclass
class Entry:
    keys: list
    secondary_keys: list
    content: str
    enabled: bool = True
    constant: bool = False
    selective: bool = False
    case_sensitive: bool = False
    insertion_order: float = 100


def texts(value):
    """A list of the non-empty strings in `value` (a key list as it came; anything else is no keys)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, str) and item.strip()]


def number(value, default):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def entries(book):
    """The Entry values of a lorebook in either shape (anything unreadable in an entry reads as absent)."""
    raw = book.get("entries") if isinstance(book, dict) else None
    if isinstance(raw, dict):  # SillyTavern world info
        return [Entry(keys=texts(item.get("key")), secondary_keys=texts(item.get("keysecondary")),
                      content=str(item.get("content") or ""), enabled=not item.get("disable", False),
                      constant=item.get("constant") is True, selective=item.get("selective") is True,
                      case_sensitive=item.get("caseSensitive") is True,
                      insertion_order=number(item.get("order"), 100))
                for item in raw.values() if isinstance(item, dict)]
    if isinstance(raw, list):  # the card spec's character_book
        return [Entry(keys=texts(item.get("keys")), secondary_keys=texts(item.get("secondary_keys")),
                      content=str(item.get("content") or ""), enabled=item.get("enabled", True) is not False,
                      constant=item.get("constant") is True, selective=item.get("selective") is True,
                      case_sensitive=item.get("case_sensitive") is True,
                      insertion_order=number(item.get("insertion_order"), 100))
                for item in raw if isinstance(item, dict)]
    return []


def scan_depth(book):
    """How many messages before the new one are scanned for keys (the book's scan_depth, else 2)."""
    depth = book.get("scan_depth") if isinstance(book, dict) else None
    depth = number(depth, DEFAULT_SCAN_DEPTH)
    return max(0, min(int(depth), MAX_SCAN_DEPTH))


def mentions(text, key, case_sensitive):
    """Whether `text` mentions `key`: as a whole word where the key begins or ends with a letter or
    digit of ASCII ("cat" is not in "concatenate"), anywhere otherwise (CJK has no spaces)."""
    flags = 0 if case_sensitive else re.IGNORECASE
    before = r"(?<!\w)" if WORD.match(key[0]) else ""
    after = r"(?!\w)" if WORD.match(key[-1]) else ""
    return re.search(before + re.escape(key) + after, text, flags) is not None


def triggered(entry, text):
    if not entry.enabled or not entry.content.strip():
        return False
    if entry.constant:
        return True
    if not any(mentions(text, key, entry.case_sensitive) for key in entry.keys):
        return False
    if entry.selective and entry.secondary_keys:
        return any(mentions(text, key, entry.case_sensitive) for key in entry.secondary_keys)
    return True


def choose(books, prompt, recent_messages, recently_read, render):
    """The entries' texts the model reads at this turn, in insertion order.

    `books`: lorebook dicts; `prompt`: the person's new message;
    `recent_messages`: the messages before it, newest first; `recently_read`:
    [text read as lore at the turn of each of those messages, or ""], newest
    first, aligned with them; `render(content)`: the text an entry's content is
    read as (names substituted, lines cleaned).
    """
    chosen, seen = [], set()
    for book in books:
        depth = scan_depth(book)
        scanned = "\n".join([prompt] + recent_messages[:depth])
        read = "\n".join(recently_read[:depth])
        for entry in entries(book):
            text = render(entry.content)
            if text and text not in seen and triggered(entry, scanned) and text not in read:
                seen.add(text)
                chosen.append((entry.insertion_order, len(chosen), text))
    return [text for _, _, text in sorted(chosen)]
