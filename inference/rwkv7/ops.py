"""The operations of an RWKV-7 layer, and the one place that chooses, for each, our
compiled kernels (inference/kernels) or PyTorch's operations: the products
(_make_linear, _make_lora), the token shift with its mixes (_shift_mix), the time
mix before and after the state update (_prepare, _finish) and the state update
itself (_state_step, _state_steps, run over a pass by _recurrence). Each
`_..._ops` function is the PyTorch form its kernel is tested against
(tests/test_rwkv7.py).
"""

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import kernels
from .layout import Layout
from .linear import _Fp32KernelLinear, _Fp32Linear, _HalfLinear, _Int8KernelLinear, _Int8Linear, _side_by_side


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
