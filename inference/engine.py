"""The inference engine: one thread owns the model and serves everyone.

Requests hand the engine jobs (tokens to read from a start state, and for a
reply, sampling settings) and get events back through an asyncio queue, so
the event loop never waits on the model.

Every job in progress has a row in one batch (up to max_batch jobs; later
ones wait for a row), and every turn of the engine loop is one forward pass
over the whole batch, whatever each job is doing:

* a reply being generated feeds its last sampled token and samples the next;
* a prompt being read feeds its next chunk: the waiting prompts share one
  chunk's worth of tokens per turn (RPSERVER_PREFILL_CHUNK), oldest first
  with a few tokens for each, so a long prompt never stalls the replies being
  streamed nor the other prompts, and a new reply reads its prompt alongside
  the others' decoding instead of taking turns with them;
* a reply that just ended feeds its closing tokens, then leaves the batch
  with its final state.

The weights are read once per turn for all of it (decoding a small model is
bound by memory bandwidth, so one pass for many rows costs little more than
for one). Sampling settings stay per reply; sampling is batched per turn.

A job can ask for snapshots: copies of its state after a given number of
its tokens were read (a reply keeps the state just before the last prompt
token, from which it can be regenerated later).

The engine knows nothing of HTTP, Django or users.
"""

import asyncio
import collections
import dataclasses
import enum
import itertools
import logging
import queue
import threading
from typing import Any

import torch

from .sampling import Sampler, banned_tokens, sample_batch

logger = logging.getLogger(__name__)

TURN_END = b"\n\n"

# A pass reading at least this many prompt tokens is compute-bound: it gets the
# engine's prefill_threads (on 2 cores, all cores read prompts about 1.5x
# faster, while decode steps are faster on one core, leaving the other to the
# event loop).
WIDE_PASS_TOKENS = 64

# Every prompt being read gets at least this many tokens per turn (see Engine._read_sizes).
READ_FLOOR = 8


class FinishReason(enum.Enum):
    STOP = "stop"  # the model ended its turn with a blank line
    LENGTH = "length"  # the reply reached its token limit; "\n\n" was read after it


@dataclasses.dataclass
class Reply:
    """What a finished reply hands back to be stored."""

    tokens: list  # every token the model read after the prompt, closing "\n\n" included
    text: str  # the reply as shown: decoded up to the first blank line, stripped
    state: Any  # the state after `tokens`
    snapshots: dict  # {tokens read: state} as asked for by the job
    finish_reason: FinishReason


@dataclasses.dataclass
class Job:
    id: int
    tokens: list  # to read, in order
    state: Any  # where the job starts (None: the zero state); once it has left the batch, where it ended
    snapshot_at: frozenset
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    sampler: Sampler | None = None  # None: read only
    max_tokens: int = 0
    read: int = 0
    snapshots: dict = dataclasses.field(default_factory=dict)
    generated: list = dataclasses.field(default_factory=list)
    decoder: Any = None
    finish_reason: FinishReason | None = None
    cancelled: bool = False

    @property
    def reading(self):
        return self.read < len(self.tokens)


class Engine:
    """Owns a backend (the loaded model) and runs its jobs on one thread."""

    def __init__(self, backend, tokenizer, prefill_chunk=64, max_batch=32, threads=0, prefill_threads=0):
        self.backend = backend
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.max_batch = max_batch
        self.threads = threads  # CPU threads for decode steps (0: leave torch's setting alone)
        self.prefill_threads = prefill_threads or threads  # for passes reading >= WIDE_PASS_TOKENS prompt tokens
        self.turn_end_tokens = tokenizer.encode("\n\n")
        self._banned = banned_tokens(tokenizer, backend.vocab_size)
        self._inbox = queue.Queue()
        self._ids = itertools.count(1)
        self._thread = None
        self._stopping = False
        self._outbox = {}  # event loop -> [(job, event)], flushed once per engine turn
        self.tokens_read = 0  # prompt tokens read, all jobs together (for monitoring and tests)
        self.tokens_generated = 0

    # ---- the asyncio side -------------------------------------------------

    @property
    def model_id(self):
        return self.backend.model_id

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rwkv-engine", daemon=True)
            self._thread.start()

    def stop(self):
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def zero_state(self):
        return self.backend.zero_state()

    async def read(self, state, tokens, snapshot_at=()):
        """Read `tokens` from `state` (None: the zero state).

        Returns (state after all tokens, {n: state after n tokens} for n in
        snapshot_at). The given state is never modified.
        """
        if not tokens:
            state = self.backend.copy_state(state) if state is not None else self.backend.zero_state()
            return state, {0: self.backend.copy_state(state)} if 0 in snapshot_at else {}
        job = self._submit(state, tokens, snapshot_at)
        kind, payload = await job.events.get()
        if kind == "error":
            raise payload
        return payload

    def generate(self, state, tokens, sampling, max_tokens, seed=None, snapshot_at=()):
        """Start a reply: read `tokens` (at least one) from `state`, then sample.

        Returns a Generation, an async iterator of the visible reply text
        (cumulative, re-sent as it grows) whose `reply` is set at the end.
        """
        if not tokens:
            raise ValueError("a reply needs at least one token to read")
        sampler = Sampler(sampling, self._banned, seed)
        job = self._submit(state, tokens, snapshot_at, sampler=sampler, max_tokens=max_tokens)
        return Generation(self, job)

    def _submit(self, state, tokens, snapshot_at, **kwargs):
        """Queue a job. Its state is only read (copied into the batch), never changed."""
        self.start()
        job = Job(
            id=next(self._ids), tokens=list(tokens), state=state, snapshot_at=frozenset(snapshot_at),
            loop=asyncio.get_running_loop(), events=asyncio.Queue(), **kwargs,
        )
        if 0 in job.snapshot_at:
            job.snapshots[0] = self.backend.copy_state(state) if state is not None else self.backend.zero_state()
        if job.sampler is not None:
            job.decoder = self.tokenizer.stream()
        self._inbox.put(job)
        return job

    def cancel(self, job):
        job.cancelled = True
        self._inbox.put(None)  # wake the loop if it is idle

    # ---- the engine thread ------------------------------------------------

    def _run(self):
        batch = self.backend.new_batch()
        members = {}  # job id -> job: the jobs whose state is in the batch, oldest first
        waiting = collections.deque()  # admitted jobs waiting for room in the batch
        while not self._stopping:
            self._admit(waiting, block=not members and not waiting)
            for job in [j for j in members.values() if j.cancelled]:
                del members[job.id]
                batch.discard(job.id)
            while waiting and len(members) < self.max_batch:
                job = waiting.popleft()
                if not job.cancelled:
                    batch.add(job.id, job.state)
                    members[job.id] = job
            if members:
                try:
                    self._turn(batch, members)
                except Exception as exc:  # noqa: BLE001 - reported to the waiting requests
                    # The pass was shared: every job in it fails (and its batch
                    # goes), never the engine, which serves the next jobs.
                    logger.exception("engine step failed")
                    for job in members.values():
                        self._emit(job, "error", exc)
                    members.clear()
                    batch = self.backend.new_batch()
            self._flush()

    def _admit(self, waiting, block):
        try:
            item = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _turn(self, batch, members):
        """One forward pass for every job in the batch: the next token of each
        reply, the next chunk of each prompt (see _read_sizes), the closing
        tokens of replies that ended."""
        sizes = self._read_sizes([job for job in members.values() if job.reading])
        feed = {}
        for key in batch.keys():
            job = members[key]
            feed[key] = job.tokens[job.read:job.read + sizes[key]] if job.reading else job.generated[-1:]
        self._set_threads(sum(sizes.values()))
        logits = batch.step(feed)
        sampling, rows, leaving = [], [], []
        for row, (key, tokens) in enumerate(feed.items()):
            job = members[key]
            if job.reading:
                job.read += len(tokens)
                self.tokens_read += len(tokens)
                if job.read in job.snapshot_at:
                    job.snapshots[job.read] = batch.state(key)
                if job.reading:
                    continue
                if job.sampler is None or job.finish_reason is not None:  # all read, nothing to sample
                    leaving.append(job)
                    continue
            sampling.append(job)
            rows.append(row)
        if sampling:
            if len(rows) < len(feed):
                logits = logits[rows]
            for job, token in zip(sampling, sample_batch([job.sampler for job in sampling], logits)):
                self._accept(job, token)
        for job in leaving:
            del members[job.id]
            job.state = batch.remove(job.id)
            self._finish(job)

    def _set_threads(self, prompt_tokens):
        """Decode steps run on `threads` CPU threads, passes that read many
        prompt tokens (compute-bound, and the streams are mostly waiting on
        them) on `prefill_threads`."""
        wanted = self.prefill_threads if prompt_tokens >= WIDE_PASS_TOKENS else self.threads
        if wanted and wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)

    def _read_sizes(self, readers):
        """How many tokens each reading job (oldest first) reads this turn.

        The prompts share one chunk (prefill_chunk tokens): each gets a few
        (READ_FLOOR, less when that would exceed the chunk) so that none
        waits behind another's long prompt, and the rest of the chunk goes
        to the oldest first, so that when many users arrive at once they
        get their first tokens one after another instead of all at the end.
        A read also stops at the job's next snapshot point.
        """
        if not readers:
            return {}
        floor = min(READ_FLOOR, max(1, self.prefill_chunk // len(readers)))
        spare = max(0, self.prefill_chunk - floor * len(readers))
        sizes = {}
        for job in readers:
            size = min(self._next_stop(job) - job.read, floor + spare)
            spare -= max(0, size - floor)
            sizes[job.id] = size
        return sizes

    @staticmethod
    def _next_stop(job):
        """Where a job's reading stops next: its end or its next snapshot point."""
        return min([n for n in job.snapshot_at if job.read < n < len(job.tokens)] + [len(job.tokens)])

    def _accept(self, job, token):
        """Record a sampled token, stream the text, and decide whether the reply ends.

        An ended reply still reads its last token, and "\n\n" after a cut one,
        so that the next round starts cleanly; then it leaves the batch.
        """
        job.generated.append(token)
        job.decoder.push(token)
        self.tokens_generated += 1
        if TURN_END in job.decoder.raw:
            job.finish_reason = FinishReason.STOP
        elif len(job.generated) >= job.max_tokens:
            job.finish_reason = FinishReason.LENGTH
        self._emit(job, "text", visible_text(job.decoder, final=job.finish_reason is not None))
        if job.finish_reason is not None:
            job.tokens, job.read, job.snapshot_at = [token] + self._closing(job), 0, frozenset()

    def _closing(self, job):
        return self.turn_end_tokens if job.finish_reason is FinishReason.LENGTH else []

    def _finish(self, job):
        if job.sampler is None:
            self._emit(job, "done", (job.state, job.snapshots))
            return
        tokens = job.generated + self._closing(job)
        text = visible_text(job.decoder, final=True)
        self._emit(job, "done", Reply(tokens, text, job.state, job.snapshots, job.finish_reason))

    def _emit(self, job, kind, payload):
        """Queue an event for a job's request; sent with the others at the end of the turn."""
        self._outbox.setdefault(job.loop, []).append((job, (kind, payload)))

    def _flush(self):
        """Hand the turn's events to their event loops: one wake-up per loop, not per token."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(deliver, items)
            except RuntimeError:  # the requests' event loop is gone
                for job, _ in items:
                    job.cancelled = True


def deliver(items):
    """On the event loop: put each event into its job's queue."""
    for job, event in items:
        job.events.put_nowait(event)


def visible_text(decoder, final):
    """The reply as shown: what comes before the first blank line, stripped."""
    text = decoder.finish() if final else decoder.text
    cut = text.find("\n\n")
    return (text if cut < 0 else text[:cut]).strip()


class Generation:
    """A reply in progress, seen from asyncio: iterate for text, then read `reply`."""

    def __init__(self, engine, job):
        self._engine = engine
        self._job = job
        self.reply = None

    def __aiter__(self):
        return self._texts()

    async def _texts(self):
        events = self._job.events
        while True:
            kind, payload = await events.get()
            # Frames are cumulative: when the client fell behind, the newest text says it all.
            while kind == "text" and not events.empty():
                next_kind, next_payload = events.get_nowait()
                if next_kind != "text":
                    yield payload
                kind, payload = next_kind, next_payload
            if kind == "text":
                yield payload
            elif kind == "done":
                self.reply = payload
                return
            else:
                raise payload

    def cancel(self):
        """Stop generating (the client went away); the engine frees the reply."""
        self._engine.cancel(self._job)
