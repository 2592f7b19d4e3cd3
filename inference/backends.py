"""Backends: a loaded model behind the small interface the engine drives.

    zero_state() / copy_state(state)
    read(tokens, state) -> (logits [vocab] float32, new state)    one sequence
    read_batch(token_lists, states) -> (logits list, states list) several, same length
    new_batch() -> a decode batch: add(key, state), remove(key) -> state,
                   discard(key), step({key: token}) -> logits [B, vocab] in key order
    state_tensors(state) / state_from_tensors(tensors)             for storage

A state is whatever the backend keeps per sequence; for storage it becomes a
list of float32 tensors whose shapes are checked when it is read back.
"""

import logging
import os
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError, detect_version, fingerprint, load_weights, resolve_path

logger = logging.getLogger(__name__)


class SequentialBatch:
    """A decode batch that steps its sequences one after another.

    For models with no batched forward (the `rwkv` package): their decode
    steps still interleave, so every stream progresses together.
    """

    def __init__(self, backend):
        self.backend = backend
        self.states = {}

    def __len__(self):
        return len(self.states)

    def __contains__(self, key):
        return key in self.states

    def add(self, key, state):
        self.states[key] = state

    def remove(self, key):
        return self.states.pop(key)

    def discard(self, key):
        self.states.pop(key, None)

    def step(self, tokens):
        rows = []
        for key, token in tokens.items():
            row, self.states[key] = self.backend.read([token], self.states[key])
            rows.append(row)
        return torch.stack(rows)


class StackedBatch:
    """A decode batch for a batched model: one forward step for every sequence.

    The sequences' states live stacked along the batch dimension; they are
    re-stacked only when a sequence joins or leaves, not at every step.
    """

    def __init__(self, backend):
        self.backend = backend
        self.keys = []
        self.stacked = None
        self.joining = {}

    def __len__(self):
        return len(self.keys) - self.keys.count(None) + len(self.joining)

    def __contains__(self, key):
        return key in self.joining or key in self.keys

    def add(self, key, state):
        self.joining[key] = state

    def remove(self, key):
        """A leaving sequence's state; its row is dropped at the next restack, so
        several replies ending in one step cost one restack, not one each."""
        if key in self.joining:
            return self.joining.pop(key)
        row = self.keys.index(key)
        self.keys[row] = None
        return [t[row:row + 1].clone() for t in self.stacked]

    def discard(self, key):
        if key in self:
            self.remove(key)

    def _unstack(self):
        states = {}
        if self.stacked is not None:
            for key, state in zip(self.keys, self.backend.split_states(self.stacked)):
                if key is not None:
                    states[key] = state
        states.update(self.joining)
        self.joining = {}
        return states

    def _restack(self, states):
        self.keys = list(states)
        self.stacked = self.backend.stack_states(list(states.values())) if states else None

    def step(self, tokens):
        if self.joining or list(tokens) != self.keys:
            states = self._unstack()
            self._restack({key: states[key] for key in tokens})
        return self.backend.model.forward_one(
            torch.tensor(list(tokens.values()), dtype=torch.long, device=self.backend.device), self.stacked)


class Backend:
    """Shared parts: identity, state copies and the storage form of states."""

    model_id = ""
    version = 0
    vocab_size = 0
    description = ""

    def copy_state(self, state):
        return [t.clone() for t in state]

    def state_tensors(self, state):
        return [t.detach().to("cpu", torch.float32).contiguous() for t in state]

    def state_from_tensors(self, tensors):
        template = self.zero_state()
        if len(tensors) != len(template) or any(t.shape != z.shape for t, z in zip(tensors, template)):
            raise ValueError("the stored state does not fit this model")
        return [t.to(z.device, z.dtype) for t, z in zip(tensors, template)]

    def new_batch(self):
        return SequentialBatch(self)

    def read_batch(self, token_lists, states):
        """read() for several sequences with as many tokens each: (logits, states) lists."""
        results = [self.read(tokens, state) for tokens, state in zip(token_lists, states)]
        return [logits for logits, _ in results], [state for _, state in results]


class RwkvPackageBackend(Backend):
    """Any RWKV-4/5/6/7 checkpoint through the `rwkv` package (one sequence at a time)."""

    def __init__(self, path, strategy="cpu fp32", version=None, jit_on=True, cuda_on=False):
        path = resolve_path(path)
        weights = load_weights(path)
        self.version = version or detect_version(weights)
        self.model_id = fingerprint(weights)
        del weights
        model_class = self._import_model_class(jit_on, cuda_on)
        # The package appends ".pth" itself.
        self.model = model_class(str(path.with_suffix("")), strategy)
        self.vocab_size = self._probe_vocab_size()
        self.description = f"RWKV-{self.version} {path.name} via the rwkv package ({strategy})"

    def _import_model_class(self, jit_on, cuda_on):
        """The package picks RWKV-7 or RWKV-4/5/6 once, at import, from RWKV_V7_ON."""
        want_v7 = "1" if self.version == 7 else "0"
        if "rwkv.model" in sys.modules:
            module = sys.modules["rwkv.model"]
            if (module.RWKV.__name__ == "RWKV_x070") != (want_v7 == "1"):
                raise CheckpointError(
                    "the rwkv package was already loaded for another RWKV version in this process"
                )
            return module.RWKV
        os.environ["RWKV_V7_ON"] = want_v7
        os.environ["RWKV_JIT_ON"] = "1" if jit_on else "0"
        os.environ["RWKV_CUDA_ON"] = "1" if cuda_on else "0"
        from rwkv.model import RWKV

        return RWKV

    def _probe_vocab_size(self):
        logits, _ = self.read([1], self.zero_state())
        return logits.shape[-1]

    def zero_state(self):
        if self.version == 7:
            return self.model.generate_zero_state()
        # RWKV-4/5/6: the package builds the zero state inside its first forward.
        _, state = self.model.forward([0], None)
        return [torch.zeros_like(t) for t in state] if self.version != 4 else self._zero_state_v4(state)

    def _zero_state_v4(self, state):
        # RWKV-4 keeps a running max ("pp", 4th of 5 per layer) that starts at -1e30.
        zero = [torch.zeros_like(t) for t in state]
        for i in range(3, len(zero), 5):
            zero[i] -= 1e30
        return zero

    @torch.inference_mode()
    def read(self, tokens, state):
        state = self.copy_state(state)  # the package updates some state tensors in place
        logits, state = self.model.forward(list(tokens), state)
        return logits.float(), state


class Rwkv7Backend(Backend):
    """RWKV-7 through our own batched PyTorch forward (inference/rwkv7.py).

    A sequence's state is the model's state with batch size 1; stored, it is
    the same list of tensors as the rwkv package's RWKV-7 state (no batch
    dimension), so blobs are interchangeable between the two backends.
    """

    version = 7

    def __init__(self, path, strategy="cpu fp32"):
        from .rwkv7 import RWKV7Model

        path = resolve_path(path)
        self.device, precision = parse_strategy(strategy)
        weights = load_weights(path)
        self.model_id = fingerprint(weights)
        self.model = RWKV7Model(weights, device=self.device, precision=precision)
        del weights
        self.vocab_size = self.model.vocab_size
        self.description = f"RWKV-7 {path.name}, batched ({strategy})"

    def zero_state(self):
        return self.model.zero_state(1)

    @torch.inference_mode()
    def read(self, tokens, state):
        state = self.copy_state(state)
        tokens = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        logits = self.model.forward_seq(tokens, state)
        return logits[0].float(), state

    @torch.inference_mode()
    def read_batch(self, token_lists, states):
        if len(states) == 1:
            return super().read_batch(token_lists, states)
        stacked = self.stack_states(states)
        logits = self.model.forward_seq(torch.tensor(token_lists, dtype=torch.long, device=self.device), stacked)
        return list(logits.float()), self.split_states(stacked)

    def split_states(self, stacked):
        from .rwkv7 import state_split

        return state_split(stacked)

    def stack_states(self, states):
        from .rwkv7 import state_stack

        return state_stack(states)

    def new_batch(self):
        return StackedBatch(self)

    def state_tensors(self, state):
        return [t[0].detach().to("cpu", torch.float32).contiguous() for t in state]

    def state_from_tensors(self, tensors):
        return super().state_from_tensors([t.unsqueeze(0) for t in tensors])


def parse_strategy(strategy):
    """(device, precision) from a strategy like "cpu fp32", "cpu int8", "cuda fp16i8 *10 -> cuda fp16".

    The first segment decides; "int8", or "i8" after a precision, means int8 weights.
    """
    first = strategy.split("->")[0].split()
    if len(first) < 2 or first[0].split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"unsupported strategy {strategy!r}: use e.g. 'cpu fp32', 'cpu bf16', 'cuda fp16'")
    device, precision = first[0], first[1]
    if precision == "int8" or (precision.endswith("i8") and device == "cpu"):
        return device, "int8"
    if precision.endswith("i8"):
        precision = precision[:-2]  # int8 weights run on the CPU; on CUDA, fp16/bf16 are the fast path
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unsupported precision {precision!r} in strategy {strategy!r}")
    return device, precision


BACKENDS = ("auto", "rwkv")


def load_backend(path, strategy="cpu fp32", jit_on=True, cuda_on=False, backend="auto"):
    """Load a checkpoint with the best backend for its version.

    "auto": RWKV-7 through our batched forward, RWKV-4/5/6 through the rwkv
    package; "rwkv": the rwkv package for every version (the original
    server's engine, e.g. to compare against).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    version = detect_version(load_weights(path).keys())
    logger.info("loading RWKV-%s checkpoint %s (%s)", version, Path(path), strategy)
    if version == 7 and backend == "auto":
        return Rwkv7Backend(path, strategy)
    return RwkvPackageBackend(path, strategy, version=version, jit_on=jit_on, cuda_on=cuda_on)
