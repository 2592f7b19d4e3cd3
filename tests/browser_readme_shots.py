"""Writes the README's screenshots (docs/screenshots/) with the real server and Chromium.

    .venv/bin/python tests/browser_readme_shots.py

The tiny test model's replies are noise, so the two replies in the picture are
written in with /chat/tamper (the chat's Edit button), as a real model's
would read. Everything else is the page as a person sees it.
"""

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from PIL import Image, ImageDraw  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402

from conftest import ROOT, Api, Server  # noqa: E402
from test_browser import CHROMIUM, CHROMIUM_ARGS, DESKTOP, PHONE  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "screenshots"

CHARACTER = {
    "bot": "Mira",
    "user": "traveller",
    "greeting": "*looks up from the logbook* Oh, a visitor! Hello, {{user}}. I'm {{char}}, I keep the light here.",
    "bot_persona": "{{char}} is the keeper of a lighthouse on a rock off the coast: calm, curious and kind. "
                   "She writes down every ship that passes and loves stories from the mainland.",
    "example_message": "{{user}}: Do you ever get lonely?\n\n{{char}}: *smiles* The gulls talk a lot, and the ships blink hello every night.",
}
ROUNDS = [
    ("Hi Mira! Is it lonely out here?",
     "*sets the pen down and smiles* Not really. The gulls talk a lot, and every ship blinks hello at night. "
     "（She nods toward the window.） What brings you all the way out to the rock?"),
    ("I saw the light from the village and wanted to see it up close.",
     "Then you came on a good night. *lifts the lantern* Come up the stairs with me, and mind the seventh step: it creaks."),
]


def lighthouse_avatar():
    """A 256 px picture of a lighthouse at dusk, as a data URL."""
    size = 256
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for y in range(size):  # dusk: deep blue to warm orange
        t = y / (size * 0.7)
        draw.line([(0, y), (size, y)], fill=(int(40 + 200 * t), int(50 + 90 * t), int(110 - 40 * t)))
    draw.rectangle([0, 178, size, size], fill=(28, 52, 92))
    draw.polygon([(128, 78), (256, 40), (256, 116)], fill=(255, 226, 140))  # the beam
    draw.polygon([(108, 190), (148, 190), (140, 92), (116, 92)], fill=(246, 244, 240))
    for top in (112, 146):
        draw.polygon([(115 - (top - 92) * 0.08, top), (141 + (top - 92) * 0.08, top),
                      (143 + (top - 92) * 0.08, top + 16), (113 - (top - 92) * 0.08, top + 16)], fill=(200, 70, 80))
    draw.rectangle([112, 70, 144, 92], fill=(255, 214, 110))
    draw.polygon([(106, 70), (150, 70), (128, 52)], fill=(200, 70, 80))
    draw.ellipse([80, 184, 176, 206], fill=(60, 64, 72))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    # The static files as a release serves them (web/storage.py), as `make run` does.
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "--verbosity", "0"],
                   cwd=ROOT, check=True)
    server = Server(name="readme-shots").start()
    try:
        # An English guest, as the English page makes one: the starter characters speak English.
        guest = Api(server.url).http.post("/login/tmp", headers={"Accept-Language": "en-US"}).json()["data"]
        api = Api(server.url, guest["user_name"], guest["token"])
        api.ok("/characters/save", **CHARACTER, avatar=lighthouse_avatar())
        api.chat("Mira")
        for prompt, reply in ROUNDS:
            api.reply("Mira", prompt)
            api.ok("/chat/tamper", character_name="Mira", message=reply)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for name, viewport, scheme, route in [
                ("chat", DESKTOP, "light", "#/chat/Mira"),
                ("editor", DESKTOP, "light", "#/edit/Mira"),
                ("gallery", DESKTOP, "dark", "#/"),
                ("chat-phone-dark", PHONE, "dark", "#/chat/Mira"),
                ("gallery-phone", PHONE, "light", "#/"),
            ]:
                # Reduced motion: no animation is caught half-way (the page turns them off for it).
                context = browser.new_context(viewport=viewport, color_scheme=scheme, locale="en-US",
                                              device_scale_factor=1, reduced_motion="reduce")
                page = context.new_page()
                page.goto(server.url + "/")
                expect(page.locator("#auth")).to_be_visible()
                page.evaluate("([name, token]) => localStorage.setItem('rpserver.session',"
                              " JSON.stringify({user_name: name, token, guest: false}))",
                              ["traveller", api.token])
                page.goto(server.url + "/" + route)
                page.reload()
                if "chat" in route:
                    expect(page.locator("#messages .message.user")).to_have_count(len(ROUNDS))
                    page.fill("#prompt", "What is in the logbook?")
                elif route == "#/":
                    expect(page.locator("#cards .card-desc")).to_have_count(3)
                    expect(page.locator("#cards img")).to_have_count(1)
                    page.locator("#cards img").evaluate("(image) => image.decode()")
                else:
                    expect(page.locator("#editor-form [name=greeting]")).not_to_have_value("")
                    page.locator("#view-editor").evaluate("(view) => view.scrollTo(0, 0)")
                    page.locator("#editor-form [name=bot]").blur()
                page.evaluate("document.fonts.ready.then(() => true)")
                page.screenshot(path=str(OUT / f"{name}.png"))
                context.close()
            browser.close()
    finally:
        server.stop()
    for path in sorted(OUT.glob("*.png")):
        print(path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
