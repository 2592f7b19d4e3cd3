"""The web client's markdown (web/static/web/markdown.js) and card import and export
(web/static/web/cards.js), in headless Chromium against the real server.

The suite's shared server (conftest's `server`) and tests/test_browser.py's browser; a page that logs
a console error or an uncaught exception fails its test.
"""

import base64
import json
from pathlib import Path

import pytest

from conftest import Api
from test_browser import axe_problems, axe_source, browser, expect, log_in_as, shot  # noqa: F401 (fixtures)
from test_cards import V3_CARD, b64json, picture, text_chunks, with_text_chunks

MARKDOWN_GREETING = (
    "*waves* Hello **friend**, run `make test` and read [the docs](https://example.org/docs) "
    "but not [this](javascript:alert(1)) <img src=x onerror=\"document.title='pwned'\"> （smiles）\n"
    "- tea\n"
    "- **cake**\n"
    "> a quote with *feeling*\n"
    "1. first\n"
    "Plain line with a_snake_case_name."
)


@pytest.fixture
def page(browser, server):  # noqa: F811 (browser: the fixture imported above)
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    opened = context.new_page()
    problems = []
    opened.on("console", lambda message: message.type == "error" and problems.append(message.text))
    opened.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    opened.goto(server.url + "/")
    opened.allowed_problems = []  # a test may expect some (substrings)
    yield opened
    context.close()
    unexpected = [p for p in problems if not any(allowed in p for allowed in opened.allowed_problems)]
    assert unexpected == [], f"console errors: {unexpected}"


def test_a_markdown_message_is_shown_formatted_and_no_html_gets_in(page, server):
    data = Api(server.url).ok("/login/tmp")
    api = Api(server.url, data["user_name"], data["token"])
    api.ok("/characters/save", bot="Mira", user="friend", greeting=MARKDOWN_GREETING, bot_persona="{{char}}.")
    log_in_as(page, api)
    page.goto(server.url + "/#/chat/Mira")
    bubble = page.locator("#messages .message .bubble").first
    expect(bubble.locator("strong").first).to_have_text("friend")
    assert bubble.locator("em").all_text_contents() == ["waves", "（smiles）", "feeling"]
    assert bubble.locator("code").all_text_contents() == ["make test"]
    link = bubble.locator("a")
    expect(link).to_have_count(1)  # the javascript: one stays text
    assert (link.get_attribute("href"), link.get_attribute("rel"), link.get_attribute("target")) == (
        "https://example.org/docs", "noopener noreferrer", "_blank")
    assert bubble.locator("ul > li").all_text_contents() == ["tea", "cake"]
    assert bubble.locator("ul strong").all_text_contents() == ["cake"]
    assert bubble.locator("blockquote").all_text_contents() == ["a quote with feeling"]
    assert bubble.locator("ol > li").all_text_contents() == ["first"]
    text = bubble.text_content()
    assert "[this](javascript:alert(1))" in text and "<img src=x onerror=" in text
    assert "a_snake_case_name." in text
    expect(bubble.locator("img, script, iframe")).to_have_count(0)
    assert page.title() != "pwned"
    shot(page, "markdown")


def new_guest(server):
    data = Api(server.url).ok("/login/tmp")
    return Api(server.url, data["user_name"], data["token"])


def drop_files(page, files):
    """Drop files [(name, bytes)] onto the gallery, as a person dragging them from their desktop does."""
    page.evaluate("""(files) => {
        const transfer = new DataTransfer();
        for (const [name, b64] of files) {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            transfer.items.add(new File([bytes], name));
        }
        const zone = document.querySelector('#view-gallery');
        for (const type of ['dragover', 'drop']) {
            zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }
    }""", [[name, base64.b64encode(data).decode()] for name, data in files])


def test_cards_dropped_on_the_gallery_are_imported_and_a_bad_one_says_why(page, server):
    api = new_guest(server)
    log_in_as(page, api)
    expect(page.locator("#view-gallery")).to_be_visible()
    card = with_text_chunks(picture(color=(40, 90, 200)), [(b"ccv3", b64json(V3_CARD))])
    drop_files(page, [("sable.png", card), ("broken.png", picture())])
    expect(page.locator("#cards .card-name", has_text="Sable")).to_have_count(1)
    expect(page.locator(".toast.error")).to_contain_text("broken.png: this PNG holds no character card")
    shot(page, "cards-dropped")
    names = [c["char_name"] for c in api.ok("/characters/list")["list"]]
    assert sorted(names) == sorted(["小雪", "Ellie", "Sable"])  # the two defaults, and nothing from broken.png
    page.allowed_problems = ["status of 400"]  # the refused file's answer, which Chromium logs


def test_a_card_chosen_with_the_file_picker_is_imported(page, server):
    api = new_guest(server)
    log_in_as(page, api)
    page.set_input_files("#card-file", files=[{"name": "sable.json", "mimeType": "application/json",
                                               "buffer": json.dumps(V3_CARD).encode()}])
    expect(page.locator("#cards .card-name", has_text="Sable")).to_have_count(1)
    expect(page.locator(".toast")).to_contain_text("Sable was imported.")


def test_the_editor_exports_a_character_as_png_and_json(page, server):
    api = new_guest(server)
    api.http.post("/api/v1/characters/import", json={"file": base64.b64encode(json.dumps(V3_CARD).encode()).decode()},
                  headers={"Authorization": f"Token {api.token}"})
    log_in_as(page, api)
    page.goto(server.url + "/#/edit/Sable")
    expect(page.locator("#editor-form[aria-busy=true]")).to_have_count(0)
    with page.expect_download() as download:
        page.click("#export-json")
    assert download.value.suggested_filename == "Sable.json"
    assert json.loads(Path(download.value.path()).read_bytes()) == V3_CARD
    with page.expect_download() as download:
        page.click("#export-png")
    assert download.value.suggested_filename == "Sable.png"
    chunks = text_chunks(Path(download.value.path()).read_bytes())
    assert json.loads(base64.b64decode(chunks["ccv3"])) == V3_CARD
    shot(page, "cards-export")


def card_named(name, description, tags):
    card = json.loads(json.dumps(V3_CARD))
    card["data"].update(name=name, description=description, tags=tags, nickname="", character_book=None)
    del card["data"]["character_book"]
    return card


def import_json(api, card):
    answer = api.http.post("/api/v1/characters/import",
                           json={"file": base64.b64encode(json.dumps(card).encode()).decode()},
                           headers={"Authorization": f"Token {api.token}"})
    assert answer.status_code == 200, answer.text


def shown_cards(page):
    return page.locator("#cards .card:not(.new-card):visible .card-name").all_text_contents()


@pytest.mark.parametrize("viewport,scheme,locale", [({"width": 360, "height": 740}, "dark", "zh-CN"),
                                                    ({"width": 1280, "height": 800}, "light", "en-US")])
def test_the_gallery_shows_card_tags_and_filters_by_tag_and_search(browser, server, axe_source,  # noqa: F811
                                                                   viewport, scheme, locale):
    api = new_guest(server)
    import_json(api, V3_CARD)  # Sable: fox, tea, 狐
    import_json(api, card_named("Wren", "{{char}} is a wren who sings at dawn.", ["bird", " Tea ", "Bird"]))
    gallery = {c["char_name"]: c["tags"] for c in api.ok("/web/characters")["list"]}
    assert gallery == {"小雪": [], "Ellie": [], "Sable": ["fox", "tea", "狐"], "Wren": ["bird", "Tea"]}
    context = browser.new_context(viewport=viewport, color_scheme=scheme, locale=locale)
    page = context.new_page()
    problems = []
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.goto(server.url + "/")
    log_in_as(page, api)
    expect(page.locator("#cards[data-shown='4']")).to_have_count(1)
    sable = page.locator("#cards .card", has_text="Sable")
    assert sable.locator(".tag").all_text_contents() == ["fox", "tea", "狐"]
    # The tag buttons, the most used first ("tea" twice, in either case), then by name (in the page's language's
    # order: Chinese puts 狐 first).
    tags = page.locator("#gallery-tags .tag-button")
    assert tags.all_text_contents() == (["tea", "狐", "bird", "fox"] if locale == "zh-CN" else ["tea", "bird", "fox", "狐"])
    tags.filter(has_text="fox").click()
    expect(page.locator("#cards[data-shown='1']")).to_have_count(1)
    assert shown_cards(page) == ["Sable"]
    expect(tags.filter(has_text="fox")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#cards .new-card")).to_be_hidden()
    axe = {"tag": axe_problems(page, axe_source)}
    tags.filter(has_text="fox").click()  # pressed again: every card
    expect(page.locator("#cards[data-shown='4']")).to_have_count(1)
    tags.filter(has_text="tea").click()
    expect(page.locator("#cards[data-shown='2']")).to_have_count(1)
    assert sorted(shown_cards(page)) == ["Sable", "Wren"]
    tags.filter(has_text="tea").click()
    # The search: every word, in the name, the tags or the line about the character, any case.
    for words, names in [("wren", ["Wren"]), ("SINGS at", ["Wren"]), ("狐", ["Sable"]), ("fox spirit", ["Sable"]),
                         ("bird tea", ["Wren"])]:
        page.fill("#gallery-search", words)
        expect(page.locator(f"#cards[data-shown='{len(names)}']")).to_have_count(1)
        assert shown_cards(page) == names, words
    shot(page, f"gallery-search-{viewport['width']}-{scheme}")
    page.fill("#gallery-search", "nobody")
    expect(page.locator("#gallery-none")).to_be_visible()
    expect(page.locator("#gallery-none")).to_have_text("没有符合条件的角色。" if locale == "zh-CN" else "No character matches.")
    axe["none"] = axe_problems(page, axe_source)
    page.press("#gallery-search", "Escape")  # Escape clears it
    expect(page.locator("#cards[data-shown='4']")).to_have_count(1)
    expect(page.locator("#gallery-none")).to_be_hidden()
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    # The tag buttons are reached and pressed by keyboard, with a focus ring.
    page.focus("#gallery-search")
    page.keyboard.press("Tab")
    expect(tags.first).to_be_focused()
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    page.keyboard.press("Enter")
    expect(page.locator("#cards[data-shown='2']")).to_have_count(1)
    shot(page, f"gallery-tags-{viewport['width']}-{scheme}")
    context.close()
    assert {view: found for view, found in axe.items() if found} == {}
    assert problems == []
