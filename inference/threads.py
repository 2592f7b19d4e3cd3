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
"""

import ctypes
import dataclasses
import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)

# A pass reading at least this many prompt tokens is a wide one.
WIDE_PASS_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class ThreadPolicy:
    decode: int = 0  # threads for decode steps (0: leave torch's setting alone)
    wide: int = 0  # threads for passes reading >= wide_pass_tokens prompt tokens (0: as decode)
    wide_pass_tokens: int = WIDE_PASS_TOKENS

    @classmethod
    def for_machine(cls, decode=0, wide=0):
        """Every core for decode steps and wide passes, unless configured."""
        cores = os.cpu_count() or 2
        return cls(decode=decode or cores, wide=wide or cores)

    def apply(self, prompt_tokens):
        """Set torch's thread count for a pass reading `prompt_tokens` prompt tokens."""
        wanted = (self.wide or self.decode) if prompt_tokens >= self.wide_pass_tokens else self.decode
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
