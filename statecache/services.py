"""The shared state cache: RNN states keyed by the exact tokens they follow.

A state is a pure function of the model and the tokens read from the zero
state, so two requests that send token-for-token the same prefix (a client
re-sending its whole history, many guests opening the same default
character, a regenerated reply) can start from one stored state and read
only what follows it. Keys are the SHA-256 of the exact prefix (uint32
tokens, as chat rounds store them) together with the model's fingerprint;
nothing else (user, character, route) goes into a key, and nothing less
than the exact tokens could.

Entries live in RAM up to RPSERVER_STATE_CACHE_MB, least recently used
first out. An entry pushed out of RAM is spilled to the one state store
(statecache.store: the rows every door shares, chat rounds' states too),
held there by the cache until the rows it holds outgrow
RPSERVER_STATE_CACHE_DISK_MB, least recently used first; several server
processes share them. A lookup asks RAM, then the store, for the longest
of the prefixes it is given: a state a chat round keeps is found too.

Everything here runs on the event loop (the engine never modifies the
states it is handed, so an entry's state is given out as it is); blobs are
written and read on statecache.blobs' blob threads, rows on Django's.
"""

import array
import asyncio
import collections
import dataclasses
import hashlib
import logging

from asgiref.sync import sync_to_async
from django.conf import settings

from inference.runtime import get_engine

from . import store
from .blobs import blob_io, delete_states, load_state, save_state
from .models import CACHE_OWNER

logger = logging.getLogger(__name__)

db = sync_to_async  # thread_sensitive by default: Django's one ORM thread

# How many prefixes one lookup asks the spilled rows about (the longest ones).
MAX_DISK_PROBES = 256


def prefix_digests(tokens, lengths):
    """{n: SHA-256 hex of tokens[:n]} for each n in lengths, hashing the tokens once."""
    hasher = hashlib.sha256()
    digests, done = {}, 0
    for n in sorted(set(lengths)):
        hasher.update(array.array("I", tokens[done:n]).tobytes())
        done = n
        digests[n] = hasher.copy().hexdigest()
    return digests


def tokens_digest(tokens):
    return prefix_digests(tokens, [len(tokens)])[len(tokens)]


def state_bytes(state):
    return sum(t.numel() * t.element_size() for t in state)


@dataclasses.dataclass
class Entry:
    state: list
    tokens: int  # length of the prefix
    nbytes: int
    spilled: bool = False  # a row of the state store holds it too


class StateCache:
    """States by (model fingerprint, digest of the exact token prefix): RAM, then the state store."""

    def __init__(self, backend, ram_bytes, disk_bytes):
        self.backend = backend
        self.ram_bytes = ram_bytes
        self.disk_bytes = disk_bytes
        self._ram = collections.OrderedDict()  # (model, digest) -> Entry, least recently used first
        self._spilling = {}  # (model, digest) -> Entry being written to the store
        self._reading = {}  # (model, digest) -> future state, while one caller reads it for all
        self._tasks = set()
        self._used = 0
        self.counters = collections.Counter()

    def stats(self):
        return {"entries": len(self._ram), "bytes": self._used, "budget_bytes": self.ram_bytes,
                "spilling": len(self._spilling), **self.counters}

    # ---- lookups -------------------------------------------------------------

    async def longest(self, tokens, lengths):
        """(n, state) for the longest n in `lengths` whose prefix tokens[:n] is
        cached, or (0, None). The state is shared: read from it, never into it."""
        digests = prefix_digests(tokens, [n for n in lengths if 0 < n <= len(tokens)])
        model = self.backend.model_id
        for n in sorted(digests, reverse=True):
            key = (model, digests[n])
            entry = self._ram.get(key) or self._spilling.get(key)
            if entry is not None:
                if key in self._ram:
                    self._ram.move_to_end(key)
                self.counters["ram_hits"] += 1
                return n, entry.state
        probes = sorted(digests, reverse=True)[:MAX_DISK_PROBES]
        if self.disk_bytes and probes:
            found = await self._from_store(model, {digests[n]: n for n in probes})
            if found is not None:
                return found
        self.counters["misses"] += 1
        return 0, None

    def _held(self, key):
        """The state of `key` if it is in RAM or on its way to the store (no waiting)."""
        entry = self._ram.get(key) or self._spilling.get(key)
        return entry.state if entry is not None else None

    async def get(self, tokens):
        """The state after exactly `tokens`, or None."""
        n, state = await self.longest(tokens, [len(tokens)])
        return state if n == len(tokens) else None

    async def _from_store(self, model, lengths_by_digest):
        rows = await db(store.find_states)(model, list(lengths_by_digest))
        for digest, (pk, name) in sorted(rows.items(), key=lambda row: -lengths_by_digest[row[0]]):
            state = await blob_io(load_state)(name, self.backend)
            if state is None:  # missing or damaged: forget it
                await db(store.forget)(name)
                continue
            await db(store.touch)(pk)
            n = lengths_by_digest[digest]
            self._insert((model, digest), Entry(state, n, state_bytes(state), spilled=True))
            self.counters["disk_hits"] += 1
            return n, state
        return None

    # ---- storing ---------------------------------------------------------------

    def put(self, tokens, state):
        """Keep `state` as the state after exactly `tokens` (already read: nothing is computed)."""
        if not tokens:
            return None
        key = (self.backend.model_id, tokens_digest(tokens))
        if key in self._ram:
            self._ram.move_to_end(key)
            return key
        self.counters["stored"] += 1
        self._insert(key, Entry(state, len(tokens), state_bytes(state)))
        return key

    async def keep(self, tokens, state):
        """put(), and write the state to the store now (it outlives a restart and
        is shared with other processes at once), unless it is there already."""
        key = self.put(tokens, state)
        entry = self._ram.get(key) or self._spilling.get(key)
        if entry is None or entry.spilled or not self.disk_bytes:
            return
        if key not in self._spilling:
            self._spill_later(key, entry)
        await asyncio.gather(*[task for task in self._tasks if task.get_name() == key[1]])

    async def state_after(self, tokens, read):
        """The state after exactly `tokens`: cached, or read once (`await read(tokens)`)
        and kept in the store. Concurrent callers for the same tokens share one
        read (many guests opening the same default character at once); if that
        read fails or its caller goes away, the others read for themselves."""
        key = (self.backend.model_id, tokens_digest(tokens))
        while True:
            state = await self.get(tokens)
            if state is None:  # a read may have ended while get() waited on the store
                state = self._held(key)
            if state is not None:
                return state
            if key not in self._reading:
                break
            self.counters["shared_reads"] += 1
            state = await asyncio.shield(self._reading[key])
            if state is not None:
                return state
        reading = asyncio.get_running_loop().create_future()
        self._reading[key] = reading
        state = None
        try:
            state = await read(tokens)
        finally:
            del self._reading[key]
            reading.set_result(state)  # None: the read failed, the waiters read for themselves
        await asyncio.shield(self.keep(tokens, state))  # put() first: no later caller misses it
        return state

    def _insert(self, key, entry):
        self._ram[key] = entry
        self._used += entry.nbytes
        while self._used > self.ram_bytes and self._ram:
            old_key, old = self._ram.popitem(last=False)
            self._used -= old.nbytes
            self.counters["evicted"] += 1
            if not old.spilled and self.disk_bytes and old_key not in self._spilling:
                self._spill_later(old_key, old)

    def _spill_later(self, key, entry):
        self._spilling[key] = entry
        task = asyncio.get_running_loop().create_task(self._spill(key, entry), name=key[1])
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spill(self, key, entry):
        name = None
        try:
            name = await blob_io(save_state)(CACHE_OWNER, self.backend, entry.state)
            if await db(store.put_cached)(key[0], key[1], entry.tokens, entry.nbytes, name):
                self.counters["spilled"] += 1
            name = None  # the store's now, or deleted by it once the row was found
            entry.spilled = True  # by us, or by another process before us
            await db(store.prune_cached)(self.disk_bytes)
        except Exception:
            logger.exception("could not spill a cached state")
        finally:
            self._spilling.pop(key, None)
            if name:
                await blob_io(delete_states)([name])

    async def drain(self):
        """Wait for the spills in progress (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


# ---- the process's cache -----------------------------------------------------------

_cache = None


def state_cache():
    """The process's shared state cache (for the model the engine serves)."""
    global _cache
    backend = get_engine().backend
    if _cache is None or _cache.backend is not backend:
        config = settings.RPSERVER
        _cache = StateCache(backend, config["STATE_CACHE_MB"] * 2**20, config["STATE_CACHE_DISK_MB"] * 2**20)
    return _cache
