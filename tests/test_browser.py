"""The web client at `/`, driven in headless Chromium (Playwright) against the real server.

One browser for the whole module, a fresh context (its own localStorage) per
page. Every page collects console errors and uncaught exceptions, and a test
fails when there are any. Screenshots go to tests/screenshots/ for people to
look at.
"""

import os
import re
import struct
import zlib
from pathlib import Path

import httpx
import pytest

from conftest import ENDLESS_MODEL, Api, Server

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # fail, never skip: the browser tests are part of the suite
    pytest.fail("the browser tests need the playwright package: pip install -r requirements.txt", pytrace=False)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
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
    """Record the streaming bubble's text length at every change, from now on."""
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const bubble = document.querySelector('#messages .bubble.streaming');
            if (bubble) window.lengths.push(bubble.textContent.length);
        }).observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true});
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
    fields = re.findall(r'\{ name: "(\w+)"', (WEB / "static/web/settings.js").read_text())
    used |= {f"settings.{name}" for name in fields}
    assert len(used) > 60 and used <= english, used - english


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

    # Rewind to round 1.
    round_1 = page.locator("#messages .message.bot[data-round='1']")
    round_1.hover()
    round_1.locator("button", has_text="Rewind to here").click()
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


def test_stop_ends_the_reply_and_gives_the_words_back(open_page, endless):
    # On a server whose replies run until their reader leaves: a short reply could end before Stop.
    api = guest_with_mira(endless)
    api.chat("Mira")
    page = open_mira(open_page, endless, api)
    expect(page.locator("#messages .message.bot")).to_have_count(1)
    page.fill("#prompt", "A question I will take back.")
    page.press("#prompt", "Enter")
    expect(page.locator("#messages .bubble.streaming")).not_to_have_text("")
    page.click("#stop")
    wait_idle(page)
    # The reply ends at once, nothing of it is kept, the words come back to the box.
    expect(page.locator(".toast")).to_contain_text("Stopped")
    expect(page.locator("#prompt")).to_have_value("A question I will take back.")
    expect(page.locator("#messages .message.user")).to_have_count(0)
    assert api.chat("Mira") == [[None, "*looks up from the logbook* Hi friend! I'm Mira."]]


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
        wait_idle(page)
    expect(page.locator("#prompt")).to_have_value("Me too!")  # the words are given back
    expect(page.locator("#messages .message.user", has_text="Me too!")).to_have_count(0)
    assert [user_text for user_text, _ in api.chat("Mira")] == [None]  # (the other tab's reply was cut off)


def test_sampling_settings_are_kept_per_character_and_sent(open_page, web):
    api = guest_with_mira(web)
    page = open_mira(open_page, web, api)
    page.click("#view-chat [data-action=settings]")
    page.fill("#sampling-temperature", "0.7")
    page.press("#sampling-temperature", "Tab")
    page.click("#settings-dialog button[value=close]")
    key = f"rpserver.sampling.{api.user_name}.Mira"
    assert page.evaluate(f"JSON.parse(localStorage.getItem({key!r}))")["temperature"] == 0.7
    with page.expect_request("**/chat/reply") as request:
        page.fill("#prompt", "Hello")
        page.press("#prompt", "Enter")
    assert "temperature=0.7" in request.value.post_data
    wait_idle(page)


def test_model_text_is_shown_as_text_and_no_script_runs(open_page, web):
    api = guest_with_mira(web)
    api.chat("Mira")
    api.reply("Mira", "<b>bold?</b>")
    hostile = '<img src=x onerror="window.pwned = 1"><script>window.pwned = 2</script>'
    api.ok("/chat/tamper", character_name="Mira", message=hostile)
    page = open_mira(open_page, web, api)
    expect(page.locator("#messages .message.bot:last-child .bubble")).to_have_text(hostile)
    expect(page.locator("#messages .message.user .bubble")).to_have_text("<b>bold?</b>")
    assert page.locator("#messages .bubble img, #messages .bubble script, #messages .bubble b").count() == 0
    page.wait_for_timeout(300)
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
    other = open_page(server=demo_server)
    other.click("#auth [data-action=guest]")
    expect(other.locator("#auth-error")).to_contain_text("Too many attempts")
