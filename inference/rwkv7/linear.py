"""RWKV-7's matrix products in each precision: x float32 (M, in) -> float32 (M, out).

One class for each way to multiply: PyTorch's (float32, half precision,
fbgemm's int8) and our kernels' (inference/kernels: int8 and float32 from
packed weights). Which one a layer gets is chosen in .ops (_make_linear,
_make_lora), with the rest of the kernel dispatch.
"""

import warnings
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


def _side_by_side(linears, columns, widths):
    """One product reading its whole input as it is, or several side by side."""
    if len(linears) == 1 and columns[0] == 0:
        return linears[0]
    return _SideBySide(linears, columns, widths)
