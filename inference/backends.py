"""Backends: a loaded model behind the small interface the engine drives.

    zero_state() / copy_state(state)
    read(tokens, state) -> (logits [vocab] float32, new state)    one sequence
    new_batch() -> a Batch: the sequences being served (its interface is declared there)
    state_tensors(state) / state_from_tensors(tensors)             for storage

A state is whatever the backend keeps per sequence; for storage it becomes a
list of float32 tensors whose shapes are checked when it is read back.
"""

import abc
import logging
import os
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError, detect_version, fingerprint, load_weights, resolve_path

logger = logging.getLogger(__name__)


class Batch(abc.ABC):
    """The sequences a backend serves together, one row each, named by keys (the engine's job ids)."""

    @abc.abstractmethod
    def __len__(self):
        """How many sequences are in the batch."""

    @abc.abstractmethod
    def __contains__(self, key):
        """Whether the sequence `key` is in the batch."""

    @abc.abstractmethod
    def keys(self):
        """The keys, in row order."""

    @abc.abstractmethod
    def add(self, key, state):
        """The sequence `key` joins from `state` (None: the zero state), which stays as it is."""

    @abc.abstractmethod
    def remove(self, key):
        """The sequence `key` leaves; returns its state."""

    def discard(self, key):
        """The sequence `key` leaves, if it is in the batch; its state is dropped."""
        if key in self:
            self.remove(key)

    @abc.abstractmethod
    def state(self, key):
        """A copy of the sequence `key`'s state."""

    @abc.abstractmethod
    def step(self, tokens, snapshot_after=None):
        """Feed each key its own tokens ({key: [tokens]}), all in one step.

        Returns (logits [len(tokens), vocab] after each key's last token, in
        the dict's order, {key: a copy of its state after its first n tokens}
        for each {key: n} of `snapshot_after`, 0 < n < its tokens).
        """


class SequentialBatch(Batch):
    """A batch for models with no batched forward (the `rwkv` package): each
    step runs its sequences one after another, so every stream still progresses."""

    def __init__(self, backend):
        self.backend = backend
        self.states = {}

    def __len__(self):
        return len(self.states)

    def __contains__(self, key):
        return key in self.states

    def keys(self):
        return list(self.states)

    def add(self, key, state):
        self.states[key] = state if state is not None else self.backend.zero_state()

    def remove(self, key):
        return self.states.pop(key)

    def state(self, key):
        return self.backend.copy_state(self.states[key])

    def step(self, tokens, snapshot_after=None):
        rows, snapshots, snapshot_after = [], {}, snapshot_after or {}
        for key, token_list in tokens.items():
            n = snapshot_after.get(key)
            if n:
                _, self.states[key] = self.backend.read(token_list[:n], self.states[key])
                snapshots[key] = self.states[key]  # read() leaves the state it is given alone
                token_list = token_list[n:]
            row, self.states[key] = self.backend.read(token_list, self.states[key])
            rows.append(row)
        return torch.stack(rows), snapshots


class SlotBatch(Batch):
    """A batch for a batched model: every step is one forward pass for all.

    The sequences' states are the first rows of one batched state with room
    to spare (it grows by doubling, and is let go when the batch empties):
    joining copies one state into the next free row, leaving moves the last
    row into the freed one. Nothing is re-stacked, whatever comes and goes.
    """

    def __init__(self, backend):
        self.model = backend.model
        self._keys = []  # row -> key
        self._slots = None  # the model's batched state, capacity rows

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._keys

    def keys(self):
        return list(self._keys)

    def add(self, key, state):
        count = len(self._keys)
        if self._slots is None or count == self._slots[0].shape[0]:
            self._grow(max(4, 2 * count))
        for i, slot in enumerate(self._slots):
            if state is None:
                slot[count].zero_()
            else:
                slot[count].copy_(state[i][0])
        self._keys.append(key)

    def remove(self, key):
        row, last = self._keys.index(key), len(self._keys) - 1
        state = [slot[row:row + 1].clone() for slot in self._slots]
        if row != last:
            for slot in self._slots:
                slot[row].copy_(slot[last])
            self._keys[row] = self._keys[last]
        self._keys.pop()
        if not self._keys:
            self._slots = None
        return state

    def state(self, key):
        row = self._keys.index(key)
        return [slot[row:row + 1].clone() for slot in self._slots]

    def step(self, tokens, snapshot_after=None):
        if len(tokens) != len(self._keys) or any(key not in tokens for key in self._keys):
            raise ValueError("a step of a slot batch feeds every sequence in it")
        count = len(self._keys)
        after = [snapshot_after.get(key, 0) for key in self._keys] if snapshot_after else None
        logits, taken = self.model.forward_snapshots([tokens[key] for key in self._keys],
                                                     [slot[:count] for slot in self._slots], after)
        order = [self._keys.index(key) for key in tokens]
        snapshots = {self._keys[row]: state for row, state in taken.items()}
        return (logits if order == list(range(count)) else logits[order]), snapshots

    def _grow(self, capacity):
        slots = self.model.zero_state(capacity)
        if self._slots is not None:
            count = len(self._keys)
            for new, old in zip(slots, self._slots):
                new[:count].copy_(old[:count])
        self._slots = slots


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
    """RWKV-7 through our own batched PyTorch forward (inference/rwkv7/).

    A sequence's state is the model's state with batch size 1; stored, it is
    the same list of tensors as the rwkv package's RWKV-7 state (no batch
    dimension), so blobs are interchangeable between the two backends.
    """

    version = 7

    def __init__(self, path, strategy="cpu fp32", jit_on=True):
        from .rwkv7 import RWKV7Model

        path = resolve_path(path)
        self.device, precision = parse_strategy(strategy)
        weights = load_weights(path)
        self.model_id = fingerprint(weights)
        self.model = RWKV7Model(weights, device=self.device, precision=precision, jit=jit_on)
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

    def new_batch(self):
        return SlotBatch(self)

    def state_tensors(self, state):
        return [t[0].detach().to("cpu", torch.float32).contiguous() for t in state]

    def state_from_tensors(self, tensors):
        return super().state_from_tensors([t.unsqueeze(0) for t in tensors])


def int8_supported():
    """Whether fbgemm's int8 kernels run here (an x86 CPU with AVX2 or better)."""
    engines = torch.backends.quantized.supported_engines
    return ("fbgemm" in engines or "x86" in engines) and torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def resolve_strategy(strategy, version=7):
    """The strategy to load: "auto" (the default) becomes the fastest one whose
    accuracy bound holds here (rwkv7.PRECISION_TOLERANCE): `cuda fp16` with a
    GPU, else `cpu int8` where the CPU has int8 kernels, else `cpu fp32`.
    RWKV-4/5/6 go through the rwkv package: `cuda fp16` or `cpu fp32`.
    Any other strategy is returned as given.
    """
    if strategy.strip().lower() != "auto":
        return strategy
    if torch.cuda.is_available():
        return "cuda fp16"
    return "cpu int8" if version == 7 and int8_supported() else "cpu fp32"


def parse_strategy(strategy):
    """(device, precision) from a strategy like "cpu fp32", "cpu int8", "cuda fp16i8 *10 -> cuda fp16".

    The first segment decides; "int8", or "i8" after a precision, means int8 weights.
    "auto" is what resolve_strategy picks here.
    """
    strategy = resolve_strategy(strategy)
    first = strategy.split("->")[0].split()
    if len(first) < 2 or first[0].split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"unsupported strategy {strategy!r}: use e.g. 'auto', 'cpu int8', 'cpu fp32', "
                         "'cpu bf16', 'cuda fp16'")
    device, precision = first[0], first[1]
    if precision == "int8" or (precision.endswith("i8") and device == "cpu"):
        return device, "int8"
    if precision.endswith("i8"):
        precision = precision[:-2]  # int8 weights run on the CPU; on CUDA, fp16/bf16 are the fast path
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unsupported precision {precision!r} in strategy {strategy!r}")
    return device, precision


BACKENDS = ("auto", "rwkv")


def load_backend(path, strategy="auto", jit_on=True, cuda_on=False, backend="auto"):
    """Load a checkpoint with the best backend for its version (and strategy,
    see resolve_strategy).

    "auto": RWKV-7 through our batched forward, RWKV-4/5/6 through the rwkv
    package; "rwkv": the rwkv package for every version (the original
    server's engine, e.g. to compare against).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    version = detect_version(load_weights(path).keys())
    strategy = resolve_strategy(strategy, version if backend == "auto" else 0)
    logger.info("loading RWKV-%s checkpoint %s (%s)", version, Path(path), strategy)
    if version == 7 and backend == "auto":
        return Rwkv7Backend(path, strategy, jit_on=jit_on)
    return RwkvPackageBackend(path, strategy, version=version, jit_on=jit_on, cuda_on=cuda_on)
