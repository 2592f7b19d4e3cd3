"""The inference engine: one thread owns the model and serves everyone.

Requests hand the engine jobs (tokens to read from a start state, and for a
reply, sampling settings) and get events back through an asyncio queue, so
the event loop never waits on the model.

Every job in progress has a row in one batch (up to max_batch jobs; later
ones wait for a row), and every step of the engine loop is one forward pass
over the whole batch, whatever each job is doing (its JobStatus):

* a reply being generated feeds its last sampled token and samples the next;
* a prompt being read feeds its next chunk: the waiting prompts share one
  chunk's worth of tokens per step (RPSERVER_PREFILL_CHUNK), oldest first
  with a few tokens for each, so a long prompt never stalls the replies being
  streamed nor the other prompts, and a new reply reads its prompt alongside
  the others' decoding instead of taking turns with them;
* a reply that just ended feeds its last token (cut at the blank line or
  stop string that ended it) and the closing "\n\n" it still needs, then
  leaves the batch with its final state.

The weights are read once per step for all of it (decoding a small model is
bound by memory bandwidth, so one pass for many rows costs little more than
for one). Sampling settings stay per reply; sampling is batched per step.

A job can ask for snapshots: copies of its state after a given number of
its tokens were read (a reply keeps the state just before the last prompt
token, from which it can be regenerated later). The forward pass takes
them as it reads past them, so they cost no pass of their own.

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
import time
from typing import Any

from . import replytext
from .sampling import Sampler, banned_tokens, sample_batch
from .threads import ThreadPolicy

logger = logging.getLogger(__name__)

# Every prompt being read gets at least this many tokens per step (see Engine._read_sizes).
READ_FLOOR = 8


class FinishReason(enum.Enum):
    STOP = "stop"  # the model ended its turn with a blank line, or wrote a stop string
    LENGTH = "length"  # the reply reached its token limit; "\n\n" was read after it


@dataclasses.dataclass
class Reply:
    """What a finished reply hands back to be stored.

    `tokens` always ends exactly at a blank line, so that the context keeps
    the documented format: a reply that ended with a blank line ends at its
    first "\n\n" (a last token that holds more, e.g. "\n\n   ", is replaced
    by the tokens of its bytes up to the blank line before it is read); one
    that wrote a stop string ends at the end of the stop string (the tokens
    before it were already read), then "\n\n"; one cut at the limit gets
    "\n\n" after its last token.
    """

    tokens: list  # every token the model read after the prompt, closing "\n\n" included
    text: str  # the reply as shown: decoded up to the first blank line or stop string, stripped
    state: Any  # the state after `tokens`
    snapshots: dict  # {tokens read: state} as asked for by the job
    finish_reason: FinishReason


class JobStatus(enum.IntEnum):
    """Where a job is. The finished states come last: `status.finished`."""

    WAITING = 0  # queued, or waiting for a row in the batch
    READING = 1  # reading its tokens (a prompt; for a read job, everything it was given)
    GENERATING = 2  # a reply: each step reads its last sampled token and samples the next
    CLOSING = 3  # a reply that ended: reading its last token (cut, see Reply) and the closing "\n\n"
    FINISHED = 4  # its result was sent
    ABORTED = 5  # its request went away (or the event loop did); nothing was sent
    FAILED = 6  # its pass failed; the error was sent

    @property
    def finished(self):
        return self >= JobStatus.FINISHED


@dataclasses.dataclass
class Job:
    id: int
    tokens: list  # to read, in order
    state: Any  # where the job starts (None: the zero state); once finished, where it ended
    snapshot_at: frozenset
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    sampler: Sampler | None = None  # None: read only
    max_tokens: int = 0
    stop: tuple = ()  # stop strings, as UTF-8 bytes
    status: JobStatus = JobStatus.WAITING
    read: int = 0  # of `tokens`
    snapshots: dict = dataclasses.field(default_factory=dict)
    generated: list = dataclasses.field(default_factory=list)  # the reply's tokens so far (the last one unread)
    decoder: Any = None
    finish_reason: FinishReason | None = None
    text_end: int = -1  # once it ended with STOP: where the shown text ends in decoder.raw
    closing: list = dataclasses.field(default_factory=list)  # once it ended: the tokens read after `generated`
    unread: list = dataclasses.field(default_factory=list)  # CLOSING: what it still reads before it leaves
    # A reply with n choices: the other n - 1 replies, which start from this job's state once it has
    # read its tokens (one read of the prompt, forked into n rows of the batch).
    forks: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Abort:
    """An inbox message: drop this job (its request went away)."""

    job_id: int


class Engine:
    """Owns a backend (the loaded model) and runs its jobs on one thread.

    One step of the engine loop is three calls: schedule (what each job in
    the batch reads in this pass), execute (one forward pass), update
    (advance each job, sample the replies' next tokens, emit text, finish).
    New jobs and aborts come through one inbox and are applied between steps.
    """

    def __init__(self, backend, tokenizer, prefill_chunk=64, max_batch=32, thread_policy=None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.max_batch = max_batch
        self.thread_policy = thread_policy or ThreadPolicy()  # default: torch's thread count left alone
        self.turn_end_tokens = tokenizer.encode("\n\n")
        self._banned = banned_tokens(tokenizer, backend.vocab_size)
        self._inbox = queue.Queue()  # Job, Abort or None (wake up)
        self._ids = itertools.count(1)
        self._thread = None
        self._stopping = False
        self._outbox = {}  # event loop -> [(job, event)], flushed once per engine step
        # Counters for stats(), written by the engine thread only.
        self.tokens_read = 0  # prompt tokens read, all jobs together
        self.tokens_generated = 0
        self.steps = 0  # forward passes
        self.rows = 0  # rows of all forward passes (/ steps: the average batch)
        self.pass_seconds = 0.0  # time in forward passes
        self.step_seconds = 0.0  # time in whole steps: the pass, sampling, emitting, finishing
        self.last_batch_size = 0
        # The step's pass, published with the step under _counters, so that stats() (another thread)
        # never sees half a step: a pass counted but not its rows, or its time but not its step's.
        self._counters = threading.Lock()
        self._pass = None  # (rows, seconds) of this step's forward pass, until the step ends
        self._running = 0
        self._waiting = 0

    def stats(self):
        """A snapshot of the engine's load and counters (for /metrics and tests).

        running: jobs in the batch; waiting: jobs waiting for a row (or not
        yet picked up); steps: forward passes so far; last_batch_size: rows
        of the latest pass; tokens_read / tokens_generated, rows (of all
        passes), pass_seconds and step_seconds (time in forward passes, and
        in whole steps): cumulative.
        """
        with self._counters:
            return self._stats()

    def _stats(self):
        return {
            "running": self._running,
            "waiting": self._waiting + self._inbox.qsize(),
            "steps": self.steps,
            "rows": self.rows,
            "pass_seconds": self.pass_seconds,
            "step_seconds": self.step_seconds,
            "last_batch_size": self.last_batch_size,
            "tokens_read": self.tokens_read,
            "tokens_generated": self.tokens_generated,
            "max_batch": self.max_batch,
        }

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

    def generate(self, state, tokens, sampling, max_tokens, seed=None, snapshot_at=(), stop=(), logit_bias=None,
                 history=(), top_logprobs=None):
        """Start a reply: read `tokens` (at least one) from `state`, then sample.

        The reply ends at its first blank line, at the first of the `stop`
        strings it writes (its text is cut before it; finish reason STOP), or
        after `max_tokens` tokens (LENGTH). Returns a Generation, an async
        iterator of the visible reply text (cumulative, re-sent as it grows;
        text that may be the start of a stop string is held back) whose
        `reply` is set at the end. `logit_bias` ({token id: value}) is added
        to the logits before sampling. `history`: the tokens before `tokens`
        (the prompt's), for the samplers that look back (DRY, a penalty
        window). With `top_logprobs` (a count), each sampled token's log
        probability and the most likely ones' come with the text
        (Generation.logprobs).
        """
        return self.generate_choices(1, state, tokens, sampling, max_tokens, seed=seed, snapshot_at=snapshot_at,
                                     stop=stop, logit_bias=logit_bias, history=history,
                                     top_logprobs=top_logprobs)[0]

    def generate_choices(self, n, state, tokens, sampling, max_tokens, seed=None, snapshot_at=(), stop=(),
                         logit_bias=None, history=(), top_logprobs=None):
        """n replies to one prompt (generate's arguments): the prompt is read once, and its state
        forked into n rows of the batch. Returns n Generations; the first holds the snapshots (the
        others share them). With a seed, choice i draws from seed + i."""
        if not tokens:
            raise ValueError("a reply needs at least one token to read")
        if logit_bias and not all(0 <= int(t) < self.backend.vocab_size for t in logit_bias):
            raise ValueError(f"logit_bias names a token outside the vocabulary (0-{self.backend.vocab_size - 1})")
        stop = replytext.stop_strings(stop)
        history = list(history) + list(tokens)
        samplers = [Sampler(sampling, self._banned, None if seed is None else (seed + i) % 2**64, logit_bias,
                            history=history, top_logprobs=top_logprobs) for i in range(n)]
        forks = [self._job(state, tokens, (), sampler=sampler, max_tokens=max_tokens, stop=stop)
                 for sampler in samplers[1:]]
        job = self._job(state, tokens, snapshot_at, sampler=samplers[0], max_tokens=max_tokens, stop=stop,
                        forks=forks)
        self._inbox.put(job)
        return [Generation(self, each) for each in [job, *forks]]

    def _submit(self, state, tokens, snapshot_at, **kwargs):
        """Queue a job. Its state is only read (copied into the batch), never changed."""
        job = self._job(state, tokens, snapshot_at, **kwargs)
        self._inbox.put(job)
        return job

    def _job(self, state, tokens, snapshot_at, **kwargs):
        self.start()
        job = Job(
            id=next(self._ids), tokens=list(tokens), state=state, snapshot_at=frozenset(snapshot_at),
            loop=asyncio.get_running_loop(), events=asyncio.Queue(), **kwargs,
        )
        if job.sampler is not None:
            job.decoder = self.tokenizer.stream()
        return job

    def cancel(self, job):
        """Drop a job (its request went away); the engine frees its row between steps."""
        self._inbox.put(Abort(job.id))

    # ---- the engine thread ------------------------------------------------

    def _run(self):
        batch = self.backend.new_batch()
        members = {}  # job id -> job: the jobs whose state is in the batch, oldest first
        waiting = collections.deque()  # admitted jobs waiting for room in the batch
        while not self._stopping:
            self._take_inbox(batch, members, waiting, block=not members and not waiting)
            while waiting and len(members) < self.max_batch:
                job = waiting.popleft()
                batch.add(job.id, job.state)
                if 0 in job.snapshot_at:  # its start state: copied here, not on the event loop
                    job.snapshots[0] = batch.state(job.id)
                job.status = JobStatus.READING
                members[job.id] = job
            self._running, self._waiting = len(members), len(waiting)
            started, stepped = time.perf_counter(), bool(members)
            if members:
                try:
                    self._step(batch, members)
                except Exception as exc:  # noqa: BLE001 - reported to the waiting requests
                    # The pass was shared: every job in it fails (and its batch
                    # goes), never the engine, which serves the next jobs.
                    logger.exception("engine step failed")
                    for job in members.values():
                        for each in [job, *job.forks]:
                            each.status = JobStatus.FAILED
                            self._emit(each, "error", exc)
                    members.clear()
                    batch = self.backend.new_batch()
            self._running, self._waiting = len(members), len(waiting)
            if stepped:  # before the step's events go out: who they wake finds the step counted
                self._publish_step(time.perf_counter() - started)
            flushing = time.perf_counter()
            self._flush()
            if stepped:
                with self._counters:
                    self.step_seconds += time.perf_counter() - flushing

    def _publish_step(self, seconds):
        """The ended step's counters, all at once (see _counters); its events not yet sent."""
        with self._counters:
            self.step_seconds += seconds
            if self._pass is not None:
                rows, pass_seconds = self._pass
                self.pass_seconds += pass_seconds
                self.steps += 1
                self.rows += rows
                self.last_batch_size = rows
        self._pass = None

    def _take_inbox(self, batch, members, waiting, block):
        """New jobs join the queue for a row; aborted ones leave wherever they are."""
        try:
            item = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
            while True:
                if isinstance(item, Job):
                    waiting.append(item)
                elif isinstance(item, Abort):
                    self._abort(item.job_id, batch, members, waiting)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    @staticmethod
    def _abort(job_id, batch, members, waiting):
        job = members.pop(job_id, None)
        if job is not None:
            batch.discard(job_id)
        else:
            job = next((j for j in waiting if j.id == job_id), None)
            if job is None:
                # Perhaps a choice not yet forked from its first (it never will be), else already finished.
                job = next((fork for j in [*members.values(), *waiting] for fork in j.forks if fork.id == job_id),
                           None)
                if job is None:
                    return
            else:
                waiting.remove(job)
        job.status = JobStatus.ABORTED

    def _step(self, batch, members):
        feed, snapshot_after, prompt_tokens = self._schedule(batch, members)
        logits, snapshots = self._execute(batch, feed, snapshot_after, prompt_tokens)
        self._update(batch, members, feed, logits, {key: (snapshot_after[key], state)
                                                    for key, state in snapshots.items()})

    def _schedule(self, batch, members):
        """What each job reads in this pass, in the batch's row order: the next
        chunk of a prompt (see _read_sizes), a reply's last sampled token, an
        ended reply's last tokens. Returns ({key: tokens}, {key: n} for the
        reads that pass a snapshot point n tokens in, prompt tokens in it)."""
        sizes = self._read_sizes([job for job in members.values() if job.status is JobStatus.READING])
        feed, snapshot_after = {}, {}
        for key in batch.keys():
            job = members[key]
            if job.status is JobStatus.READING:
                feed[key] = job.tokens[job.read:job.read + sizes[key]]
                ahead = self._snapshots_ahead(job)
                if ahead and ahead[0] < job.read + sizes[key]:  # at most one (_next_stop)
                    snapshot_after[key] = ahead[0] - job.read
            elif job.status is JobStatus.GENERATING:
                feed[key] = job.generated[-1:]
            else:  # CLOSING
                feed[key] = job.unread
        return feed, snapshot_after, sum(sizes.values())

    def _execute(self, batch, feed, snapshot_after, prompt_tokens):
        """One forward pass: (logits [rows, vocab] after each job's tokens, {key: snapshot state})."""
        self.thread_policy.apply(prompt_tokens)
        started = time.perf_counter()
        logits, snapshots = batch.step(feed, snapshot_after)
        self._pass = (len(feed), time.perf_counter() - started)  # published when the step ends
        return logits, snapshots

    def _update(self, batch, members, feed, logits, snapshots):
        """Advance every job by what it read: snapshots (those taken inside the
        pass, {key: (tokens in, state)}, and one at the end of a read), the next
        token of each reply (sampled together), and the jobs that are done leave."""
        sampling, rows, leaving = [], [], []
        for row, (key, tokens) in enumerate(feed.items()):
            job = members[key]
            if job.status is JobStatus.READING:
                if key in snapshots:
                    offset, state = snapshots[key]
                    job.snapshots[job.read + offset] = state
                job.read += len(tokens)
                self.tokens_read += len(tokens)
                if job.read in job.snapshot_at:
                    job.snapshots[job.read] = batch.state(key)
                if job.read < len(job.tokens):
                    continue
                if job.sampler is None:
                    leaving.append(job)
                    continue
                job.status = JobStatus.GENERATING
                for fork in self._fork(batch, members, job):  # its other choices sample from the same logits
                    sampling.append(fork)
                    rows.append(row)
            elif job.status is JobStatus.CLOSING:
                leaving.append(job)
                continue
            sampling.append(job)
            rows.append(row)
        if sampling:
            if rows != list(range(len(feed))):
                logits = logits[rows]
            for job, token in zip(sampling, sample_batch([job.sampler for job in sampling], logits)):
                self._accept(job, token)
        for job in leaving:
            del members[job.id]
            job.state = batch.remove(job.id)
            job.status = JobStatus.FINISHED
            self._finish(job)

    @staticmethod
    def _fork(batch, members, job):
        """A reply's other choices join the batch with a copy of its state after the prompt."""
        forks, job.forks = [fork for fork in job.forks if fork.status is JobStatus.WAITING], []
        for fork in forks:
            batch.add(fork.id, batch.state(job.id))
            fork.read, fork.snapshots, fork.status = len(fork.tokens), job.snapshots, JobStatus.GENERATING
            members[fork.id] = fork
        return forks

    def _read_sizes(self, readers):
        """How many tokens each reading job (oldest first) reads this step.

        The prompts share one chunk (prefill_chunk tokens): each gets a few
        (READ_FLOOR, fewer when that would take more than half the chunk) so
        that none waits behind another's long prompt, and the rest of the
        chunk goes to the oldest first, so that when many users arrive at
        once they get their first tokens one after another instead of all
        at the end. (With the whole chunk reserved, 32 users arriving at
        once with 17-token turns all waited for the third pass: first token
        p50 ~1.46 s against ~1.23 s with half of it, bench/throughput.py
        --users 32 --tokens 16, six runs each.)
        A read passes at most one of the job's snapshot points (taken inside
        the pass) and stops at the next.
        """
        if not readers:
            return {}
        floor = min(READ_FLOOR, max(1, self.prefill_chunk // (2 * len(readers))))
        spare = max(0, self.prefill_chunk - floor * len(readers))
        sizes = {}
        for job in readers:
            size = min(self._next_stop(job) - job.read, floor + spare)
            spare -= max(0, size - floor)
            sizes[job.id] = size
        return sizes

    @staticmethod
    def _snapshots_ahead(job):
        """The job's snapshot points still to be read past, in order."""
        return sorted(n for n in job.snapshot_at if job.read < n < len(job.tokens))

    @classmethod
    def _next_stop(cls, job):
        """Where a job's reading stops next: its end, or the second snapshot point ahead
        (a pass takes one snapshot inside a read; one at its end is the state after it)."""
        ahead = cls._snapshots_ahead(job)
        return ahead[1] if len(ahead) > 1 else len(job.tokens)

    def _accept(self, job, token):
        """Record a sampled token, stream the text, and decide whether the reply ends.

        An ended reply still reads its last token (cut where the reply ends,
        see Reply), and "\n\n" when it did not end with one, so that the
        next round starts cleanly; then it leaves the batch.
        """
        read = len(job.generated)  # every earlier sampled token has been read; this one is read next step
        job.generated.append(token)
        if job.sampler.logprobs is not None:
            self._emit(job, "logprobs", job.sampler.logprobs)
        job.decoder.push(token)
        self.tokens_generated += 1
        end = replytext.find_end(job.decoder.raw, len(self.tokenizer.pieces.get(token, b"")), job.stop)
        if end is not None:
            job.finish_reason = FinishReason.STOP
            job.text_end, keep, closed = end
            job.closing = [] if closed else self.turn_end_tokens
            raw = job.decoder.raw
            if keep < len(raw):
                # The last token holds more than the reply: read only its bytes up to the end.
                piece_start = len(raw) - len(self.tokenizer.pieces.get(token, b""))
                job.generated[read:] = self.tokenizer.encode_bytes(bytes(raw[piece_start:keep]))
        elif len(job.generated) >= job.max_tokens:
            job.finish_reason = FinishReason.LENGTH
            job.closing = self.turn_end_tokens
        self._emit(job, "text", self._shown_text(job))
        if job.finish_reason is not None:
            job.status = JobStatus.CLOSING
            job.unread = job.generated[read:] + job.closing

    def _shown_text(self, job):
        """The visible reply so far (replytext.shown_text)."""
        ended_at = job.text_end if job.finish_reason is FinishReason.STOP else None
        return replytext.shown_text(job.decoder, job.stop, ended_at, final=job.finish_reason is not None)

    def _finish(self, job):
        if job.sampler is None:
            self._emit(job, "done", (job.state, job.snapshots))
            return
        reply = Reply(job.generated + job.closing, self._shown_text(job), job.state, job.snapshots,
                      job.finish_reason)
        self._emit(job, "done", reply)

    def _emit(self, job, kind, payload):
        """Queue an event for a job's request; sent with the others at the end of the step."""
        self._outbox.setdefault(job.loop, []).append((job, (kind, payload)))

    def _flush(self):
        """Hand the step's events to their event loops: one wake-up per loop, not per token."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(deliver, items)
            except RuntimeError:  # the requests' event loop is gone
                for job, _ in items:
                    if not job.status.finished:
                        self._inbox.put(Abort(job.id))


def deliver(items):
    """On the event loop: put each event into its job's queue."""
    for job, event in items:
        job.events.put_nowait(event)


class Generation:
    """A reply in progress, seen from asyncio: iterate for text, then read `reply`."""

    def __init__(self, engine, job):
        self._engine = engine
        self._job = job
        self.reply = None
        # With top_logprobs: (token, logprob, [(token, logprob), ...]) for each sampled token so far,
        # as they come with the text.
        self.logprobs = []

    def __aiter__(self):
        return self._texts()

    async def _texts(self):
        events = self._job.events
        while True:
            kind, payload = await events.get()
            if kind == "logprobs":
                self.logprobs.append(payload)
                continue
            # Frames are cumulative: when the client fell behind, the newest text says it all.
            while kind == "text" and not events.empty():
                next_kind, next_payload = events.get_nowait()
                if next_kind == "logprobs":
                    self.logprobs.append(next_payload)
                    continue
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
