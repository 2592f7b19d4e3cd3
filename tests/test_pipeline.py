"""One request pipeline: every malformed input is code 400 with a message, on views and streams alike;
the same headers (CORS, nosniff) on every route; the body limit before buffering."""

import json
import socket

import pytest

from conftest import CHARACTER

# Every route of the legacy API (views and streams), with fields that are otherwise fine.
ROUTES = ["/login", "/login/tmp", "/signup", "/logout", "/characters/list", "/characters/get",
          "/characters/save", "/characters/delete", "/characters/load", "/chat/reply", "/chat/resay",
          "/chat/tamper", "/chat/back", "/chat/reset", "/debug/token"]
STREAMS = ["/chat/reply", "/chat/resay"]


@pytest.fixture(autouse=True)
def no_server_fault(server):
    """Bad input never raises in the server: after each test here, the part of the (shared) server's
    log that its requests wrote holds no traceback. (Server faults are logged before they are
    answered, so that part is complete when the test's last answer has come.)"""
    start = len(server.log())
    yield
    written = server.log()[start:]
    assert "Traceback" not in written, written


def envelope_of(answer):
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    return answer.json()


def assert_refused(answer, message_part):
    body = envelope_of(answer)
    assert body["code"] == 400 and body["data"] is None, body
    assert message_part in body["message"], body


@pytest.mark.parametrize("route", ROUTES)
def test_a_lone_surrogate_is_refused_on_every_route(mira, route):
    raw = '{"token": "%s", "character_name": "Mira", "prompt": "hi \\ud800"}' % mira.token
    answer = mira.http.post(route, content=raw, headers={"content-type": "application/json"})
    assert_refused(answer, "lone UTF-16 surrogate")


@pytest.mark.parametrize("route", ["/login", "/characters/save", "/chat/reply"])
@pytest.mark.parametrize("body", ["null", "[]", "12", '"text"'])
def test_a_json_body_that_is_not_an_object_is_refused(api, route, body):
    answer = api.http.post(route, content=body, headers={"content-type": "application/json"})
    assert_refused(answer, "the JSON body must be an object")


@pytest.mark.parametrize("route", ["/login", "/chat/reply"])
def test_json_nested_100000_deep_is_refused(api, route):
    body = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    answer = api.http.post(route, content=body, headers={"content-type": "application/json"})
    assert_refused(answer, "nested too deeply")


@pytest.mark.parametrize("route", ["/characters/list", "/chat/reply"])
def test_more_than_1000_form_fields_are_refused(mira, route):
    fields = "&".join(f"f{i}=x" for i in range(1001))
    answer = mira.http.post(route, content=f"token={mira.token}&{fields}",
                            headers={"content-type": "application/x-www-form-urlencoded"})
    assert_refused(answer, "too many fields")


def test_a_nul_character_is_refused(mira):
    answer = mira.http.post("/characters/save", data={**mira.auth(), **CHARACTER, "greeting": "a\x00b"})
    assert_refused(answer, "NUL")


@pytest.mark.parametrize("route", ["/characters/save", "/chat/reply", "/login"])
def test_a_body_over_the_limit_is_refused_on_views_and_streams(mira, route):
    big = "x" * (4 * 1024 * 1024 + 1)
    answer = mira.http.post(route, data={**mira.auth(), "character_name": "Mira", "prompt": big})
    assert_refused(answer, "the request body is too large")
    assert mira.chat("Mira") == [[None, "Hi friend! I'm Mira."]]


def test_a_huge_body_is_cut_off_without_being_kept(server):
    # 100 MB announced: answered from the Content-Length, the body is never buffered.
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=30) as sock:
        sock.sendall(b"POST /chat/reply HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n")
        try:
            sock.sendall(b"{" * 65536)
        except OSError:  # the server may have closed already: it answers without reading on
            pass
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"x-content-type-options: nosniff" in head.lower()
    assert json.loads(body)["message"].startswith("the request body is too large")


def test_a_multipart_body_without_a_boundary_gets_an_envelope(api):
    answer = api.http.post("/login", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert_refused(answer, "the multipart body could not be read")


def test_multipart_fields_are_read_like_form_fields(api, alice):
    answer = api.http.post("/login", files={"user_name": (None, alice.user_name), "password": (None, "secret-pw")})
    assert envelope_of(answer)["code"] == 200


def test_a_file_upload_is_refused_with_a_message(api):
    answer = api.http.post("/login", files={"avatar": ("a.png", b"\x89PNG", "image/png")})
    assert_refused(answer, "file uploads are not accepted")


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_answers_cors_and_nosniff(api, route):
    answer = api.http.post(route, data={}, headers={"origin": "http://ui.example"})
    assert answer.headers["access-control-allow-origin"] == "*"
    assert answer.headers["x-content-type-options"] == "nosniff"
    preflight = api.http.options(route, headers={"origin": "http://ui.example",
                                                 "access-control-request-method": "POST"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "authorization" in preflight.headers["access-control-allow-headers"]


@pytest.mark.parametrize("route", STREAMS)
def test_streams_and_their_errors_carry_the_security_headers(mira, route):
    body, headers = mira.stream(route, character_name="nobody", prompt="hi")
    assert body["message"] == "character does not exist"
    assert headers["x-content-type-options"] == "nosniff"
    frames, headers = mira.stream("/chat/reply", character_name="Mira", prompt="hello",
                                  **{"temperature": "1"})
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-content-type-options"] == "nosniff"


def test_a_wrong_method_gets_an_envelope(mira):
    for route in ("/chat/reply", "/characters/list"):
        answer = mira.http.get(route, headers={"authorization": f"Token {mira.token}"})
        assert_refused(answer, "method GET is not allowed here")
