"""Avatars arrive as base64 data URLs and are stored as image files."""

import base64
import binascii
import re

from django.conf import settings

from rpserver.envelope import ApiError

DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.IGNORECASE)

# Known image signatures; anything else is refused (no SVG: it can carry scripts).
SIGNATURES = [
    (b"\x89PNG\r\n\x1a\n", "image/png", "png"),
    (b"\xff\xd8\xff", "image/jpeg", "jpg"),
    (b"GIF87a", "image/gif", "gif"),
    (b"GIF89a", "image/gif", "gif"),
]


def sniff(image):
    """(mime type, extension) from the image bytes, or None."""
    for magic, mime, extension in SIGNATURES:
        if image.startswith(magic):
            return mime, extension
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "image/webp", "webp"
    return None


def parse_avatar(value):
    """(bytes, mime type, extension) of an avatar given as a data URL or bare base64."""
    match = DATA_URL.match(value)
    payload = value[match.end():] if match else value
    limit = settings.RPSERVER["MAX_AVATAR_BYTES"]
    if len(payload) > (limit * 4) // 3 + 4:
        raise ApiError(f"avatar is too large: the limit is {limit // 1024} KB")
    try:
        image = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError("avatar is not a base64-encoded image")
    if len(image) > limit:
        raise ApiError(f"avatar is too large: the limit is {limit // 1024} KB")
    kind = sniff(image)
    if kind is None:
        raise ApiError("avatar must be a PNG, JPEG, GIF or WebP image")
    return image, kind[0], kind[1]


def avatar_data_url(character):
    """The avatar as the data URL the UI puts into <img src>, or "" when there is none."""
    if not character.avatar:
        return ""
    try:
        with character.avatar.open("rb") as stored:
            image = stored.read()
    except OSError:
        return ""
    return f"data:{character.avatar_type};base64,{base64.b64encode(image).decode()}"
