"""Locks that die with their holder: crashes, restarts, a clean stop, two processes on one database."""

import contextlib
import gc
import random
import signal
import time
from datetime import timedelta

import httpx
import pytest
from django.db import transaction
from django.utils import timezone

from chat.models import Round
from conftest import CHARACTER, ENDLESS_MODEL, UNTIL_THE_READER_LEAVES, Api, Server, first_frame, path_rounds
from lock_checks import served_once_its_holder_is_past_its_bound
from locks import services as locks
from locks.models import Lock, ServerInstance
from rpserver.errors import BUSY


DEAD_AFTER = 5  # RPSERVER_LOCK_DEAD_AFTER_SECONDS of the two-process test


def long_server(name, **env):
    """A server whose replies run until their reader leaves (or the server stops)."""
    return Server(model=ENDLESS_MODEL, env={**UNTIL_THE_READER_LEAVES, **env}, name=name)


def new_guest(server):
    data = Api(server.url).ok("/login/tmp")
    guest = Api(server.url, data["user_name"], data["token"])
    guest.ok("/characters/save", **CHARACTER)
    guest.chat("Mira")
    return guest


def same_user(guest, server):
    return Api(server.url, guest.user_name, guest.token)


def assert_consistent(guest):
    """The chat log, the rounds and the context agree (nothing half-stored)."""
    chat = guest.chat("Mira")
    rounds = list(path_rounds(guest.user_name))
    assert [r.index for r in rounds] == list(range(len(chat)))
    assert [[r.user_text, r.bot_text] for r in rounds] == chat
    assert guest.context("Mira")["token_count"] == sum(len(r.token_list) for r in rounds)


def test_held_refuses_a_second_holder_with_busy_and_releases_when_its_block_ends():
    try:
        with locks.held("test-held"):
            with pytest.raises(locks.Busy) as refused, locks.held("test-held"):
                pass
            assert (refused.value.message, refused.value.code) == (BUSY, 400)
        assert not locks.is_held("test-held")
        with pytest.raises(ValueError), locks.held("test-held"):
            raise ValueError("the block failed")
        assert not locks.is_held("test-held")
    finally:
        locks.stop_instance()


def test_a_lock_taken_over_from_held_stays_held_after_the_block_and_a_collection():
    # chat.services.acquire keeps the conversation's lock for its lease this way.
    try:
        with contextlib.ExitStack() as until_leased:
            key = until_leased.enter_context(locks.held("test-lease"))
            until_leased.pop_all()
        gc.collect()
        assert locks.is_held("test-lease")
        locks.release("test-lease", key)
        assert not locks.is_held("test-lease")
    finally:
        locks.stop_instance()



def test_each_process_is_judged_dead_by_its_own_bound_not_the_reapers():
    # A process with a shorter RPSERVER_LOCK_DEAD_AFTER_SECONDS on the same database once reaped every
    # other process whose heartbeat was older than its own bound: their requests were answered BUSY
    # until their next heartbeat (tests/test_lore.py failed so right after this module in CI).
    # Here (the pytest process reaping) dead-after is 20 s; "slow" is dead after 40 s, "gone" after 4 s.
    now = timezone.now()
    slow = ServerInstance.objects.create(id="slow-beater", host="elsewhere", pid=1,
                                         heartbeat=now - timedelta(seconds=25), dead_at=now + timedelta(seconds=15))
    gone = ServerInstance.objects.create(id="gone-quiet", host="elsewhere", pid=1,
                                         heartbeat=now - timedelta(seconds=5), dead_at=now - timedelta(seconds=1))
    try:
        locks.reap_expired()
        assert ServerInstance.objects.filter(id=slow.id).exists(), "a process within its own bound was reaped"
        assert not ServerInstance.objects.filter(id=gone.id).exists(), "a process past its own bound was kept"
    finally:
        ServerInstance.objects.filter(id__in=[slow.id, gone.id]).delete()


@pytest.mark.parametrize("in_a_transaction", [False, True])
def test_a_process_taken_for_dead_registers_again_for_its_next_request_instead_of_answering_busy(in_a_transaction):
    try:
        me = locks.instance()
        ServerInstance.objects.filter(id=me.id).delete()  # as another process does after a long stall
        with transaction.atomic() if in_a_transaction else contextlib.nullcontext():
            with locks.held("test-taken-for-dead"):
                assert Lock.objects.get(name="test-taken-for-dead").holder_id == me.id
        assert not locks.is_held("test-taken-for-dead")
    finally:
        locks.stop_instance()

def test_a_server_killed_during_a_reply_frees_the_conversation_at_restart():
    server = long_server("killed-mid-reply").start()
    try:
        guest = new_guest(server)
        with guest.http.stream("POST", "/chat/reply", data={**guest.auth(), "character_name": "Mira",
                                                            "prompt": "tell me everything"}) as answer:
            _, rest = first_frame(answer)  # (kept: dropping the iterator would close the stream)
            assert Lock.objects.filter(holder__pid=server.process.pid).count() == 1
            server.process.kill()
            server.process.wait()
        server.process = None
        server.env["RPSERVER_MAX_REPLY_TOKENS"] = "12"  # short replies from here on
        server.start()
        guest = same_user(guest, server)
        guest.ok("/characters/load", character_name="Mira")
        frames, _ = guest.stream("/chat/reply", character_name="Mira", prompt="again")
        assert isinstance(frames, list), frames  # not BUSY: the dead process's lock went at start-up
        assert guest.chat("Mira")[1][0] == "again"  # the killed reply stored nothing
        assert_consistent(guest)
    finally:
        server.stop()


def test_kills_at_random_moments_of_replies_and_their_storing_lose_nothing():
    # Short replies: a kill lands while the reply is generated, while its round
    # is being stored (after the last frame, before the stream ends), or between.
    server = Server(name="killed-at-random").start()
    rng = random.Random(7)
    try:
        guest = new_guest(server)
        for attempt in range(3):
            guest = same_user(guest, server)
            guest.reply("Mira", f"kept {attempt}")
            before = guest.chat("Mira")
            with guest.http.stream("POST", "/chat/reply", data={**guest.auth(), "character_name": "Mira",
                                                                "prompt": f"maybe {attempt}"}) as answer:
                _, rest = first_frame(answer)  # (kept: dropping the iterator would close the stream)
                time.sleep(rng.uniform(0, 0.05))
                server.process.kill()
                server.process.wait()
            server.process = None
            server.start()
            guest = same_user(guest, server)
            after = guest.chat("Mira")
            assert after in (before, before + [[f"maybe {attempt}", after[-1][1]]])  # all or nothing
            assert_consistent(guest)
            guest.reply("Mira", f"at once {attempt}")  # never BUSY after a restart
            assert guest.chat("Mira")[-1][0] == f"at once {attempt}"
    finally:
        server.stop()


def test_sigterm_during_a_stream_exits_cleanly_and_frees_every_lock():
    server = long_server("sigterm", RPSERVER_SHUTDOWN_GRACE_SECONDS="1").start()
    guest = new_guest(server)
    pid = server.process.pid
    with guest.http.stream("POST", "/chat/reply", data={**guest.auth(), "character_name": "Mira",
                                                        "prompt": "tell me everything"}) as answer:
        _, rest = first_frame(answer)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=120) == 0
        try:
            for _ in rest:  # the stream ends: cancelled after the grace period
                pass
        except httpx.RemoteProtocolError:  # (cut off when the process left)
            pass
    server.process = None
    assert not Lock.objects.filter(holder__pid=pid).exists()
    assert not ServerInstance.objects.filter(pid=pid).exists()
    log = server.log()
    assert "terminate called" not in log and "Traceback" not in log
    assert "rpserver stopped" in log
    # Nothing half: the reply was cancelled, nothing of it stored.
    rounds = Round.objects.filter(conversation__owner__username=guest.user_name)
    assert [r.user_text for r in rounds] == [None]


def test_sigterm_lets_a_short_reply_finish_within_the_grace_period():
    # A grace period far beyond a 12-token reply on a loaded machine: the server leaves as soon as
    # the reply is done, so it costs nothing.
    server = Server(env={"RPSERVER_SHUTDOWN_GRACE_SECONDS": "300"}, name="sigterm-grace").start()
    guest = new_guest(server)
    with guest.http.stream("POST", "/chat/reply", data={**guest.auth(), "character_name": "Mira",
                                                        "prompt": "short one"}) as answer:
        seen, rest = first_frame(answer)
        server.process.send_signal(signal.SIGTERM)
        body = seen + b"".join(rest)
    assert server.process.wait(timeout=300) == 0
    server.process = None
    rounds = Round.objects.filter(conversation__owner__username=guest.user_name).order_by("index")
    assert [r.user_text for r in rounds] == [None, "short one"]
    assert body.decode().endswith("\n\ndata: " + rounds[1].bot_text)  # the stored reply is the last frame


def test_a_dead_process_lock_frees_within_the_bound_and_a_live_one_never():
    # Two processes on one database, as on two machines (different instance
    # hosts, so only the heartbeat tells a dead one). Dead after 5 s here
    # (a heartbeat every 1.25 s); 20 s by default.
    first = long_server("machine-a", RPSERVER_LOCK_DEAD_AFTER_SECONDS=str(DEAD_AFTER),
                        RPSERVER_INSTANCE_HOST="machine-a")
    second = long_server("machine-b", RPSERVER_LOCK_DEAD_AFTER_SECONDS=str(DEAD_AFTER),
                         RPSERVER_INSTANCE_HOST="machine-b", RPSERVER_MAX_REPLY_TOKENS="12")  # its replies end
    first.start()
    second.start()

    def take():
        body, _ = other.stream("/chat/reply", character_name="Mira", prompt="from b")
        assert isinstance(body, list) or body == {"data": None, "message": BUSY, "code": 400}, body
        return isinstance(body, list)

    try:
        guest = new_guest(first)
        other = same_user(guest, second)
        with guest.http.stream("POST", "/chat/reply", data={**guest.auth(), "character_name": "Mira",
                                                            "prompt": "tell me everything"}) as answer:
            _, rest = first_frame(answer)  # (kept: dropping the iterator would close the stream)
            deadline = time.monotonic() + 1.6 * DEAD_AFTER  # past its bound: the heartbeat keeps the lock
            while time.monotonic() < deadline:
                assert not take(), "a live process's lock was taken"
                time.sleep(0.5)
            first.process.kill()
            first.process.wait()
            killed = timezone.now()
        first.process = None
        served_once_its_holder_is_past_its_bound(take, killed, DEAD_AFTER)
        assert [user_text for user_text, _ in other.chat("Mira")] == [None, "from b"]
    finally:
        first.stop()
        second.stop()
