"""Shared fixtures: a tiny real model, the real server in a subprocess, API clients.

The test process and the server share one data directory (SQLite database
and media files), so tests can drive the server over HTTP and then look at
what it stored with the ORM.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(tempfile.mkdtemp(prefix="rpserver-test-"))
TINY_MODEL = DATA_DIR / "model" / "tiny-rwkv7.pth"
ENDLESS_MODEL = DATA_DIR / "model" / "endless-rwkv7.pth"

# For each of several servers sharing this machine: one core (README, "Deploying beyond one process").
ONE_CORE = {"RPSERVER_THREADS": "1", "RPSERVER_PREFILL_THREADS": "1"}

# Settings shared by this process and the servers it starts.
TEST_ENV = {
    "DJANGO_SETTINGS_MODULE": "rpserver.settings",
    "RPSERVER_DATA_DIR": str(DATA_DIR),
    "RPSERVER_MODEL": str(TINY_MODEL),
    "RPSERVER_MAX_REPLY_TOKENS": "12",
    "RPSERVER_STATE_KEEP_RECENT": "2",
    "RPSERVER_STATE_CHECKPOINT_EVERY": "3",
    "RPSERVER_MAX_AVATAR_BYTES": "65536",
    "RPSERVER_LOG_LEVEL": "INFO",
    "RWKV_V7_ON": "1",
    "RWKV_JIT_ON": "1",
    "RWKV_CUDA_ON": "0",
    # The suite makes many guests and replies from one address: the abuse
    # limits are off here, and on in the servers of tests/test_limits.py.
    "RPSERVER_GUESTS_PER_HOUR_PER_ADDRESS": "0",
    "RPSERVER_SIGNUPS_PER_HOUR_PER_ADDRESS": "0",
    "RPSERVER_REPLIES_PER_MINUTE": "0",
}

# The database of the whole run: SQLite in DATA_DIR (the default), or with
# RPSERVER_TEST_DATABASE=postgres (`make test-postgres`) a private PostgreSQL
# server that this run starts from the system's binaries and removes at exit.
TEST_DATABASE = os.environ.get("RPSERVER_TEST_DATABASE", "") or "sqlite"
if TEST_DATABASE == "postgres":
    from postgres import PrivatePostgres

    TEST_ENV["RPSERVER_DATABASE_URL"] = PrivatePostgres().start()
elif TEST_DATABASE == "sqlite":
    os.environ.pop("RPSERVER_DATABASE_URL", None)  # never the operator's database
else:
    raise RuntimeError(f"RPSERVER_TEST_DATABASE must be sqlite or postgres, got {TEST_DATABASE!r}")

# Test files whose outcome does not depend on the run's database: no database
# at all (the model, the engine, the sampler, text, the deploy files), or a
# PostgreSQL of their own whatever the run uses (two processes). The
# PostgreSQL run leaves them out (pytest reports them as deselected): they
# ran in the SQLite run, and running them again would prove nothing new.
DATABASE_INDEPENDENT = {"test_engine.py", "test_rwkv7.py", "test_sampling.py", "test_text.py",
                        "test_deploy.py", "test_scaleout.py"}


def pytest_collection_modifyitems(config, items):
    if TEST_DATABASE != "postgres":
        return
    left_out = [item for item in items if item.path.name in DATABASE_INDEPENDENT]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item.path.name not in DATABASE_INDEPENDENT]
os.environ.update(TEST_ENV)
sys.path.insert(0, str(ROOT))

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402

from inference.backends import parse_strategy, resolve_strategy  # noqa: E402
from inference.checkpoint import write_demo_model  # noqa: E402
from inference.rwkv7 import PRECISION_TOLERANCE  # noqa: E402
from inference.tokenizer import world_tokenizer  # noqa: E402

write_demo_model(TINY_MODEL, n_layer=2, n_embd=128)
call_command("migrate", verbosity=0)


def server_precision():
    """The precision the suite's servers (and this process's engine) compute in."""
    return parse_strategy(resolve_strategy(settings.RPSERVER["STRATEGY"]))[1]


def state_errors(a, b):
    """Each tensor's relative error of state a against state b."""
    return [((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)).item() for x, y in zip(a, b)]


# How close a state read again must be to the state first read. At fp32 the
# two differ by float rounding only: elementwise 1e-4. At the lossy
# precisions activations are rounded to a grid in every pass, and where
# reading tokens one per pass (a reply) and all at once (a rebuild) give
# float results that differ in their last bit, a value can round to either
# side of a grid step and the difference propagates (on CI's machine, before
# the LoRA products were summed in one order whatever the batch, one such
# flip moved a rebuilt int8 state by up to 0.003 where its values reach ~8).
# The int8 and bf16 passes on the CPU with the kernels built are now the
# same bit for bit (int8: tests/test_rwkv7.py; both: bench/reread.py); fp16
# and bf16 on CUDA and int8 without the kernels are not.
# So there each tensor is compared as a whole, by its relative (Frobenius)
# error, against the precision's own bound (rwkv7.PRECISION_TOLERANCE, int8
# 0.06): bench/reread.py measures how far re-reading goes (for int8 in its
# worst case, every activation nudged, 0.020) and how far a wrong state is
# (the state one token earlier: more than 1.2).
def assert_same_state(a, b, precision="fp32"):
    """a is state b read again, at `precision`."""
    assert len(a) == len(b)
    if precision == "fp32":
        for x, y in zip(a, b):
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-5)
    else:
        assert max(state_errors(a, b)) <= PRECISION_TOLERANCE[precision], state_errors(a, b)


def write_endless_model(path):
    """The tiny model, changed so that it never writes a line break: its replies never end their turn
    (a blank line) and run to the length limit. For tests that need a reply in progress for seconds.

    One component of the final norm's output is pinned to 100 (weight 0, bias 100), and that column of
    the head is +1 for every token and -1 for those containing a line break: they score ~200 below every
    other token (the rest of a logit is a few units), so no sampler setting keeps them.
    """
    weights = torch.load(TINY_MODEL)
    breaks = [token for token, piece in world_tokenizer().pieces.items() if b"\n" in piece]
    weights["ln_out.weight"][0] = 0
    weights["ln_out.bias"][0] = 100
    weights["head.weight"][:, 0] = 1
    weights["head.weight"][breaks, 0] = -1
    torch.save(weights, path)
    return path


write_endless_model(ENDLESS_MODEL)

# With the endless model, a server with these settings streams every reply until its reader leaves:
# the model never ends its turn, and no test reads a billion tokens. A test that needs a reply still
# running uses one (running_reply), never a long reply that will "surely" outlast its other requests.
UNTIL_THE_READER_LEAVES = {"RPSERVER_MAX_REPLY_TOKENS": "1000000000"}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_listening(port, process, log, seconds=120):
    """Return once something accepts connections on `port`; fail if `process` exits first, or after
    `seconds` (far beyond a start on a loaded machine), with its `log()`."""
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode} before listening on {port}:\n{log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not listening on {port} after {seconds} s:\n{log()}") from None
            time.sleep(0.1)


class Server:
    """`manage.py serve` in a subprocess, on a free port."""

    def __init__(self, model=TINY_MODEL, env=None, name="server"):
        self.model = model
        self.env = {**os.environ, **(env or {})}
        self.log_path = DATA_DIR / f"{name}.log"
        self.process = None
        self.url = None

    def command(self, port):
        return [sys.executable, "manage.py", "serve", "--model", str(self.model), "--port", str(port)]

    def start(self):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(self.command(port), cwd=ROOT, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)
        wait_until_listening(port, self.process, self.log)
        return self

    def stop(self):
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def restart(self):
        self.stop()
        return self.start()

    def log(self):
        return self.log_path.read_text(errors="replace")


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


@contextmanager
def running_reply(client, route="/chat/reply", **fields):
    """A reply streaming to `client` on the legacy API, begun: its first frame has arrived, so the
    conversation's lock is held. On a server whose replies run until their reader leaves
    (UNTIL_THE_READER_LEAVES) it runs for as long as the block does; leaving the block closes the
    stream, and the server then cancels the reply (storing nothing) and lets go of the lock, soon
    but not at once: see until_not_busy. Yields the response."""
    with client.http.stream("POST", route, data={**client.auth(), **fields}) as answer:
        rest = first_frame(answer)  # (kept until the block ends: a dropped iterator closes the stream)
        yield answer
        del rest


def first_frame(answer):
    """Read `answer`, an event stream, until its first frame has come; the iterator over the rest of
    it. Keep that while the stream must stay open: when the iterator is dropped, httpx closes the
    stream (and the server sees its reader leave)."""
    assert answer.headers["content-type"].startswith("text/event-stream"), answer.read()
    chunks, seen = answer.iter_raw(), b""
    while b"data: " not in seen:
        chunk = next(chunks, None)
        assert chunk is not None, f"the stream ended before its first frame: {seen!r}"
        seen += chunk
    return chunks


def at_once(work, arguments):
    """work(*args) for each tuple in `arguments`, each in its own thread, all started before any is
    waited for; their results in order. An exception in one is raised here once all have ended."""
    results, errors = [None] * len(arguments), []

    def run(i, args):
        try:
            results[i] = work(*args)
        except BaseException as exc:  # raised in the test's thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, args)) for i, args in enumerate(arguments)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def wait_for(condition, what, seconds=120, every=0.05):
    """condition()'s first true value, polled every `every` s: for a test that waits for an event it
    cannot be told of. Fails after `seconds` (far beyond any wait on a loaded machine), saying `what`
    it waited for."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(every)
    return value


def until_not_busy(call, deadline_seconds=120):
    """`call()`'s answer once it is not the busy envelope: for a request that must wait until a
    conversation's lock is let go of (after running_reply's reader left, or its process died).
    Polled, with a deadline far beyond any wait the suite expects on a loaded machine."""
    from rpserver.errors import BUSY

    deadline = time.monotonic() + deadline_seconds
    while True:
        answer = call()
        body = answer[0] if isinstance(answer, tuple) else answer
        if not (isinstance(body, dict) and body.get("message") == BUSY):
            return answer
        assert time.monotonic() < deadline, f"still busy after {deadline_seconds} s"
        time.sleep(0.1)


# What a client of the local S3 server (the s3_endpoint fixture) authenticates with, as environment.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint():
    """The URL of an S3 server on a free port: moto's server mode (`python -m moto.server`, PyPI's
    `moto[server]`), a separate process that speaks S3's REST API over HTTP."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.HTTPError:
                assert process.poll() is None and time.monotonic() < deadline, "moto did not start"
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        process.wait()


def s3_bucket(endpoint, name):
    """A new bucket on the S3 server at `endpoint` (a boto3 Bucket)."""
    import boto3

    resource = boto3.resource("s3", endpoint_url=endpoint, region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
                              aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    return resource.create_bucket(Bucket=name)


@pytest.fixture(scope="session")
def server():
    running = Server().start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def endless_server():
    """A server whose replies run until their reader leaves (the endless model, UNTIL_THE_READER_LEAVES):
    for every test that needs a reply still running while it does something else."""
    running = Server(model=ENDLESS_MODEL, env=UNTIL_THE_READER_LEAVES, name="endless").start()
    yield running
    running.stop()


@pytest.fixture
def api(server):
    return Api(server.url)


@pytest.fixture
def guest(api):
    data = api.ok("/login/tmp")
    return Api(api.url, data["user_name"], data["token"])


def make_user(api, prefix, password="secret-pw"):
    from accounts.services import create_user

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    create_user(name, password)
    data = api.ok("/login", user_name=name, password=password)
    return Api(api.url, data["user_name"], data["token"])


@pytest.fixture
def alice(api):
    return make_user(api, "alice")


@pytest.fixture
def bob(api):
    return make_user(api, "bob")


CHARACTER = {
    "bot": "Mira",
    "user": "friend",
    "greeting": "Hi {{user}}! I'm {{char}}.",
    "bot_persona": "{{char}} is a calm lighthouse keeper who talks to {{user}}.",
    "example_message": "{{user}}: How are you?\n\n{{char}}: Fine, thank you.",
}


@pytest.fixture
def mira(guest):
    """A guest with a character called Mira and an open conversation."""
    guest.ok("/characters/save", **CHARACTER)
    guest.chat("Mira")
    return guest
