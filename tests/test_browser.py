"""The web client at `/`, driven in headless Chromium (Playwright) against the real server.

One browser for the whole module, a fresh context (its own localStorage) per
page. Every page collects console errors and uncaught exceptions, and a test
fails when there are any. Screenshots go to tests/screenshots/ for people to
look at.
"""

import base64
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import pytest

from conftest import ENDLESS_MODEL, ROOT, Api, Server

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # fail, never skip: the browser tests are part of the suite
    pytest.fail("the browser tests need the playwright package: pip install -r requirements.txt", pytrace=False)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
# axe-core, pinned in tests/package.json (and its lock), installed by npm into tests/node_modules: a test tool,
# never part of the page.
AXE = Path(__file__).resolve().parent / "node_modules" / "axe-core" / "axe.min.js"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 360, "height": 740}

CHARACTER = {
    "bot": "Mira",
    "user": "friend",
    "greeting": "*looks up from the logbook* Hi {{user}}! I'm {{char}}.",
    "bot_persona": "{{char}} is a calm lighthouse keeper who talks to {{user}}.",
}

expect.set_options(timeout=30_000)


def png(width, height, rgb):
    """A small solid-colour PNG, written by hand."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module", autouse=True)
def collected_static():
    """The static files as a release serves them (hashed names, gzip: web/storage.py), written before any
    server of this module starts, as `make run` does."""
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "--verbosity", "0"],
                   cwd=ROOT, check=True)


@pytest.fixture(scope="module")
def web():
    """A server whose replies are long enough to watch them grow and to stop them: 120 tokens each (the
    endless model never ends its turn sooner)."""
    running = Server(model=ENDLESS_MODEL, env={"RPSERVER_MAX_REPLY_TOKENS": "120"}, name="web").start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: run scripts/ensure-chromium (make test does)", pytrace=False)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def open_page(browser, web):
    """open_page(viewport=..., ...): a new page at `/`, in a context of its own."""
    pages = []

    def open_(viewport=DESKTOP, color_scheme="light", locale="en-US", server=None):
        context = browser.new_context(viewport=viewport, color_scheme=color_scheme, locale=locale)
        page = context.new_page()
        page.problems = []
        page.on("console", lambda message: message.type == "error" and page.problems.append(message.text))
        page.on("pageerror", lambda error: page.problems.append(f"uncaught: {error}"))
        page.goto((server or web).url + "/")
        pages.append(page)
        return page

    yield open_
    problems = [problem for page in pages for problem in page.problems]
    for page in pages:
        page.context.close()
    assert problems == [], f"console errors: {problems}"


def log_in_as(page, api):
    """Put an API session into the page's localStorage, as logging in does, and reload."""
    expect(page.locator("#auth")).to_be_visible()  # the first load is done with localStorage
    page.evaluate("([name, token]) => localStorage.setItem('rpserver.session',"
                  " JSON.stringify({user_name: name, token, guest: false}))", [api.user_name, api.token])
    page.reload()
    expect(page.locator("#app")).to_be_visible()


def page_api(page, server):
    """An Api client with the page's own token (read from localStorage)."""
    saved = page.evaluate("JSON.parse(localStorage.getItem('rpserver.session'))")
    return Api(server.url, saved["user_name"], saved["token"])


def guest_with_mira(server):
    """A new guest (an Api client) with CHARACTER, Mira, saved."""
    data = Api(server.url).ok("/login/tmp")
    api = Api(server.url, data["user_name"], data["token"])
    api.ok("/characters/save", **CHARACTER)
    return api


def open_mira(open_page, server, api):
    """A new page logged in as `api`, at Mira's chat."""
    page = open_page(server=server)
    log_in_as(page, api)
    page.goto(server.url + "/#/chat/Mira")
    return page


def rounds_on_page(page):
    """The chat as the page shows it: [(role, text)] in order."""
    return page.evaluate("""() => [...document.querySelectorAll('#messages .message')].map(
        (m) => [m.classList.contains('user') ? 'user' : 'bot', m.querySelector('.bubble').textContent])""")


def watch_stream(page):
    """Record the length of the streaming bubble's text as received (before markdown, which shortens
    the shown text when a `*` pair closes) at every change, from now on."""
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const bubble = document.querySelector('#messages .bubble.streaming');
            if (bubble && bubble.dataset.received) window.lengths.push(Number(bubble.dataset.received));
        }).observe(document.querySelector('#messages'),
                   {subtree: true, childList: true, characterData: true, attributes: true});
    }""")


def as_shown(text):
    """A message as the page shows it: *actions* lose their asterisks (and are in italics)."""
    return re.sub(r"\*([^*\n]+)\*", r"\1", text) if text else "(empty reply)"


def wait_idle(page):
    expect(page.locator("body[data-reply=idle]")).to_have_count(1)
    expect(page.locator("#send")).to_be_visible()


def send(page, text):
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    expect(page.locator("body[data-reply=streaming]")).to_have_count(0)  # started and ended
    wait_idle(page)


def confirm(page):
    expect(page.locator("#confirm-dialog")).to_be_visible()
    page.click("#confirm-ok")


def shot(page, name):
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


# ---------------------------------------------------------------- the page itself


WEB = Path(__file__).resolve().parent.parent / "web"


def test_every_label_is_in_english_and_chinese():
    strings = (WEB / "static/web/i18n.js").read_text()
    english = set(re.findall(r'^ +"([\w.]+)":', strings[strings.index("  en: {"):strings.index("  zh: {")], re.M))
    chinese = set(re.findall(r'^ +"([\w.]+)":', strings[strings.index("  zh: {"):], re.M))
    assert english == chinese, english ^ chinese
    used = set(re.findall(r'data-i18n(?:-placeholder|-label)?="([\w.]+)"',
                          (WEB / "templates/web/index.html").read_text()))
    for script in (WEB / "static/web").glob("*.js"):
        used |= set(re.findall(r'\bt\("([\w.]+)"', script.read_text()))
    # The server-message table names its keys as strings: "error.too_long", "chat.not_found", ...
    table = strings[strings.index("const SERVER_MESSAGES"):]
    used |= set(re.findall(r'"((?:error|auth|chat|editor)\.\w+)"', table))
    from inference.sampling import LIMITS
    used |= {f"settings.{name}" for name in LIMITS}
    assert len(used) > 90 and used <= english, used - english


# ---------------------------------------------------------------- coming in


def test_the_page_is_served_with_a_strict_content_security_policy(web):
    answer = httpx.get(web.url + "/")
    assert answer.status_code == 200
    policy = answer.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "default-src 'none'" in policy
    assert '<script type="module"' in answer.text and "<script>" not in answer.text
    config = httpx.get(web.url + "/web/config").json()
    assert config["code"] == 200 and config["data"]["demo_model"] is False


def test_static_files_are_compressed_cache_busted_and_long_cached(web):
    page = httpx.get(web.url + "/").text
    assert page.count("/static/") >= 3
    for url in re.findall(r'(?:src|href)="(/static/[^"]+)"', page):
        assert re.search(r"\.[0-9a-f]{12}\.(js|css|svg)$", url), url  # named by its content
        answer = httpx.get(web.url + url, headers={"Accept-Encoding": "gzip"})
        assert answer.status_code == 200
        assert answer.headers["content-encoding"] == "gzip", url
        assert "immutable" in answer.headers["cache-control"], answer.headers["cache-control"]
        assert int(re.search(r"max-age=(\d+)", answer.headers["cache-control"])[1]) >= 365 * 24 * 3600
    # The modules import each other by their hashed names too, so a new release never mixes old and new code.
    app = re.search(r'src="(/static/web/app\.[0-9a-f]{12}\.js)"', page)[1]
    imports = re.findall(r'from "(\./[^"]+)"', httpx.get(web.url + app).text)
    assert len(imports) >= 4 and all(re.search(r"\.[0-9a-f]{12}\.js$", name) for name in imports), imports
    # The page itself is asked for again every time, so that it names the newest files.
    assert httpx.get(web.url + "/").headers["cache-control"] == "no-cache"


def test_a_person_signs_up_logs_out_and_logs_in_again(open_page, web):
    page = open_page()
    expect(page.locator("#auth")).to_be_visible()
    name = f"web-{os.urandom(4).hex()}"
    page.click("#tab-signup")
    page.fill("#auth-form [name=user_name]", name)
    page.fill("#auth-form [name=password]", "a fine long password 42")
    page.click("#auth-submit")
    expect(page.locator("#who")).to_have_text(name)
    expect(page.locator("#cards .card-name").first).to_be_visible()  # the default characters
    saved = page.evaluate("JSON.parse(localStorage.getItem('rpserver.session'))")
    assert saved["user_name"] == name and saved["token"] not in page.url
    old = Api(web.url, name, saved["token"])
    assert old.call("/characters/list")["code"] == 200

    page.reload()  # a reload stays logged in
    expect(page.locator("#who")).to_have_text(name)

    page.click("#app [data-action=logout]")
    expect(page.locator("#auth")).to_be_visible()
    assert page.evaluate("localStorage.getItem('rpserver.session')") is None
    assert old.call("/characters/list")["code"] == 403  # the token is gone on the server too

    page.fill("#auth-form [name=user_name]", name)
    page.fill("#auth-form [name=password]", "not the password")
    page.click("#auth-submit")
    expect(page.locator("#auth-error")).to_be_visible()
    page.fill("#auth-form [name=password]", "a fine long password 42")
    page.click("#auth-submit")
    expect(page.locator("#who")).to_have_text(name)


def test_sign_up_shows_the_password_rules_message(open_page):
    page = open_page()
    page.click("#tab-signup")
    page.fill("#auth-form [name=user_name]", f"web-{os.urandom(4).hex()}")
    page.fill("#auth-form [name=password]", "123")
    page.click("#auth-submit")
    expect(page.locator("#auth-error")).to_contain_text(re.compile("password", re.I))
    expect(page.locator("#auth")).to_be_visible()


def test_a_guest_comes_in_with_one_click(open_page):
    page = open_page()
    page.click("#auth [data-action=guest]")
    expect(page.locator("#who")).to_contain_text("guest")
    expect(page.locator("#cards .card")).not_to_have_count(0)


def test_an_expired_token_goes_back_to_the_login(open_page, web):
    page = open_page()
    expect(page.locator("#auth")).to_be_visible()  # the first load is done with localStorage
    page.evaluate("localStorage.setItem('rpserver.session', JSON.stringify({user_name: 'nobody', token: 'not-a-token'}))")
    page.reload()
    expect(page.locator("#auth")).to_be_visible()
    expect(page.locator("#auth-error")).to_contain_text("log in again")
    assert page.evaluate("localStorage.getItem('rpserver.session')") is None


def test_a_broken_address_shows_the_gallery(open_page, web):
    guest = Api(web.url).ok("/login/tmp")
    page = open_page()
    log_in_as(page, Api(web.url, guest["user_name"], guest["token"]))
    page.goto(web.url + "/#/chat/%E0%A4%A")
    page.reload()
    expect(page.locator("#view-gallery")).to_be_visible()


# ---------------------------------------------------------------- characters


def test_a_character_is_created_with_an_avatar_edited_and_deleted(open_page, web, tmp_path):
    page = open_page()
    page.click("#auth [data-action=guest]")
    page.click("#cards .new-card a")
    expect(page.locator("#view-editor")).to_be_visible()
    image = tmp_path / "avatar.png"
    image.write_bytes(png(48, 48, (200, 90, 110)))
    page.set_input_files("#avatar-input", str(image))
    preview = page.locator("#editor-avatar img")
    expect(preview).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    page.fill("#editor-form [name=bot]", "Mira")
    page.fill("#editor-form [name=user]", CHARACTER["user"])
    page.fill("#editor-form [name=greeting]", CHARACTER["greeting"])
    page.fill("#editor-form [name=bot_persona]", CHARACTER["bot_persona"])
    page.fill("#editor-form [name=example_message]", "{{user}}: Hello?\n\n{{char}}: *waves* Hello.")
    shot(page, "editor-1280")
    page.click("#editor-save")

    # The new chat opens with the greeting, its action in italics.
    expect(page.locator("#chat-name")).to_have_text("Mira")
    greeting = page.locator("#messages .message.bot .bubble").first
    expect(greeting).to_have_text("looks up from the logbook Hi friend! I'm Mira.")
    expect(greeting.locator("em")).to_have_text("looks up from the logbook")
    expect(page.locator("#chat-avatar img")).to_have_attribute("src", re.compile("^data:image/"))
    api = page_api(page, web)
    stored = api.ok("/characters/get", character_name="Mira")
    assert stored["avatar"].startswith("data:image/") and stored["example_message"].startswith("{{user}}")

    # Edit: the form comes back filled in; a new greeting is saved. (The form still holds what was typed
    # above: wait for it to open for Mira and load her, or the typing below races the loading.)
    page.click("#view-chat [data-action=edit-character]")
    expect(page.locator("#editor-title")).to_have_text("Edit Mira")
    expect(page.locator("#editor-form")).to_have_attribute("aria-busy", "false")
    expect(page.locator("#editor-form [name=greeting]")).to_have_value(CHARACTER["greeting"])
    expect(page.locator("#editor-avatar img")).to_be_visible()
    page.fill("#editor-form [name=greeting]", "Welcome back, {{user}}.")
    page.click("#editor-save")
    expect(page.locator("#messages .message.bot .bubble").first).to_have_text("Welcome back, friend.")
    assert api.ok("/characters/get", character_name="Mira")["avatar"] == stored["avatar"]  # kept

    # Delete, after a confirmation.
    page.click("#view-chat [data-action=edit-character]")
    page.click("#editor-delete")
    confirm(page)
    expect(page.locator("#view-gallery")).to_be_visible()
    expect(page.locator("#cards .card-name", has_text="Mira")).to_have_count(0)
    names = [c["char_name"] for c in api.ok("/characters/list")["list"]]
    assert "Mira" not in names


def test_the_editor_says_what_is_missing(open_page):
    page = open_page(locale="zh-CN")
    page.click("#auth [data-action=guest]")
    page.click("#cards .new-card a")
    page.fill("#editor-form [name=bot]", "小雪")
    page.click("#editor-save")
    expect(page.locator("#editor-error")).to_contain_text("请填写")
    expect(page.locator("#view-editor")).to_be_visible()


# ---------------------------------------------------------------- the chat


def test_a_chat_streams_two_rounds_and_survives_a_reload(open_page, web):
    api = guest_with_mira(web)
    page = open_page()
    log_in_as(page, api)
    page.click("#cards .card-link >> text=Mira")
    expect(page.locator("#messages .message.bot")).to_have_count(1)

    watch_stream(page)
    page.fill("#prompt", "Hello there! （smiles）")
    page.press("#prompt", "Shift+Enter")  # a new line, not a send
    page.type("#prompt", "How are you?")
    expect(page.locator("#messages .message.user")).to_have_count(0)
    page.press("#prompt", "Enter")
    wait_idle(page)
    lengths = page.evaluate("window.lengths")
    growing = [n for n in lengths if n > 0]
    assert len(set(growing)) >= 3 and growing == sorted(growing), lengths  # the text grew as it came
    user = page.locator("#messages .message.user .bubble").first
    expect(user).to_have_text("Hello there! （smiles）\nHow are you?")
    expect(user.locator("em")).to_have_text("（smiles）")

    send(page, "Tell me about the lighthouse.")
    expect(page.locator("#messages .message.user")).to_have_count(2)
    server_chat = api.chat("Mira")
    assert len(server_chat) == 3
    shown = rounds_on_page(page)
    assert [text for role, text in shown if role == "bot"] == [as_shown(bot) for _, bot in server_chat]
    expect(page.locator("#prompt")).to_have_value("")
    expect(page.locator("#messages .message.bot").last).to_be_in_viewport()  # the newest stays in view
    shot(page, "chat-1280")

    page.reload()
    expect(page.locator("#chat-name")).to_have_text("Mira")
    expect(page.locator("#messages .message")).to_have_count(5)
    assert rounds_on_page(page) == shown

    # What the model has read, in a panel.
    page.click("#view-chat [data-action=context]")
    expect(page.locator("#context-text")).to_contain_text("friend: Tell me about the lighthouse.")
    assert page.locator("#context-text").text_content() == api.context("Mira")["token_state"]
    page.click("#context-dialog button[value=close]")


def test_regenerate_edit_rewind_and_reset(open_page, web):
    api = guest_with_mira(web)
    api.chat("Mira")
    api.reply("Mira", "First question.")
    api.reply("Mira", "Second question.")
    page = open_mira(open_page, web, api)
    expect(page.locator("#messages .message.user")).to_have_count(2)

    # Regenerate: a new version of the last reply, the same on the page as on the server.
    before = api.chat("Mira")[-1][1]
    for _ in range(3):  # random sampling may say the same thing once
        page.click("#messages .message.bot:last-child button >> text=Regenerate")
        wait_idle(page)
        if api.chat("Mira")[-1][1] != before:
            break
    after = api.chat("Mira")[-1][1]
    assert after != before
    expect(page.locator("#messages .message.bot:last-child .bubble")).to_have_text(as_shown(after))

    # Edit the last reply.
    page.click("#messages .message.bot:last-child button >> text=Edit")
    page.fill("#messages .edit-box textarea", "I keep the light. *smiles*")
    page.click("#messages .edit-box button >> text=Save")
    last = page.locator("#messages .message.bot:last-child .bubble")
    expect(last).to_have_text("I keep the light. smiles")
    assert api.chat("Mira")[-1][1] == "I keep the light. *smiles*"
    assert api.context("Mira")["token_state"].endswith("Mira: I keep the light. *smiles*\n\n")

    # Rewind to round 1: the button is there without hovering (a finger, a keyboard), reached with Tab.
    page.mouse.move(0, 0)
    rewind = page.locator("#messages .message.bot[data-round='1'] button", has_text="Rewind to here")
    assert rewind.evaluate("(button) => getComputedStyle(button).opacity") == "1"
    page.locator("#messages .message.bot[data-round='0'] .bubble").click()
    for _ in range(10):
        page.keyboard.press("Tab")
        if rewind.evaluate("(button) => button === document.activeElement"):
            break
    assert rewind.evaluate("(button) => button === document.activeElement")
    assert rewind.evaluate("(button) => getComputedStyle(button).outlineStyle") != "none"  # and it shows
    page.keyboard.press("Enter")
    confirm(page)
    expect(page.locator("#messages .message.user")).to_have_count(1)
    assert len(api.chat("Mira")) == 2

    # Reset, after a confirmation.
    page.click("#view-chat [data-action=reset]")
    expect(page.locator("#confirm-text")).to_contain_text("Mira")
    confirm(page)
    expect(page.locator("#messages .message")).to_have_count(1)
    assert api.chat("Mira") == [[None, "*looks up from the logbook* Hi friend! I'm Mira."]]


@pytest.fixture
def endless():
    """A server whose replies run until their reader leaves."""
    running = Server(model=ENDLESS_MODEL, env={"RPSERVER_MAX_REPLY_TOKENS": "100000"}, name="web-endless").start()
    yield running
    running.stop()


# Stop keeps what was written: tests/test_browser_tree.py (test_stop_keeps_the_partial_reply_...).


def test_a_busy_character_gets_a_clear_message(open_page, endless):
    api = guest_with_mira(endless)
    api.chat("Mira")
    page = open_mira(open_page, endless, api)
    expect(page.locator("#messages .message.bot")).to_have_count(1)
    # Another tab of the same person is in the middle of a reply.
    with api.http.stream("POST", "/chat/reply", data={**api.auth(), "character_name": "Mira",
                                                      "prompt": "Talk for a while."}) as other:
        assert other.headers["content-type"].startswith("text/event-stream")
        page.fill("#prompt", "Me too!")
        page.press("#prompt", "Enter")
        expect(page.locator(".toast.error")).to_contain_text("still answering")
        expect(page.locator(".toast")).to_have_count(1)  # one failure, one message
        # (the chat's REST API answers at the real HTTP status, which the browser logs: this one is expected)
        page.problems.remove("Failed to load resource: the server responded with a status of 400 (Bad Request)")
        # The page says where the other reply will appear, and sends nothing while it runs.
        expect(page.locator("body[data-reply=elsewhere]")).to_have_count(1)
        expect(page.locator("#send")).to_be_disabled()
    wait_idle(page)  # the other tab left: its reply was cut off, and this page follows
    expect(page.locator("#prompt")).to_have_value("Me too!")  # the words are given back
    expect(page.locator("#messages .message.user", has_text="Me too!")).to_have_count(0)
    assert [user_text for user_text, _ in api.chat("Mira")] == [None]  # (the other tab's reply was cut off)


def test_sampling_settings_are_kept_per_character_and_sent(open_page, web):
    from inference.sampling import LIMITS, SamplingSettings

    api = guest_with_mira(web)
    page = open_mira(open_page, web, api)
    page.click("#view-chat [data-action=settings]")
    # The ranges and defaults are the API's own (inference.sampling), served to the page.
    shown = page.eval_on_selector_all("#sliders input[type=number]", """(inputs) => inputs.map(
        (input) => [input.name, Number(input.min), Number(input.max), Number(input.value)])""")
    assert {name for name, *_ in shown} == set(LIMITS)
    for name, low, high, value in shown:
        assert high == LIMITS[name][1] and value == getattr(SamplingSettings, name)
        assert low == LIMITS[name][0] if LIMITS[name][2] else low > LIMITS[name][0]
    # The keyboard's place shows on a slider.
    page.focus("#sampling-temperature")
    page.keyboard.press("Shift+Tab")
    slider = page.locator("#sliders input[type=range]:focus")
    expect(slider).to_have_count(1)
    assert slider.evaluate("(s) => getComputedStyle(s).outlineStyle") != "none"
    page.fill("#sampling-temperature", "0.7")
    page.press("#sampling-temperature", "Tab")
    page.click("#settings-dialog button[value=close]")
    key = f"rpserver.sampling.{api.user_name}.Mira"
    assert page.evaluate(f"JSON.parse(localStorage.getItem({key!r}))")["temperature"] == 0.7
    with page.expect_request(re.compile(r"/api/v1/chats/\d+/reply$")) as request:
        page.fill("#prompt", "Hello")
        page.press("#prompt", "Enter")
    assert "temperature=0.7" in request.value.post_data
    wait_idle(page)


def test_a_failed_request_shows_one_message_in_the_page_language(open_page, web):
    api = guest_with_mira(web)
    api.chat("Mira")
    api.reply("Mira", "A first question.")
    limit = httpx.get(web.url + "/web/config").json()["data"]["max_prompt_chars"]
    page = open_page(viewport=PHONE, locale="zh-CN")
    log_in_as(page, api)
    page.goto(web.url + "/#/chat/Mira")
    expect(page.locator("#messages .message.user")).to_have_count(1)
    toasts = page.locator("#toasts .toast")

    # Too long: the server's "prompt: Ensure this field has no more than 4000 characters." in Chinese.
    page.fill("#prompt", "长" * (limit + 1))
    page.press("#prompt", "Enter")
    expect(toasts).to_have_text([f"你的消息太长了：最多 {limit} 个字符。"])
    wait_idle(page)
    page.press("#prompt", "Enter")  # the words came back; the same failure again is still one message
    expect(page.locator("body[data-reply=streaming]")).to_have_count(0)
    wait_idle(page)
    expect(toasts).to_have_count(1)
    # The messages sit at the top, clear of the box being typed in.
    toast_box = toasts.first.bounding_box()
    assert toast_box["y"] + toast_box["height"] <= page.locator("#composer").bounding_box()["y"]

    # More failures, each different: a short stack, newest last, never a wall.
    page.evaluate("document.querySelector('#prompt').value = 'a\\u0000b'")
    page.press("#prompt", "Enter")
    expect(toasts.last).to_have_text(re.compile("NUL"))
    wait_idle(page)
    page.click("#messages .message.bot:last-child button >> text=修改")
    page.fill("#messages .edit-box textarea", "长" * (limit + 1))
    page.click("#messages .edit-box button >> text=保存")
    expect(toasts.last).to_have_text(f"消息太长了：最多 {limit} 个字符。")
    api.ok("/characters/del", character_name="Mira")
    page.click("#view-chat [data-action=context]")
    expect(toasts.last).to_have_text("这个角色不存在（或已被删除）。")
    assert toasts.count() <= 3
    for text in toasts.all_text_contents():
        assert not re.search(r"[A-Za-z]{4}", text.replace("NUL", "")), text  # no English left in 中文
    # (the chat's REST API answers at the real HTTP status, which the browser logs: these are expected)
    page.problems[:] = [problem for problem in page.problems if "status of 400 (Bad Request)" not in problem]

    # A sign-up with a taken name, in Chinese too.
    other = open_page(locale="zh-CN")
    other.click("#tab-signup")
    other.fill("#auth-form [name=user_name]", api.user_name)
    other.fill("#auth-form [name=password]", "a fine long password 42")
    other.click("#auth-submit")
    expect(other.locator("#auth-error")).to_have_text(f"用户名“{api.user_name}”已被占用。请换一个，或者直接登录。")


def test_every_message_of_the_api_the_page_meets_is_written_for_people(open_page, web):
    """The legacy API's refusals, as this server words them, each mapped by the client (i18n.js)."""
    api = guest_with_mira(web)
    limit = httpx.get(web.url + "/web/config").json()["data"]["max_prompt_chars"]
    refusals = [
        Api(web.url).call("/login", user_name=api.user_name, password="wrong password 42"),
        Api(web.url).call("/signup", user_name=api.user_name, password="a fine long password 42"),
        Api(web.url).call("/signup", user_name="new " + os.urandom(3).hex(), password="a fine long password 42"),
        Api(web.url).call("/signup", user_name=f"web-{os.urandom(3).hex()}", password="1234"),
        api.call("/characters/save", **{**CHARACTER, "bot": "x" * 101}),
        api.call("/characters/save", **{**CHARACTER, "greeting": ""}),
        api.call("/characters/save", **{**CHARACTER, "avatar": "data:image/png;base64,bm90IGFuIGltYWdl"}),
        api.call("/characters/load", character_name="Nobody"),
        api.call("/chat/tamper", character_name="Mira", message="x" * (limit + 1)),
        api.call("/chat/back", character_name="Mira", log_index=99),
        api.stream("/chat/reply", character_name="Mira", prompt="")[0],
        api.stream("/chat/reply", character_name="Mira", prompt="x" * (limit + 1))[0],
        api.stream("/chat/reply", character_name="Mira", prompt="hi", temperature="9")[0],
    ]
    messages = [body["message"] for body in refusals]
    assert all(body["code"] == 400 for body in refusals), refusals
    page = open_page()
    expect(page.locator("#auth")).to_be_visible()
    for language in ("en", "zh"):
        shown = page.evaluate("""async ([messages, language]) => {
            const i18n = await import("/static/web/i18n.js");
            i18n.setLanguage(language);
            return messages.map((message) => i18n.fromServer(message));
        }""", [messages, language])
        unmapped = [message for message, words in zip(messages, shown) if words is None]
        assert unmapped == [], unmapped
        assert not set(shown) & set(messages)
        if language == "zh":
            assert all(re.search(r"[\u4e00-\u9fff]", words) for words in shown), shown


def test_a_guest_is_warned_before_logging_out(open_page):
    page = open_page()
    page.click("#auth [data-action=guest]")
    expect(page.locator("#cards .card")).not_to_have_count(0)
    page.click("#app [data-action=logout]")
    expect(page.locator("#confirm-text")).to_contain_text("gone for good")
    page.click("#confirm-dialog button[value=cancel]")
    expect(page.locator("#app")).to_be_visible()
    assert page.evaluate("localStorage.getItem('rpserver.session')") is not None
    page.click("#app [data-action=logout]")
    confirm(page)
    expect(page.locator("#auth")).to_be_visible()


def test_a_guest_s_large_picture_is_scaled_down_in_the_browser(open_page, web, tmp_path):
    # 500 x 500 pixels of noise: 733 KB as a PNG, over a guest's 256 KB, under the size kept as it is.
    noise = os.urandom(500 * 500 * 3)
    rows = b"".join(b"\x00" + noise[y * 1500:(y + 1) * 1500] for y in range(500))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    image = tmp_path / "noise.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 500, 500, 8, 2, 0, 0, 0))
                      + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b""))
    guest_limit = httpx.get(web.url + "/web/config").json()["data"]["guest_max_avatar_bytes"]
    assert image.stat().st_size > 700 * 1024 > guest_limit
    page = open_page()
    page.click("#auth [data-action=guest]")
    page.click("#cards .new-card a")
    page.set_input_files("#avatar-input", str(image))
    expect(page.locator("#editor-avatar img")).to_have_attribute("src", re.compile(r"^data:image/(webp|jpeg);base64,"))
    page.fill("#editor-form [name=bot]", "Noisy")
    page.fill("#editor-form [name=user]", "friend")
    page.fill("#editor-form [name=greeting]", "Hello.")
    page.fill("#editor-form [name=bot_persona]", "{{char}} is made of static.")
    page.click("#editor-save")
    expect(page.locator("#chat-name")).to_have_text("Noisy")
    stored = page_api(page, web).ok("/characters/get", character_name="Noisy")["avatar"]
    assert len(base64.b64decode(stored.split(",", 1)[1])) <= guest_limit


def test_a_second_tab_shows_that_a_reply_is_being_written_and_follows_it(open_page, endless):
    api = guest_with_mira(endless)
    api.chat("Mira")
    with api.http.stream("POST", "/chat/reply", data={**api.auth(), "character_name": "Mira",
                                                      "prompt": "Talk for a while."}) as first_tab:
        assert first_tab.headers["content-type"].startswith("text/event-stream")
        page = open_mira(open_page, endless, api)
        writing = page.locator("#messages .message.elsewhere .bubble.streaming")
        expect(writing).to_contain_text("being written in another tab")
        expect(page.locator("#send")).to_be_disabled()
        expect(page.locator("#stop")).to_be_hidden()  # this page cannot stop the other tab's reply
        page.fill("#prompt", "Wait for me")
        page.press("#prompt", "Enter")
        expect(page.locator("#messages .message.user")).to_have_count(0)  # nothing is sent meanwhile
    # The first tab left, so its reply was cut off and nothing kept; the page sees the chat free again.
    wait_idle(page)
    expect(page.locator("#messages .message.elsewhere")).to_have_count(0)
    assert rounds_on_page(page) == [["bot", as_shown(bot)] for _, bot in api.chat("Mira")]
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#prompt")).to_have_value("Wait for me")  # what was typed meanwhile is still there


@pytest.mark.parametrize("locale,greeting", [("en-US", "osmanthus tea"), ("zh-CN", "桂花茶")])
def test_starter_characters_speak_the_page_language_and_say_who_they_are(open_page, web, locale, greeting):
    page = open_page(locale=locale)
    page.click("#auth [data-action=guest]")
    card = page.locator("#cards .card", has_text="小雪")
    expect(card.locator(".card-desc")).to_contain_text("astronomy" if locale == "en-US" else "天文学")
    expect(page.locator("#cards .card", has_text="Ellie").locator(".card-desc")).to_contain_text("cartographer")
    card.locator(".card-link").click()
    expect(page.locator("#messages .message.bot .bubble").first).to_contain_text(greeting)


def test_the_legacy_api_without_a_language_keeps_the_chinese_starter_set(web):
    for headers, greeting in [({}, "桂花茶"), ({"Accept-Language": "zh-TW,en;q=0.5"}, "桂花茶"),
                              ({"Accept-Language": "en-GB,zh;q=0.5"}, "osmanthus tea")]:
        data = httpx.post(web.url + "/login/tmp", headers=headers).json()["data"]
        guest = Api(web.url, data["user_name"], data["token"])
        assert greeting in guest.ok("/characters/get", character_name="小雪")["greeting"]


def test_model_text_is_shown_as_text_and_no_script_runs(open_page, web):
    api = guest_with_mira(web)
    api.chat("Mira")
    api.reply("Mira", "<b>bold?</b>")
    hostile = '<img src=x onerror="window.pwned = 1"><script>window.pwned = 2</script>'
    api.ok("/chat/tamper", character_name="Mira", message=hostile)
    page = open_mira(open_page, web, api)
    expect(page.locator("#messages .message.bot:last-child .bubble")).to_have_text(hostile)
    expect(page.locator("#messages .message.user .bubble")).to_have_text("<b>bold?</b>")
    # No element was made from the text, so there is nothing that could run later.
    assert page.locator("#messages .bubble *:not(em)").count() == 0
    assert page.evaluate("window.pwned") is None


# ---------------------------------------------------------------- looks


@pytest.mark.parametrize("viewport,scheme,locale", [
    (PHONE, "dark", "zh-CN"),
    (PHONE, "light", "en-US"),
    (DESKTOP, "dark", "en-US"),
])
def test_the_layout_fits_phones_and_desktops(open_page, web, viewport, scheme, locale):
    api = guest_with_mira(web)
    api.chat("Mira")
    api.reply("Mira", "Hello! How is the sea tonight?")
    page = open_page(viewport=viewport, color_scheme=scheme, locale=locale)
    tag = f"{viewport['width']}-{scheme}-{locale}"
    expect(page.locator("#tab-login")).to_have_text("登录" if locale == "zh-CN" else "Log in")
    shot(page, f"login-{tag}")
    log_in_as(page, api)
    expect(page.locator("#cards .card")).not_to_have_count(0)
    shot(page, f"gallery-{tag}")
    page.goto(web.url + "/#/chat/Mira")
    expect(page.locator("#messages .message.user")).to_have_count(1)
    shot(page, f"chat-{tag}")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= viewport["width"], f"the page scrolls sideways: {width} px"
    box = page.locator("#prompt").bounding_box()
    assert box["y"] + box["height"] <= viewport["height"] and box["x"] >= 0
    assert box["x"] + box["width"] <= viewport["width"]
    sidebar = page.locator("#sidebar")
    if viewport is PHONE:
        expect(sidebar).to_be_hidden()
    else:
        expect(sidebar).to_be_visible()
    # The language switch changes the words at once.
    page.click("#app [data-action=switch-language]")
    expect(page.locator("#send")).to_have_text("Send" if locale == "zh-CN" else "发送")


# ---------------------------------------------------------------- accessibility


@pytest.fixture(scope="module")
def axe_source():
    if not AXE.is_file():  # make test installs it; a bare pytest run does it here
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(AXE.parents[2])], check=True)
    return AXE.read_text()


def axe_problems(page, source):
    """axe-core's serious and critical violations on the page as it is now: ["rule: element", ...].
    (Evaluated through the DevTools protocol, which the page's CSP does not govern; nothing is added to it.)"""
    page.evaluate(source)
    violations = page.evaluate("""async () => (await axe.run(document, {resultTypes: ["violations"]})).violations""")
    return [f"{v['id']} ({v['impact']}): {node['target']}" for v in violations
            if v["impact"] in ("serious", "critical") for node in v["nodes"]]


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_no_serious_accessibility_problems_on_any_view(open_page, web, axe_source, scheme):
    api = guest_with_mira(web)
    api.chat("Mira")
    api.reply("Mira", "Hello! How is the sea tonight?")
    page = open_page(color_scheme=scheme)
    found = {}
    expect(page.locator("#auth")).to_be_visible()
    found["log-in"] = axe_problems(page, axe_source)
    log_in_as(page, api)
    expect(page.locator("#cards .card-desc").first).not_to_be_empty()
    found["gallery"] = axe_problems(page, axe_source)
    page.goto(web.url + "/#/edit/Mira")
    expect(page.locator("#editor-form")).to_have_attribute("aria-busy", "false")
    found["editor"] = axe_problems(page, axe_source)
    page.goto(web.url + "/#/chat/Mira")
    expect(page.locator("#messages .message.user")).to_have_count(1)
    wait_idle(page)
    found["chat"] = axe_problems(page, axe_source)
    page.click("#view-chat [data-action=settings]")
    expect(page.locator("#settings-dialog")).to_be_visible()
    found["settings"] = axe_problems(page, axe_source)
    assert {view: problems for view, problems in found.items() if problems} == {}


# ---------------------------------------------------------------- a demo server with sign-up turned off


@pytest.fixture(scope="module")
def demo_server():
    from inference.runtime import demo_model_path

    running = Server(model=demo_model_path(), env={
        "RPSERVER_ALLOW_SIGNUP": "0", "RPSERVER_GUESTS_PER_HOUR_PER_ADDRESS": "1",
    }, name="web-demo").start()
    yield running
    running.stop()


def test_a_demo_server_says_so_and_a_private_one_offers_no_sign_up(open_page, demo_server):
    page = open_page(server=demo_server)
    expect(page.locator("#demo-note")).to_be_visible()
    expect(page.locator("#demo-note")).to_contain_text("random weights")
    expect(page.locator("#tab-signup")).to_be_hidden()
    shot(page, "demo-note-1280")
    page.click("#auth [data-action=guest]")
    expect(page.locator("#app")).to_be_visible()
    # The note can be put away, and stays away on this browser.
    page.click("#demo-note [data-action=dismiss-demo]")
    expect(page.locator("#demo-note")).to_be_hidden()
    page.reload()
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#demo-note")).to_be_hidden()
    other = open_page(server=demo_server)
    other.click("#auth [data-action=guest]")
    expect(other.locator("#auth-error")).to_contain_text("Too many attempts")
