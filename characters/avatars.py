"""Avatars arrive as base64 data URLs and are stored as clean, re-encoded images.

An avatar is decoded with Pillow before anything is stored, so what a user
sends is never what the server keeps or serves back:

- the header is read first and an image of more than
  RPSERVER_MAX_AVATAR_PIXELS is refused before its pixels are decompressed
  (a 150 KB PNG can declare 12000x12000 pixels, 576 MB once decoded);
- the pixels are decoded in full, so a damaged or truncated file is refused;
- a file that is also something else (a PNG that ends in an HTML page, HTML
  or script inside a metadata chunk: a "polyglot") is refused, because a
  browser or a careless proxy may sniff it as a page;
- what is stored is the first frame re-encoded in the same format, with no
  metadata (EXIF, comments, text chunks, XMP): only the pixels, their
  orientation applied, and their transparency.
"""

import base64
import binascii
import io
import re
import struct
import warnings

from django.conf import settings
from PIL import Image, ImageOps

from rpserver.envelope import ApiError

DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.IGNORECASE)

# Known image signatures: (magic, mime type, extension, Pillow format).
# Anything else is refused (no SVG: it can carry scripts).
SIGNATURES = [
    (b"\x89PNG\r\n\x1a\n", "image/png", "png", "PNG"),
    (b"\xff\xd8\xff", "image/jpeg", "jpg", "JPEG"),
    (b"GIF87a", "image/gif", "gif", "GIF"),
    (b"GIF89a", "image/gif", "gif", "GIF"),
]
WEBP = ("image/webp", "webp", "WEBP")

# Markup a browser would run or render if it sniffed the file as a page.
# Compressed pixel data holds one of these by chance with a negligible
# probability; XMP metadata (<x:xmpmeta>, <rdf:...>) is not among them.
MARKUP = re.compile(
    rb"<(?:!doctype\s+html|html|head|body|script|iframe|object|embed|svg|meta|a\s+href|img\s)|<\?php",
    re.IGNORECASE,
)

EXIF_ORIENTATION = 0x0112

# What Pillow raises on a damaged, truncated or unsupported file.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


def sniff(image):
    """(mime type, extension, Pillow format) from the image bytes, or None."""
    for magic, mime, extension, pillow_format in SIGNATURES:
        if image.startswith(magic):
            return mime, extension, pillow_format
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return WEBP
    return None


def parse_avatar(value):
    """(bytes, mime type, extension) of an avatar given as a data URL or bare base64.

    The bytes are a re-encoded copy of the image (see the module docstring);
    anything that is not a sound PNG, JPEG, GIF or WebP image within the
    size limits raises ApiError with a message for the user.
    """
    image = decode_base64(value)
    kind = sniff(image)
    if kind is None:
        raise ApiError("avatar must be a PNG, JPEG, GIF or WebP image")
    mime, extension, pillow_format = kind
    refuse_polyglot(image, pillow_format)
    return reencode(image, pillow_format), mime, extension


def decode_base64(value):
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
    return image


def refuse_polyglot(image, pillow_format):
    """Refuse a file that carries markup, or bytes after the end its format defines."""
    if MARKUP.search(image):
        raise ApiError("avatar is refused: the image file contains HTML or script markup")
    end = image_end(image, pillow_format)
    if end is not None and image[end:].strip(b"\x00") != b"":
        raise ApiError("avatar is refused: the file goes on after the end of its image (it is also another kind of file)")


def image_end(image, pillow_format):
    """Where the image ends by its own structure (PNG: after IEND; WebP: the RIFF size), or None."""
    if pillow_format == "WEBP":
        (riff_size,) = struct.unpack("<I", image[4:8])
        return 8 + riff_size + (riff_size & 1)
    if pillow_format == "PNG":
        position = 8
        while position + 8 <= len(image):
            length, chunk_type = struct.unpack(">I4s", image[position:position + 8])
            position += 12 + length
            if chunk_type == b"IEND":
                return position
        return None  # no IEND: the decoder refuses the file as truncated
    return None  # JPEG and GIF: the markup scan is the check (their ends are not reliably found)


def reencode(image, pillow_format):
    """The first frame of `image`, decoded in full and encoded again without metadata."""
    limit = settings.RPSERVER["MAX_AVATAR_PIXELS"]
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check only warns below 2x its limit; ours is the rule here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image), formats=[pillow_format]) as source:
                width, height = source.size
                if width * height > limit:
                    raise ApiError(
                        f"avatar is too large: {width}x{height} pixels, the limit is {limit} pixels"
                        f" (about {int(limit ** 0.5)}x{int(limit ** 0.5)})"
                    )
                source.seek(0)
                source.load()
                return encode_clean(source, pillow_format)
    except ApiError:
        raise
    except Image.DecompressionBombError:  # over twice Pillow's own limit: refused while opening
        raise ApiError(f"avatar is too large: the limit is {limit} pixels")
    except DECODE_ERRORS:
        raise ApiError("avatar is not a valid image: the file is damaged or truncated")


def encode_clean(source, pillow_format):
    """Encode the pixels of `source` (loaded) in `pillow_format`, keeping only orientation and transparency.

    Copies are made only where needed (a rotation, a mode change): at the
    pixel limit one RGBA copy is 64 MB, and several avatars may be decoded at once.
    """
    transparency = source.info.get("transparency")
    picture = source
    if pillow_format != "GIF" and source.getexif().get(EXIF_ORIENTATION, 1) != 1:
        picture = ImageOps.exif_transpose(source)
    options = {}
    if pillow_format == "JPEG":
        if picture.mode not in ("RGB", "L"):
            picture = picture.convert("RGB")
        options = {"quality": 90}
    elif pillow_format == "WEBP":
        if picture.mode not in ("RGB", "RGBA"):
            picture = picture.convert("RGBA" if "A" in picture.mode or transparency is not None else "RGB")
        options = {"quality": 90}
    elif pillow_format == "PNG":
        if transparency is not None or picture.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
            picture = picture.convert("RGBA" if transparency is not None or "A" in picture.mode else "RGB")
    elif pillow_format == "GIF" and transparency is not None:
        options = {"transparency": transparency}
    # Nothing of the source's info (EXIF, XMP, ICC profile, text chunks, comments) is written.
    picture.info = {}
    output = io.BytesIO()
    picture.save(output, pillow_format, **options)
    return output.getvalue()


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
