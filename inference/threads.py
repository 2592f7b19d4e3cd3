"""How many CPU threads a forward pass gets: the engine's thread policy.

Decode steps leave one core free for the event loop (streams, database,
JSON): with every core in PyTorch's pool, its worker threads and the loop
preempt each other and each step waits milliseconds (measured on 2 cores: 1
thread decodes one stream about 1.7x faster than 2; 16 users got 283-311
tok/s instead of 223-236). A pass that reads many prompt tokens is
compute-bound, and the streams are mostly waiting on it: it gets every core
(on 2 cores, prompts read about 1.5x faster).
"""

import dataclasses
import os

import torch

# A pass reading at least this many prompt tokens is a wide one.
WIDE_PASS_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class ThreadPolicy:
    decode: int = 0  # threads for decode steps (0: leave torch's setting alone)
    wide: int = 0  # threads for passes reading >= wide_pass_tokens prompt tokens (0: as decode)
    wide_pass_tokens: int = WIDE_PASS_TOKENS

    @classmethod
    def for_machine(cls, decode=0, wide=0):
        """cores - 1 for decode steps and every core for wide passes, unless configured."""
        cores = os.cpu_count() or 2
        return cls(decode=decode or max(1, cores - 1), wide=wide or cores)

    def apply(self, prompt_tokens):
        """Set torch's thread count for a pass reading `prompt_tokens` prompt tokens."""
        wanted = (self.wide or self.decode) if prompt_tokens >= self.wide_pass_tokens else self.decode
        if wanted and wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
