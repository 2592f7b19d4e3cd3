"""Two `serve` processes on one PostgreSQL database and one media directory.

What the README's scale-out section promises, run: users whose requests
alternate between the processes lose nothing and get nothing twice; two
changes to one conversation at once are refused across processes; and when a
process is killed (SIGKILL: no clean-up at all), the other serves its users'
conversations, their locks freed within the lock bound below.

The database is a private PostgreSQL server (tests/postgres.py) whatever the
rest of the run uses. Process A runs as if on another machine (its own
hostname), B on this one. Replies are capped at 100 tokens: long enough for
a request to overlap a running reply, short enough for a test of many steps.
"""

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from chat.services import BUSY
from conftest import CHARACTER, ENDLESS_MODEL, ONE_CORE, ROOT, Api, Server, free_port
from postgres import PrivatePostgres

# locks.services: a dead process's locks free within DEAD_AFTER_SECONDS (20)
# + HEARTBEAT_SECONDS (5) on another machine; issue 7 asks for 30 s at most.
LOCK_BOUND_SECONDS = 30
# On the same machine a dead process is seen at once (its pid is gone).
SAME_HOST_BOUND_SECONDS = 5
GREETING = "Hi friend! I'm Mira."


class ClusterServer(Server):
    """A Server whose process may run as if on another machine (its own hostname).

    The locks tell a dead process on this host by its pid, and one on another
    host by its heartbeat; a UTS namespace (`unshare --uts`) gives the process
    another hostname, so the cross-machine path runs here too.
    """

    def __init__(self, env, name, hostname=None):
        # Every reply runs to its 600 tokens (long enough to be caught running: 100 became too short
        # once the forward pass was fused); processes sharing the machine take one core each (README).
        env = {**env, **ONE_CORE}
        super().__init__(model=ENDLESS_MODEL, env=env, name=name)
        self.hostname = hostname

    def start(self):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "manage.py", "serve", "--model", str(self.model), "--port", str(port)]
        if self.hostname:
            user_namespace = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
            command = ["unshare", *user_namespace, "--uts", "sh", "-c",
                       f'hostname {self.hostname} && exec "$0" "$@"', *command]
        self.process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=open(self.log_path, "a"),
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log()}")
            try:
                Api(self.url).http.get("/login/tmp", timeout=1)
                return self
            except Exception:
                time.sleep(0.1)
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def kill(self):
        """SIGKILL, and reap it (a zombie's pid still looks alive)."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process = None


@pytest.fixture(scope="module")
def cluster():
    """(environment, A on "another machine", B on this one): one database, one media directory, one secret key."""
    database = PrivatePostgres()
    shared = tempfile.mkdtemp(prefix="rpserver-cluster-")
    env = {
        "RPSERVER_DATABASE_URL": database.start(),
        "RPSERVER_DATA_DIR": shared,
        "RPSERVER_MEDIA_ROOT": os.path.join(shared, "media"),
        "RPSERVER_SECRET_KEY": "scale-out-test-secret-key-shared-by-every-process",
        "RPSERVER_MAX_REPLY_TOKENS": "600",
    }
    servers = []
    try:
        # One after the other: the first one migrates the new database.
        servers.append(ClusterServer(env, "scale-a", hostname="machine-a").start())
        servers.append(ClusterServer(env, "scale-b").start())
        yield env, servers[0], servers[1]
    finally:
        for running in servers:
            running.stop()
        database.stop()


def guest_on(first, *others):
    """A guest with Mira, logged in through `first`; one client per server, same token."""
    data = Api(first.url).ok("/login/tmp")
    clients = [Api(server.url, data["user_name"], data["token"]) for server in (first, *others)]
    clients[0].ok("/characters/save", **CHARACTER)
    return clients


def resay(client):
    frames, _ = client.stream("/chat/resay", character_name="Mira")
    assert isinstance(frames, list), frames
    return frames[-1]


def alternate(a, b, label, failures):
    """One user's requests, alternating between the processes, checked after each step."""
    try:
        expected = [[None, GREETING]]
        assert a.chat("Mira") == expected
        expected.append([f"{label} one", a.reply("Mira", f"{label} one")])
        assert b.chat("Mira") == expected
        expected.append([f"{label} two", b.reply("Mira", f"{label} two")])
        assert a.chat("Mira") == expected
        expected[-1][1] = resay(a)
        assert b.chat("Mira") == expected
        b.ok("/chat/back", character_name="Mira", log_index=1)
        expected = expected[:2]
        assert a.chat("Mira") == expected
        expected.append([f"{label} three", a.reply("Mira", f"{label} three")])
        b.ok("/chat/tamper", character_name="Mira", message=f"{label} edited")
        expected[-1][1] = f"{label} edited"
        assert a.chat("Mira") == expected and b.chat("Mira") == expected
        expected.append([f"{label} four", b.reply("Mira", f"{label} four")])
        assert a.chat("Mira") == expected
        # What the model read is the same from both processes, each turn once.
        context = a.context("Mira")
        assert b.context("Mira") == context
        text = context["token_state"]
        for word in ("one", "three", "four"):
            assert text.count(f"friend: {label} {word}\n\nMira:") == 1
        assert f"{label} two" not in text  # rolled back
        assert f"Mira: {label} edited\n\n" in text
    except BaseException as exc:  # reported by the test's thread
        failures.append((label, exc))


def test_users_alternating_between_processes_lose_and_duplicate_nothing(cluster):
    _, a, b = cluster
    users = [guest_on(a, b), guest_on(b, a)]
    failures = []
    threads = [threading.Thread(target=alternate, args=(first, second, f"user{i}", failures))
               for i, (first, second) in enumerate(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert "ERROR" not in a.log() + b.log()


def test_a_change_while_a_reply_runs_on_the_other_process_is_refused(cluster):
    _, a, b = cluster
    on_a, on_b = guest_on(a, b)
    on_a.chat("Mira")
    fields = {**on_a.auth(), "character_name": "Mira", "prompt": "a long story"}
    with on_a.http.stream("POST", "/chat/reply", data=fields) as answer:
        chunks = answer.iter_raw()
        next(chunks)  # the reply is running on A, its lock held
        busy = {"data": None, "message": BUSY, "code": 400}
        assert on_b.call("/chat/tamper", character_name="Mira", message="no") == busy
        assert on_b.call("/chat/back", character_name="Mira", log_index=0) == busy
        assert on_b.call("/chat/reset", character_name="Mira") == busy
        assert on_b.stream("/chat/reply", character_name="Mira", prompt="me too")[0] == busy
        assert on_b.stream("/chat/resay", character_name="Mira")[0] == busy
        streamed = b"".join(chunks).decode()
    final = streamed.split("\n\ndata: ")[-1]
    assert on_b.chat("Mira") == [[None, GREETING], ["a long story", final]]
    on_b.reply("Mira", "now me")  # the lock went with the reply
    assert len(on_a.chat("Mira")) == 3


def test_simultaneous_replies_on_both_processes_store_exactly_the_ones_that_streamed(cluster):
    _, a, b = cluster
    on_a, on_b = guest_on(a, b)
    on_a.chat("Mira")
    start = threading.Barrier(4)
    results = []

    def reply(client, i):
        client = Api(client.url, client.user_name, client.token)
        start.wait()
        results.append((i, client.stream("/chat/reply", character_name="Mira", prompt=f"message {i}")[0]))

    threads = [threading.Thread(target=reply, args=(client, i)) for i, client in enumerate([on_a, on_b] * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    streamed = {f"message {i}": frames[-1] for i, frames in results if isinstance(frames, list)}
    refused = [body for _, body in results if isinstance(body, dict)]
    assert streamed and refused
    assert all(body["message"] == BUSY for body in refused)
    chat = on_b.chat("Mira")
    assert len(chat) == 1 + len(streamed)
    assert {user: bot for user, bot in chat[1:]} == streamed


def wait_until_served(client, killed_at, bound):
    """Seconds from the kill until `client`'s conversation takes a change (a tamper); fails past `bound`."""
    while True:
        body = client.call("/chat/tamper", character_name="Mira", message="after the crash")
        elapsed = time.monotonic() - killed_at
        if body["code"] == 200:
            return elapsed
        assert body["message"] == BUSY, body
        assert elapsed < bound, f"still locked {elapsed:.1f} s after the kill"
        time.sleep(0.25)


def crash_during_a_reply(doomed, survivor):
    """Two users of `doomed`, one idle and one mid-reply; SIGKILL it.

    Their clients on `survivor`, their chats before the kill, and its time."""
    idle_on_doomed, idle = guest_on(doomed, survivor)
    idle_on_doomed.reply("Mira", "before the crash")
    busy_on_doomed, busy = guest_on(doomed, survivor)
    busy_on_doomed.reply("Mira", "before the crash")
    chats = idle_on_doomed.chat("Mira"), busy_on_doomed.chat("Mira")
    fields = {**busy_on_doomed.auth(), "character_name": "Mira", "prompt": "interrupted"}
    with busy_on_doomed.http.stream("POST", "/chat/reply", data=fields) as answer:
        next(answer.iter_raw())  # the reply runs on the doomed process, its lock held
        doomed.kill()
        killed_at = time.monotonic()
    return idle, busy, chats, killed_at


def served_after_the_crash(idle, busy, chats, killed_at, bound, known_dead_at_once):
    """Seconds from the kill until the interrupted conversation takes a change (at most `bound`)."""
    idle_chat, busy_chat = chats
    # Everything the dead process stored is there; the interrupted reply left nothing half-applied.
    assert idle.chat("Mira") == idle_chat
    assert busy.chat("Mira") == busy_chat
    if not known_dead_at_once:  # the lock is still held until the heartbeat is missed
        assert busy.call("/chat/tamper", character_name="Mira", message="too soon")["message"] == BUSY
    elapsed = wait_until_served(busy, killed_at, bound)
    assert busy.chat("Mira") == busy_chat[:-1] + [[busy_chat[-1][0], "after the crash"]]
    busy.reply("Mira", "and on")
    assert len(busy.chat("Mira")) == len(busy_chat) + 1
    # The idle user's conversation was never locked.
    idle.reply("Mira", "after the crash")
    assert len(idle.chat("Mira")) == len(idle_chat) + 1
    return elapsed


def test_a_process_killed_on_this_machine_frees_its_locks_at_once(cluster):
    env, _, b = cluster
    doomed = ClusterServer(env, "scale-doomed").start()
    try:
        idle, busy, chats, killed_at = crash_during_a_reply(doomed, b)
    finally:
        doomed.stop()
    elapsed = served_after_the_crash(idle, busy, chats, killed_at, SAME_HOST_BOUND_SECONDS, known_dead_at_once=True)
    print(f"lock of a process killed on the same machine freed after {elapsed:.1f} s")


def test_a_process_killed_on_another_machine_frees_its_locks_within_the_bound(cluster):
    """Last in the module: it kills A."""
    _, a, b = cluster
    idle, busy, chats, killed_at = crash_during_a_reply(a, b)
    elapsed = served_after_the_crash(idle, busy, chats, killed_at, LOCK_BOUND_SECONDS, known_dead_at_once=False)
    print(f"lock of a process killed on another machine freed after {elapsed:.1f} s")
