"""What the web client asks the server beyond the legacy API: the server's facts (which model, whether
sign-up is open, the sampling ranges), the gallery with a line about each character, and a chat with
whether a reply is being written for it now."""

import functools
import re
from pathlib import Path

from django.conf import settings

from characters.avatars import avatar_data_url
from characters.services import get_character
from chat.services import chats_of, load_chat, show_chat
from chat.tree import NO_CHAT
from inference import runtime
from inference.checkpoint import CheckpointError, fingerprint, load_weights
from inference.sampling import LIMITS, SamplingSettings
from locks import services as locks
from rpserver.errors import ApiError


@functools.lru_cache(maxsize=4)
def _fingerprint_of(path, modified):
    try:
        return fingerprint(load_weights(path))
    except CheckpointError:
        return None


def serving_demo_model():
    """True when the loaded model is the random-weight demo checkpoint.

    Told by the weights, not the file name: the loaded model's fingerprint
    equals the demo file's. Serving the demo writes that file first, so a
    missing file means a real model.
    """
    engine = runtime.loaded()
    demo = Path(settings.RPSERVER["DEMO_MODEL"])
    if engine is None or not demo.is_file():
        return False
    return engine.backend.model_id == _fingerprint_of(str(demo), demo.stat().st_mtime_ns)


def signup_allowed():
    """RPSERVER_ALLOW_SIGNUP (on unless an operator turns it off)."""
    return bool(settings.RPSERVER.get("ALLOW_SIGNUP", True))


# The sliders, in the dialog's order, and how finely a person sets each (the ranges and defaults are the API's).
SLIDER_STEPS = {"temperature": 0.05, "min_p": 0.01, "presence_penalty": 0.1, "tau": 0.1, "rate": 0.01}


def sampling_fields():
    """The legacy API's sampling fields for the settings dialog: one home for their ranges and defaults
    (inference.sampling), served to the client rather than written again in its script."""
    fields = []
    for name, step in SLIDER_STEPS.items():
        low, high, low_inclusive = LIMITS[name]
        fields.append({"name": name, "min": low if low_inclusive else low + step, "max": high, "step": step,
                       "value": getattr(SamplingSettings, name)})
    return fields


def client_config():
    engine = runtime.loaded()
    return {
        "sampling": sampling_fields(),
        "guest_max_avatar_bytes": settings.RPSERVER["LIMITS"]["GUEST_MAX_AVATAR_BYTES"],
        "demo_model": serving_demo_model(),
        "model": engine.backend.description if engine is not None else "",
        "allow_signup": signup_allowed(),
        "max_reply_tokens": settings.RPSERVER["MAX_REPLY_TOKENS"],
        "max_prompt_chars": settings.RPSERVER["MAX_PROMPT_CHARS"],
        "max_persona_chars": settings.RPSERVER["MAX_PERSONA_CHARS"],
        "max_avatar_bytes": settings.RPSERVER["MAX_AVATAR_BYTES"],
    }


SENTENCE_END = re.compile(r"(?<=[.!?])\s|(?<=[。！？])")
MAX_DESCRIPTION_CHARS = 140


def describe(character):
    """A line about a character for the gallery: the first sentence of its persona, names filled in."""
    text = " ".join(character.persona.replace("{{char}}", character.name)
                    .replace("{{user}}", character.user_name).split())
    first = SENTENCE_END.split(text, maxsplit=1)[0].strip()
    return first if len(first) <= MAX_DESCRIPTION_CHARS else first[:MAX_DESCRIPTION_CHARS - 1].rstrip() + "…"


# At most this many tags of a card are shown and searched: a card's tags are free text from anyone.
MAX_GALLERY_TAGS = 12
MAX_TAG_CHARS = 40


def card_tags(character):
    """The tags of the card a character was imported from (Character.card), as the gallery shows them:
    strings only, stripped, each once (any case), at most MAX_GALLERY_TAGS of MAX_TAG_CHARS."""
    tags = (character.card or {}).get("tags")
    shown = {}
    for tag in tags if isinstance(tags, list) else []:
        if isinstance(tag, str) and tag.strip():
            text = " ".join(tag.split())[:MAX_TAG_CHARS]
            shown.setdefault(text.casefold(), text)
    return list(shown.values())[:MAX_GALLERY_TAGS]


def gallery(owner):
    """The owner's characters as the gallery shows them: name, avatar, a line about each, its card's tags."""
    return [{"char_name": c.name, "avatar": avatar_data_url(c), "description": describe(c), "tags": card_tags(c)}
            for c in owner.characters.all()]


def chat_now(owner, name, chat_id=None):
    """The chat as stored, and whether a request (a reply being written, most often) holds it now:
    a second tab shows that, and loads the chat again when it is free.

    `tree` is the conversation tree's view of the same chat (chat.tree.tree_view: each message's
    round id and alternatives), for the page's controls; `chats` the character's chats (the main
    one, then its forks); `chat_id` picks a fork instead of the main chat (the legacy `chat` is
    always the main one's).

    `busy` is read first: a change is stored in the transaction that lets go of the lock, so a
    chat read after the lock was seen free holds every change made under it. (Read last, a reply
    stored between the two reads showed the chat without it, and free: after a Stop, the page
    gave the person's words back although their message was kept.)"""
    busy = locks.is_held(get_character(owner, name).lock_name)
    chat = load_chat(owner, name)
    chats = chats_of(owner, name)
    tree = show_chat(owner, chats[0]["id"] if chat_id is None else chat_id)
    if tree["character"] != name:
        raise ApiError(NO_CHAT, 404)
    return {"chat": chat, "tree": tree, "chats": chats, "busy": busy}
