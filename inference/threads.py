"""How many CPU threads torch's operations get: the engine's thread policy.

Only the engine thread runs torch operations on several cores. PyTorch's
CPU parallelism is OpenMP, and every thread that runs one parallel
operation gets a team of OpenMP worker threads of its own, for good; once
a process holds more OpenMP threads than the machine has cores, OpenMP's
workers stop spinning between parallel regions and sleep, so each of the
hundreds of parallel operations in a forward pass waits for a wake-up
(measured on 2 cores, 32 rows with 2 threads: 385 tok/s in a process
where only one thread ever ran parallel work, 185-240 in one where a
second thread had). So the thread that loads the model and the threads
that encode and decode states (`serial_thread`) run theirs on one core.

Decode steps get every core by default (on 2 cores, in the live server
with the benchmark client beside it, 256-token replies: 1 user 63.5 tok/s
with 2 threads and 47.6 with 1, 32 users 259.5 and 235.9). `RPSERVER_THREADS` sets fewer, e.g. to
keep a core for the event loop on a machine where it is busy. A pass that
reads many prompt tokens is compute-bound: it gets every core too.

A shared machine: the cores other processes keep busy are left to them
(RPSERVER_ADAPT_THREADS, on by default). Each of a pass's hundreds of
parallel regions ends at a barrier that waits for every thread of the team;
a worker that shares its core with a busy process gets the core only when
the scheduler gives it a turn (milliseconds), so every region waits that
long (on 2 cores with one `while True: pass` beside the server, 8 users fell
from 531 to 5.9 tok/s). So the engine measures, at most every
`CpuShare.interval` seconds, how many cores the rest of the machine used
(/proc/stat less this process's own CPU time) and runs its passes on the
cores left, at least one: a pass on one thread has no barrier to wait at.
"""

import ctypes
import dataclasses
import functools
import logging
import os
import time

import torch

logger = logging.getLogger(__name__)

# A pass reading at least this many prompt tokens is a wide one.
WIDE_PASS_TOKENS = 64


def busy_ticks():
    """Clock ticks all CPUs spent busy since boot (/proc/stat: all but idle and iowait); None off Linux."""
    try:
        with open("/proc/stat", "rb") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - fields[4]


class CpuShare:
    """How many cores the rest of the machine keeps busy: all CPUs' busy time
    less this process's own, over the last `interval` seconds or more."""

    TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, interval=0.5):
        self.interval = interval
        self._last = None  # (monotonic time, busy ticks, own CPU seconds)
        self.others = 0.0

    def update(self, now=None):
        """Measure again if `interval` has passed; the cores others used (0 where it cannot be measured)."""
        now = time.monotonic() if now is None else now
        if self._last is not None and now - self._last[0] < self.interval:
            return self.others
        ticks = busy_ticks()
        if ticks is None:
            return self.others
        own = sum(os.times()[:2])
        if self._last is not None:
            elapsed = now - self._last[0]
            busy = (ticks - self._last[1]) / self.TICKS_PER_SECOND - (own - self._last[2])
            self.others = max(0.0, busy / elapsed)
        self._last = (now, ticks, own)
        return self.others


@dataclasses.dataclass(frozen=True)
class ThreadPolicy:
    decode: int = 0  # threads for decode steps (0: leave torch's setting alone)
    wide: int = 0  # threads for passes reading >= wide_pass_tokens prompt tokens (0: as decode)
    wide_pass_tokens: int = WIDE_PASS_TOKENS
    share: CpuShare | None = None  # when set, the cores others keep busy are left to them
    cores: int = 0

    @classmethod
    def for_machine(cls, decode=0, wide=0, adapt=True):
        """Every core for decode steps and wide passes, unless configured; with `adapt`, only the cores
        the rest of the machine leaves free."""
        cores = os.cpu_count() or 2
        return cls(decode=decode or cores, wide=wide or cores, share=CpuShare() if adapt else None, cores=cores)

    def threads_for(self, prompt_tokens):
        """The threads for a pass reading `prompt_tokens` prompt tokens (0: leave torch's setting alone)."""
        wanted = (self.wide or self.decode) if prompt_tokens >= self.wide_pass_tokens else self.decode
        if wanted > 1 and self.share is not None:
            # A core counts as taken once others use more than half of it (the benchmark's own client,
            # ~a quarter of a core, leaves both to the engine; one busy process takes one).
            free = self.cores - int(self.share.update() + 0.5)
            wanted = max(1, min(wanted, free))
        return wanted

    def apply(self, prompt_tokens):
        """Set torch's thread count for a pass reading `prompt_tokens` prompt tokens."""
        wanted = self.threads_for(prompt_tokens)
        if wanted and wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)


@functools.cache
def _openmp():
    """The OpenMP runtime torch runs on (a thread's own setting is reachable only through it), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line})
    except OSError:
        paths = []
    for path in paths or ["libgomp.so.1"]:
        try:
            runtime = ctypes.CDLL(path)
            runtime.omp_set_num_threads.argtypes = [ctypes.c_int]
            return runtime
        except (OSError, AttributeError):
            continue
    logger.info("no OpenMP runtime found: helper threads keep torch's thread count")
    return None


def serial_thread():
    """Make the calling thread run torch operations on one core, leaving every other thread's setting alone.

    (torch.set_num_threads would also change the default that threads
    starting later take, and the engine's.)
    """
    torch.get_num_threads()  # torch sets a thread's OpenMP count on its first use: let it happen first
    runtime = _openmp()
    if runtime is not None:
        runtime.omp_set_num_threads(1)
