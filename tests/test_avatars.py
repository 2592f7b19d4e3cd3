"""Avatars are decoded with Pillow: bombs, damaged files and polyglots are refused,
and what is stored (and served back) is a clean re-encoded image."""

import base64
import io
import struct
import zlib

import pytest
from PIL import Image, PngImagePlugin

from characters.models import Character
from conftest import CHARACTER, Server


def encoded(image, image_format, **options):
    output = io.BytesIO()
    image.save(output, image_format, **options)
    return output.getvalue()


def data_url(data, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def picture(size=(6, 4)):
    """An image whose every pixel differs, so a rotation or a lost row shows."""
    image = Image.new("RGB", size)
    image.putdata([(x * 40 % 256, y * 60 % 256, (x + y) * 20 % 256) for y in range(size[1]) for x in range(size[0])])
    return image


def save_avatar(api, data, mime="image/png"):
    return api.call("/characters/save", **CHARACTER, avatar=data_url(data, mime))


def stored_avatar(api):
    """(bytes served back by /characters/get, bytes in storage, stored mime type)."""
    served = api.ok("/characters/get", character_name="Mira")["avatar"]
    header, payload = served.split(",", 1)
    character = Character.objects.get(owner__username=api.user_name, name="Mira")
    with character.avatar.open("rb") as stored:
        on_disk = stored.read()
    assert header == f"data:{character.avatar_type};base64"
    return base64.b64decode(payload), on_disk, character.avatar_type


def test_it_stores_a_png_without_its_text_chunks(guest):
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "taken at 51.5007N 0.1246W")
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>secret-camera-serial</x:xmpmeta>")
    source = picture()
    assert save_avatar(guest, encoded(source, "PNG", pnginfo=info))["code"] == 200
    served, on_disk, mime = stored_avatar(guest)
    assert served == on_disk and mime == "image/png"
    assert b"51.5007N" not in served and b"secret-camera-serial" not in served
    with Image.open(io.BytesIO(served)) as image:
        assert image.format == "PNG" and image.convert("RGB").tobytes() == source.tobytes()
        assert "Comment" not in image.info and "XML:com.adobe.xmp" not in image.info


def test_it_stores_a_jpeg_upright_without_its_exif(guest):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned, show it rotated 90 degrees clockwise
    exif[0x010F] = "SecretCam"  # make
    data = encoded(picture((6, 4)), "JPEG", exif=exif.tobytes(), quality=95)
    assert save_avatar(guest, data, "image/jpeg")["code"] == 200
    served, _, mime = stored_avatar(guest)
    assert mime == "image/jpeg" and b"SecretCam" not in served and b"Exif" not in served
    with Image.open(io.BytesIO(served)) as image:
        assert image.format == "JPEG" and image.size == (4, 6)
        assert not image.getexif()


def test_it_keeps_the_first_frame_of_an_animated_gif_and_its_transparency(guest):
    frames = [Image.new("P", (5, 5), index) for index in (1, 2, 3)]
    for frame in frames:
        frame.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
        frame.putpixel((0, 0), 0)  # the transparent colour
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], transparency=0,
                   comment=b"a comment to drop", loop=0)
    assert save_avatar(guest, data, "image/gif")["code"] == 200
    served, _, mime = stored_avatar(guest)
    assert mime == "image/gif" and b"a comment to drop" not in served
    with Image.open(io.BytesIO(served)) as image:
        assert image.format == "GIF" and getattr(image, "n_frames", 1) == 1
        assert image.convert("RGBA").getpixel((2, 2)) == (255, 0, 0, 255)
        assert image.convert("RGBA").getpixel((0, 0))[3] == 0


def test_it_stores_a_webp_with_its_alpha(guest):
    source = Image.new("RGBA", (8, 8), (10, 200, 30, 128))
    assert save_avatar(guest, encoded(source, "WEBP", lossless=True), "image/webp")["code"] == 200
    served, _, mime = stored_avatar(guest)
    with Image.open(io.BytesIO(served)) as image:
        assert mime == "image/webp" and image.format == "WEBP" and image.mode == "RGBA"
        red, green, blue, alpha = image.getpixel((3, 3))
        assert abs(green - 200) < 8 and abs(alpha - 128) < 8


def test_it_refuses_a_decompression_bomb_before_decoding_it(guest):
    bomb = encoded(Image.new("1", (12000, 12000)), "PNG", optimize=True)
    assert len(bomb) < 64 * 1024  # small enough to pass the byte limit: only the pixel limit stops it
    body = save_avatar(guest, bomb)
    assert body["code"] == 400
    assert body["message"] == "avatar is too large: 12000x12000 pixels, the limit is 16777216 pixels (about 4096x4096)"
    assert not Character.objects.filter(owner__username=guest.user_name, name="Mira").exists()


def truncated_png():
    data = encoded(picture((64, 64)), "PNG")
    return data[: len(data) // 2]


def png_with_bad_crc():
    data = bytearray(encoded(picture(), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 6] ^= 0xFF  # a byte of the compressed pixels; the chunk's CRC no longer matches
    return bytes(data)


@pytest.mark.parametrize("data,mime", [
    (truncated_png(), "image/png"),
    (png_with_bad_crc(), "image/png"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "image/png"),  # a signature and nothing of an image
    (b"\xff\xd8\xff\xe0" + b"garbage" * 20, "image/jpeg"),
    (b"GIF89a" + b"\x01\x00", "image/gif"),
    (b"RIFF\x10\x00\x00\x00WEBPVP8 \x04\x00\x00\x00abcd", "image/webp"),
])
def test_it_refuses_a_damaged_image(guest, data, mime):
    body = save_avatar(guest, data, mime)
    assert body["code"] == 400
    assert body["message"] == "avatar is not a valid image: the file is damaged or truncated"


def png_then_html():
    return encoded(picture(), "PNG") + b"<html><body><script>alert(document.cookie)</script></body></html>"


def png_with_script_in_a_chunk():
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", "<script>alert(1)</script>")
    return encoded(picture(), "PNG", pnginfo=info)


def jpeg_with_html_comment():
    return encoded(picture(), "JPEG", comment=b"<!DOCTYPE html><title>hi</title>")


def gif_with_script_comment():
    return encoded(Image.new("P", (4, 4), 1), "GIF", comment=b"<script src=//evil.example/x.js></script>")


@pytest.mark.parametrize("data,mime", [
    (png_then_html(), "image/png"),
    (png_with_script_in_a_chunk(), "image/png"),
    (jpeg_with_html_comment(), "image/jpeg"),
    (gif_with_script_comment(), "image/gif"),
])
def test_it_refuses_an_image_that_carries_markup(guest, data, mime):
    body = save_avatar(guest, data, mime)
    assert body["code"] == 400
    assert body["message"] == "avatar is refused: the image file contains HTML or script markup"


def raw_png(grey):
    """A PNG of a greyscale image whose pixel bytes appear in the file as they are (no filter, no compression)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    width, height = grey.size
    rows = b"".join(b"\x00" + grey.tobytes()[y * width:(y + 1) * width] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 0))
            + chunk(b"IEND", b""))


def test_pixels_that_spell_markup_are_only_pixels(guest):
    """Only what is not pixel data is searched: bytes of an image's pixels are never a page."""
    row = b"<html><script>alert(1)</script>"
    source = Image.frombytes("L", (len(row), 2), row * 2)
    data = raw_png(source)
    assert row in data
    assert save_avatar(guest, data)["code"] == 200
    served, _, _ = stored_avatar(guest)
    with Image.open(io.BytesIO(served)) as image:
        assert image.tobytes() == source.tobytes()


@pytest.mark.parametrize("data", [
    encoded(picture(), "PNG") + b"PK\x03\x04" + b"\x14" * 40,  # a PNG that is also a ZIP archive
    encoded(picture(), "WEBP") + b"trailing bytes of another file",
])
def test_it_refuses_a_file_that_goes_on_after_its_image(guest, data):
    body = save_avatar(guest, data, "image/png")
    assert body["code"] == 400
    assert body["message"] == ("avatar is refused: the file goes on after the end of its image"
                               " (it is also another kind of file)")


def test_a_refused_avatar_leaves_the_stored_one_alone(guest):
    from test_characters import PNG_URL

    guest.ok("/characters/save", **CHARACTER, avatar=PNG_URL)
    assert save_avatar(guest, png_then_html())["code"] == 400
    assert guest.ok("/characters/get", character_name="Mira")["avatar"] == PNG_URL


def test_the_pixel_limit_is_a_setting():
    server = Server(env={"RPSERVER_MAX_AVATAR_PIXELS": "4096"}, name="avatar-pixels").start()
    try:
        from conftest import Api

        api = Api(server.url)
        data = api.ok("/login/tmp")
        guest = Api(server.url, data["user_name"], data["token"])
        assert save_avatar(guest, encoded(picture((64, 64)), "PNG"))["code"] == 200
        body = save_avatar(guest, encoded(picture((65, 64)), "PNG"))
        assert body["code"] == 400
        assert body["message"] == "avatar is too large: 65x64 pixels, the limit is 4096 pixels (about 64x64)"
    finally:
        server.stop()
