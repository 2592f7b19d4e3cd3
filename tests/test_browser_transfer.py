"""The web client's chat and account export and import (web/static/web/transfer.js), in headless
Chromium against the real server: the buttons work from the keyboard, in English and Chinese, and
what goes out comes back in.

The suite's shared server (conftest's `server`) and tests/test_browser.py's browser; a page that logs
a console error or an uncaught exception fails its test.
"""

import io
import json
import zipfile
from pathlib import Path

import pytest

from conftest import CHARACTER, Api
from test_browser import browser, expect, log_in_as, shot  # noqa: F401 (browser: a fixture)
from test_chat_transfer import SILLYTAVERN_CHAT, jsonl


@pytest.fixture
def page(browser, server):  # noqa: F811 (browser: the fixture imported above)
    context = browser.new_context(viewport={"width": 1000, "height": 800}, accept_downloads=True)
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


def new_guest(server):
    data = Api(server.url).ok("/login/tmp")
    return Api(server.url, data["user_name"], data["token"])


def bubbles(page):
    return page.locator("#messages .message .bubble").all_text_contents()


def test_a_chat_is_exported_and_imported_from_its_head_with_the_keyboard(page, server):
    api = new_guest(server)
    api.ok("/characters/save", **CHARACTER)
    api.ok("/chat/tamper", character_name="Mira", message="*waves* Welcome, friend.")
    log_in_as(page, api)
    page.goto(server.url + "/#/chat/Mira")
    expect(page.locator("#messages .message .bubble")).to_have_count(1)
    # Export: the button, reached by the keyboard.
    page.focus("#chat-export")
    with page.expect_download() as download:
        page.keyboard.press("Enter")
    assert download.value.suggested_filename == "Mira.jsonl"
    header, *messages = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
    assert header["character_name"] == "Mira" and header["user_name"] == "friend"
    assert [(m["is_user"], m["mes"]) for m in messages] == [(False, "*waves* Welcome, friend.")]
    assert messages[0]["swipes"] == ["Hi friend! I'm Mira.", "*waves* Welcome, friend."] and messages[0]["swipe_id"] == 1
    # Import: a SillyTavern chat through the file picker; the chat shows it at once.
    page.set_input_files("#chat-import-file", files=[{"name": "seraphina.jsonl", "mimeType": "application/jsonl",
                                                      "buffer": jsonl(SILLYTAVERN_CHAT)}])
    expect(page.locator(".toast", has_text="The chat was imported.")).to_be_visible()
    expect(page.locator("#messages .message .bubble")).to_have_count(5)  # the last message awaits its reply
    texts = bubbles(page)
    assert texts[0] == "*She waves.* Welcome!" or texts[0].endswith("Welcome!")
    assert "Who are you?" in texts[1] and texts[2] == "A guardian." and texts[3] == "Where am I?"
    shot(page, "chat-transfer")
    # A bad file is refused with the server's reason, in the page's language too.
    page.click(".topbar [data-action=switch-language]")
    expect(page.locator("#chat-import-file")).to_have_attribute("aria-label", "导入对话（SillyTavern JSONL）")
    expect(page.locator("#chat-export")).to_have_attribute("aria-label", "导出这段对话（SillyTavern JSONL）")
    page.set_input_files("#chat-import-file", files=[{"name": "bad.jsonl", "mimeType": "application/jsonl",
                                                      "buffer": b"[1, 2]"}])
    expect(page.locator(".toast.error")).to_contain_text("bad.jsonl: line 1 of the chat file is not a chat message")
    expect(page.locator("#messages .message .bubble")).to_have_count(5)  # the chat is as it was
    page.allowed_problems = ["status of 400"]  # the refused file's answer, which Chromium logs


def test_the_account_is_exported_and_imported_from_the_account_menu(page, server, browser):  # noqa: F811
    api = new_guest(server)
    api.ok("/characters/save", **CHARACTER)
    api.ok("/chat/tamper", character_name="Mira", message="The lamp is lit.")
    log_in_as(page, api)
    page.click(".topbar [data-action=switch-language]")  # in Chinese
    summary = page.locator("#account-menu > summary")
    expect(summary).to_have_text("账户")
    summary.focus()
    page.keyboard.press("Enter")  # a <details>: opens from the keyboard
    expect(page.locator("#account-export")).to_be_visible()
    expect(page.locator("#account-export")).to_have_text("导出我的账户")
    page.focus("#account-export")
    with page.expect_download() as download:
        page.keyboard.press("Enter")
    file = Path(download.value.path()).read_bytes()
    manifest = json.loads(zipfile.ZipFile(io.BytesIO(file)).read("rpserver-account.json"))
    assert "Mira" in [character["name"] for character in manifest["characters"]]
    # Into another account: the characters and the chat come back.
    other = new_guest(server)
    other.ok("/characters/del", character_name="Ellie")  # (one of the starters goes, to come back)
    second = browser.new_context(viewport={"width": 1000, "height": 800})
    try:
        fresh = second.new_page()
        fresh.goto(server.url + "/")
        log_in_as(fresh, other)
        fresh.click("#account-menu > summary")
        fresh.set_input_files("#account-import-file", files=[{"name": "account.zip", "mimeType": "application/zip",
                                                              "buffer": file}])
        expect(fresh.locator(".toast", has_text="Imported 3 characters")).to_be_visible()
        expect(fresh.locator("#account-menu")).not_to_have_attribute("open", "")
        expect(fresh.locator("#side-list")).to_contain_text("Mira")
        expect(fresh.locator("#side-list")).to_contain_text("Ellie")
    finally:
        second.close()
    assert other.chat("Mira") == [[None, "The lamp is lit."]]


def test_a_chat_is_imported_from_a_characters_page_with_the_keyboard_in_both_languages(page, server):
    api = new_guest(server)
    api.ok("/characters/save", **CHARACTER)
    log_in_as(page, api)
    page.goto(server.url + "/#/new")  # a character not stored yet has no chat to import into
    expect(page.locator("#editor-form")).to_be_visible()
    expect(page.locator("#character-chat-import")).to_be_hidden()
    page.goto(server.url + "/#/edit/Mira")
    entry = page.locator("#character-chat-import")
    expect(entry).to_be_visible()
    expect(entry).to_have_text("Import a chat")
    # In Chinese: the label and the picker's name.
    page.click(".topbar [data-action=switch-language]")
    expect(entry).to_have_text("导入对话")
    expect(page.locator("#character-chat-import-file")).to_have_attribute("aria-label", "导入对话（SillyTavern JSONL）")
    page.click(".topbar [data-action=switch-language]")
    # The keyboard reaches the picker (Tab from the JSON export). (Opening it with Enter is the
    # browser's own behaviour for a focused file input, and headless Chromium did not always show
    # the chooser within 30 s in a full run: the file is given to the focused input instead.)
    page.focus("#export-json")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "character-chat-import-file"
    page.set_input_files("#character-chat-import-file", files=[{
        "name": "seraphina.jsonl", "mimeType": "application/jsonl", "buffer": jsonl(SILLYTAVERN_CHAT)}])
    expect(page.locator(".toast", has_text="The chat was imported.")).to_be_visible()
    page.wait_for_url("**/#/chat/Mira")  # the imported chat is opened
    expect(page.locator("#messages .message .bubble")).to_have_count(5)
    assert bubbles(page)[2] == "A guardian."
    assert [turn[0] for turn in api.chat("Mira")][1:] == ["Hi!\n\nWho are you?", "Where am I?"]
