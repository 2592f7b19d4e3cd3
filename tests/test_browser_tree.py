"""The conversation tree in the web client (web/static/web/tree.js, docs/conversation-tree.md), in headless
Chromium against the real server: ‹ n/m › between versions, Regenerate on any reply, Edit on any message,
Delete and Undo, Continue, Fork, Draft and Stop keeping the partial reply.

Each control is checked twice: what the page shows, and what the server stored (the REST API's view of
the chat). Screenshots go to tests/screenshots/tree-*.png for people to look at.
"""

import re

import httpx
import pytest

from conftest import ENDLESS_MODEL, Server
from test_browser import (  # noqa: F401 (browser, collected_static: fixtures)
    AXE, DESKTOP, PHONE, SCREENSHOTS, as_shown, axe_problems, browser, collected_static, expect, guest_with_mira,
    log_in_as, rounds_on_page, wait_idle)

GREETING = "*looks up from the logbook* Hi friend! I'm Mira."


@pytest.fixture(scope="module")
def tree_server():
    """Replies of exactly 24 tokens (the endless model never ends its turn sooner): never empty, quick."""
    running = Server(model=ENDLESS_MODEL, env={"RPSERVER_MAX_REPLY_TOKENS": "24"}, name="web-tree").start()
    yield running
    running.stop()


@pytest.fixture
def open_page(browser, tree_server):  # noqa: F811 (browser: the fixture imported above)
    """open_page(api, server=..., viewport=..., ...): a new page logged in as `api`, at Mira's chat."""
    pages = []

    def open_(api, server=None, viewport=DESKTOP, color_scheme="light", locale="en-US"):
        server = server or tree_server
        context = browser.new_context(viewport=viewport, color_scheme=color_scheme, locale=locale)
        page = context.new_page()
        page.problems = []
        page.on("console", lambda message: message.type == "error" and page.problems.append(message.text))
        page.on("pageerror", lambda error: page.problems.append(f"uncaught: {error}"))
        page.goto(server.url + "/")
        pages.append(page)
        log_in_as(page, api)
        page.goto(server.url + "/#/chat/Mira")
        expect(page.locator("#messages .message.bot").first).to_be_visible()
        wait_idle(page)
        return page

    yield open_
    problems = [problem for page in pages for problem in page.problems]
    for page in pages:
        page.context.close()
    assert problems == [], f"console errors: {problems}"


def shot(page, name):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def rest(api, path, **fields):
    """The REST API as the person: GET `path` (or POST `fields` to it); the envelope's data."""
    headers = {"Authorization": f"Token {api.token}"}
    answer = (httpx.post(api.url + path, data=fields, headers=headers) if fields
              else httpx.get(api.url + path, headers=headers))
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def chats(api):
    return rest(api, "/api/v1/chats?character=Mira")["chats"]


def stored(api, chat_id=None):
    """The chat as the server keeps it: the REST API's view (the main chat unless `chat_id`)."""
    return rest(api, f"/api/v1/chats/{chat_id or chats(api)[0]['id']}")


def texts(view):
    return [(message["role"], message["text"]) for message in view["messages"]]


def mira_with_two_rounds(server):
    api = guest_with_mira(server)
    api.chat("Mira")
    api.reply("Mira", "First question.")
    api.reply("Mira", "Second question.")
    return api


def bot(page, round_):
    return page.locator(f"#messages .message.bot[data-round='{round_}']")


def user(page, round_):
    return page.locator(f"#messages .message.user[data-round='{round_}']")


def press(page, control):
    """Reach `control` with the keyboard and press Enter: it must take the focus and show it."""
    control.focus()
    page.keyboard.press("Shift+Tab")  # (a key press, so that the browser shows the focus, as for a keyboard user)
    page.keyboard.press("Tab")
    assert control.evaluate("(element) => element === document.activeElement")
    assert control.evaluate("(element) => getComputedStyle(element).outlineStyle") != "none"
    page.keyboard.press("Enter")


# ---------------------------------------------------------------- versions, regenerate, edit


def test_regenerate_any_reply_and_switch_between_its_versions(open_page, tree_server):
    api = mira_with_two_rounds(tree_server)
    before = stored(api)
    page = open_page(api)
    first_reply = bot(page, 1)
    expect(first_reply.locator(".versions")).to_have_count(0)  # one version: no ‹ › to show

    # Regenerate the first reply (not the last one): a second version, whose branch has no later messages.
    first_reply.get_by_role("button", name="Regenerate this reply").click()
    wait_idle(page)
    expect(first_reply.locator(".position")).to_have_text("2/2")
    expect(page.locator("#messages .message.user")).to_have_count(1)
    after = stored(api)
    swiped = after["messages"][2]
    assert texts(after)[:2] == texts(before)[:2] and len(after["messages"]) == 3
    assert swiped["alternatives"] == [before["messages"][2]["round"], swiped["round"]] and swiped["position"] == 2
    expect(first_reply.locator(".bubble")).to_have_text(as_shown(swiped["text"]))

    # ‹ with the keyboard: back to the first version, with all that followed it on the page and the server.
    press(page, first_reply.get_by_role("button", name="Previous version"))
    expect(first_reply.locator(".position")).to_have_text("1/2")
    expect(page.locator("#messages .message.user")).to_have_count(2)
    assert texts(stored(api)) == texts(before)
    assert rounds_on_page(page) == [["bot" if role == "character" else "user", as_shown(text)]
                                    for role, text in texts(before)]
    expect(first_reply.get_by_role("button", name="Previous version")).to_be_disabled()  # the first one

    # › with the pointer: the second version again.
    first_reply.get_by_role("button", name="Next version").click()
    expect(first_reply.locator(".position")).to_have_text("2/2")
    expect(page.locator("#messages .message.user")).to_have_count(1)
    assert stored(api)["messages"][2]["round"] == swiped["round"]


def test_edit_any_message_the_person_s_and_the_character_s(open_page, tree_server):
    api = mira_with_two_rounds(tree_server)
    before = stored(api)
    page = open_page(api)

    # The character's first reply, with the keyboard: a new version with that text; later messages stay with the old.
    press(page, bot(page, 1).get_by_role("button", name="Edit this reply"))
    box = page.locator("#messages .edit-box textarea")
    expect(box).to_be_focused()
    expect(box).to_have_value(before["messages"][2]["text"])
    box.fill("The lamp needs oil. *sighs*")
    page.locator("#messages .edit-box").get_by_role("button", name="Save").click()
    expect(bot(page, 1).locator(".bubble")).to_have_text("The lamp needs oil. sighs")
    expect(bot(page, 1).locator(".position")).to_have_text("2/2")
    expect(page.locator("#messages .message.user")).to_have_count(1)
    assert texts(stored(api))[2] == ("character", "The lamp needs oil. *sighs*")
    assert api.context("Mira")["token_state"].endswith("Mira: The lamp needs oil. *sighs*\n\n")

    # The person's own message: a new version of it, and its reply is written at once.
    user(page, 1).get_by_role("button", name="Edit your message").click()
    page.fill("#messages .edit-box textarea", "What keeps you here?")
    page.locator("#messages .edit-box").get_by_role("button", name="Save").click()
    expect(user(page, 1).locator(".position")).to_have_text("2/2")
    wait_idle(page)
    expect(user(page, 1).locator(".bubble")).to_have_text("What keeps you here?")
    view = stored(api)
    assert texts(view)[1] == ("user", "What keeps you here?") and view["messages"][2]["text"]
    assert not view["messages"][2]["pending"]
    expect(bot(page, 1).locator(".bubble")).to_have_text(as_shown(view["messages"][2]["text"]))
    assert api.context("Mira")["token_state"].endswith(f"Mira: {view['messages'][2]['text']}\n\n")

    # The old message is one ‹ away, with the reply it had last (the edited one), whose ‹ leads on to the
    # original reply and everything that followed it.
    user(page, 1).get_by_role("button", name="Previous version").click()
    expect(user(page, 1).locator(".bubble")).to_have_text("First question.")
    expect(bot(page, 1).locator(".bubble")).to_have_text("The lamp needs oil. sighs")
    assert texts(stored(api))[1:3] == [("user", "First question."), ("character", "The lamp needs oil. *sighs*")]
    bot(page, 1).get_by_role("button", name="Previous version").click()
    expect(page.locator("#messages .message.user")).to_have_count(2)
    assert texts(stored(api)) == texts(before)

    # Cancel (Escape) changes nothing.
    bot(page, 0).get_by_role("button", name="Edit this reply").click()
    page.locator("#messages .edit-box textarea").press("Escape")
    expect(page.locator("#messages .edit-box")).to_have_count(0)
    assert texts(stored(api))[0] == ("character", GREETING)


# ---------------------------------------------------------------- delete and undo, continue, fork, draft


def test_delete_a_message_and_what_follows_then_undo_until_the_next_change(open_page, tree_server):
    api = mira_with_two_rounds(tree_server)
    before = stored(api)
    page = open_page(api)

    # Delete the first question: it, its reply and the second round leave the page and the path.
    user(page, 1).get_by_role("button", name="Delete this message and all that follows").click()
    expect(page.locator("#messages .message")).to_have_count(1)
    note = page.locator("#messages .undo-note")
    expect(note).to_contain_text("deleted")
    expect(note.get_by_role("button", name="Undo")).to_be_focused()  # the keyboard is where the undo is
    view = stored(api)
    assert texts(view) == texts(before)[:1] and view["can_undo"]
    assert api.chat("Mira") == [[None, GREETING]]

    # Undo, with the keyboard: everything comes back.
    page.keyboard.press("Enter")
    expect(page.locator("#messages .message.user")).to_have_count(2)
    expect(note).to_have_count(0)
    assert texts(stored(api)) == texts(before) and not stored(api)["can_undo"]

    # Delete the second question, then send another message: the deletion is final, no undo is offered.
    user(page, 2).get_by_role("button", name="Delete this message and all that follows").click()
    expect(page.locator("#messages .message.user")).to_have_count(1)
    expect(note).to_be_visible()
    page.fill("#prompt", "Something else.")
    page.press("#prompt", "Enter")
    wait_idle(page)
    expect(page.locator("#messages .message.user")).to_have_count(2)
    expect(note).to_have_count(0)
    view = stored(api)
    assert texts(view)[3] == ("user", "Something else.") and not view["can_undo"]
    # (the second question went for good: the new message has no other version)
    assert len(view["messages"][3]["alternatives"]) == 1


def test_continue_a_reply_and_fork_the_chat_from_a_message(open_page, tree_server):
    api = mira_with_two_rounds(tree_server)
    page = open_page(api)
    old = stored(api)["messages"][2]["text"]

    # Continue the first reply: a new version that begins with it and goes on.
    bot(page, 1).get_by_role("button", name="Continue this reply").click()
    wait_idle(page)
    view = stored(api)
    continued = view["messages"][2]
    assert continued["text"].startswith(old) and len(continued["text"]) > len(old)
    assert continued["position"] == 2 and len(view["messages"]) == 3
    expect(bot(page, 1).locator(".position")).to_have_text("2/2")
    expect(bot(page, 1).locator(".bubble")).to_have_text(as_shown(continued["text"]))

    # Fork from there: a new chat with the path so far, shown at its own address; the main chat stays.
    main = texts(view)
    bot(page, 1).get_by_role("button", name="Fork: a new chat from here").click()
    expect(page).to_have_url(re.compile(r"#/branch/\d+/Mira$"))
    wait_idle(page)
    forks = [chat for chat in chats(api) if chat["is_fork"]]
    assert len(forks) == 1 and forks[0]["forked_from"] == view["id"]
    fork_id = forks[0]["id"]
    assert texts(stored(api, fork_id)) == main
    expect(page.locator("#chat-branch")).to_have_value(str(fork_id))
    expect(page.locator("#chat-branch option")).to_have_text(["Main chat", "Fork 1"])

    # A message in the fork stays in the fork.
    page.fill("#prompt", "Only in the fork.")
    page.press("#prompt", "Enter")
    wait_idle(page)
    expect(page.locator("#messages .message.user")).to_have_count(2)
    assert texts(stored(api, fork_id))[3] == ("user", "Only in the fork.")
    assert texts(stored(api)) == main

    # Back to the main chat with the chooser (a keyboard works it as well).
    page.select_option("#chat-branch", "")
    expect(page).to_have_url(re.compile(r"#/chat/Mira$"))
    wait_idle(page)
    assert [text for _, text in rounds_on_page(page)] == [as_shown(text) for _, text in main]

    # The fork again, then deleted (the main chat's "Start over" button deletes a fork instead).
    page.select_option("#chat-branch", str(fork_id))
    expect(page.locator("#messages .message.user")).to_have_count(2)
    wait_idle(page)
    page.click("#view-chat [data-action=reset]")
    expect(page.locator("#confirm-text")).to_contain_text("Delete this fork")
    page.click("#confirm-ok")
    expect(page).to_have_url(re.compile(r"#/chat/Mira$"))
    expect(page.locator("#chat-branch")).to_be_hidden()
    assert [chat["is_fork"] for chat in chats(api)] == [False]
    assert texts(stored(api)) == main


def test_draft_the_person_s_next_message_into_the_box(open_page, tree_server):
    api = mira_with_two_rounds(tree_server)
    before = stored(api)
    page = open_page(api)
    expect(page.locator("#prompt")).to_have_value("")
    press(page, page.get_by_role("button", name="Draft"))
    wait_idle(page)
    expect(page.locator("#prompt")).not_to_have_value("")
    expect(page.locator("#prompt")).to_be_focused()
    assert texts(stored(api)) == texts(before)  # a draft is stored nowhere
    # The draft is the person's to send.
    draft = page.locator("#prompt").input_value()
    page.press("#prompt", "Enter")
    wait_idle(page)
    assert texts(stored(api))[5] == ("user", draft.strip())


# ---------------------------------------------------------------- Stop keeps what was written


def test_stop_keeps_the_partial_reply_which_can_then_be_continued(open_page, endless_server):
    # On a server whose replies run until their reader leaves: a short reply could end before Stop.
    api = guest_with_mira(endless_server)
    api.chat("Mira")
    page = open_page(api, server=endless_server)
    page.fill("#prompt", "A question I will keep.")
    page.press("#prompt", "Enter")
    expect(page.locator("#messages .bubble.streaming")).not_to_have_text("")
    page.click("#stop")
    expect(page.locator(".toast")).to_contain_text("What was written so far is kept")
    wait_idle(page)
    expect(page.locator("#prompt")).to_have_value("")  # the message was sent and kept: nothing comes back
    view = stored(api)
    assert texts(view)[1] == ("user", "A question I will keep.")
    kept = view["messages"][2]["text"]
    assert kept and not view["messages"][2]["pending"]
    expect(bot(page, 1).locator(".bubble")).to_have_text(as_shown(kept))

    # It continues from where it stopped (and Stop keeps the longer text).
    bot(page, 1).get_by_role("button", name="Continue this reply").click()
    expect(bot(page, 1).locator(".bubble.streaming")).not_to_have_text(as_shown(kept))
    page.click("#stop")
    wait_idle(page)
    # (Once, under load, the page showed the chat as it was before the continuation although the server
    # then held the longer text: a moment where /web/chat answered "free" before the partial reply was
    # stored, not understood yet. So the server is asked until it holds the new version, and the page is
    # loaded again.)
    expect(page.locator("#send")).to_be_enabled()
    longer = stored(api)["messages"][2]
    for _ in range(300):  # (each ask is a request to the server: a wait for its state, at most a minute)
        if longer["position"] == 2:
            break
        page.wait_for_timeout(200)
        longer = stored(api)["messages"][2]
    assert longer["position"] == 2, longer
    assert longer["text"].startswith(kept) and len(longer["text"]) > len(kept)
    page.reload()
    expect(bot(page, 1).locator(".bubble")).to_have_text(as_shown(longer["text"]))
    expect(bot(page, 1).locator(".position")).to_have_text("2/2")


# ---------------------------------------------------------------- looks, languages, accessibility


@pytest.fixture(scope="module")
def axe_source():
    assert AXE.is_file(), "axe-core is installed by tests/test_browser.py's fixture or make test (npm ci)"
    return AXE.read_text()


@pytest.mark.parametrize("viewport,scheme,locale", [
    (PHONE, "dark", "zh-CN"),
    (PHONE, "light", "en-US"),
    (DESKTOP, "light", "en-US"),
    (DESKTOP, "dark", "zh-CN"),
])
def test_the_controls_fit_phones_and_desktops_in_both_languages(open_page, tree_server, axe_source,
                                                                 viewport, scheme, locale):
    # A chat with a second version of its first reply (‹ 1/2 ›), a fork, and a deleted last round (Undo).
    api = mira_with_two_rounds(tree_server)
    view = stored(api)
    first_reply = view["messages"][2]
    frames, _ = api.stream(f"/api/v1/chats/{view['id']}/swipe", round=first_reply["round"])
    assert frames
    rest(api, f"/api/v1/chats/{view['id']}/switch", round=first_reply["round"])
    rest(api, f"/api/v1/chats/{view['id']}/fork", round=first_reply["round"])
    rest(api, f"/api/v1/chats/{view['id']}/delete", round=view["messages"][3]["round"])
    page = open_page(api, viewport=viewport, color_scheme=scheme, locale=locale)
    page.mouse.move(0, 0)  # nothing hovered: a finger sees what a mouse sees
    zh = locale == "zh-CN"
    expect(bot(page, 1).locator(".position")).to_have_text("1/2")
    expect(page.locator("#messages .undo-note")).to_contain_text("已删除" if zh else "deleted")
    expect(page.locator("#chat-branch option")).to_have_text(["主对话", "分叉 1"] if zh else ["Main chat", "Fork 1"])
    tag = f"{viewport['width']}-{scheme}-{locale}"
    shot(page, f"tree-chat-{tag}")

    # Every control is labelled in the page's language, shown without hovering, and inside the screen.
    labels = {"regenerate": "重新生成这条回复" if zh else "Regenerate this reply",
              "edit": "修改你的这条消息" if zh else "Edit your message",
              "previous": "上一个版本" if zh else "Previous version",
              "draft": "代写" if zh else "Draft"}
    for name in labels.values():
        expect(page.get_by_role("button", name=name).first).to_be_visible()
    controls = page.locator("#messages .message-actions button, #messages .undo-note button, #draft, #chat-branch")
    assert controls.count() >= 12
    for index in range(controls.count()):
        control = controls.nth(index)
        box = control.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"], control.inner_text()
        assert control.evaluate("(element) => getComputedStyle(element).opacity") == "1" or control.is_disabled()
        assert control.get_attribute("aria-label") or control.inner_text().strip()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= viewport["width"], f"the page scrolls sideways: {width} px"

    # An edit box open, in the same looks.
    user(page, 1).get_by_role("button", name=labels["edit"]).click()
    expect(page.locator("#messages .edit-box textarea")).to_be_focused()
    shot(page, f"tree-edit-{tag}")
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    page.locator("#messages .edit-box textarea").press("Escape")
    wait_idle(page)
    assert axe_problems(page, axe_source) == []


# ---------------------------------------------------------------- the page's read: POST /web/chat


def test_the_page_s_chat_read_answers_the_tree_and_a_fork_only_of_its_own(tree_server):
    api = mira_with_two_rounds(tree_server)
    view = stored(api)
    fork = rest(api, f"/api/v1/chats/{view['id']}/fork", round=view["messages"][2]["round"])
    main = api.ok("/web/chat", character_name="Mira")
    assert main["tree"] == view and main["chat"] == api.chat("Mira") and main["busy"] is False
    assert [chat["id"] for chat in main["chats"]] == [view["id"], fork["id"]]
    assert api.ok("/web/chat", character_name="Mira", chat=fork["id"])["tree"] == fork
    # Another character's chat, another person's, or no number: refused, nothing shown.
    api.ok("/characters/save", bot="Other", user="friend", greeting="Hello.", bot_persona="{{char}}.")
    def answer(person, **fields):
        response = person.http.post("/web/chat", data={**person.auth(), **fields})
        return response.status_code, response.json()

    gone = {"data": None, "message": "chat does not exist", "code": 404}
    assert answer(api, character_name="Other", chat=fork["id"]) == (404, gone)
    assert answer(guest_with_mira(tree_server), character_name="Mira", chat=fork["id"]) == (404, gone)
    status, bad = answer(api, character_name="Mira", chat="first")
    assert bad["code"] == 400 and "chat" in bad["message"] and bad["data"] is None  # (the legacy envelope)
