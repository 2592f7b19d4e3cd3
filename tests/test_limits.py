"""Abuse limits, on by default: log-in backoff, guest and sign-up rates, reply rate, engine share, guest quotas."""

import base64
import os

import httpx
import pytest

from PIL import Image

from conftest import CHARACTER, Api, Server, make_user, running_reply, wait_for
from test_avatars import data_url, encoded
from test_openai import running_completion, stats
from limits.models import Counter

LIMITED = {
    "RPSERVER_GUESTS_PER_HOUR_PER_ADDRESS": "3",
    "RPSERVER_SIGNUPS_PER_HOUR_PER_ADDRESS": "2",
    "RPSERVER_REPLIES_PER_MINUTE": "4",
    "RPSERVER_LOGIN_FREE_FAILURES_PER_ACCOUNT": "3",
    "RPSERVER_LOGIN_BACKOFF_SECONDS": "30",
    "RPSERVER_MAX_REPLIES_PER_USER": "1",
    "RPSERVER_GUEST_MAX_CHARACTERS": "3",
    "RPSERVER_GUEST_MAX_AVATAR_BYTES": "1024",
}


@pytest.fixture(scope="module")
def limited():
    # Limits are counted in the shared database: start from none.
    Counter.objects.all().delete()
    running = Server(env=LIMITED, name="limited").start()
    yield running
    running.stop()
    Counter.objects.all().delete()


def guest_of(server):
    data = Api(server.url).ok("/login/tmp")
    return Api(server.url, data["user_name"], data["token"])


def test_wrong_passwords_back_off_before_the_password_is_checked(limited):
    api = Api(limited.url)
    user = make_user(api, "dora", password="lantern-harbour-7")
    for _ in range(3):
        assert api.call("/login", user_name=user.user_name, password="wrong")["code"] == 400
    body = api.call("/login", user_name=user.user_name, password="wrong")
    assert body["code"] == 400  # the 4th failure is counted, and starts the backoff
    body = api.call("/login", user_name=user.user_name, password="lantern-harbour-7")
    assert body["code"] == 429 and body["message"].startswith("too many failed log-ins: please try again in")
    other = make_user(api, "erin", password="lantern-harbour-7")  # another account from the same address
    assert api.ok("/login", user_name=other.user_name, password="lantern-harbour-7")["token"]


def test_signups_are_limited_per_address(limited):
    api = Api(limited.url)
    codes = [api.call("/signup", user_name=f"signer-{i}-{id(api)}", password="lantern-harbour-7")["code"]
             for i in range(3)]
    assert codes == [200, 200, 429]


def test_replies_are_limited_per_user_and_minute(limited):
    user = make_user(Api(limited.url), "fay", password="lantern-harbour-7")
    user.ok("/characters/save", **CHARACTER)
    results = [user.stream("/chat/reply", character_name="Mira", prompt=f"hi {i}")[0] for i in range(5)]
    assert all(isinstance(r, list) for r in results[:4])
    assert results[4]["code"] == 429 and results[4]["message"].startswith("too many replies in a minute")


def test_a_chat_import_counts_as_a_reply(limited):
    user = make_user(Api(limited.url), "hal", password="lantern-harbour-7")
    user.ok("/characters/save", **CHARACTER)
    file = base64.b64encode(b'{"is_user": true, "mes": "hello"}').decode()
    answers = [user.http.post("/api/v1/chats/import", json={"character": "Mira", "file": file},
                              headers={"Authorization": f"Token {user.token}"}) for _ in range(5)]
    assert [answer.status_code for answer in answers] == [200] * 4 + [429]
    assert answers[4].json()["message"].startswith("too many replies in a minute")


def test_one_user_gets_only_their_share_of_the_engine(endless_server):
    # RPSERVER_MAX_REPLIES_PER_USER=2 (the default): while two replies of one user run, to two
    # characters, until their reader leaves, a third, to a third character, is told why it waits.
    user = make_user(Api(endless_server.url), "gus", password="lantern-harbour-7")
    for name in ("Mira", "Nia", "Ola"):
        user.ok("/characters/save", **{**CHARACTER, "bot": name})
    with running_reply(user, character_name="Mira", prompt="hello"), \
            running_reply(user, character_name="Nia", prompt="hello"):
        body, _ = user.stream("/chat/reply", character_name="Ola", prompt="hello")
    assert body["code"] == 429 and "replies being generated" in body["message"], body


def test_both_doors_count_against_one_engine_share_and_get_it_back_when_their_reader_leaves(endless_server):
    # One reply service (replies/services.py) runs the legacy API's replies and OpenAI's completions:
    # a legacy reply and a completion of one user take their whole share (2); a third is refused on
    # either door. When the readers leave, both shares are given back, and the user can start again.
    user = make_user(Api(endless_server.url), "ike", password="lantern-harbour-7")
    for name in ("Mira", "Nia"):
        user.ok("/characters/save", **{**CHARACTER, "bot": name})
    with running_reply(user, character_name="Mira", prompt="hello"), running_completion(endless_server.url, user.token):
        assert stats(endless_server, user.token)["replies"]["yours"] == 2
        legacy, _ = user.stream("/chat/reply", character_name="Nia", prompt="hello")
        completion = httpx.post(f"{endless_server.url}/v1/completions", headers={"Authorization": f"Bearer {user.token}"},
                                json={"model": "rwkv", "prompt": "Once", "max_tokens": 2}, timeout=60)
    assert legacy["code"] == 429 and "replies being generated" in legacy["message"], legacy
    assert completion.status_code == 429 and "replies being generated" in completion.json()["error"]["message"]
    wait_for(lambda: stats(endless_server, user.token)["replies"]["yours"] == 0, "both shares to be given back")
    with running_reply(user, character_name="Nia", prompt="hello again"), \
            running_completion(endless_server.url, user.token):
        assert stats(endless_server, user.token)["replies"]["yours"] == 2


def test_guests_have_a_character_quota(limited):
    guest = guest_of(limited)  # the default characters count too (2)
    assert guest.call("/characters/save", **CHARACTER)["code"] == 200
    body = guest.call("/characters/save", **{**CHARACTER, "bot": "Nia"})
    assert body["code"] == 400 and body["message"].startswith("a guest can keep at most 3 characters")
    assert guest.call("/characters/save", **CHARACTER)["code"] == 200  # overwriting is not a new one


def test_guests_have_an_avatar_quota(limited):
    guest = guest_of(limited)
    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))  # does not compress: ~12 KB stored
    body = guest.call("/characters/save", **{**CHARACTER, "avatar": data_url(encoded(noise, "PNG"))})
    assert body["code"] == 400 and body["message"].startswith("a guest's avatar can be at most 1 KB")


def test_guest_accounts_are_limited_per_address(limited):
    # (last here: it uses up this address's guests)
    api = Api(limited.url)
    answers = [api.call("/login/tmp") for _ in range(4)]
    assert [a["code"] for a in answers].count(429) >= 1
    refused = next(a for a in answers if a["code"] == 429)
    assert refused["message"].startswith("too many guest accounts from this address: please try again in")
