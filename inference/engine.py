"""The inference engine: one thread owns the model and serves everyone.

Requests hand the engine jobs (tokens to read from a start state, and for a
reply, sampling settings) and get events back through an asyncio queue, so
the event loop never waits on the model. Every turn of the engine loop:

1. admit new jobs and drop cancelled ones (a client that disconnected);
2. advance every waiting prompt together, in one batched read of at most one
   chunk's worth of tokens (RPSERVER_PREFILL_CHUNK), so a long prompt never
   stalls the replies being streamed and new users do not queue behind each other;
3. decode one token for every reply in progress, all in one batched step.

A job can ask for snapshots: copies of its state after a given number of
its tokens were read (a reply keeps the state just before the last prompt
token, from which it can be regenerated later).

The engine knows nothing of HTTP, Django or users.
"""

import asyncio
import dataclasses
import enum
import itertools
import logging
import queue
import threading
from typing import Any


from .sampling import Sampler, banned_tokens, sample_batch

logger = logging.getLogger(__name__)

TURN_END = b"\n\n"


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
    state: Any
    snapshot_at: frozenset
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    sampler: Sampler | None = None  # None: read only
    max_tokens: int = 0
    read: int = 0
    logits: Any = None
    snapshots: dict = dataclasses.field(default_factory=dict)
    generated: list = dataclasses.field(default_factory=list)
    decoder: Any = None
    finish_reason: FinishReason | None = None
    cancelled: bool = False

    @property
    def reading(self):
        return self.read < len(self.tokens)

    @property
    def ready(self):
        """A reply whose prompt is read, waiting to sample its first token."""
        return self.logits is not None and self.sampler is not None and not self.reading


class Engine:
    """Owns a backend (the loaded model) and runs its jobs on one thread."""

    def __init__(self, backend, tokenizer, prefill_chunk=64, max_batch=32):
        self.backend = backend
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.max_batch = max_batch
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
        self.start()
        if state is None:
            state = self.backend.zero_state()
        job = Job(
            id=next(self._ids), tokens=list(tokens), state=self.backend.copy_state(state),
            snapshot_at=frozenset(snapshot_at), loop=asyncio.get_running_loop(),
            events=asyncio.Queue(), **kwargs,
        )
        if 0 in job.snapshot_at:
            job.snapshots[0] = self.backend.copy_state(state)
        if job.sampler is not None:
            job.decoder = self.tokenizer.stream()
        self._inbox.put(job)
        return job

    def cancel(self, job):
        job.cancelled = True
        self._inbox.put(None)  # wake the loop if it is idle

    # ---- the engine thread ------------------------------------------------

    def _run(self):
        active = []  # jobs in arrival order
        batch = self.backend.new_batch()
        while not self._stopping:
            self._admit(active, block=not active)
            for job in [j for j in active if j.cancelled]:
                active.remove(job)
                batch.discard(job.id)
            # Replies that just ended read their last token; then every waiting
            # prompt advances together, in one batched read of one chunk's worth.
            for job in [j for j in active if j.reading and j.finish_reason is not None]:
                self._guard([job], active, batch, self._read_together, [job], active, self.prefill_chunk)
            readers = [j for j in active if j.reading and j.finish_reason is None][:self.max_batch]
            if readers:
                share = max(1, self.prefill_chunk // len(readers))
                self._guard(readers, active, batch, self._read_together, readers, active, share)
            for job in [j for j in active if j.ready and j.id not in batch]:
                if len(batch) >= self.max_batch:
                    break
                self._guard([job], active, batch, self._join, job, batch)
            decoding = [j for j in active if j.id in batch]
            if decoding:
                self._guard(decoding, active, batch, self._decode_step, decoding, batch)
            self._flush()

    def _admit(self, active, block):
        try:
            item = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    active.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _guard(self, jobs, active, batch, step, *args):
        """Run one step; a failure fails the jobs in it, never the engine."""
        try:
            step(*args)
        except Exception as exc:  # noqa: BLE001 - reported to the waiting requests
            logger.exception("engine step failed")
            for job in jobs:
                if job in active:
                    active.remove(job)
                batch.discard(job.id)
                self._emit(job, "error", exc)

    def _read_together(self, jobs, active, limit):
        """Read the same number (at most `limit`) of next tokens for several jobs
        in one batched forward, stopping at the first snapshot point among them."""
        count = min(self._next_stop(job, limit) - job.read for job in jobs)
        logits, states = self.backend.read_batch(
            [job.tokens[job.read:job.read + count] for job in jobs], [job.state for job in jobs])
        for job, row, state in zip(jobs, logits, states):
            job.logits, job.state = row, state
            job.read += count
            self.tokens_read += count
            if job.read in job.snapshot_at:
                job.snapshots[job.read] = self.backend.copy_state(job.state)
            if not job.reading and (job.sampler is None or job.finish_reason is not None):
                active.remove(job)
                self._finish(job)

    @staticmethod
    def _next_stop(job, limit):
        """Where a job's next read ends: `limit` tokens on, its end, or a snapshot point."""
        end = min(job.read + limit, len(job.tokens))
        return min([n for n in job.snapshot_at if job.read < n < end] + [end])

    def _join(self, job, batch):
        """A reply whose prompt is read samples its first token and joins the batch."""
        token = job.sampler.sample(job.logits)
        job.logits = None
        self._accept(job, token)
        if job.finish_reason is None:
            batch.add(job.id, job.state)
        else:
            self._close(job)

    def _decode_step(self, jobs, batch):
        """One token for every reply in the batch; ended replies leave it at once."""
        logits = batch.step({job.id: job.generated[-1] for job in jobs})
        tokens = sample_batch([job.sampler for job in jobs], logits)
        for job, token in zip(jobs, tokens):
            self._accept(job, token)
            if job.finish_reason is not None:
                job.state = batch.remove(job.id)
                self._close(job)

    def _accept(self, job, token):
        """Record a sampled token, stream the text, and decide whether the reply ends."""
        job.generated.append(token)
        job.decoder.push(token)
        self.tokens_generated += 1
        if TURN_END in job.decoder.raw:
            job.finish_reason = FinishReason.STOP
        elif len(job.generated) >= job.max_tokens:
            job.finish_reason = FinishReason.LENGTH
        self._emit(job, "text", visible_text(job.decoder, final=job.finish_reason is not None))

    def _close(self, job):
        """An ended reply still reads its last token, and "\n\n" after a cut one,
        so that the next round starts cleanly."""
        job.tokens = [job.generated[-1]] + self._closing(job)
        job.read = 0
        job.snapshot_at = frozenset()

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
