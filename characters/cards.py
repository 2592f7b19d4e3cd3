"""Character cards: the files SillyTavern, Agnai, RisuAI and KoboldCpp exchange.

Reading: a PNG with the card as base64 JSON in a tEXt chunk (`ccv3` for V3,
`chara` for V2/V1; `ccv3` wins when both are there), a JSON file (V1: the
six fields at the top; V2: `spec: chara_card_v2`; V3: `spec: chara_card_v3`)
or a CHARX file (a zip with `card.json` and its assets). Writing: JSON (V3,
or V2 on request) and PNG (the picture, with both a `chara` and a `ccv3`
chunk, as the V3 spec asks for compatibility).

Everything here is about the files, not the database: `read_card` turns
bytes into a Card (the card's `data` object exactly as it came, its spec,
and its picture's bytes, not yet checked), `card_json` and `card_png` turn a
`data` object back into a file. characters.services maps a card onto a
character and back.

Every file is hostile until read: sizes are checked before anything is
decoded (base64, JSON, zip members), JSON nesting is bounded, a zip member's
real size is counted as it is read (its header may lie), and every error is
a CardError whose message says what is wrong with the file.
"""

import base64
import binascii
import dataclasses
import io
import json
import re
import struct
import zipfile
import zlib

from django.conf import settings

from rpserver.errors import ApiError
from rpserver.pipeline import checked_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
V2 = "chara_card_v2"
V3 = "chara_card_v3"

# A card's JSON nests a few levels (data, character_book, entries, an entry,
# its extensions, what a tool keeps there): 32 is far above any real card and
# far below what would exhaust the parser.
MAX_DEPTH = 32
# A CHARX holds a card and its assets: more members than this is not a card.
MAX_ZIP_MEMBERS = 1000

TEXT_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example",
               "creator_notes", "system_prompt", "post_history_instructions", "creator",
               "character_version")
LIST_FIELDS = ("alternate_greetings", "tags")
V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
# The fields V3 added: a V2 export leaves them out.
V3_ONLY_FIELDS = ("nickname", "assets", "group_only_greetings", "creator_notes_multilingual", "source",
                  "creation_date", "modification_date")


class CardError(ApiError):
    """A file that is not a card we can read (code 400)."""


@dataclasses.dataclass
class Card:
    data: dict  # the card's `data` object, as it came (a V1 card's six fields)
    spec: str  # "chara_card_v1", "chara_card_v2" or "chara_card_v3"
    image: bytes | None = None  # the picture (PNG, or CHARX's main icon), unchecked


def limit(name):
    return settings.RPSERVER[name]


# ---- reading ------------------------------------------------------------------------


def read_card(file):
    """The Card in `file` (bytes of a PNG, JSON or CHARX file); CardError if there is none."""
    if len(file) > limit("MAX_CARD_FILE_BYTES"):
        raise CardError(f"the card file is too large: the limit is {limit('MAX_CARD_FILE_BYTES') // 1024} KB")
    if file.startswith(PNG_SIGNATURE):
        return read_png(file)
    if file.startswith(ZIP_SIGNATURE):
        return read_charx(file)
    if file.lstrip()[:1] == b"{":
        return parse_card_json(file)
    raise CardError("this file is not a character card: expected a PNG, a JSON file or a CHARX (zip) file")


def png_chunks(file):
    """[(type, data)] of a PNG's chunks, in order; CardError if its structure is broken."""
    chunks, position = [], len(PNG_SIGNATURE)
    while position < len(file):
        if position + 12 > len(file):
            raise CardError("the PNG file is damaged: it ends in the middle of a chunk")
        length, chunk_type = struct.unpack(">I4s", file[position:position + 8])
        end = position + 12 + length
        if end > len(file):
            raise CardError("the PNG file is damaged: a chunk runs past the end of the file")
        chunks.append((chunk_type, file[position + 8:position + 8 + length]))
        position = end
        if chunk_type == b"IEND":
            break
    return chunks


def read_png(file):
    """A PNG card: the JSON of its `ccv3` tEXt chunk, else of its `chara` chunk; the PNG is its picture."""
    texts = {}
    for chunk_type, data in png_chunks(file):
        if chunk_type == b"tEXt" and b"\x00" in data:
            keyword, text = data.split(b"\x00", 1)
            if keyword in (b"ccv3", b"chara") and keyword not in texts:
                texts[keyword] = text
    text = texts.get(b"ccv3", texts.get(b"chara"))
    if text is None:
        raise CardError("this PNG holds no character card (no 'chara' or 'ccv3' text chunk)")
    if len(text) > (limit("MAX_CARD_JSON_BYTES") * 4) // 3 + 4:
        raise CardError(card_too_large())
    try:
        payload = base64.b64decode(re.sub(rb"\s+", b"", text), validate=True)
    except (binascii.Error, ValueError):
        raise CardError("the card in this PNG is not base64-encoded JSON")
    card = parse_card_json(payload, where="the card in this PNG")
    card.image = file
    return card


def read_charx(file):
    """A CHARX card: `card.json` (V3), and the main icon among its assets as the picture."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(file))
        members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, struct.error):
        raise CardError("the CHARX file is not a readable zip archive")
    if len(members) > MAX_ZIP_MEMBERS:
        raise CardError(f"the CHARX file holds too many files (more than {MAX_ZIP_MEMBERS})")
    for member in members:
        check_member_name(member.filename)
    names = {member.filename: member for member in members}
    if "card.json" not in names:
        raise CardError("the CHARX file holds no card.json")
    card = parse_card_json(read_member(archive, names["card.json"], limit("MAX_CARD_JSON_BYTES")),
                           where="card.json in this CHARX")
    icon = main_icon_path(card.data)
    if icon is not None and icon in names:
        card.image = read_member(archive, names[icon], limit("MAX_AVATAR_BYTES"), what="the card's picture")
    return card


def check_member_name(name, container="the CHARX file"):
    """Refuse a member that would land outside the archive's folder if it were unpacked."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", name) or "\x00" in name:
        raise CardError(f"{container} is refused: it holds a file outside its own folder ({name!r})")


def read_member(archive, member, max_bytes, what="card.json", container="the CHARX file"):
    """A zip member's bytes, counted as they are decompressed: a member (a zip bomb) whose header
    understates its size is stopped at `max_bytes`, not read to its end. (`container` names the
    archive in the messages: a CHARX file, or an account file, archive/services.py.)"""
    if member.file_size > max_bytes:
        raise CardError(f"{what} in {container} is too large: the limit is {max_bytes // 1024} KB")
    chunks, size = [], 0
    try:
        with archive.open(member) as stream:
            while chunk := stream.read(65536):
                size += len(chunk)
                if size > max_bytes:
                    raise CardError(f"{what} in {container} is too large: the limit is {max_bytes // 1024} KB")
                chunks.append(chunk)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError, zlib.error) as exc:
        raise CardError(f"{what} in {container} cannot be read: {exc}")
    return b"".join(chunks)


def main_icon_path(data):
    """The path in a CHARX of the card's main icon (assets: type "icon", name "main"), or None."""
    assets = data.get("assets")
    if not isinstance(assets, list):
        return None
    for asset in assets:
        if isinstance(asset, dict) and asset.get("type") == "icon" and asset.get("name") == "main":
            uri = asset.get("uri")
            if isinstance(uri, str) and uri.startswith("embeded://"):
                return uri[len("embeded://"):]
    return None


def card_too_large():
    return f"the card is too large: its JSON may be at most {limit('MAX_CARD_JSON_BYTES') // 1024} KB"


def parse_card_json(payload, where="the card file"):
    """A Card from the bytes of a card's JSON (V1, V2 or V3)."""
    if len(payload) > limit("MAX_CARD_JSON_BYTES"):
        raise CardError(card_too_large())
    card = load_json_object(payload, where, "a character card")
    spec = card.get("spec")
    if spec in (V2, V3):
        data = card.get("data")
        if not isinstance(data, dict):
            raise CardError(f"{where} is not a character card: a {spec} card needs a 'data' object")
        return Card(check_data(data), spec)
    if spec is not None:
        raise CardError(f"{where} has an unknown spec {str(spec)[:40]!r}: expected chara_card_v2 or chara_card_v3")
    if "name" not in card or "first_mes" not in card and "description" not in card:
        raise CardError(f"{where} is not a character card: it has no name, description or first_mes")
    return Card(check_data({key: card.get(key, "") for key in V1_FIELDS}), "chara_card_v1")


def load_json_object(payload, where, what):
    """The JSON object in `payload` (bytes, already within its size limit), nesting within
    MAX_DEPTH and every string storable; CardError naming `where` otherwise."""
    try:
        value = json.loads(payload.decode("utf-8-sig"))
    except RecursionError:
        raise CardError(f"{where} is nested too deeply (more than {MAX_DEPTH} levels)")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CardError(f"{where} is not valid JSON: {exc}")
    if not isinstance(value, dict):
        raise CardError(f"{where} is not {what}: its JSON must be an object ({{...}})")
    check_values(value, 1, where)
    return value


def check_values(value, depth, where):
    """Nesting within MAX_DEPTH; every string storable text (no NUL, no lone surrogate)."""
    if depth > MAX_DEPTH:
        raise CardError(f"{where} is nested too deeply (more than {MAX_DEPTH} levels)")
    if isinstance(value, str):
        checked_text(value, where)
    elif isinstance(value, list):
        for item in value:
            check_values(item, depth + 1, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            checked_text(key, where)
            check_values(item, depth + 1, where)


def check_data(data):
    """The card's `data`, its known fields of the right types (missing ones are read as empty)."""
    for field in TEXT_FIELDS:
        if not isinstance(data.get(field, ""), str):
            raise CardError(f"the card's {field} must be text")
    for field in LIST_FIELDS + ("group_only_greetings",):
        value = data.get(field, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise CardError(f"the card's {field} must be a list of texts")
    for field in ("extensions", "character_book"):
        if data.get(field) is not None and not isinstance(data[field], dict):
            raise CardError(f"the card's {field} must be an object")
    if not isinstance(data.get("nickname") or "", str):
        raise CardError("the card's nickname must be text")
    if not str(data.get("name", "")).strip():
        raise CardError("the card has no name")
    return data


# ---- writing ----------------------------------------------------------------------


def v2_data(data):
    """A V2 card's `data`: the V3-only fields left out, the required ones present."""
    result = {key: value for key, value in data.items() if key not in V3_ONLY_FIELDS}
    for field in TEXT_FIELDS:
        result.setdefault(field, "")
    for field in LIST_FIELDS:
        result.setdefault(field, [])
    result.setdefault("extensions", {})
    return result


def v3_data(data):
    """A V3 card's `data`: the required fields present (the optional ones only if the card has them)."""
    result = v2_data(data) | {key: value for key, value in data.items() if key in V3_ONLY_FIELDS}
    result.setdefault("group_only_greetings", [])
    return result


def card_object(data, spec="v3"):
    """The whole card (spec, spec_version, data) for a `data` object."""
    if spec == "v2":
        return {"spec": V2, "spec_version": "2.0", "data": v2_data(data)}
    return {"spec": V3, "spec_version": "3.0", "data": v3_data(data)}


def card_json(data, spec="v3"):
    """The card as a JSON file's bytes (UTF-8, non-ASCII kept as it is)."""
    return json.dumps(card_object(data, spec), ensure_ascii=False, indent=2).encode()


def text_chunk(keyword, text):
    body = keyword + b"\x00" + text
    return struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))


def card_png(data, picture):
    """A PNG card: `picture` (PNG bytes, without card chunks) with a `chara` (V2) and a `ccv3` (V3) chunk."""
    chunks = png_chunks(picture)
    out = [PNG_SIGNATURE]
    for chunk_type, body in chunks:
        if chunk_type == b"tEXt" and body.split(b"\x00", 1)[0] in (b"chara", b"ccv3"):
            continue
        if chunk_type == b"IEND":
            for keyword, spec in ((b"chara", "v2"), (b"ccv3", "v3")):
                encoded = json.dumps(card_object(data, spec), ensure_ascii=False).encode()
                out.append(text_chunk(keyword, base64.b64encode(encoded)))
        out.append(struct.pack(">I", len(body)) + chunk_type + body
                   + struct.pack(">I", zlib.crc32(chunk_type + body)))
    return b"".join(out)


# ---- what goes where: a card's fields and a character's ------------------------------
#
# card field                      rpserver (what the model reads; docs/cards.md)
# name                            the character's name (its speaker label)
# description, personality,       the persona: description, then "{{char}}'s personality: ...",
#   scenario                        then "Scenario: ...", as paragraphs
# first_mes                       the greeting (round 0's reply)
# mes_example                     the example dialogue: each <START> block's turns, a blank
#                                   line after each ("{{user}}: ...", "{{char}}: ...")
# system_prompt                   read first, before the example dialogue (once, at the start)
# post_history_instructions       read last in the header, just before the greeting (once)
# extensions.rpserver            how the character addresses the person (user_name, when it
#                                   is not "User") and use_qa, written by rpserver's export
# everything else                 kept in Character.card as it came, given back on export
#
# <BOT> and <USER> (any case) become {{char}} and {{user}}; with a V3 nickname,
# {{char}} in the text the model reads is the nickname (the V3 spec's rule), but
# for the speaker label, which stays the name.

DEFAULT_USER_NAME = "User"  # {{user}} for a card, until a persona names the person
MACROS = [(re.compile(r"<bot>|\{\{char\}\}", re.IGNORECASE), "{{char}}"),
          (re.compile(r"<user>|\{\{user\}\}", re.IGNORECASE), "{{user}}")]
START = re.compile(r"<start>", re.IGNORECASE)
SPEAKER_LINE = re.compile(r"^\s*\{\{(?:user|char)\}\}\s*:")


def with_macros(text, nickname=""):
    for pattern, macro in MACROS:
        text = pattern.sub(macro, text)
    return text.replace("{{char}}", nickname) if nickname else text


def persona_text(data):
    nickname = data.get("nickname") or ""
    parts = [data.get("description", "").strip()]
    if data.get("personality", "").strip():
        parts.append("{{char}}'s personality: " + data["personality"].strip())
    if data.get("scenario", "").strip():
        parts.append("Scenario: " + data["scenario"].strip())
    return with_macros("\n\n".join(part for part in parts if part), nickname)


def example_dialogue(mes_example, nickname=""):
    """mes_example's <START> blocks as turns, one paragraph each (a speaker line starts a turn)."""
    turns = []
    for block in START.split(with_macros(mes_example)):
        current = None
        for line in block.replace("\r", "\n").split("\n"):
            if not line.strip():
                continue
            if SPEAKER_LINE.match(line) or current is None:
                current = [line.strip()]
                turns.append(current)
            else:
                current.append(line.strip())
    if nickname:  # the nickname in what is said; the speaker label stays {{char}} (the name)
        turns = [[nicknamed_line(line, nickname) for line in turn] for turn in turns]
    return "\n\n".join("\n".join(turn) for turn in turns)


def nicknamed_line(line, nickname):
    label = SPEAKER_LINE.match(line)
    start = label.end() if label else 0
    return line[:start] + line[start:].replace("{{char}}", nickname)


def character_fields(data):
    """The character a card's `data` makes: {name, greeting, persona, example_message}."""
    nickname = data.get("nickname") or ""
    ours = (data.get("extensions") or {}).get("rpserver")
    ours = ours if isinstance(ours, dict) else {}
    user_name = ours.get("user_name")
    return {
        "name": data.get("name", "").strip(),
        "user_name": user_name.strip() if isinstance(user_name, str) and user_name.strip() else DEFAULT_USER_NAME,
        "use_qa": ours.get("use_qa") is True,
        "greeting": with_macros(data.get("first_mes", ""), nickname).strip(),
        "persona": persona_text(data),
        "example_message": example_dialogue(data.get("mes_example", ""), nickname),
    }


ORIGINAL = re.compile(r"\{\{original\}\}", re.IGNORECASE)


def card_instructions(data):
    """(system_prompt, post_history_instructions) of a card's `data` as the model reads them: macros as in
    the persona ({{char}} the nickname, if any), and SillyTavern's {{original}} (the main prompt the card's
    system prompt replaces; rpserver's prompt has none) removed. Empty strings when the card has none
    (docs/cards.md says where each is read)."""
    data = data if isinstance(data, dict) else {}
    nickname = data.get("nickname") or ""
    return tuple(with_macros(ORIGINAL.sub("", value), nickname).strip() if isinstance(value, str) else ""
                 for value in (data.get("system_prompt"), data.get("post_history_instructions")))


def card_data(character):
    """The `data` of the card that exports `character`: the card it was imported from, with the
    fields edited since in rpserver (persona, greeting, example dialogue, name) written over it."""
    data = dict(character.card or {})
    imported = character_fields(data) if data else None
    if imported is None or character.persona != imported["persona"]:
        data.update(description=character.persona, personality="", scenario="")
    if imported is None or character.greeting != imported["greeting"]:
        data["first_mes"] = character.greeting
    if imported is None or character.example_message != imported["example_message"]:
        data["mes_example"] = mes_example(character.example_message)
    if data.get("name", "").strip() != character.name:
        data["name"] = character.name
    if (character.user_name, character.use_qa) != (DEFAULT_USER_NAME, False):
        extensions = data.get("extensions") or {}
        data["extensions"] = extensions | {"rpserver": {"user_name": character.user_name,
                                                        "use_qa": character.use_qa}}
    return data


def mes_example(example_message):
    """A legacy example dialogue (turns separated by blank lines) as one <START> block."""
    lines = [line.strip() for line in example_message.replace("\r", "\n").split("\n") if line.strip()]
    return "<START>\n" + "\n".join(lines) if lines else ""


# ---- pictures -------------------------------------------------------------------------

PLACEHOLDER_SIZE = (400, 600)  # the 2:3 portrait that card galleries show


def to_png(image):
    """A stored avatar (JPEG, GIF, WebP: already checked when stored) as PNG bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(image)) as picture:
        picture.seek(0)
        converted = picture.convert("RGBA" if "A" in picture.mode or "transparency" in picture.info else "RGB")
    output = io.BytesIO()
    converted.save(output, "PNG")
    return output.getvalue()


def placeholder_png(name):
    """A picture for a card whose character has no avatar: the name's initial on a colour of its own."""
    from PIL import Image, ImageDraw, ImageFont

    hue = zlib.crc32(name.encode()) % 360
    picture = Image.new("HSV", PLACEHOLDER_SIZE, (hue * 255 // 360, 90, 200)).convert("RGB")
    draw = ImageDraw.Draw(picture)
    initial = name.strip()[:1].upper() or "?"
    font = ImageFont.load_default(size=220)
    draw.text((PLACEHOLDER_SIZE[0] / 2, PLACEHOLDER_SIZE[1] / 2), initial, fill="white", font=font, anchor="mm")
    output = io.BytesIO()
    picture.save(output, "PNG")
    return output.getvalue()
