"""A batched RWKV-7 ("Goose") forward pass in PyTorch, compiled with TorchScript. No Django here.

Same maths as `RWKV_x070` in the `rwkv` package (which stays the reference the
tests compare against), organised for serving:

* `forward` advances B independent sequences, each by its own tokens (one for
  a decode step, a chunk for a prompt), in one pass: everything that does not
  depend on the recurrent state (token shift, linear layers, LoRAs, norms,
  channel mix) runs for all tokens of all sequences at once, so the weights
  are read once per pass (decoding a small model on a CPU is bound by memory
  bandwidth, not arithmetic). Only the small per-head state update loops over
  token positions. `forward_one` (one token each) and `forward_seq` (a
  B x T block) are the two common shapes; `forward_snapshots` also hands
  back states part-way through sequences' tokens, copied out as the pass
  goes by (a reply keeps its state before its last prompt token).
* The layers are TorchScript (`jit=True`, the default): a whole pass runs in
  C++ without Python's GIL, so the server's other threads (HTTP, database,
  storage) never hold up a decode step, and each step skips Python's
  per-operation overhead. `jit=False` runs the same modules eagerly.
* On the CPU, where inference/kernels is built: each token's state update is
  one C++ pass per head, and a prompt's tokens are one call; a layer's
  products that read one input are one call (R, K, V; the LoRA halves); its
  elementwise work is three passes over each row (`_shift_mix`, `_prepare`,
  `_finish`). Elsewhere, PyTorch operations (the `_ops` functions).
* Precisions: "fp32"; "bf16" (big matrices stored and multiplied in bfloat16,
  everything else in float32); "fp16" (CUDA only); "int8" (CPU only: big
  matrices as per-output-channel int8 weights, each row of activations
  quantised on its own, multiplied by our kernel (inference/kernels
  int8_linear.cpp) or else fbgemm's; everything else in float32). The
  recurrent state is float32 in every precision, so states are
  interchangeable between them.

State layout (a plain list of 3 * n_layer tensors, all float32, on the
model's device; B = number of sequences in the batch, C = n_embd,
H = n_head, N = head_size):

    state[3*i + 0]  layer i time-mix x_prev      (B, C)     layer-normed input of the previous token
    state[3*i + 1]  layer i time-mix kv state    (B, H, N, N)  rows index value dims, columns key dims
    state[3*i + 2]  layer i channel-mix x_prev   (B, C)

The forward passes update the state tensors IN PLACE (the list and its
tensors stay the same objects) and return only the logits.
"""

import dataclasses
import math
import warnings
from typing import List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels

# Relative error ||logits - logits_fp32|| / ||logits_fp32|| that each reduced
# precision is allowed (and tested) to stay within, on one decode step after a
# short prompt. Measured on random demo models: bf16 about 0.3-0.5 %, int8
# about 2-4 %; the bounds leave headroom for other weights and sizes.
PRECISION_TOLERANCE = {"fp32": 1e-4, "bf16": 0.02, "int8": 0.06, "fp16": 0.02}

PRECISIONS = ("fp32", "bf16", "fp16", "int8")

# Decay: w = exp(-exp(-0.5) * sigmoid(w0 + lora(x))), as in the reference.
_DECAY_SCALE = -math.exp(-0.5)
_GROUP_NORM_EPS = 64e-5
_LAYER_NORM_EPS = 1e-5

# forward_seq processes a long prompt in pieces of this many tokens: the
# activations stay small and cache friendly, the result is the same.
DEFAULT_SEQ_CHUNK = 256


# --------------------------------------------------------------------------
# Linear layers in each precision: x float32 (M, in) -> float32 (M, out).


class _Fp32Linear(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight_t = weight.t().contiguous()

    def forward(self, x: Tensor) -> Tensor:
        return torch.mm(x, self.weight_t)


class _HalfLinear(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).float()


def _channel_scales(weight):
    """Symmetric int8 scales, one per output channel (row) of weight (out, in): max |w| / 127."""
    return (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-12)


class _Int8Linear(nn.Module):
    """Symmetric per-output-channel int8 weights through fbgemm; activations
    quantised with one scale PER ROW (token position).

    fbgemm's dynamic linear quantises its whole input with one scale (from
    its min and max), so a row's rounding would depend on the other rows of
    the pass: a reply would change with who else is in the batch, a state
    re-read in other chunks would not be the state first read, and one
    row's large activations would cost the others' accuracy (a 50x row took
    the others' error from ~2 % to ~36 %). So each row is divided by its own
    max |x|, quantised over the fixed range [-1, 1] (scale 2/127, zero point
    64), multiplied in int8 and scaled back: each row's result is the same
    whatever else is in the pass. fbgemm's static-input linear with float
    output does this in one call, and skips the min/max scan the dynamic one
    makes (one row, 768x768: 90 -> 59 us, with results bit-identical to the
    former way, which appended a +1/-1 row to the dynamic linear's input to
    force its range).

    The activations use 7 bits (0..127): fbgemm multiplies uint8 activations
    by int8 weights in pairs summed in int16, which saturates with full 8-bit
    activations (measured on the demo model: 6-8 % logit error with 8 bits,
    2-4 % with 7).
    """

    def __init__(self, weight):
        super().__init__()
        scales = _channel_scales(weight).double()
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # quantized dtypes are deprecated; fbgemm's kernels are still the fastest
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qweight, None)

    def forward(self, x: Tensor) -> Tensor:
        # (M, 1): max |x| (vector_norm(x, inf) gives the same but is not vectorised: 85 us for 32 rows, this 9)
        scale = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x / scale, 2.0 / 127, 64, self.packed)
        return y.mul_(scale)


class _Int8KernelLinear(nn.Module):
    """_Int8Linear's numbers through our own kernel (inference/kernels/int8_linear.cpp):
    the same int8 weights and per-row 7-bit activations (a value exactly half
    way between two steps may round the other way), exact integer sums, but
    the weights read as packed streams where fbgemm packs and requantises per
    call: one row through 768 x 768, weights from memory, 47 us instead of
    185 (bench/kernels.py). Needs the kernels built with AVX2, input widths
    that are multiples of 32 and output widths that are multiples of 4.

    Several weights make one call (see _SideBySide): the kernel quantises
    each product's input columns of each row on its own, so the numbers are
    those of separate calls."""

    def __init__(self, weights, columns=(0,)):
        super().__init__()
        self.weights, self.scales, self.offsets = [], [], []
        for weight in [weights] if isinstance(weights, Tensor) else weights:
            N, K = weight.shape
            scales = _channel_scales(weight)
            quantised = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
            self.offsets.append((64 * quantised.sum(dim=1, dtype=torch.int32)).to(torch.int32).contiguous())
            self.scales.append(scales.float().contiguous())
            # Each 4 output channels as one stream of 32-wide runs (see int8_linear.cpp).
            self.weights.append(quantised.view(N // 4, 4, K // 32, 32).transpose(1, 2).contiguous().view(N, K))
        self.columns = list(columns)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.rpserver.int8_linear(x, self.weights, self.scales, self.offsets, self.columns)


class _Fp32KernelLinear(nn.Module):
    """A float32 product through our kernel (inference/kernels/f32_linear.cpp), for the LoRAs on
    the CPU: each row summed in one order whatever the number of rows (MKL's sgemm is not), and
    the weights read as packed streams. Needs the kernels built with AVX2, input widths that
    are multiples of 8 and output widths that are multiples of 4. Several weights make one
    call (see _SideBySide)."""

    def __init__(self, weights, columns=(0,)):
        super().__init__()
        self.weights = []
        for weight in [weights] if isinstance(weights, Tensor) else weights:
            N, K = weight.shape
            # Each 4 output channels as one stream of 8-wide runs (see f32_linear.cpp).
            self.weights.append(weight.float().reshape(N // 4, 4, K // 8, 8).transpose(1, 2).contiguous().view(N, K))
        self.columns = list(columns)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.rpserver.f32_linear(x, self.weights, self.columns)


class _SideBySide(nn.Module):
    """Products of column ranges of one input, their outputs side by side:
    [x[:, c_0:c_0 + K_0] @ W_0^T | x[:, c_1:c_1 + K_1] @ W_1^T | ...], one product
    module each. On the CPU with the kernels built, one kernel call does the
    same (a decode row through R, K and V, weights from memory: 147 -> 103 us)."""

    def __init__(self, linears, columns, widths):
        super().__init__()
        self.linears = nn.ModuleList(linears)
        self.columns, self.widths = list(columns), list(widths)

    def forward(self, x: Tensor) -> Tensor:
        outs: List[Tensor] = []
        for i, linear in enumerate(self.linears):
            outs.append(linear(x[:, self.columns[i]:self.columns[i] + self.widths[i]]))
        return torch.cat(outs, dim=1)


def _make_lora(ms, device, columns=(0,)):
    """LoRA halves, each stored (in, out) and used as x @ m, multiplied side by side from
    `columns` of one input (see _SideBySide): float32 in every precision."""
    weights = [m.to(device=device, dtype=torch.float32).t() for m in ms]
    if device.type == "cpu" and kernels.vectorised() and all(w.shape[1] % 8 == 0 and w.shape[0] % 4 == 0
                                                             for w in weights):
        return _Fp32KernelLinear(weights, columns)
    return _side_by_side([_Fp32Linear(w) for w in weights], columns, [w.shape[1] for w in weights])


def _make_linear(weights, precision, device, columns=(0,)):
    """weights: (out, in) as stored in the checkpoint, multiplied side by side from `columns` of one
    input (see _SideBySide)."""
    if precision == "int8" and kernels.vectorised() and all(w.shape[1] % 32 == 0 and w.shape[0] % 4 == 0
                                                            for w in weights):
        return _Int8KernelLinear([w.float().contiguous() for w in weights], columns)
    return _side_by_side([_one_linear(w, precision, device) for w in weights], columns, [w.shape[1] for w in weights])


def _one_linear(weight, precision, device):
    if precision == "fp32":
        return _Fp32Linear(weight.to(device=device, dtype=torch.float32))
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return _HalfLinear(weight.to(device=device, dtype=dtype).contiguous())
    return _Int8Linear(weight.float().contiguous())


def _side_by_side(linears, columns, widths):
    """One product reading its whole input as it is, or several side by side."""
    if len(linears) == 1 and columns[0] == 0:
        return linears[0]
    return _SideBySide(linears, columns, widths)


# --------------------------------------------------------------------------
# The model's shape.


@dataclasses.dataclass(frozen=True)
class RWKV7Config:
    n_layer: int
    n_embd: int  # C
    n_head: int  # H
    head_size: int  # N; n_head * head_size == n_embd
    vocab_size: int

    @classmethod
    def from_weights(cls, weights):
        """The shape of a checkpoint's dict of tensors (official key names)."""
        n_head, head_size = weights["blocks.0.att.r_k"].shape
        vocab_size, n_embd = weights["emb.weight"].shape
        n_layer = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
        return cls(n_layer=n_layer, n_embd=n_embd, n_head=n_head, head_size=head_size, vocab_size=vocab_size)


# --------------------------------------------------------------------------
# How the tokens of one pass are laid out.


class Layout(NamedTuple):
    """The tokens of B sequences read together, flat, one sequence after
    another: M = sum(lengths) positions. Built by `layout()`.

    The recurrence takes every sequence's first token in one batched step,
    then the later tokens of the sequences that have more ("readers"),
    longest first, so that at each later step the sequences still reading
    are the first few readers.

    A sequence may also ask for a snapshot: its state after its first n
    tokens (0 < n < its length), taken inside the pass (so a reply that
    keeps the state before its last prompt token needs no pass of its own
    to get there). Snapshot j is of sequence `snap_seq[j]`, after flat
    position `snap_pos[j]`.
    """

    single: bool  # one token per sequence: position b is sequence b (the rest is empty)
    first: Tensor  # [B] position of each sequence's first token
    last: Tensor  # [B] position of each sequence's last token
    readers: Tensor  # [R] the sequences with more than one token, longest first
    readers_in_place: bool  # the readers are exactly sequences 0..B-1 in order (e.g. a uniform chunk)
    # [T-1, R] position of reader r's t-th token (its last one once it has no more), and the
    # positions the later steps produce, in step order; both empty for one sequence, whose later
    # tokens are positions 1.. in order (_recurrence takes them as slices)
    later: Tensor
    later_flat: Tensor
    # Runs of later steps [start, end, readers still reading, reader, snapshot]: after the run,
    # reader `reader`'s state is snapshot `snapshot` (both -1: none); a run may be empty.
    segments: List[List[int]]
    snap_pos: Tensor  # [J] the flat position after which snapshot j is taken
    snap_seq: Tensor  # [J] the sequence of snapshot j
    first_snaps: List[List[int]]  # [sequence, snapshot] for snapshots after a sequence's first token


def layout(lengths, device, snapshot_after=None):
    """The Layout of sequences of these lengths; `snapshot_after` (optional,
    one per sequence): take a snapshot after that many of its tokens
    (0 or None: none; else 0 < n < its length)."""
    if not lengths or min(lengths) < 1:
        raise ValueError("every sequence needs at least one token")
    snapshot_after = [n or 0 for n in snapshot_after] if snapshot_after else [0] * len(lengths)
    if len(snapshot_after) != len(lengths) or any(not 0 <= n < length for n, length in zip(snapshot_after, lengths)):
        raise ValueError("a snapshot is taken after 0 < n < length of a sequence's tokens")
    empty = torch.empty(0, dtype=torch.long, device=device)
    if len(lengths) == sum(lengths):
        return Layout(True, empty, empty, empty, False, empty.view(0, 0), empty, [], empty, empty, [])
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    readers = sorted((b for b, n in enumerate(lengths) if n > 1), key=lambda b: -lengths[b])
    later = range(1, max(lengths))
    active = [sum(1 for b in readers if lengths[b] > t) for t in later]
    snapping = [b for b, n in enumerate(snapshot_after) if n]
    # Later step t (0-based) reads token t + 1: a snapshot after n >= 2 tokens follows step n - 2.
    snaps_after_step = {}
    for j, b in enumerate(snapping):
        if snapshot_after[b] >= 2:
            snaps_after_step.setdefault(snapshot_after[b] - 2, []).append([readers.index(b), j])
    segments = []
    for t, n in enumerate(active):
        if segments and segments[-1][2] == n and segments[-1][3] < 0:
            segments[-1][1] = t + 1
        else:
            segments.append([t, t + 1, n, -1, -1])
        for reader, j in snaps_after_step.get(t, []):
            if segments[-1][3] >= 0:
                segments.append([t + 1, t + 1, n, -1, -1])
            segments[-1][3:] = [reader, j]

    def tensor(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    alone = len(lengths) == 1  # one sequence: _recurrence slices its later tokens, no gathers

    return Layout(
        single=False,
        first=tensor(starts),
        last=tensor([s + n - 1 for s, n in zip(starts, lengths)]),
        readers=tensor(readers),
        readers_in_place=readers == list(range(len(lengths))),
        later=empty.view(0, 0) if alone else tensor([[starts[b] + min(t, lengths[b] - 1) for b in readers]
                                                     for t in later]),
        later_flat=empty if alone else tensor([starts[b] + t for t, n in zip(later, active) for b in readers[:n]]),
        segments=segments,
        snap_pos=tensor([starts[b] + snapshot_after[b] - 1 for b in snapping]) if snapping else empty,
        snap_seq=tensor(snapping) if snapping else empty,
        first_snaps=[[b, j] for j, b in enumerate(snapping) if snapshot_after[b] == 1],
    )


# --------------------------------------------------------------------------
# The layers.


def _shift(xx: Tensor, prev: Tensor, rows: Layout) -> Tensor:
    """Token shift: (input of the previous token - input) per position, the
    state's `prev` standing before each sequence's first token; `prev` then
    becomes each sequence's last input."""
    if rows.single:
        delta = prev - xx
        prev.copy_(xx)
        return delta
    shifted = xx.roll(1, 0)
    shifted[rows.first] = prev
    prev.copy_(xx[rows.last])
    return shifted.sub_(xx)


def _shift_mix_ops(x: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float, prev: Tensor, mixes: Tensor,
                   rows: Layout) -> Tuple[Tensor, Tensor]:
    """A mix's start (see _shift_mix)."""
    xx = F.layer_norm(x, [x.shape[1]], ln_w, ln_b, eps)
    return xx, torch.addcmul(xx.unsqueeze(1), _shift(xx, prev, rows).unsqueeze(1), mixes).view(xx.shape[0], -1)


if kernels.vectorised():
    def _shift_mix(x: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float, prev: Tensor, mixes: Tensor,
                   rows: Layout) -> Tuple[Tensor, Tensor]:
        """xx = layer_norm(x) and the n mixes (n, C) of xx with its token shift side by side (M, n C):
        xx + (xx of the token before - xx) * mix_i, the state `prev` standing before each sequence's
        first token (and becoming its last xx). On the CPU one pass over each row
        (inference/kernels/time_mix.cpp)."""
        if x.is_cuda or x.shape[1] % 8 != 0:
            return _shift_mix_ops(x, ln_w, ln_b, eps, prev, mixes, rows)
        return torch.ops.rpserver.rwkv7_shift_mix(x, ln_w, ln_b, eps, prev, mixes, rows.first, rows.last, rows.single)
else:
    _shift_mix = _shift_mix_ops


def _step(S: Tensor, q: Tensor, u: Tensor, v: Tensor, w: Tensor) -> Tensor:
    """One token for n sequences' heads: S (nH, N, N) updated in place.

    q (nH, 2, N) holds w*r and kk, so one bmm gives S (w*r) and S kk (a
    row-vector bmm against S^T is much faster on CPU than S @ column);
    then S' = S diag(w) - (S kk) b^T + v k^T is one scale and one rank-2
    update with u (nH, 2, N) = (-b, k). Returns the bmm's output (nH, 2, N).
    """
    o = torch.bmm(q, S.transpose(1, 2))
    S.mul_(w)
    S.baddbmm_(torch.cat((o[:, 1:], v), dim=1).transpose(1, 2), u)
    return o


def _steps(S: Tensor, q: Tensor, u: Tensor, v: Tensor, w: Tensor) -> Tensor:
    """T tokens in a row for the same nH heads: q, u (T, nH, 2, N), v, w
    (T, nH, 1, N); returns the T outputs (T, nH, 2, N)."""
    return torch.stack([_step(S, q[t], u[t], v[t], w[t]) for t in range(q.shape[0])])


if kernels.available():
    def _state_step(S: Tensor, q: Tensor, u: Tensor, v: Tensor, w: Tensor) -> Tensor:
        """_step in one pass over the state (inference/kernels/wkv7.cpp) on the CPU."""
        if S.is_cuda:
            return _step(S, q, u, v, w)
        return torch.ops.rpserver.wkv7_step(S, q, u, v, w)

    def _state_steps(S: Tensor, q: Tensor, u: Tensor, v: Tensor, w: Tensor) -> Tensor:
        """_steps with each head's state kept in the L1 cache for all T tokens, on the CPU."""
        if S.is_cuda:
            return _steps(S, q, u, v, w)
        return torch.ops.rpserver.wkv7_steps(S, q, u, v, w)
else:
    _state_step = _step
    _state_steps = _steps


def _prepare_ops(rkv: Tensor, up: Tensor, v_first: Tensor, wa0: Tensor, v0: Tensor, k_k: Tensor, k_a: Tensor,
                 r_k: Tensor, decay: float, H: int, first: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The time mix from its products' outputs to the state update's inputs (see _prepare)."""
    M, C = rkv.shape[0], rkv.shape[1] // 3
    N = C // H
    r, k, v = rkv[:, :C], rkv[:, C:2 * C], rkv[:, 2 * C:]
    wa = torch.sigmoid(up[:, :2 * C] + wa0)
    w = wa[:, :C].mul(decay).exp_()
    a = wa[:, C:]
    kk = F.normalize((k * k_k).view(-1, H, N), dim=-1).view(-1, C)
    k = k * (1 + (a - 1) * k_a)
    if first:
        v = v.contiguous()
    else:
        v = torch.lerp(v, v_first, torch.sigmoid(up[:, 3 * C:] + v0))
    r4, k4, kk4 = r.view(M, H, 1, N), k.view(M, H, 1, N), kk.view(M, H, 1, N)
    b4 = kk4 * a.view(M, H, 1, N)
    q = torch.cat((w.view(M, H, 1, N) * r4, kk4), dim=2)
    u = torch.cat((b4.neg(), k4), dim=2)
    coef = torch.cat(((b4 * r4).sum(-1), (k4 * r4).sum(-1), (r4 * k4 * r_k.view(H, 1, N)).sum(-1)), dim=2)
    return q, u, v, w, coef


def _finish_ops(o: Tensor, coef: Tensor, v: Tensor, g: Tensor, lnx_w: Tensor, lnx_b: Tensor, eps: float) -> Tensor:
    """The time mix from the state update's output to O's input (see _finish)."""
    M, H, N = o.shape[0], o.shape[1], o.shape[3]
    v4 = v.view(M, H, 1, N)
    y = o[:, :, :1] - o[:, :, 1:] * coef[:, :, 0:1].unsqueeze(-1) + v4 * coef[:, :, 1:2].unsqueeze(-1)
    y = F.group_norm(y.view(M, H * N), H, lnx_w, lnx_b, eps)
    return y.view(M, H, N).addcmul_(coef[:, :, 2:3], v.view(M, H, N)).view(M, H * N) * g


if kernels.vectorised():
    def _prepare(rkv: Tensor, up: Tensor, v_first: Tensor, wa0: Tensor, v0: Tensor, k_k: Tensor, k_a: Tensor,
                 r_k: Tensor, decay: float, H: int, first: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """From r, k, v (side by side in rkv) and the LoRAs' w, a, g, v outputs (in up): with
        w = exp(decay * sigmoid(w' + w0)), a = sigmoid(a' + a0), kk = normalize(k k_k),
        k <- k (1 + (a - 1) k_a), v <- lerp(v, v_first, sigmoid(v' + v0)) (not in layer 0) and
        b = kk a, the state update's inputs q = [w r, kk], u = [-b, k] (M, H, 2, N), v and w
        (M, C), and per head coef = [b.r, k.r, (r k).r_k] (M, H, 3). On the CPU one pass over
        each row (inference/kernels/time_mix.cpp)."""
        if rkv.is_cuda or (rkv.shape[1] // 3 // H) % 8 != 0:  # the kernel takes heads of 8k channels
            return _prepare_ops(rkv, up, v_first, wa0, v0, k_k, k_a, r_k, decay, H, first)
        return torch.ops.rpserver.rwkv7_prepare(rkv, up, v_first, wa0, v0, k_k, k_a, r_k, decay, H, first)

    def _finish(o: Tensor, coef: Tensor, v: Tensor, g: Tensor, lnx_w: Tensor, lnx_b: Tensor, eps: float) -> Tensor:
        """y = S' r = S (w r) - (S kk)(b.r) + v (k.r) from o = [S (w r), S kk] (the state before
        the token), group-normed per head, plus the bonus ((r k).r_k) v, times g: O's input.
        On the CPU one pass over each row (inference/kernels/time_mix.cpp)."""
        if o.is_cuda or o.shape[3] % 8 != 0:
            return _finish_ops(o, coef, v, g, lnx_w, lnx_b, eps)
        return torch.ops.rpserver.rwkv7_finish(o, coef, v, g, lnx_w, lnx_b, eps)
else:
    _prepare = _prepare_ops
    _finish = _finish_ops


def _recurrence(S: Tensor, q: Tensor, u: Tensor, v: Tensor, w: Tensor, rows: Layout, H: int, N: int,
                snap_S: Tensor) -> Tensor:
    """The time mix's state update over all positions (inputs from _prepare); returns
    o = [S (w r), S kk] (M, H, 2, N) for the state before each token (for _finish) and
    updates S (B, H, N, N) in place, copying the layout's snapshots into snap_S
    (J, H, N, N) as the steps pass them.

    With b = kk*a, each token does S' = S diag(w) - (S kk) b^T + v k^T.
    """
    M = q.shape[0]
    B = S.shape[0]
    v4, w4 = v.view(M, H, 1, N), w.view(M, H, 1, N)
    BH = B * H
    if rows.single:
        o = _state_step(S.view(BH, N, N), q.view(BH, 2, N), u.view(BH, 2, N), v4.view(BH, 1, N), w4.view(BH, 1, N))
        return o.view(B, H, 2, N)
    o0 = _state_step(S.view(BH, N, N), q[rows.first].view(BH, 2, N), u[rows.first].view(BH, 2, N),
                     v4[rows.first].view(BH, 1, N), w4[rows.first].view(BH, 1, N))
    for pair in rows.first_snaps:  # [sequence, snapshot]
        snap_S[pair[1]].copy_(S[pair[0]])
    RH = rows.readers.shape[0] * H
    SR = S if rows.readers_in_place else S[rows.readers]  # (readers, H, N, N)
    S3 = SR.view(RH, N, N)
    if B == 1:  # one sequence (a prompt read alone): its later tokens are positions 1.. in order
        qs, us, vs, ws = q[1:], u[1:], v4[1:], w4[1:]
    else:
        qs = q[rows.later].view(-1, RH, 2, N)  # (T-1, RH, 2, N)
        us = u[rows.later].view(-1, RH, 2, N)
        vs = v4[rows.later].view(-1, RH, 1, N)
        ws = w4[rows.later].view(-1, RH, 1, N)
    outs: List[Tensor] = []
    for segment in rows.segments:  # steps [start, end) have the first n readers reading
        start, end, nH = segment[0], segment[1], segment[2] * H
        if end > start:
            outs.append(_state_steps(S3[:nH], qs[start:end, :nH], us[start:end, :nH], vs[start:end, :nH],
                                     ws[start:end, :nH]).view(-1, 2, N))
        if segment[3] >= 0:  # reader segment[3]'s state is snapshot segment[4]
            snap_S[segment[4]].copy_(S3[segment[3] * H:(segment[3] + 1) * H])
    if not rows.readers_in_place:
        S[rows.readers] = SR
    if B == 1:
        o = torch.cat([o0] + outs).view(M, H, 2, N)
    else:
        o = torch.empty(M, H, 2, N, device=o0.device)
        o[rows.first] = o0.view(B, H, 2, N)
        o[rows.later_flat] = torch.cat(outs).view(-1, H, 2, N)
    return o


class _Block(nn.Module):
    """Layer i's weights, prepared once, and its forward over a Layout."""

    def __init__(self, weights, i, precision, device, config: RWKV7Config):
        super().__init__()
        b, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."

        def vec(key):
            return weights[key].to(device=device, dtype=torch.float32).reshape(-1).contiguous()

        def linear(key):
            return _make_linear([weights[key + ".weight"]], precision, device)

        C = config.n_embd
        self.H, self.N = config.n_head, config.head_size
        self.ln_eps, self.gn_eps, self.decay_scale = _LAYER_NORM_EPS, _GROUP_NORM_EPS, _DECAY_SCALE
        self.ln1_w, self.ln1_b = vec(b + "ln1.weight"), vec(b + "ln1.bias")
        self.ln2_w, self.ln2_b = vec(b + "ln2.weight"), vec(b + "ln2.bias")
        # The six token-shift mixes side by side, one op making all six inputs (M, 6C): R's, K's and
        # V's first (one product call reads those three), then the w, a and g LoRAs'.
        self.maa = torch.stack([vec(a + n) for n in ("x_r", "x_k", "x_v", "x_w", "x_a", "x_g")])
        self.RKV = _make_linear([weights[a + n + ".weight"] for n in ("receptance", "key", "value")], precision,
                                device, (0, C, 2 * C))
        # Layer 0 takes its value as v_first for the others; it has no v LoRA.
        self.first_layer = i == 0
        loras = ("w", "a", "g") if i == 0 else ("w", "a", "g", "v")  # v's reads V's input
        # The LoRAs' first halves in one call, their second halves in another, reading the first's outputs.
        downs = [weights[a + n + "1"] for n in loras]
        self.lora_down = _make_lora(downs, device, (3 * C, 4 * C, 5 * C, 2 * C)[:len(loras)])
        widths = [down.shape[1] for down in downs]
        self.lora_up = _make_lora([weights[a + n + "2"] for n in loras], device,
                                  [sum(widths[:j]) for j in range(len(loras))])
        self.w_width, self.g_from, self.g_to = widths[0], widths[0] + widths[1], sum(widths[:3])
        self.wa0 = torch.cat([vec(a + "w0"), vec(a + "a0")])
        self.v0 = torch.zeros(1, device=device) if i == 0 else vec(a + "v0")
        self.k_k, self.k_a, self.r_k = (vec(a + n) for n in ("k_k", "k_a", "r_k"))
        self.lnx_w, self.lnx_b = vec(a + "ln_x.weight"), vec(a + "ln_x.bias")
        self.O = linear(a + "output")
        self.fx_k = vec(f + "x_k").unsqueeze(0)
        self.FK, self.FV = linear(f + "key"), linear(f + "value")

    def forward(self, x: Tensor, v_first: Tensor, att_prev: Tensor, S: Tensor, ffn_prev: Tensor, rows: Layout,
                snap_att: Tensor, snap_S: Tensor, snap_ffn: Tensor):
        """The layer over the layout's tokens: the state (att_prev, S, ffn_prev) is advanced in
        place, and the layout's snapshots of it are copied into snap_att, snap_S, snap_ffn."""
        H, N = self.H, self.N
        C = x.shape[1]
        snapping = rows.snap_pos.shape[0] > 0

        # ---- time mix
        xx, mixed = _shift_mix(x, self.ln1_w, self.ln1_b, self.ln_eps, att_prev, self.maa, rows)
        if snapping:  # a token shift's state after position p is p's input
            snap_att.copy_(xx[rows.snap_pos])
        low = self.lora_down(mixed)
        low[:, :self.w_width].tanh_()
        low[:, self.g_from:self.g_to].sigmoid_()
        up = self.lora_up(low)  # w's, a's, g's and v's LoRA outputs
        q, u, v, w, coef = _prepare(self.RKV(mixed), up, v_first, self.wa0, self.v0, self.k_k, self.k_a, self.r_k,
                                    self.decay_scale, H, self.first_layer)
        if self.first_layer:
            v_first = v
        o = _recurrence(S, q, u, v, w, rows, H, N, snap_S)
        x = x + self.O(_finish(o, coef, v, up[:, 2 * C:3 * C], self.lnx_w, self.lnx_b, self.gn_eps))

        # ---- channel mix
        xx, kx = _shift_mix(x, self.ln2_w, self.ln2_b, self.ln_eps, ffn_prev, self.fx_k, rows)
        if snapping:
            snap_ffn.copy_(xx[rows.snap_pos])
        kx = torch.relu(self.FK(kx)).square_()
        return x + self.FV(kx), v_first


class _Network(nn.Module):
    """Embedding, blocks and head: what gets compiled."""

    def __init__(self, weights, precision, device, config: RWKV7Config):
        super().__init__()
        n_embd = config.n_embd
        # ln0 folded into the embedding (the table is only ever looked up).
        emb = F.layer_norm(weights["emb.weight"].float(), (n_embd,), weights["blocks.0.ln0.weight"].float(),
                           weights["blocks.0.ln0.bias"].float(), eps=_LAYER_NORM_EPS)
        self.emb = emb.to(device=device, dtype=torch.float32 if precision == "fp32" else torch.bfloat16)
        self.blocks = nn.ModuleList(_Block(weights, i, precision, device, config) for i in range(config.n_layer))
        self.ln_out_w = weights["ln_out.weight"].to(device=device, dtype=torch.float32).contiguous()
        self.ln_out_b = weights["ln_out.bias"].to(device=device, dtype=torch.float32).contiguous()
        self.head_linear = _make_linear([weights["head.weight"]], precision, device)
        self.ln_eps = _LAYER_NORM_EPS

    def forward(self, tokens: Tensor, state: List[Tensor], rows: Layout, snaps: List[Tensor]) -> Tensor:
        """Hidden states [M, C] after the last block, for the flat tokens [M]; the layout's
        snapshots go into `snaps` (laid out as a state of batch J; [] when there are none)."""
        x = self.emb[tokens].float()
        v_first = x
        none = x[:0]
        for i, block in enumerate(self.blocks):
            snap_att, snap_S, snap_ffn = none, none, none
            if len(snaps) > 0:
                snap_att, snap_S, snap_ffn = snaps[3 * i], snaps[3 * i + 1], snaps[3 * i + 2]
            x, v_first = block(x, v_first, state[3 * i], state[3 * i + 1], state[3 * i + 2], rows,
                               snap_att, snap_S, snap_ffn)
        return x

    @torch.jit.export
    def head(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x, [x.shape[1]], self.ln_out_w, self.ln_out_b, self.ln_eps)
        return self.head_linear(x)

    @torch.jit.export
    def logits(self, tokens: Tensor, state: List[Tensor], rows: Layout, snaps: List[Tensor]) -> Tensor:
        """Logits [B, vocab] after each sequence's last token."""
        x = self.forward(tokens, state, rows, snaps)
        return self.head(x if rows.single else x[rows.last])


class RWKV7Model:
    """RWKV-7 weights prepared once for fast batched inference.

    `weights` is the checkpoint's dict of tensors (official key names, e.g.
    from `inference.checkpoint.load_weights`). Inference runs under
    `torch.inference_mode`; the thread count is left to the caller.
    """

    def __init__(self, weights, device="cpu", precision="fp32", jit=True):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        device = torch.device(device)
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device: CPUs have no fast float16 "
                             "matrix multiply; use 'bf16' or 'int8' on CPU")
        if precision == "int8" and device.type != "cpu":
            raise ValueError("precision 'int8' runs on the CPU only (fbgemm); use 'fp16' or 'bf16' on CUDA")
        self.device = device
        self.precision = precision
        self.config = RWKV7Config.from_weights(weights)
        self.n_layer, self.n_embd, self.n_head, self.head_size, self.vocab_size = (
            self.config.n_layer, self.config.n_embd, self.config.n_head, self.config.head_size,
            self.config.vocab_size)
        with torch.inference_mode():
            network = _Network(weights, precision, device, self.config).eval()
        self._network = torch.jit.script(network) if jit else network
        if jit:
            # TorchScript profiles the first call and optimises at the second
            # (about 0.3 + 0.5 s for a 0.1B model): pay that here, not on a
            # user's first reply.
            for _ in range(2):
                self.forward_snapshots([[0, 0, 0], [0]], self.zero_state(2), [2, 0])

    def zero_state(self, batch=1):
        B, C, H, N = batch, self.n_embd, self.n_head, self.head_size
        state = []
        for _ in range(self.n_layer):
            state.append(torch.zeros(B, C, device=self.device))
            state.append(torch.zeros(B, H, N, N, device=self.device))
            state.append(torch.zeros(B, C, device=self.device))
        return state

    def forward(self, token_lists, state):
        """Advance B sequences by their own tokens, all in one pass.

        token_lists: B lists of token ids, each at least one long and of any
        length (a decode step gives one token per sequence, a prompt chunk
        many); `state` (batch B, row b for token_lists[b]) is updated in
        place. Returns float32 logits [B, vocab] after each list's last
        token. The caller keeps the total number of tokens reasonable (the
        engine reads prompts in chunks).
        """
        return self.forward_snapshots(token_lists, state, None)[0]

    def forward_snapshots(self, token_lists, state, snapshot_after):
        """forward(), also taking snapshots inside the pass: `snapshot_after` gives
        for each sequence 0 (none) or n, 0 < n < its length, for its state after
        its first n tokens. Returns (logits, {b: state of batch 1})."""
        rows = layout([len(tokens) for tokens in token_lists], self.device, snapshot_after)
        flat = torch.tensor([t for tokens in token_lists for t in tokens], dtype=torch.long, device=self.device)
        J = rows.snap_seq.shape[0]
        snaps = self.zero_state(J) if J else []
        with torch.inference_mode():
            logits = self._network.logits(flat, state, rows, snaps)
        # Each its own tensors (not views of one batch that would keep the others alive).
        taken = {b: [t[j:j + 1] if J == 1 else t[j:j + 1].clone() for t in snaps]
                 for j, b in enumerate(rows.snap_seq.tolist())}
        return logits, taken

    def forward_one(self, tokens, state):
        """One decode step for B sequences: tokens LongTensor [B] -> logits float32 [B, vocab].

        `state` (batch B) is updated in place.
        """
        tokens = torch.as_tensor(tokens).reshape(-1).to(self.device)
        with torch.inference_mode():
            return self._network.logits(tokens, state, layout([1] * tokens.shape[0], self.device), [])

    def forward_seq(self, tokens, state, chunk=DEFAULT_SEQ_CHUNK):
        """Read T tokens for B sequences: tokens LongTensor [B, T] (or [T] for B=1).

        Returns float32 logits [B, vocab] after the last token. `state` is
        updated in place. Long inputs are processed `chunk` tokens at a time.
        """
        tokens = torch.as_tensor(tokens).to(self.device)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        B, T = tokens.shape
        if T == 0:
            raise ValueError("forward_seq needs at least one token")
        with torch.inference_mode():
            for start in range(0, T, chunk):
                part = tokens[:, start : start + chunk]
                logits = self._network.logits(part.reshape(-1), state, layout([part.shape[1]] * B, self.device), [])
        return logits
