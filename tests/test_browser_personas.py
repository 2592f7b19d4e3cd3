"""The web client's persona manager and the choice of persona per chat (web/static/web/personas.js), in
headless Chromium against the real server: what the model reads (/debug/token, the chat's context) follows
the persona chosen on the page.

The suite's shared server (conftest's `server`) and tests/test_browser.py's browser and axe-core; a page
that logs a console error or an uncaught exception fails its test.
"""

import pytest

from conftest import Api
from test_browser import (  # noqa: F401 (browser, axe_source: fixtures)
    CHARACTER, DESKTOP, PHONE, axe_problems, axe_source, browser, expect, log_in_as, png, shot)

ROBIN = "{{user}} is a sailor who visits {{char}} on Sundays."
ASH = "{{user}} is a painter who sketches {{char}}'s lighthouse."


@pytest.fixture
def open_page(browser, server):  # noqa: F811 (browser: the fixture imported above)
    pages = []

    def open_(viewport=DESKTOP, color_scheme="light", locale="en-US"):
        context = browser.new_context(viewport=viewport, color_scheme=color_scheme, locale=locale)
        page = context.new_page()
        page.problems = []
        page.on("console", lambda message: message.type == "error" and page.problems.append(message.text))
        page.on("pageerror", lambda error: page.problems.append(f"uncaught: {error}"))
        page.goto(server.url + "/")
        pages.append(page)
        return page

    yield open_
    problems = [problem for page in pages for problem in page.problems]
    for page in pages:
        page.context.close()
    assert problems == [], f"console errors: {problems}"


def guest_with_mira(server):
    data = Api(server.url).ok("/login/tmp")
    api = Api(server.url, data["user_name"], data["token"])
    api.ok("/characters/save", **CHARACTER)
    return api


def rest(api, method, route, **body):
    answer = api.http.request(method, route, json=body or None, headers={"Authorization": f"Token {api.token}"})
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def header_read(api):
    """What the model has read of Mira's chat so far: its header and greeting (no message was sent)."""
    return api.context("Mira")["token_state"]


def new_persona_on_page(page, name, description, avatar=None):
    page.click("#persona-new")
    expect(page.locator("#persona-form")).to_be_visible()
    expect(page.locator("#persona-form-title")).to_have_text("New persona")
    page.fill("#persona-form [name=name]", name)
    page.fill("#persona-form [name=description]", description)
    if avatar:
        page.set_input_files("#persona-avatar-input", files=[{"name": "me.png", "mimeType": "image/png",
                                                              "buffer": avatar}])
        expect(page.locator("#persona-avatar img")).to_have_count(1)
    page.click("#persona-save")
    expect(page.locator("#persona-list .item-name", has_text=name)).to_have_count(1)


def test_personas_are_made_on_the_page_and_the_one_chosen_for_a_chat_is_what_the_model_reads(open_page, server):
    api = guest_with_mira(server)
    page = open_page()
    log_in_as(page, api)
    # Without personas, the chat's person is who Mira's editor says: "friend".
    assert "friend: " not in header_read(api) and "talks to friend." in header_read(api)
    page.click("#view-gallery .gallery-nav >> text=Your personas")
    expect(page.locator("#persona-empty")).to_be_visible()
    # The first persona is the default unless the person says otherwise; a second one is not.
    new_persona_on_page(page, "Robin", ROBIN, avatar=png(8, 8, (200, 120, 40)))
    new_persona_on_page(page, "Ash", ASH)
    expect(page.locator("#persona-list .item")).to_have_count(2)
    robin = page.locator("#persona-list .item", has_text="Robin")
    expect(robin.locator(".badge")).to_have_text("default")
    expect(robin.locator(".avatar img")).to_have_count(1)
    expect(page.locator("#persona-list .item", has_text="Ash").locator(".badge")).to_have_count(0)
    listed = {p["name"]: p for p in rest(api, "GET", "/api/v1/personas")["personas"]}
    assert (listed["Robin"]["default"], listed["Ash"]["default"]) == (True, False)
    assert listed["Robin"]["avatar"].startswith("data:image/") and listed["Ash"]["avatar"] == ""
    assert listed["Ash"]["description"] == ASH
    # The default persona is who the person is in Mira's chat: its name for {{user}}, its description read.
    read = header_read(api)
    assert "Robin is a sailor who visits Mira on Sundays." in read and "talks to Robin." in read
    assert "friend" not in read
    shot(page, "personas-list")

    # In Mira's editor, the person chooses to be Ash in her chat: the chat starts over, reading Ash.
    page.goto(server.url + "/#/edit/Mira")
    select = page.locator("#chat-persona-select")
    expect(select).to_be_visible()
    expect(select.locator("option").first).to_have_text("Your default persona (Robin)")
    assert select.input_value() == ""
    select.select_option(label="Ash")
    expect(page.locator("#confirm-text")).to_have_text("Be “Ash” in the chat with Mira? The chat starts over.")
    page.click("#confirm-ok")
    expect(page.locator(f"#chat-persona[data-chosen='{listed['Ash']['id']}']")).to_have_count(1)  # the server said so
    expect(page.locator(".toast", has_text="The chat with Mira starts over with your new persona.")).to_have_count(1)
    assert rest(api, "GET", "/api/v1/characters/Mira/persona")["chosen"] == listed["Ash"]["id"]
    read = header_read(api)
    assert "Ash is a painter who sketches Mira's lighthouse." in read and "talks to Ash." in read
    assert "Robin" not in read
    shot(page, "personas-chat-choice")

    # Cancelling the question changes nothing.
    select.select_option(value="")
    page.click("#confirm-dialog button[value=cancel]")
    expect(select).to_have_value(str(listed["Ash"]["id"]))
    assert rest(api, "GET", "/api/v1/characters/Mira/persona")["chosen"] == listed["Ash"]["id"]

    # Editing Ash's description on the page: Mira's chat (which speaks as Ash) reads the new one.
    page.goto(server.url + "/#/personas")
    page.locator("#persona-list .item", has_text="Ash").locator("a.button").click()
    expect(page.locator("#persona-form-title")).to_have_text("Edit Ash")
    expect(page.locator("#persona-form [name=description]")).to_have_value(ASH)
    page.fill("#persona-form [name=description]", "{{user}} is a retired painter.")
    page.click("#persona-save")
    expect(page.locator("#persona-list .item", has_text="retired painter")).to_have_count(1)
    read = header_read(api)
    assert "Ash is a retired painter." in read and "sketches" not in read

    # Back to the default (Robin) from the editor; then Robin is deleted on the page, and the chat is
    # as it was before any persona: the character's own name for the person.
    page.goto(server.url + "/#/edit/Mira")
    expect(select).to_have_value(str(listed["Ash"]["id"]))
    select.select_option(value="")
    page.click("#confirm-ok")
    expect(page.locator("#chat-persona[data-chosen='']")).to_have_count(1)
    assert "talks to Robin." in header_read(api)
    page.goto(server.url + f"/#/personas/{listed['Robin']['id']}")
    expect(page.locator("#persona-form [name=name]")).to_have_value("Robin")
    page.click("#persona-delete")
    page.click("#confirm-ok")
    expect(page.locator("#persona-list .item")).to_have_count(1)
    assert [p["name"] for p in rest(api, "GET", "/api/v1/personas")["personas"]] == ["Ash"]
    assert "talks to friend." in header_read(api)


def test_make_default_on_the_page_and_a_duplicate_name_refused_in_the_page_language(open_page, server):
    api = guest_with_mira(server)
    rest(api, "POST", "/api/v1/personas", name="Robin", description=ROBIN, default=True)
    ash = rest(api, "POST", "/api/v1/personas", name="Ash", description=ASH)
    page = open_page(locale="zh-CN")
    log_in_as(page, api)
    page.goto(server.url + "/#/personas")
    expect(page.locator("#persona-list .item", has_text="Robin").locator(".badge")).to_have_text("默认")
    page.locator("#persona-list .item", has_text="Ash").locator("button", has_text="设为默认").click()
    expect(page.locator("#confirm-text")).to_contain_text("把 Ash 设为默认身份？")
    page.click("#confirm-ok")
    expect(page.locator("#persona-list .item", has_text="Ash").locator(".badge")).to_have_text("默认")
    expect(page.locator("#persona-list .badge")).to_have_count(1)
    assert [p["id"] for p in rest(api, "GET", "/api/v1/personas")["personas"] if p["default"]] == [ash["id"]]
    assert "talks to Ash." in header_read(api)  # Mira's chat has no persona of its own: the new default
    page.goto(server.url + "/#/personas/new")
    page.fill("#persona-form [name=name]", "Robin")
    page.click("#persona-save")
    expect(page.locator("#persona-error")).to_have_text("你已经有一个叫 Robin 的身份了。")
    page.problems.clear()  # the refused request's 400, which Chromium logs
    assert len(rest(api, "GET", "/api/v1/personas")["personas"]) == 2


@pytest.mark.parametrize("viewport,scheme,locale", [(PHONE, "dark", "zh-CN"), (DESKTOP, "light", "en-US"),
                                                    (PHONE, "light", "en-US"), (DESKTOP, "dark", "zh-CN")])
def test_the_persona_screens_fit_work_by_keyboard_and_have_no_serious_accessibility_problems(
        open_page, server, axe_source, viewport, scheme, locale):  # noqa: F811 (axe_source: a fixture)
    api = guest_with_mira(server)
    rest(api, "POST", "/api/v1/personas", name="Robin", description=ROBIN, default=True)
    rest(api, "POST", "/api/v1/personas", name="Ash with a rather long name for a phone", description=ASH * 3)
    page = open_page(viewport=viewport, color_scheme=scheme, locale=locale)
    log_in_as(page, api)
    tag = f"{viewport['width']}-{scheme}-{locale}"
    page.goto(server.url + "/#/personas")
    expect(page.locator("#view-personas[aria-busy=false] #persona-list .item")).to_have_count(2)
    found = {"list": axe_problems(page, axe_source)}
    shot(page, f"personas-{tag}")
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    # The language switch rewrites what the script wrote, at once.
    badge = page.locator("#persona-list .badge")
    expect(badge).to_have_text("默认" if locale == "zh-CN" else "default")
    page.click("#app [data-action=switch-language]")
    expect(badge).to_have_text("default" if locale == "zh-CN" else "默认")
    page.click("#app [data-action=switch-language]")
    expect(badge).to_have_text("默认" if locale == "zh-CN" else "default")
    # By keyboard: Tab reaches the new-persona link, whose focus ring shows, and Enter opens the form.
    page.focus("#persona-new")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")
    expect(page.locator("#persona-new")).to_be_focused()
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    page.keyboard.press("Enter")
    expect(page.locator("#persona-form")).to_be_visible()
    expect(page.locator("#persona-form [name=name]")).to_be_focused()
    found["form"] = axe_problems(page, axe_source)
    shot(page, f"personas-form-{tag}")
    page.goto(server.url + "/#/edit/Mira")
    expect(page.locator("#chat-persona")).to_be_visible()
    found["editor"] = axe_problems(page, axe_source)
    page.locator("#chat-persona").scroll_into_view_if_needed()
    shot(page, f"personas-editor-{tag}")
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    assert {view: problems for view, problems in found.items() if problems} == {}
