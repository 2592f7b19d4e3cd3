"""Clients of the legacy API, the users and character they use, and replies held running."""

import json
import time
import uuid
from contextlib import contextmanager

import httpx

from rpserver.errors import BUSY

CHARACTER = {
    "bot": "Mira",
    "user": "friend",
    "greeting": "Hi {{user}}! I'm {{char}}.",
    "bot_persona": "{{char}} is a calm lighthouse keeper who talks to {{user}}.",
    "example_message": "{{user}}: How are you?\n\n{{char}}: Fine, thank you.",
}


class Api:
    """A client of the legacy API, optionally logged in."""

    def __init__(self, url, user_name=None, token=None):
        self.url = url
        self.user_name = user_name
        self.token = token
        self.http = httpx.Client(base_url=url, timeout=120)

    def auth(self):
        return {"user_name": self.user_name, "token": self.token} if self.token else {}

    def call(self, route, **fields):
        """POST form fields (plus auth); the envelope."""
        answer = self.http.post(route, data={**self.auth(), **fields})
        assert answer.status_code == 200, answer.text
        return answer.json()

    def ok(self, route, **fields):
        """POST and insist on success; the envelope's data."""
        body = self.call(route, **fields)
        assert body["code"] == 200, body
        return body["data"]

    def stream(self, route, **fields):
        """POST to a streaming route: (frames, response headers), or (envelope, headers)."""
        with self.http.stream("POST", route, data={**self.auth(), **fields}) as answer:
            raw = answer.read().decode("utf-8")
            headers = answer.headers
        if headers["content-type"].startswith("application/json"):
            return json.loads(raw), headers
        return raw.split("\n\ndata: ")[1:], headers

    def reply(self, character, prompt, **sampling):
        frames, _ = self.stream("/chat/reply", character_name=character, prompt=prompt, **sampling)
        assert isinstance(frames, list), frames
        return frames[-1] if frames else ""

    def chat(self, character):
        return self.ok("/characters/load", character_name=character)["chat"]

    def context(self, character):
        return self.ok("/debug/token", character_name=character)


def make_user(api, prefix, password="secret-pw"):
    """A new account (created with the ORM, in the run's database), logged in through `api`."""
    from accounts.services import create_user

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    create_user(name, password)
    data = api.ok("/login", user_name=name, password=password)
    return Api(api.url, data["user_name"], data["token"])


def first_frame(answer):
    """Read `answer`, an event stream, until its first frame has come: (the bytes read, the iterator
    over the rest). Keep the iterator while the stream must stay open: when it is dropped, httpx
    closes the stream (and the server sees its reader leave)."""
    assert answer.headers["content-type"].startswith("text/event-stream"), answer.read()
    chunks, seen = answer.iter_raw(), b""
    while b"data: " not in seen:
        chunk = next(chunks, None)
        assert chunk is not None, f"the stream ended before its first frame: {seen!r}"
        seen += chunk
    return seen, chunks


@contextmanager
def running_reply(client, route="/chat/reply", **fields):
    """A reply streaming to `client` on the legacy API, begun: its first frame has arrived, so the
    conversation's lock is held. On a server whose replies run until their reader leaves
    (servers.UNTIL_THE_READER_LEAVES) it runs for as long as the block does; leaving the block closes
    the stream, and the server then cancels the reply (storing nothing) and lets go of the lock, soon
    but not at once: see until_not_busy. Yields the response."""
    with client.http.stream("POST", route, data={**client.auth(), **fields}) as answer:
        _, rest = first_frame(answer)  # (kept until the block ends: a dropped iterator closes the stream)
        yield answer
        del rest


def until_not_busy(call, seconds=120):
    """`call()`'s answer once it is not the busy envelope: for a request that must wait until a
    conversation's lock is let go of (after running_reply's reader left, or its process died).
    Polled, with a deadline far beyond any wait on a loaded machine."""
    deadline = time.monotonic() + seconds
    while True:
        answer = call()
        body = answer[0] if isinstance(answer, tuple) else answer
        if not (isinstance(body, dict) and body.get("message") == BUSY):
            return answer
        assert time.monotonic() < deadline, f"still busy after {seconds} s"
        time.sleep(0.1)


def answer_held(client, route, fields, answered):
    """POST `fields` (plus auth) to the streaming `route`: "running" if a stream began (its first
    frame came), else the refusal's envelope. The stream, if any, is held open until `answered` (a
    threading.Barrier) is passed: for requests sent at once that must overlap, each held until all
    have their answer, so that a reply that began is still running when the others come."""
    with client.http.stream("POST", route, data={**client.auth(), **fields}) as answer:
        if answer.headers["content-type"].startswith("text/event-stream"):
            _, rest = first_frame(answer)  # (kept: a dropped iterator closes the stream)
            answered.wait()
            del rest
            return "running"
        body = json.loads(answer.read())
        answered.wait()
        return body
