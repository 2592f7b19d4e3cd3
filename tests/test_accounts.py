"""/login, /login/tmp, tokens, createuser, the envelope and CORS."""

import io
import uuid
from datetime import timedelta

from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.core.management import call_command
from django.utils import timezone

from accounts.models import ApiToken, User, token_digest
from conftest import Api, Server


def test_it_logs_in_with_a_password(alice):
    assert alice.ok("/characters/list")["list"]


def test_it_rejects_a_wrong_password(api, alice):
    body = api.call("/login", user_name=alice.user_name, password="nope")
    assert body == {"data": None, "message": "wrong user name or password", "code": 400}


def test_it_names_a_missing_parameter(api):
    body = api.call("/login", user_name="someone")
    assert body["code"] == 400 and body["message"] == "missing parameter: password"


def test_it_accepts_json_bodies(api, alice):
    answer = api.http.post("/login", json={"user_name": alice.user_name, "password": "secret-pw"})
    assert answer.json()["code"] == 200


def test_guest_gets_a_random_token_that_is_not_its_name(api):
    first, second = api.ok("/login/tmp"), api.ok("/login/tmp")
    assert first["user_name"].startswith("tmp-") and first["token"] != first["user_name"]
    assert first["user_name"] != second["user_name"] and first["token"] != second["token"]
    assert User.objects.get(username=first["user_name"]).is_guest


def test_new_accounts_get_the_default_characters(guest):
    names = [c["char_name"] for c in guest.ok("/characters/list")["list"]]
    assert names == ["小雪", "Ellie"]


def test_tokens_are_stored_hashed(guest):
    assert not ApiToken.objects.filter(digest=guest.token).exists()
    assert ApiToken.objects.filter(digest=token_digest(guest.token)).exists()


def test_it_rejects_a_wrong_token(guest):
    body = Api(guest.url, guest.user_name, "0" * 32).call("/characters/list")
    assert body["code"] == 403 and "log in" in body["message"]


def test_it_rejects_a_missing_token(api):
    body = api.call("/characters/list", user_name="anyone")
    assert body["code"] == 403 and "token" in body["message"]


def test_it_rejects_another_users_token(alice, bob):
    body = Api(alice.url, alice.user_name, bob.token).call("/characters/list")
    assert body["code"] == 403 and "another user" in body["message"]


def test_it_rejects_an_expired_token(guest):
    ApiToken.objects.filter(digest=token_digest(guest.token)).update(
        last_used=timezone.now() - timedelta(days=365))
    body = guest.call("/characters/list")
    assert body == {"data": None, "message": "token expired, please log in again", "code": 403}


def test_it_accepts_an_authorization_header_without_user_name(api, guest):
    answer = api.http.post("/characters/list", headers={"Authorization": f"Token {guest.token}"})
    assert answer.json()["code"] == 200


def test_streams_check_the_token_too(guest):
    body, _ = Api(guest.url, guest.user_name, "bad").stream("/chat/reply", character_name="Ellie", prompt="hi")
    assert body["code"] == 403


def test_get_is_answered_in_the_envelope(api):
    answer = api.http.get("/characters/list")
    assert answer.status_code == 200
    assert answer.json()["code"] in (400, 403)


def test_unknown_routes_answer_json(api):
    answer = api.http.post("/no/such/route")
    assert answer.status_code == 404 and answer.json()["code"] == 404


def test_every_answer_carries_cors_headers(api, guest):
    origin = {"Origin": "http://localhost:9000"}
    answers = [
        api.http.post("/login/tmp", headers=origin),
        api.http.post("/characters/list", data=guest.auth(), headers=origin),
        api.http.post("/chat/reply", data={**guest.auth(), "character_name": "Ellie", "prompt": "hi"}, headers=origin),
        api.http.post("/chat/reply", data={"token": "bad", "character_name": "Ellie"}, headers=origin),
    ]
    for answer in answers:
        assert answer.headers["access-control-allow-origin"] == "*", answer.request.url


def test_preflights_succeed(api):
    headers = {"Origin": "http://localhost:9000", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
    for route in ("/characters/list", "/chat/reply"):
        answer = api.http.options(route, headers=headers)
        assert answer.status_code == 200, route
        assert answer.headers["access-control-allow-origin"] == "*"
        assert "authorization" in answer.headers["access-control-allow-headers"].lower()


def test_createuser_makes_an_account_that_logs_in(api):
    call_command("createuser", "carol-cli", "--password", "lantern-harbour-7")
    assert api.ok("/login", user_name="carol-cli", password="lantern-harbour-7")["user_name"] == "carol-cli"
    assert User.objects.get(username="carol-cli").password.startswith("pbkdf2_")


def test_signup_makes_an_account_and_logs_it_in(api):
    name = f"hana-{uuid.uuid4().hex[:6]}"
    data = api.ok("/signup", user_name=name, password="lantern-harbour-7")
    user = Api(api.url, data["user_name"], data["token"])
    assert [c["char_name"] for c in user.ok("/characters/list")["list"]] == ["小雪", "Ellie"]
    assert api.ok("/login", user_name=name, password="lantern-harbour-7")["user_name"] == name


def test_signup_applies_the_password_validators(api):
    body = api.call("/signup", user_name=f"ivy-{uuid.uuid4().hex[:6]}", password="1")
    assert body["code"] == 400 and "This password is too short" in body["message"]
    body = api.call("/signup", user_name=f"ivy-{uuid.uuid4().hex[:6]}", password="password")
    assert body["code"] == 400 and "This password is too common" in body["message"]


def test_signup_refuses_a_taken_or_malformed_name(api, alice):
    body = api.call("/signup", user_name=alice.user_name, password="lantern-harbour-7")
    assert body == {"data": None, "message": f"user {alice.user_name} already exists", "code": 400}
    body = api.call("/signup", user_name="no spaces allowed", password="lantern-harbour-7")
    assert body["code"] == 400 and "Enter a valid username" in body["message"]


def test_signup_can_be_turned_off():
    server = Server(env={"RPSERVER_ALLOW_SIGNUP": "0"}, name="no-signup").start()
    try:
        body = Api(server.url).call("/signup", user_name="jo-x", password="lantern-harbour-7")
        assert body == {"data": None, "message": "sign-up is turned off on this server", "code": 403}
    finally:
        server.stop()


def test_logout_revokes_the_token_it_is_called_with(alice):
    second = Api(alice.url).ok("/login", user_name=alice.user_name, password="secret-pw")["token"]
    assert alice.ok("/logout") is None
    body = alice.call("/characters/list")
    assert body["code"] == 403 and body["message"] == "invalid token, please log in again"
    assert Api(alice.url, alice.user_name, second).ok("/characters/list")["list"]  # other sessions stay


def test_changing_a_password_revokes_every_token(alice):
    user = User.objects.get(username=alice.user_name)
    user.set_password("a-new-lantern-9")
    user.save()
    assert alice.call("/characters/list")["code"] == 403


def weak_hash(password):
    return PBKDF2PasswordHasher().encode(password, "fixedsalt12345", iterations=1000)


def test_a_password_rehash_at_login_revokes_nothing(alice):
    # Django re-hashes a password stored with fewer iterations at the next log-in.
    User.objects.filter(username=alice.user_name).update(password=weak_hash("secret-pw"))
    assert Api(alice.url).ok("/login", user_name=alice.user_name, password="secret-pw")["token"]
    assert User.objects.get(username=alice.user_name).password != weak_hash("secret-pw")  # re-hashed...
    assert alice.ok("/characters/list")["list"]  # ...and the old token still works


def test_an_api_key_works_as_a_bearer_token_and_does_not_expire(alice):
    out = io.StringIO()
    call_command("createapikey", alice.user_name, "--label", "tests", stdout=out)
    key = out.getvalue().strip()
    token = ApiToken.objects.get(digest=token_digest(key))
    assert token.kind == ApiToken.API_KEY and token.name == "tests"
    ApiToken.objects.filter(pk=token.pk).update(last_used=timezone.now() - timedelta(days=3650))
    answer = alice.http.post("/characters/list", headers={"authorization": f"Bearer {key}"})
    assert answer.json()["code"] == 200


# ---- log-in answers tell nothing about which accounts exist ----------------------


def log_in_answers(user_name, address, attempts, monkeypatch):
    """Wrong passwords for `user_name`: per attempt, (code, message, PBKDF2 iterations run)."""
    import django.contrib.auth.hashers as hashers

    from accounts.services import log_in
    from rpserver.errors import ApiError

    real_pbkdf2 = hashers.pbkdf2
    iterations = []

    def counted_pbkdf2(password, salt, rounds, *args, **kwargs):
        iterations.append(rounds)
        return real_pbkdf2(password, salt, rounds, *args, **kwargs)

    monkeypatch.setattr(hashers, "pbkdf2", counted_pbkdf2)
    answers = []
    for _ in range(attempts):
        iterations.clear()
        try:
            log_in(user_name, "not-the-password", address)
            answers.append(("logged in",))
        except ApiError as refused:
            answers.append((refused.code, refused.message.split(":")[0], list(iterations)))
    return answers


def test_an_unknown_name_is_answered_and_hashed_like_an_account(monkeypatch):
    # The same wrong-password attempts against an account, a guest's name and a name no account
    # has: the same answers one by one (the failures counted for each, the backoff starting at the
    # same attempt), and the same password hashing work (one PBKDF2 run of the default iterations
    # until the backoff, none in it), so neither the answers nor their time tell which names exist.
    from django.conf import settings

    from accounts.services import create_guest, create_user

    monkeypatch.setitem(settings.RPSERVER, "LIMITS", {**settings.RPSERVER["LIMITS"],
                                                      "LOGIN_FREE_FAILURES_PER_ACCOUNT": 2,
                                                      "LOGIN_FREE_FAILURES_PER_ADDRESS": 1000})
    account = create_user(f"kim-{uuid.uuid4().hex[:8]}", "lantern-harbour-7").username
    guest = create_guest(f"10.9.{uuid.uuid4().int % 250}.1")[0].username
    unknown = f"kim-{uuid.uuid4().hex[:8]}"
    answers = {name: log_in_answers(name, f"10.8.{uuid.uuid4().int % 250}.{index}", 5, monkeypatch)
               for index, name in enumerate((account, guest, unknown))}
    rounds = PBKDF2PasswordHasher.iterations
    wrong, blocked = (400, "wrong user name or password", [rounds]), (429, "too many failed log-ins", [])
    assert answers[account] == [wrong, wrong, wrong, blocked, blocked]
    assert answers[guest] == answers[account]
    assert answers[unknown] == answers[account]
