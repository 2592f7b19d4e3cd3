"""/characters/load, /chat/reply, resay, tamper, back, reset and /debug/token over HTTP."""

import threading

import torch

import pytest
from safetensors.torch import load as load_safetensors

from conftest import (CHARACTER, DATA_DIR, TINY_MODEL, Api, Server, answer_held, assert_same_state,
                      at_once, path_rounds, running_reply, server_precision, until_not_busy)
from inference import prompt as prompt_format
from inference.tokenizer import world_tokenizer
from rpserver.errors import BUSY
from statecache.models import StoredState
from statecache.services import tokens_digest

HEADER = "friend: How are you?\n\nMira: Fine, thank you.\n\nMira is a calm lighthouse keeper who talks to friend.\n\nMira:"
GREETING = "Hi friend! I'm Mira."


def rounds(user_name):
    return path_rounds(user_name)


def test_load_opens_the_chat_with_the_greeting(mira):
    assert mira.chat("Mira") == [[None, GREETING]]
    assert mira.context("Mira")["token_state"] == f"{HEADER} {GREETING}\n\n"


def test_a_reply_streams_cumulative_frames_without_buffering(mira):
    frames, headers = mira.stream("/chat/reply", character_name="Mira", prompt="Hello, Mira")
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    assert len(frames) >= 2
    for before, after in zip(frames, frames[1:]):
        assert after.startswith(before)
    assert mira.chat("Mira") == [[None, GREETING], ["Hello, Mira", frames[-1]]]


def test_the_context_is_exactly_what_the_model_read(mira):
    mira.reply("Mira", "  Hello\n\n\n  there  ")
    context = mira.context("Mira")
    assert context["token_state"].startswith(f"{HEADER} {GREETING}\n\nfriend: Hello\nthere\n\nMira:")
    assert context["token_state"].endswith("\n\n")
    stored = sum(len(r.token_list) for r in rounds(mira.user_name))
    assert context["token_count"] == stored


def kept_snapshots(user):
    for i in range(5):
        user.reply("Mira", f"message {i}")
    return {r.index: (bool(r.pre_state), bool(r.post_state)) for r in rounds(user.user_name)}


def test_each_round_keeps_the_snapshots_it_needs(alice):
    alice.ok("/characters/save", **CHARACTER)
    kept = kept_snapshots(alice)
    # pre-reply state for the last round only; post-round states for the
    # path's end and every 3rd round (RPSERVER_STATE_CHECKPOINT_EVERY=3);
    # round 0's is in the shared state cache, kept in the store under the digest of its tokens.
    round_zero = rounds(alice.user_name).get(index=0)
    assert StoredState.objects.filter(digest=tokens_digest(round_zero.token_list),
                                       state_model=rounds(alice.user_name).last().state_model).count() == 1
    assert kept == {0: (False, False), 1: (False, False), 2: (False, False), 3: (False, True),
                    4: (False, False), 5: (True, True)}


def test_guests_keep_the_same_states_within_their_smaller_budget(mira):
    # The policy is one for everyone; a guest's budget (RPSERVER_GUEST_STATE_BUDGET_COUNT, 8 states)
    # is not reached here (tests/test_state_policy.py runs one that is).
    assert kept_snapshots(mira) == {0: (False, False), 1: (False, False), 2: (False, False),
                                    3: (False, True), 4: (False, False), 5: (True, True)}


@pytest.mark.parametrize("fields,message", [
    ({"prompt": "   \n  "}, "prompt must not be empty"),
    ({}, "missing parameter: prompt"),
    ({"prompt": "x" * 4001}, "prompt: Ensure this field has no more than 4000 characters."),
    ({"prompt": "hi", "tau": "abc"}, "tau: must be a number, got 'abc'"),
    ({"prompt": "hi", "temperature": "0"}, "temperature: must be in (0, 5], got 0"),
    ({"prompt": "hi", "min_p": "1.5"}, "min_p: must be in [0, 1], got 1.5"),
    ({"prompt": "hi", "presence_penalty": "nan"}, "presence_penalty: must be in [0, 10], got nan"),
])
def test_a_bad_reply_request_gets_a_clear_error(mira, fields, message):
    body, headers = mira.stream("/chat/reply", character_name="Mira", **fields)
    assert body == {"data": None, "message": message, "code": 400}
    assert mira.chat("Mira") == [[None, GREETING]]


def test_sampling_fields_are_accepted_as_form_strings(mira):
    reply = mira.reply("Mira", "hi", tau="2.5", rate="0.2", min_p="0", temperature="0.7", presence_penalty="")
    assert mira.chat("Mira")[-1] == ["hi", reply]


def test_resay_replaces_the_last_reply_and_its_context(mira):
    mira.reply("Mira", "first")
    mira.reply("Mira", "second")
    before = mira.context("Mira")
    frames, _ = mira.stream("/chat/resay", character_name="Mira")
    chat = mira.chat("Mira")
    assert len(chat) == 3 and chat[2] == ["second", frames[-1]]
    after = mira.context("Mira")
    prefix = before["token_state"][:before["token_state"].rindex("friend: second\n\nMira:")]
    assert after["token_state"].startswith(prefix + "friend: second\n\nMira:")
    assert after["token_count"] == sum(len(r.token_list) for r in rounds(mira.user_name))


def test_resay_works_after_a_restart_and_rebuilds_a_missing_snapshot(mira):
    mira.reply("Mira", "first")
    last = rounds(mira.user_name).last()
    last.pre_state.delete(save=True)
    frames, _ = mira.stream("/chat/resay", character_name="Mira")
    assert mira.chat("Mira")[-1] == ["first", frames[-1]]
    assert rounds(mira.user_name).last().pre_state


def test_resay_of_the_greeting_regenerates_it(mira):
    frames, _ = mira.stream("/chat/resay", character_name="Mira")
    assert mira.chat("Mira") == [[None, frames[-1]]]
    assert mira.context("Mira")["token_state"].startswith(HEADER)


def test_tamper_overwrites_the_last_reply_in_the_chat_and_the_context(mira):
    mira.reply("Mira", "hello")
    mira.ok("/chat/tamper", character_name="Mira", message="  I am the lighthouse.  ")
    assert mira.chat("Mira")[-1] == ["hello", "I am the lighthouse."]
    assert mira.context("Mira")["token_state"].endswith("friend: hello\n\nMira: I am the lighthouse.\n\n")


def test_tamper_needs_a_message(mira):
    assert mira.call("/chat/tamper", character_name="Mira")["message"] == "missing parameter: message"
    assert mira.call("/chat/tamper", character_name="Mira", message=" ")["message"] == "message must not be empty"


def test_back_restores_the_exact_context_and_state_of_an_old_round(mira):
    contexts, states = [], []
    for i in range(4):
        mira.reply("Mira", f"message {i}")
        contexts.append(mira.context("Mira"))
        states.append(load_safetensors(rounds(mira.user_name).last().post_state.read()))
    assert not rounds(mira.user_name).get(index=1).post_state  # pruned: will be rebuilt
    mira.ok("/chat/back", character_name="Mira", log_index=1)
    assert len(mira.chat("Mira")) == 2
    assert mira.context("Mira") == contexts[0]
    rebuilt = load_safetensors(rounds(mira.user_name).get(index=1).post_state.read())
    assert rebuilt.keys() == states[0].keys()
    assert_same_state(list(rebuilt.values()), [states[0][key] for key in rebuilt], server_precision())
    with pytest.raises(AssertionError):  # the check tells one round's state from the next
        assert_same_state(list(rebuilt.values()), [states[1][key] for key in rebuilt], server_precision())
    mira.reply("Mira", "after back")
    assert len(mira.chat("Mira")) == 3


def test_back_defaults_to_the_greeting(mira):
    mira.reply("Mira", "hello")
    mira.ok("/chat/back", character_name="Mira")
    assert mira.chat("Mira") == [[None, GREETING]]


@pytest.mark.parametrize("log_index,message", [
    ("5", "log_index 5 is past the last round (1)"),
    ("-1", "log_index: Ensure this value is greater than or equal to 0."),
    ("x", "log_index: A valid integer is required."),
])
def test_back_rejects_a_bad_log_index(mira, log_index, message):
    mira.reply("Mira", "hello")
    assert mira.call("/chat/back", character_name="Mira", log_index=log_index)["message"] == message
    assert len(mira.chat("Mira")) == 2


def stored_rows(user_name):
    """What the database holds for one user: conversations, rounds, characters, held locks."""
    from characters.models import Character
    from chat.models import Conversation
    from locks.models import Lock

    characters = Character.objects.filter(owner__username=user_name)
    return (Conversation.objects.filter(owner__username=user_name).count(), rounds(user_name).count(),
            list(characters.values_list("name", "greeting")),
            Lock.objects.filter(name__in=[character.lock_name for character in characters]).count())


REFUSED = [
    ("/chat/back", {"log_index": "99999999999999999999"}, "log_index 99999999999999999999 is past the last round (0)"),
    ("/chat/back", {"log_index": "1.0"}, "log_index 1 is past the last round (0)"),
    ("/chat/back", {"log_index": "1", "user_name": ""}, "log_index 1 is past the last round (0)"),
    ("/chat/back", {"log_index": "-1"}, "log_index: Ensure this value is greater than or equal to 0."),
    ("/chat/back", {"character_name": "Nobody"}, "character does not exist"),
    ("/chat/reset", {"character_name": "Nobody"}, "character does not exist"),
    ("/chat/tamper", {}, "missing parameter: message"),
    ("/chat/tamper", {"message": "  "}, "message must not be empty"),
    ("/chat/reply", {"prompt": " "}, "prompt must not be empty"),
    ("/chat/reply", {"prompt": "hi", "tau": "x"}, "tau: must be a number, got 'x'"),
    ("/chat/resay", {"temperature": "0"}, "temperature: must be in (0, 5], got 0"),
    ("/characters/load", {"character_name": "Nobody"}, "character does not exist"),
    ("/debug/token", {"character_name": "Nobody"}, "character does not exist"),
    ("/characters/save", {"greeting": ""}, "greeting must not be empty"),
]


@pytest.mark.parametrize("route,fields,message", REFUSED)
def test_a_refused_request_changes_nothing(guest, route, fields, message):
    # Mira is saved but her conversation is not opened yet: a refused request must not open it.
    guest.ok("/characters/save", **CHARACTER)
    before = stored_rows(guest.user_name)
    base = CHARACTER if route == "/characters/save" else {"character_name": "Mira"}
    body, _ = guest.stream(route, **{**base, **fields})
    assert body == {"data": None, "message": message, "code": 400}
    assert stored_rows(guest.user_name) == before


def test_reset_starts_over_from_the_greeting(mira):
    fresh = mira.context("Mira")
    mira.reply("Mira", "hello")
    assert mira.ok("/chat/reset", character_name="Mira") == {"chat": [[None, GREETING]]}
    assert mira.context("Mira") == fresh
    assert mira.chat("Mira") == [[None, GREETING]]


def test_unicode_flows_through_names_prompts_and_context(guest):
    guest.ok("/characters/save", **{**CHARACTER, "bot": "小雪", "user": "哥哥"})
    guest.chat("小雪")
    guest.reply("小雪", "你好呀 😊 ¿qué tal?")
    assert guest.chat("小雪")[1][0] == "你好呀 😊 ¿qué tal?"
    assert "哥哥: 你好呀 😊 ¿qué tal?\n\n小雪:" in guest.context("小雪")["token_state"]


def test_everything_survives_a_restart(server, mira):
    mira.reply("Mira", "remember me")
    chat, context = mira.chat("Mira"), mira.context("Mira")
    server.restart()
    again = Api(server.url, mira.user_name, mira.token)
    assert again.chat("Mira") == chat
    assert again.context("Mira") == context
    again.reply("Mira", "still here?")
    assert len(again.chat("Mira")) == 3


def long_guest(server):
    api = Api(server.url)
    data = api.ok("/login/tmp")
    return Api(server.url, data["user_name"], data["token"])


def test_two_requests_on_one_conversation_never_corrupt_it(endless_server):
    # Four replies sent at once; one that begins runs until its reader leaves, and each is held until
    # all four have their answer, so they overlap for certain (a long reply may end first).
    guest = long_guest(endless_server)
    guest.ok("/characters/save", **CHARACTER)
    guest.chat("Mira")
    answered = threading.Barrier(4, timeout=120)
    fields = [{"character_name": "Mira", "prompt": f"message {i}"} for i in range(4)]
    answers = at_once(answer_held, [(Api(guest.url, guest.user_name, guest.token), "/chat/reply", each, answered)
                                    for each in fields])
    assert sorted(map(str, answers)) == sorted(map(str, ["running"] + [{"data": None, "message": BUSY, "code": 400}] * 3))
    # The one that ran was left by its reader: nothing of it is stored, and the conversation is whole.
    assert until_not_busy(lambda: guest.call("/chat/tamper", character_name="Mira", message="ok"))["code"] == 200
    assert guest.chat("Mira") == [[None, "ok"]]
    context = guest.context("Mira")
    assert context["token_count"] == sum(len(r.token_list) for r in rounds(guest.user_name))
    assert context["token_state"].endswith("Mira: ok\n\n")


def test_a_client_that_disconnects_stops_its_reply(endless_server):
    guest = long_guest(endless_server)
    guest.ok("/characters/save", **CHARACTER)
    guest.chat("Mira")
    with running_reply(guest, character_name="Mira", prompt="tell me everything"):
        pass  # the reply runs until its reader leaves: here
    # The lock is released and nothing half-generated is stored.
    assert until_not_busy(lambda: guest.call("/chat/tamper", character_name="Mira", message="ok"))["code"] == 200
    assert guest.chat("Mira") == [[None, "ok"]]
    assert "client disconnected: /chat/reply cancelled" in endless_server.log()


def test_a_reply_after_a_lost_snapshot_rereads_and_remembers_it(mira):
    for prompt in ("first", "second", "third"):
        mira.reply("Mira", prompt)
    lost = rounds(mira.user_name).get(index=3)  # the path's end, and a checkpoint (K = 3)
    lost.post_state.delete(save=True)  # the file and the round's pin go; the store's row names a lost blob
    mira.reply("Mira", "fourth")
    assert rounds(mira.user_name).get(index=3).post_state  # rebuilt on the way and stored again
    assert [pair[0] for pair in mira.chat("Mira")] == [None, "first", "second", "third", "fourth"]
    context = mira.context("Mira")
    assert context["token_count"] == sum(len(r.token_list) for r in rounds(mira.user_name))


# ---- what the model read is the chat -------------------------------------------


def write_untidy_model(path):
    """The tiny model, changed so that it writes only "Hi" and "\r\n\r\n": no space after the
    speaker's colon, and a blank line that is not "\n\n" (the engine's end of a turn), so every
    reply is one the documented format spells otherwise ("Mira: Hi\nHi"). The trick of the
    endless model (tests/conftest.py): a pinned component of the final norm's output, and a head
    column that is +1 for these two tokens and -1 for every other."""
    weights = torch.load(TINY_MODEL)
    favoured = [world_tokenizer().encode(piece)[0] for piece in ("Hi", "\r\n\r\n")]
    weights["ln_out.weight"][0] = 0
    weights["ln_out.bias"][0] = 100
    weights["head.weight"][:, 0] = -1
    weights["head.weight"][favoured, 0] = 1
    torch.save(weights, path)
    return path


@pytest.fixture(scope="module")
def untidy_server():
    running = Server(model=write_untidy_model(DATA_DIR / "model" / "untidy-rwkv7.pth"), name="untidy-server").start()
    yield running
    running.stop()


def chat_as_read(chat, user="friend", bot="Mira"):
    """The chat in the documented format (inference/prompt.py): what the model must have read."""
    parts = [prompt_format.character_header(user, bot, CHARACTER["bot_persona"].replace("{{char}}", bot)
                                            .replace("{{user}}", user),
                                            prompt_format.substitute(CHARACTER["example_message"], user, bot)),
             prompt_format.reply_part(chat[0][1])]
    for user_text, bot_text in chat[1:]:
        parts += [prompt_format.user_turn(user, bot, user_text), prompt_format.reply_part(bot_text)]
    return "".join(parts)


def post_state(user_name, index):
    state = load_safetensors(rounds(user_name).get(index=index).post_state.read())
    return [state[key] for key in sorted(state)]


def test_the_context_is_the_chat_in_the_documented_format_whatever_the_model_wrote(untidy_server):
    # The model writes "Hi" and "\r\n\r\n" only: as it wrote them, "Mira:Hi\r\n\r\nHi" (no space after
    # the colon, a blank line inside the turn), where the chat shows "Hi\nHi". The context must be the
    # chat spelled as documented, after a reply and a regeneration, and the state the one it gives.
    guest = long_guest(untidy_server)
    guest.ok("/characters/save", **CHARACTER)
    guest.chat("Mira")
    frames, _ = guest.stream("/chat/reply", character_name="Mira", prompt="Hello, Mira")
    for before, after in zip(frames, frames[1:]):
        assert after.startswith(before)
    chat = guest.chat("Mira")
    assert chat[1] == ["Hello, Mira", frames[-1]] and "Hi" in frames[-1] and "\r" not in frames[-1]
    assert guest.context("Mira")["token_state"] == chat_as_read(chat)
    # The state after the reply is the one its text gives: overwriting the reply with its own text
    # (which reads " <text>\n\n" from the state before it) leaves the same state.
    replied = post_state(guest.user_name, 1)
    guest.ok("/chat/tamper", character_name="Mira", message=chat[1][1])
    assert_same_state(post_state(guest.user_name, 1), replied, server_precision())
    frames, _ = guest.stream("/chat/resay", character_name="Mira")
    guest.reply("Mira", "And again")
    chat = guest.chat("Mira")
    assert chat[1][1] == frames[-1] and len(chat) == 3
    assert guest.context("Mira")["token_state"] == chat_as_read(chat)
