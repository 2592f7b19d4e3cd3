"""RWKV checkpoints on disk: finding them, telling their version, writing demo ones.

An official RWKV checkpoint is a `.pth` file holding a flat dict of tensors
(`emb.weight`, `blocks.N.att.*`, `blocks.N.ffn.*`, `ln_out.*`, `head.weight`).
The architecture version is told by which keys are present. No Django here.
"""

import hashlib
import math
from pathlib import Path

import torch

WORLD_VOCAB_SIZE = 65536
HEAD_SIZE = 64


class CheckpointError(Exception):
    """The file is missing, unreadable, or not an RWKV checkpoint."""


def resolve_path(path):
    """Accept a checkpoint path with or without `.pth`, like the original server."""
    path = Path(path).expanduser()
    if path.suffix != ".pth":
        with_suffix = path.with_name(path.name + ".pth")
        if with_suffix.exists() or not path.exists():
            path = with_suffix
    if not path.is_file():
        raise CheckpointError(f"no RWKV checkpoint at {path}")
    return path


def load_weights(path):
    """The checkpoint's tensors, memory-mapped where the file allows it."""
    try:
        weights = torch.load(resolve_path(path), map_location="cpu", mmap=True, weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # torch raises many kinds for a bad file
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
    if not isinstance(weights, dict) or "emb.weight" not in weights:
        raise CheckpointError(f"{path} is not an RWKV checkpoint (no emb.weight)")
    return weights


def detect_version(keys):
    """The RWKV architecture version (4, 5, 6 or 7) told by the key names."""
    keys = set(keys)
    if "blocks.0.att.r_k" in keys:
        return 7
    if any(k.endswith("att.time_maa_x") for k in keys):
        return 6
    if any(".ln_x." in k for k in keys):
        return 5
    if "blocks.0.att.time_decay" in keys:
        return 4
    raise CheckpointError("unknown RWKV architecture: none of the keys of RWKV-4/5/6/7 found")


def fingerprint(weights):
    """A short identity of a checkpoint's weights, stored with every state.

    Hashes every key, shape and dtype, and the first 4 KiB of every tensor:
    cheap even for a multi-GB model, and two different trainings (or sizes)
    never share it. A state saved under one fingerprint never loads into
    another model.
    """
    digest = hashlib.sha256()
    for key in sorted(weights):
        tensor = weights[key]
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        flat = tensor.reshape(-1)[:1024].contiguous()
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _lora_size(n_embd, factor, power=0.5):
    """The low-rank sizes RWKV-7's training code uses for an embedding size."""
    return max(32, int(round(factor * (n_embd ** power) / 32) * 32))


class RandomWeights:
    """Seeded random tensors, and the parts every RWKV version shares."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, *shape, std):
        return torch.randn(*shape, generator=self.gen) * std

    def uniform(self, *shape, low=0.0, high=1.0):
        return torch.rand(*shape, generator=self.gen) * (high - low) + low

    def shared(self, n_layer, n_embd, vocab_size):
        """Embedding, layer norms and head: the keys of RWKV-4 to 7 alike."""
        C = n_embd
        w = {"emb.weight": self.normal(vocab_size, C, std=1.0)}
        norms = ["blocks.0.ln0"] + [f"blocks.{i}.{ln}" for i in range(n_layer) for ln in ("ln1", "ln2")]
        for norm in norms + ["ln_out"]:
            w[norm + ".weight"], w[norm + ".bias"] = torch.ones(C), torch.zeros(C)
        w["head.weight"] = self.normal(vocab_size, C, std=3.0 / math.sqrt(C))
        return w

    def square(self, rows, cols):
        return self.normal(rows, cols, std=1.0 / math.sqrt(cols))


def demo_weights_v7(n_layer=2, n_embd=128, vocab_size=WORLD_VOCAB_SIZE, seed=0):
    """Random RWKV-7 weights with the official key names and shapes.

    The values follow the shape of the training code's initialisation closely
    enough that the forward pass is numerically tame (bounded decays, unit
    layer norms); the replies are noise.
    """
    if n_embd % HEAD_SIZE:
        raise ValueError(f"n_embd must be a multiple of {HEAD_SIZE}")
    r = RandomWeights(seed)
    C, H = n_embd, n_embd // HEAD_SIZE
    d_decay, d_aaa = _lora_size(C, 1.8), _lora_size(C, 1.8)
    d_mv, d_gate = _lora_size(C, 1.3), _lora_size(C, 0.6, 0.8)
    w = r.shared(n_layer, C, vocab_size)
    for i in range(n_layer):
        a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            w[a + name] = r.uniform(1, 1, C)
        w[a + "w0"] = r.uniform(1, 1, C, low=-6.0, high=-0.5)
        w[a + "a0"] = r.normal(1, 1, C, std=0.5)
        w[a + "v0"] = torch.ones(1, 1, C)
        for name, rank in (("w", d_decay), ("a", d_aaa), ("v", d_mv), ("g", d_gate)):
            w[a + name + "1"], w[a + name + "2"] = r.normal(C, rank, std=0.1), r.normal(rank, C, std=0.1)
        w[a + "k_k"] = torch.full((1, 1, C), 0.85)
        w[a + "k_a"] = torch.ones(1, 1, C)
        w[a + "r_k"] = r.normal(H, HEAD_SIZE, std=0.1)
        for name in ("receptance", "key", "value", "output"):
            w[a + name + ".weight"] = r.square(C, C)
        w[a + "ln_x.weight"], w[a + "ln_x.bias"] = torch.ones(C), torch.zeros(C)
        w[f + "x_k"] = r.uniform(1, 1, C)
        w[f + "key.weight"] = r.square(4 * C, C)
        w[f + "value.weight"] = r.square(C, 4 * C) * 0.5
    return w


def demo_weights_v4(n_layer=2, n_embd=128, vocab_size=WORLD_VOCAB_SIZE, seed=0):
    """Random RWKV-4 weights with the official key names and shapes."""
    r = RandomWeights(seed)
    C = n_embd
    w = r.shared(n_layer, C, vocab_size)
    for i in range(n_layer):
        a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
        w[a + "time_decay"] = r.uniform(C, low=-3.0, high=1.0)
        w[a + "time_first"] = r.uniform(C, low=-0.5, high=0.5)
        for name in ("time_mix_k", "time_mix_v", "time_mix_r"):
            w[a + name] = r.uniform(1, 1, C)
        for name in ("key", "value", "receptance", "output"):
            w[a + name + ".weight"] = r.square(C, C)
        for name in ("time_mix_k", "time_mix_r"):
            w[f + name] = r.uniform(1, 1, C)
        w[f + "key.weight"] = r.square(4 * C, C)
        w[f + "receptance.weight"] = r.square(C, C)
        w[f + "value.weight"] = r.square(C, 4 * C) * 0.5
    return w


DEMO_WRITERS = {7: demo_weights_v7, 4: demo_weights_v4}


def write_demo_model(path, n_layer=2, n_embd=128, version=7, seed=0):
    """Write a random-weight checkpoint to `path` (`.pth` added if missing).

    The file is written to a temporary name and renamed into place, so a
    crash never leaves half a checkpoint where the server looks for one.
    """
    path = Path(path)
    if path.suffix != ".pth":
        path = path.with_name(path.name + ".pth")
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = DEMO_WRITERS[version](n_layer=n_layer, n_embd=n_embd, seed=seed)
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}
    partial = path.with_name(path.name + ".partial")
    torch.save(weights, partial)
    partial.replace(path)
    return path
