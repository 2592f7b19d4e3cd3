"""Micro-benchmark: the compiled RWKV-7 state update (inference/kernels) against the PyTorch one it replaces.

    .venv/bin/python bench/kernels.py [--repeats 15]

For the 0.1B shape (64-wide heads), on one thread and on every core, the
median time of:

* one decode step of 32 sequences (384 heads, one token each): the
  compiled `wkv7_step` against inference/rwkv7/ops.py's `_step` (a bmm, a scale
  and a rank-2 update: what the forward pass runs without the build);
* one sequence reading a 256-token prompt (12 heads, 256 tokens in a row):
  `wkv7_steps` (one call, each head's state kept in the L1 cache) against
  256 calls of `wkv7_step` and against `_steps`.

The inputs are shaped as the model makes them (unit kk, decays in (0.5, 1)).

And the matrix products, at 1 and 32 rows, with the weights coming from
memory as in the model (enough copies of each matrix cycled to overflow the
caches), with the bytes of weights read per second: the `cpu int8` ones,
our `int8_linear` (inference/kernels/int8_linear.cpp) against fbgemm's
(rwkv7._Int8Linear, the fallback), for the 0.1B model's 768 x 768,
3072 x 768, 768 x 3072 and the 65,536 x 768 head; and the float32 LoRA
halves, our `f32_linear` against MKL's (rwkv7._Fp32Linear).

Then a layer's products that read columns of one input (R, K and V; the
LoRAs' first halves; their second halves) in one kernel call, as the model
makes them, against one call per product.

Last, the compute ceiling of reading prompts: bench/int8_peak.cpp (compiled
here with g++) measures the most int8 multiply-adds per second the CPU's
AVX2 gives on registers alone, on one core and on all; our int8 product
on a 256-token chunk (weights in the caches) is put against it, and so is
what a prompt token of the 0.1B model needs (85 M multiply-adds in its
int8 products): the fastest prompt reading the products alone allow.

Needs the kernels built (`make install`).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from inference import kernels  # noqa: E402
from inference.rwkv7.linear import _Fp32KernelLinear, _Fp32Linear, _Int8KernelLinear, _Int8Linear  # noqa: E402
from inference.rwkv7.ops import _step, _steps  # noqa: E402

HEAD_SIZE = 64
# Multiply-adds of one token in the 0.1B model's int8 products: 12 layers of four 768 x 768 and
# the 3072 x 768 and 768 x 3072 of the channel mix (the head is read for a prompt's last token only).
PROMPT_TOKEN_MACS = 12 * (4 * 768 * 768 + 2 * 3072 * 768)


def inputs(heads, tokens, generator):
    def rand(*shape):
        return torch.rand(tokens, heads, *shape, generator=generator)

    kk = torch.nn.functional.normalize(torch.randn(tokens, heads, 1, HEAD_SIZE, generator=generator), dim=-1)
    w, r, k, v = (0.5 + 0.5 * rand(1, HEAD_SIZE), rand(1, HEAD_SIZE) - 0.5, rand(1, HEAD_SIZE) - 0.5,
                  rand(1, HEAD_SIZE) - 0.5)
    q, u = torch.cat((w * r, kk), dim=2), torch.cat((-kk * rand(1, HEAD_SIZE), k), dim=2)
    state = torch.randn(heads, HEAD_SIZE, HEAD_SIZE, generator=generator) * 0.3
    return state, q, u, v, w


def time_us(run, repeats, statistic=statistics.median):
    """The median (or another statistic) of `repeats` timed runs after one untimed, in microseconds."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistic(times) * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if not kernels.available():
        sys.exit("the compiled kernels are not built: run `make install` (python -m inference.kernels)")
    generator = torch.Generator().manual_seed(0)
    compiled_step, compiled_steps = torch.ops.rpserver.wkv7_step, torch.ops.rpserver.wkv7_steps
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores; "
          f"medians of {args.repeats}")
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        S, q, u, v, w = inputs(384, 1, generator)
        plain = time_us(lambda: _step(S, q[0], u[0], v[0], w[0]), args.repeats)
        fused = time_us(lambda: compiled_step(S, q[0], u[0], v[0], w[0]), args.repeats)
        print(f"{threads} thread(s), decode step of 32 sequences (384 heads): "
              f"PyTorch {plain:.0f} us, compiled {fused:.0f} us ({plain / fused:.1f}x)")
        S, q, u, v, w = inputs(12, 256, generator)
        plain = time_us(lambda: _steps(S, q, u, v, w), args.repeats) / 256
        single = time_us(lambda: [compiled_step(S, q[t], u[t], v[t], w[t]) for t in range(256)], args.repeats) / 256
        fused = time_us(lambda: compiled_steps(S, q, u, v, w), args.repeats) / 256
        print(f"{threads} thread(s), 256-token prompt of one sequence, per token: PyTorch {plain:.1f} us, "
              f"compiled one call per token {single:.1f} us, one call for all {fused:.1f} us "
              f"({plain / fused:.1f}x)")

    torch.set_num_threads(os.cpu_count() or 1)
    if not kernels.vectorised():
        sys.exit("the matrix-product kernels need the kernels built with AVX2")
    print(f"\nmatrix products, {torch.get_num_threads()} thread(s), weights from memory (us per product):")
    products = [("int8", "fbgemm", _Int8Linear, _Int8KernelLinear, shape, 1)
                for shape in ((768, 768), (3072, 768), (768, 3072), (65536, 768))]
    products += [("float32 LoRA", "MKL", _Fp32Linear, _Fp32KernelLinear, shape, 4)
                 for shape in ((64, 768), (768, 64), (128, 768), (768, 128))]
    for kind, library, theirs_class, ours_class, (rows, cols), width in products:
        copies = max(2, (64 << 20) // (rows * cols * width))  # 64 MB of each: more than the caches hold
        weights = [torch.randn(rows, cols, generator=generator) for _ in range(copies)]
        theirs, ours = [theirs_class(w) for w in weights], [ours_class(w) for w in weights]
        for batch in (1, 32):
            x = torch.randn(batch, cols, generator=generator)
            library_us = time_us(lambda: [linear(x) for linear in theirs], args.repeats) / copies
            ours_us = time_us(lambda: [linear(x) for linear in ours], args.repeats) / copies
            print(f"  {kind:12} {rows:>5} x {cols:<4} {batch:2} row(s): {library} {library_us:7.1f}, "
                  f"ours {ours_us:7.1f} ({library_us / ours_us:.2f}x, "
                  f"{rows * cols * width / ours_us / 1e3:.1f} GB/s of weights)")
    side_by_side(generator, args.repeats)
    compute_ceiling(generator, args.repeats)


# A layer's products that read columns of one input, in one call: (kernel, input width, [(N, K, column)]).
SIDE_BY_SIDE = {
    "R, K, V (int8)": (_Int8KernelLinear, 6 * 768, [(768, 768, 0), (768, 768, 768), (768, 768, 1536)]),
    "LoRA first halves": (_Fp32KernelLinear, 6 * 768, [(64, 768, 2304), (64, 768, 3072), (128, 768, 3840),
                                                        (32, 768, 1536)]),
    "LoRA second halves": (_Fp32KernelLinear, 288, [(768, 64, 0), (768, 64, 64), (768, 128, 128), (768, 32, 256)]),
}


def side_by_side(generator, repeats):
    """One kernel call for several products reading columns of one input (as the model makes them)
    against one call per product, weights from memory."""
    print("\nproducts side by side (a layer's, as the model calls them), weights from memory: "
          "one call per product -> one call for all (us)")
    for name, (kernel, width, shapes) in SIDE_BY_SIDE.items():
        copies = max(2, (64 << 20) // sum(N * K * (1 if kernel is _Int8KernelLinear else 4) for N, K, _ in shapes))
        layers = []
        for _ in range(copies):
            weights = [torch.randn(N, K, generator=generator) for N, K, _ in shapes]
            columns = [column for _, _, column in shapes]
            layers.append(([kernel(weight, (column,)) for weight, column in zip(weights, columns)],
                           kernel(weights, columns)))
        for batch in (1, 32):
            x = torch.randn(batch, width, generator=generator)
            apart = time_us(lambda: [linear(x) for alone, _ in layers for linear in alone], repeats) / copies
            together = time_us(lambda: [linear(x) for _, linear in layers], repeats) / copies
            print(f"  {name:20} {batch:2} row(s): {apart:6.1f} -> {together:6.1f} ({apart / together:.2f}x)")


def int8_peak(threads):
    """G multiply-adds per second of bench/int8_peak.cpp on `threads` threads (the best of 3 runs),
    or None where it cannot be built or run here."""
    compiler = shutil.which("g++")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as directory:
        program = Path(directory) / "int8_peak"
        try:
            subprocess.run([compiler, "-O3", "-mavx2", "-pthread", str(Path(__file__).with_name("int8_peak.cpp")),
                            "-o", str(program)], check=True)
            return max(float(subprocess.run([str(program), str(threads)], check=True, capture_output=True,
                                            text=True).stdout) for _ in range(3))
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"  bench/int8_peak.cpp did not build or run: {exc}")
            return None


def compute_ceiling(generator, repeats):
    """Our int8 product on a prompt chunk against the CPU's int8 peak, and the prompt speed it bounds.
    Both are the best of their runs: a peak is what a run gets when nothing interrupts it."""
    cores = os.cpu_count() or 1
    print("\nthe compute ceiling of reading prompts (int8, 256-row chunks, weights in the caches, "
          "best runs):")
    linear = _Int8KernelLinear(torch.randn(768, 768, generator=generator))
    x = torch.randn(256, 768, generator=generator)
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        ours = 256 * 768 * 768 / time_us(lambda: linear(x), 4 * repeats, min) / 1e3
        peak = int8_peak(threads)
        if peak is None:
            print(f"  {threads} thread(s): ours {ours:.1f} G multiply-adds/s (the peak not measured)")
            continue
        print(f"  {threads} thread(s): ours {ours:.1f} G multiply-adds/s, the AVX2 peak {peak:.1f} "
              f"({100 * ours / peak:.0f} %): a 0.1B prompt token's int8 products take "
              f"{PROMPT_TOKEN_MACS / 1e6:.0f} M, so at the peak, with nothing else in the pass, "
              f"{peak * 1e9 / PROMPT_TOKEN_MACS:,.0f} tok/s; at ours {ours * 1e9 / PROMPT_TOKEN_MACS:,.0f}")


if __name__ == "__main__":
    main()
