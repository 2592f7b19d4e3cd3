"""The web client's lorebook screens (web/static/web/lore.js), in headless Chromium against the real server:
a world-info file imported with the picker, its entries edited, added and deleted on the page and kept in
their shape with every field the page does not show; what the model reads (/debug/token) follows the
page's edits and its active switch; export gives the stored JSON back.

The suite's shared server (conftest's `server`) and tests/test_browser.py's browser and axe-core.
"""

import base64
import copy
import json
from pathlib import Path

import pytest

from test_browser import (  # noqa: F401 (browser, axe_source: fixtures)
    DESKTOP, PHONE, axe_problems, axe_source, browser, expect, log_in_as, shot)
from test_browser_personas import guest_with_mira, open_page, rest  # noqa: F401 (open_page: a fixture)
from test_lore import WORLD


def context(api):
    return api.context("Mira")["token_state"]


def import_on_page(page, book, name="coast.json"):
    page.set_input_files("#lore-file", files=[{"name": name, "mimeType": "application/json",
                                               "buffer": json.dumps(book).encode()}])


def entry(page, number):
    return page.locator("#lore-entries fieldset.entry").nth(number - 1)


def test_a_lorebook_is_imported_edited_and_exported_on_the_page_and_the_model_reads_the_edits(open_page, server):
    api = guest_with_mira(server)
    page = open_page()
    log_in_as(page, api)
    page.click("#view-gallery .gallery-nav >> text=Lorebooks")
    expect(page.locator("#lore-empty")).to_be_visible()
    import_on_page(page, WORLD)
    item = page.locator("#lore-list .item", has_text="Coast")
    expect(item).to_contain_text("5 entries")
    expect(item.locator("input[type=checkbox]")).to_be_checked()
    shot(page, "lore-list")

    # The editor shows the five entries in their order in the file, with their fields.
    item.locator(".item-name").click()
    expect(page.locator("#lore-form")).to_be_visible()
    expect(page.locator("#lore-title")).to_have_text("Lorebook: Coast")
    expect(page.locator("#lore-entries fieldset.entry")).to_have_count(5)
    expect(entry(page, 3).locator("[name=keys]")).to_have_value("ship")
    expect(entry(page, 3).locator("[name=secondary]")).to_have_value("storm, gale")
    expect(entry(page, 3).locator("[name=order]")).to_have_value("30")
    expect(entry(page, 4).locator("[name=constant]")).to_be_checked()
    expect(entry(page, 5).locator("[name=enabled]")).not_to_be_checked()

    # Edit entry 2's content, turn the constant entry off, delete the disabled one, add a new one.
    entry(page, 2).locator("[name=content]").fill("{{char}} left the harbour at dawn.")
    entry(page, 4).locator("[name=enabled]").uncheck()
    entry(page, 5).locator("button", has_text="Delete entry").click()
    expect(page.locator("#lore-entries fieldset.entry")).to_have_count(4)
    page.click("#lore-add-entry")
    expect(page.locator("#lore-entries fieldset.entry")).to_have_count(5)
    expect(entry(page, 5).locator("[name=keys]")).to_be_focused()
    entry(page, 5).locator("[name=keys]").fill("dragon, wyrm")
    entry(page, 5).locator("[name=secondary]").fill("")
    entry(page, 5).locator("[name=content]").fill("A dragon sleeps under {{char}}'s lighthouse.")
    entry(page, 5).locator("[name=order]").fill("1")
    shot(page, "lore-editor")
    page.click("#lore-save")
    expect(page.locator("#lore-form[data-saved='1']")).to_have_count(1)

    books = rest(api, "GET", "/api/v1/lorebooks")["lorebooks"]
    assert [(b["name"], b["entries"]) for b in books] == [("Coast", 5)]
    lorebook_id = books[0]["id"]
    stored = rest(api, "GET", f"/api/v1/lorebooks/{lorebook_id}")["data"]
    expected = copy.deepcopy(WORLD)
    expected["entries"]["1"]["content"] = "{{char}} left the harbour at dawn."
    expected["entries"]["3"]["disable"] = True
    del expected["entries"]["4"]
    # The page writes the fields it shows on every entry (the same values where nothing changed)...
    for uid, item_ in expected["entries"].items():
        shown = {"key": item_.get("key", []), "keysecondary": item_.get("keysecondary", []),
                 "content": item_["content"], "constant": item_.get("constant", False), "order": item_["order"],
                 "disable": item_.get("disable", False), "selective": bool(item_.get("keysecondary"))}
        expected["entries"][uid] = item_ | shown
    expected["entries"]["4"] = {"uid": 4, "key": ["dragon", "wyrm"], "keysecondary": [], "comment": "",
                                "content": "A dragon sleeps under {{char}}'s lighthouse.", "constant": False,
                                "selective": False, "order": 1, "disable": False}
    # ... and keeps every other one (probability, depth, extensions, the book's own name); the new entry takes
    # the uid after the highest one left (4, which the deleted entry had).
    for uid in expected["entries"]:
        assert (uid, stored["entries"].get(uid)) == (uid, expected["entries"][uid])
    assert stored == expected

    # What the model reads follows the page: the new entry, by either key, first in order; the edited
    # entry's new text; the constant entry no more (turned off on the page).
    api.reply("Mira", "Is there a wyrm by the harbour?")
    read = context(api)
    assert ("A dragon sleeps under Mira's lighthouse.\nMira left the harbour at dawn.\nThe harbour freezes in winter."
            "\n\nfriend: Is there a wyrm by the harbour?\n\nMira:") in read
    assert "always foggy" not in read and "Never read" not in read

    # Export gives the stored JSON back, as a file named after the book.
    with page.expect_download() as download:
        page.click("#lore-export")
    assert download.value.suggested_filename == "Coast.json"
    assert json.loads(Path(download.value.path()).read_bytes()) == expected

    # Turned off in the list: not read any more.
    page.click("#lore-form a.button[href='#/lore']")
    box = page.locator("#lore-list .item", has_text="Coast").locator("input[type=checkbox]")
    box.uncheck()
    expect(page.locator(f"#lore-list .item[data-id='{lorebook_id}'][data-active=false]")).to_have_count(1)
    assert rest(api, "GET", "/api/v1/lorebooks")["lorebooks"][0]["active"] is False
    api.reply("Mira", "Tell me of the dragon.")
    assert "dragon sleeps" not in context(api).split("Is there a wyrm")[1]

    # Deleted, after a question.
    page.locator("#lore-list .item", has_text="Coast").locator("button", has_text="Delete").click()
    page.click("#confirm-ok")
    expect(page.locator("#lore-empty")).to_be_visible()
    assert rest(api, "GET", "/api/v1/lorebooks")["lorebooks"] == []


def test_a_character_book_keeps_its_shape_and_a_bad_file_says_why(open_page, server):
    api = guest_with_mira(server)
    book = {"name": "Sea", "scan_depth": 3, "extensions": {"kept": True},
            "entries": [{"keys": ["gull"], "content": "Gulls steal chips.", "insertion_order": 2, "enabled": True,
                         "extensions": {"y": 2}, "id": 7}]}
    page = open_page(locale="zh-CN")
    log_in_as(page, api)
    page.goto(server.url + "/#/lore")
    expect(page.locator("#view-lore[aria-busy=false]")).to_have_count(1)
    import_on_page(page, book, "sea.json")
    import_on_page(page, {"not": "a lorebook"}, "bad.json")
    expect(page.locator(".toast.error")).to_contain_text("bad.json: 这个文件不是设定集")
    page.locator("#lore-list .item", has_text="Sea").locator(".item-name").click()
    expect(page.locator("#lore-entries fieldset.entry")).to_have_count(1)
    page.click("#lore-add-entry")
    entry(page, 2).locator("[name=keys]").fill("crab")
    entry(page, 2).locator("[name=secondary]").fill("beach, sand")
    entry(page, 2).locator("[name=content]").fill("Crabs pinch.")
    entry(page, 2).locator("[name=constant]").check()
    page.click("#lore-save")
    expect(page.locator("#lore-form[data-saved='1']")).to_have_count(1)
    (stored,) = rest(api, "GET", "/api/v1/lorebooks")["lorebooks"]
    data = rest(api, "GET", f"/api/v1/lorebooks/{stored['id']}")["data"]
    assert data["scan_depth"] == 3 and data["extensions"] == {"kept": True} and data["name"] == "Sea"
    assert data["entries"][0] == book["entries"][0] | {"secondary_keys": [], "constant": False, "selective": False}
    assert data["entries"][1] == {"keys": ["crab"], "secondary_keys": ["beach", "sand"], "content": "Crabs pinch.",
                                  "extensions": {}, "enabled": True, "insertion_order": 100, "constant": True,
                                  "selective": True}
    page.problems.clear()  # the refused file's 400, which Chromium logs


@pytest.mark.parametrize("viewport,scheme,locale", [(PHONE, "dark", "zh-CN"), (DESKTOP, "light", "en-US"),
                                                    (PHONE, "light", "en-US"), (DESKTOP, "dark", "zh-CN")])
def test_the_lorebook_screens_fit_work_by_keyboard_and_have_no_serious_accessibility_problems(
        open_page, server, axe_source, viewport, scheme, locale):  # noqa: F811 (axe_source: a fixture)
    api = guest_with_mira(server)
    for name in ("Coast", "A lorebook with a rather long name for a phone screen"):
        rest(api, "POST", "/api/v1/lorebooks/import", file=base64.b64encode(json.dumps(WORLD).encode()).decode(),
             name=name)
    page = open_page(viewport=viewport, color_scheme=scheme, locale=locale)
    log_in_as(page, api)
    tag = f"{viewport['width']}-{scheme}-{locale}"
    page.goto(server.url + "/#/lore")
    expect(page.locator("#view-lore[aria-busy=false] #lore-list .item")).to_have_count(2)
    found = {"list": axe_problems(page, axe_source)}
    shot(page, f"lore-{tag}")
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    # By keyboard: from the book's name, Enter opens the editor; Tab reaches "+ Add entry" with a focus ring.
    page.focus("#lore-list .item >> nth=0 >> .item-name")
    page.keyboard.press("Enter")
    expect(page.locator("#view-lore[aria-busy=false] #lore-form")).to_be_visible()
    expect(page.locator("#lore-entries fieldset.entry")).to_have_count(5)
    page.focus("#lore-entries fieldset.entry >> nth=4 >> button")
    page.keyboard.press("Tab")
    expect(page.locator("#lore-add-entry")).to_be_focused()
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    page.keyboard.press("Enter")
    expect(page.locator("#lore-entries fieldset.entry")).to_have_count(6)
    # The language switch rewrites the editor's words and keeps what was typed in it.
    page.locator("#lore-entries fieldset.entry >> nth=5 >> [name=keys]").fill("reef")
    title = {"zh-CN": "设定集：Coast", "en-US": "Lorebook: Coast"}
    expect(page.locator("#lore-title")).to_have_text(title[locale])
    page.click("#app [data-action=switch-language]")
    expect(page.locator("#lore-title")).to_have_text(title["en-US" if locale == "zh-CN" else "zh-CN"])
    expect(page.locator("#lore-entries fieldset.entry >> nth=5 >> legend")).to_have_text(
        "Entry 6" if locale == "zh-CN" else "条目 6")
    expect(page.locator("#lore-entries fieldset.entry >> nth=5 >> [name=keys]")).to_have_value("reef")
    page.click("#app [data-action=switch-language]")
    expect(page.locator("#lore-title")).to_have_text(title[locale])
    found["editor"] = axe_problems(page, axe_source)
    shot(page, f"lore-editor-{tag}")
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    assert {view: problems for view, problems in found.items() if problems} == {}
