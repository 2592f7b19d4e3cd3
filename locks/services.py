"""Locks that die with their holder: one home for the lock and its rules.

A lock is a row (locks.models.Lock) naming the server process that holds it
(a ServerInstance row) and the request within it (a random key). Taking it is
one INSERT: the unique name makes a second taker fail at once, in one
process or across several on one database.

Why each piece:
- The holder is a process, not a time: a running reply keeps its lock for as
  long as it runs, however long, while its process lives. (A timeout on the
  lock itself would hand a long reply's conversation to a second request.)
- A process proves it lives by a heartbeat (every quarter of
  RPSERVER_LOCK_DEAD_AFTER_SECONDS, default 20). Each beat writes when the
  process will count as dead (`dead_at`: now + its own dead-after). A process
  past its `dead_at` is dead: its row is deleted and its locks go with it
  (CASCADE), so a crashed process's locks free within 25 s (dead-after +
  one heartbeat) for any other process that wants one of them. Judged by
  its own bound, a process is never taken for dead by another configured
  with a shorter one while it beats.
- A restarted server on the same host frees its predecessor's locks at once:
  at start-up, instances on this host whose process id is not running (or is
  our own: a container restarts as pid 1 again) are dead.
- A process that was stalled so long that another reaped it (its row is
  gone) registers again at its next heartbeat, or at once when a request
  wants a lock meanwhile; the requests that held locks fail their `check` at
  commit: nothing they store can overwrite the work of a request that took
  a lock over.
- A clean stop deletes the instance's row, freeing anything still held.
"""

import logging
import os
import socket
import threading
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, close_old_connections, transaction
from django.utils import timezone

from rpserver.errors import BUSY, ApiError

from .models import Lock, ServerInstance

logger = logging.getLogger(__name__)


def dead_after():
    """Seconds without a heartbeat after which a process is dead."""
    return settings.RPSERVER["LOCK_DEAD_AFTER_SECONDS"]


def heartbeat_seconds():
    return max(0.25, dead_after() / 4)


def beat():
    """The fields a heartbeat writes: when it was, and when this process counts as dead without another."""
    now = timezone.now()
    return {"heartbeat": now, "dead_at": now + timedelta(seconds=dead_after())}


def host():
    """This machine's name for the instances (RPSERVER_INSTANCE_HOST, default the host name)."""
    return settings.RPSERVER["INSTANCE_HOST"] or socket.gethostname()


class Busy(ApiError):
    """The lock is held by a live request: the request that wanted it is refused (code 400, BUSY)."""

    def __init__(self, name):
        super().__init__(BUSY)
        self.name = name


class Lost(Exception):
    """The lock is no longer ours (our process was taken for dead meanwhile)."""


class Instance:
    """This process's identity as a lock holder, with its heartbeat thread."""

    def __init__(self):
        self.id = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = None

    def register(self):
        """Reap the dead (see the module's notes), then record this process as alive."""
        reap_dead_here()
        reap_expired()
        ServerInstance.objects.update_or_create(id=self.id, defaults={"host": host(), "pid": os.getpid(), **beat()})

    def registered(self):
        return ServerInstance.objects.filter(id=self.id).exists()

    def register_again(self):
        """After another process took this one for dead and deleted its row (a long stall)."""
        logger.warning("this server was taken for dead (no heartbeat for %s s); registering again", dead_after())
        self.register()

    def start(self):
        self.register()
        self._thread = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(heartbeat_seconds()):
            try:
                close_old_connections()
                if not ServerInstance.objects.filter(id=self.id).update(**beat()):
                    self.register_again()
                reap_expired()
            except Exception:  # the database may be away for a moment: try again next beat
                logger.exception("lock heartbeat failed")
        close_old_connections()

    def stop(self):
        """Stop beating and free every lock this process still holds."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=heartbeat_seconds() + 5)
        ServerInstance.objects.filter(id=self.id).delete()


_instance = None


def instance():
    """This process's Instance (registered and beating on first use)."""
    global _instance
    if _instance is None:
        _instance = Instance()
        _instance.start()
    return _instance


def stop_instance():
    global _instance
    if _instance is not None:
        _instance.stop()
        _instance = None


def pid_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, as another user
        return True
    return True


def reap_dead_here():
    """Delete the instances of this host whose process is gone (their locks go too)."""
    for row in ServerInstance.objects.filter(host=host()):
        if row.pid == os.getpid() or not pid_running(row.pid):
            row.delete()


def reap_expired():
    """Delete the instances whose heartbeat stopped (past their own dead-after; their locks go too)."""
    ServerInstance.objects.filter(dead_at__lt=timezone.now()).delete()


def acquire(name):
    """Take the lock `name` for this request; returns its key. Busy if a live request holds it.

    Call outside a transaction or inside one (the INSERT is its own savepoint).
    """
    me = instance()
    key = uuid.uuid4().hex
    if transaction.get_connection().in_atomic_block and not me.registered():
        me.register_again()  # (the holder's foreign key is checked at the outer commit, not below)
    for attempt in (1, 2):
        try:
            with transaction.atomic():
                Lock.objects.create(name=name, holder_id=me.id, key=key)
            return key
        except IntegrityError:  # the name is taken, or this process was taken for dead (no holder row)
            if attempt == 2:
                raise Busy(name)
            if not me.registered():
                me.register_again()
            elif not reap_holder_if_dead(name):
                raise Busy(name)
    raise Busy(name)


class held:
    """`with held(name) as key:` holds the lock `name` for the block; Busy if a live request holds it.

    The lock is released when the block ends, however it ends. A holder that
    keeps it past the block (a reply's lease) takes the release over with
    contextlib.ExitStack.pop_all. (A class, not a generator: a discarded
    generator's `finally` would release the kept lock when it is collected.)
    """

    def __init__(self, name):
        self.name = name
        self.key = None

    def __enter__(self):
        self.key = acquire(self.name)
        return self.key

    def __exit__(self, *exc_info):
        release(self.name, self.key)


def reap_holder_if_dead(name):
    """If `name` is held by a dead process, reap it; True when the lock is free now."""
    lock = Lock.objects.select_related("holder").filter(name=name).first()
    if lock is None:
        return True
    holder = lock.holder
    dead = holder.dead_at < timezone.now() or (
        holder.host == host() and holder.id != instance().id and not pid_running(holder.pid))
    if dead:
        holder.delete()
    return dead


def release(name, key):
    Lock.objects.filter(name=name, key=key).delete()


def check(name, key):
    """Inside the transaction that stores a locked change: the lock is still ours
    (row-locked until the commit, so it cannot be reaped meanwhile). Lost if not."""
    if not Lock.objects.select_for_update().filter(name=name, key=key).exists():
        raise Lost(name)


def is_held(name):
    """Whether a live request holds `name` (a dead holder's lock is reaped and does not count)."""
    return Lock.objects.filter(name=name).exists() and not reap_holder_if_dead(name)


def held_count():
    return Lock.objects.count()
