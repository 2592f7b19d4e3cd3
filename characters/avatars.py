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
from django.core.files.base import ContentFile
from PIL import Image, ImageOps

from rpserver.errors import ApiError
from rpserver.files import delete_file_on_commit, delete_file_on_rollback

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

# Markup a browser would run or render if it sniffed the file as a page,
# searched for outside the compressed pixels (refuse_polyglot). XMP metadata
# (<x:xmpmeta>, <rdf:...>) is not among them.
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
    return clean_avatar(decode_base64(value))


def clean_avatar(image):
    """(bytes, mime type, extension) of the image file `image`, re-encoded (see parse_avatar)."""
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
    """Refuse a file that carries markup outside its pixels, or bytes after the end its format defines.

    Only the parts of the file that are not compressed pixel data are
    searched (headers, metadata chunks, comments, anything after the end):
    compressed pixels hold any short byte string now and then by chance, and
    a browser never reads them as text anyway.
    """
    regions, end = outside_pixels(image, pillow_format)
    trailing = image[end:] if end is not None else b""
    if any(MARKUP.search(region) for region in regions + [trailing]):
        raise ApiError("avatar is refused: the image file contains HTML or script markup")
    # JPEG may carry a trailer (a phone's motion photo appends a video): only PNG and WebP must end where they say.
    if pillow_format in ("PNG", "WEBP") and trailing.strip(b"\x00"):
        raise ApiError("avatar is refused: the file goes on after the end of its image (it is also another kind of file)")


PIXEL_CHUNKS = {"PNG": {b"IDAT", b"fdAT"}, "WEBP": {b"VP8 ", b"VP8L", b"ALPH", b"ANMF"}}


def outside_pixels(image, pillow_format):
    """([the parts of `image` that are not compressed pixels], where its structure ends or None).

    A file whose structure cannot be followed is searched whole from where
    following it failed (the decoder refuses such a file in any case).
    """
    walk = {"PNG": png_regions, "WEBP": webp_regions, "JPEG": jpeg_regions, "GIF": gif_regions}[pillow_format]
    regions = []
    try:
        position, end = walk(image, regions)
    except (IndexError, struct.error):  # ran off the end of a damaged file: search all of it
        return [image], None
    if end is None:
        regions.append(image[position:])
    return regions, end


def png_regions(image, regions):
    position = 8
    while position + 8 <= len(image):
        length, chunk_type = struct.unpack(">I4s", image[position:position + 8])
        if chunk_type not in PIXEL_CHUNKS["PNG"]:
            regions.append(image[position + 8:position + 8 + length])
        position += 12 + length
        if chunk_type == b"IEND":
            return position, position
    return position, None


def webp_regions(image, regions):
    (riff_size,) = struct.unpack("<I", image[4:8])
    end = 8 + riff_size + (riff_size & 1)
    position = 12
    while position + 8 <= min(end, len(image)):
        fourcc, size = struct.unpack("<4sI", image[position:position + 8])
        if fourcc not in PIXEL_CHUNKS["WEBP"]:
            regions.append(image[position + 8:position + 8 + size])
        position += 8 + size + (size & 1)
    return position, end if end <= len(image) else None


def jpeg_regions(image, regions):
    """Segments before the first scan (APPn, COM, tables); the end is the EOI after the scan data."""
    position = 2
    while position + 4 <= len(image):
        if image[position] != 0xFF:
            return position, None
        marker = image[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            position += 2
            continue
        (length,) = struct.unpack(">H", image[position + 2:position + 4])
        if marker == 0xDA:  # start of scan: entropy-coded pixels follow, where 0xFF is always escaped
            eoi = image.find(b"\xff\xd9", position + 2 + length)
            return position, (eoi + 2 if eoi >= 0 else None)
        regions.append(image[position + 4:position + 2 + length])
        position += 2 + length
    return position, None


def gif_regions(image, regions):
    """Extension blocks (comments, application data, plain text); image data blocks are skipped."""
    flags = image[10]
    position = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    while True:
        block = image[position]
        if block == 0x3B:  # trailer
            return position + 1, position + 1
        if block == 0x21:  # extension: label, then data sub-blocks
            position = gif_sub_blocks(image, position + 2, regions)
        elif block == 0x2C:  # image descriptor, local colour table, LZW code size, pixel sub-blocks
            local = image[position + 9]
            position += 10 + (3 * 2 ** ((local & 7) + 1) if local & 0x80 else 0) + 1
            position = gif_sub_blocks(image, position, None)
        else:
            return position, None


def gif_sub_blocks(image, position, regions):
    while True:
        size = image[position]
        if size == 0:
            return position + 1
        if regions is not None:
            regions.append(image[position + 1:position + 1 + size])
        position += 1 + size


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


def replace_avatar(owner_object, avatar, image):
    """A character's or a persona's avatar after a save: `avatar` given (even empty) drops the old file
    once the transaction commits; `image` (data, mime, extension) is the new one, if any (its file goes
    again if an enclosing rpserver.files.deleted_on_rollback block fails: an account import)."""
    if avatar is not None:
        delete_file_on_commit(owner_object.avatar)
        owner_object.avatar = None
        owner_object.avatar_type = ""
    if image is not None:
        data, mime, extension = image
        owner_object.avatar_type = mime
        owner_object.avatar.save(f"avatar.{extension}", ContentFile(data), save=False)
        delete_file_on_rollback(owner_object.avatar)
