"""Micro-benchmark: our batched RWKV-7 forward (inference/rwkv7/) against the rwkv package.

    .venv/bin/python bench/forward.py [--layers 12 --embd 768] [--repeats 3] [--prompt 1000]

Writes a random-weight model of that shape to a temp dir if it is not there
yet, then prints medians of several repeats:

* the rwkv package (RWKV_V7_ON=1, "cpu fp32"): single-stream decode tokens/s
  and prompt-reading (prefill) tokens/s: the baseline, measured as
  bench/throughput.py measures it, in a process of its own (measured in this
  one first, it left our passes ~40 % slower after it);
* ours for each precision: decode at batch sizes 1, 4, 16, 32 (aggregate
  tokens/s: batch * steps / time) and prefill of the same prompt;
* each figure's ratio to the matching baseline figure;
* each precision's logit error against our cpu fp32 on a short probe
  (a prompt and a few decode steps), and how often the top token agrees.

`--fused off` runs each layer's elementwise work as PyTorch operations (what
the forward pass does without the kernels) while the matrix products stay
ours: run it and the default in turns to see what the fused passes
(inference/kernels/time_mix.cpp) give. (Not both in one process:
TorchScript reuses a module class's compiled code for every instance.)

`--without-products` also times, for each precision, the pass with its
matrix products (R/K/V, O, the channel mix's two, the LoRAs, the head)
replaced by constants of their shape: what the rest of the pass costs.

Threads: torch's default (all cores) unless --threads is given.
`--device cuda --precisions fp16,bf16` measures ours on a GPU (the package
baseline stays on the CPU, as the original server ran it).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from inference import rwkv7  # noqa: E402
from inference.checkpoint import load_weights, write_demo_model  # noqa: E402
from inference.rwkv7 import RWKV7Model, ops  # noqa: E402

from baseline import baseline_subprocess  # noqa: E402

BATCHES = (1, 4, 16, 32)


def model_path(layers, embd):
    path = Path(tempfile.gettempdir()) / "rpserver-bench" / f"demo-rwkv7-L{layers}-D{embd}.pth"
    if not path.exists():
        print(f"writing a random {layers}-layer {embd}-wide RWKV-7 to {path} ...", flush=True)
        write_demo_model(path, n_layer=layers, n_embd=embd)
    return path


def cpu_busy(seconds=1.0):
    """Fraction of the machine's CPU time that was busy over `seconds` (Linux)."""
    def ticks():
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
        return sum(fields), fields[3] + fields[4]

    try:
        total0, idle0 = ticks()
        time.sleep(seconds)
        total1, idle1 = ticks()
    except OSError:
        return 0.0
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet(max_wait, threshold=0.25):
    """Other jobs on a shared 2-core machine make every figure junk: wait a while for them."""
    started = time.monotonic()
    busy = cpu_busy()
    while busy > threshold and time.monotonic() - started < max_wait:
        print(f"  CPUs {100 * busy:.0f}% busy with other processes, waiting ...", flush=True)
        busy = cpu_busy(3.0)
    if busy > threshold:
        print(f"  ** CPUs still {100 * busy:.0f}% busy: figures will be low and noisy **", flush=True)


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_rate(run, count, repeats):
    """Median of `count / seconds(run())` over `repeats` runs (after one warm-up)."""
    run()
    rates = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def steps_for(rate_guess, batch, seconds=0.8):
    return max(4, int(seconds * rate_guess / batch))


# The accuracy probe: a short prompt, then a few decode steps.
PROBE = [5, 300, 1000, 25, 7777, 12, 65000, 33, 4096, 261, 0, 65535] * 3
PROBE_STEPS = (11, 22, 33, 44, 55, 66)


def probe_logits(model):
    """float32 CPU logits after PROBE and after each of PROBE_STEPS."""
    state = model.zero_state(1)
    logits = [model.forward_seq(torch.tensor([PROBE], device=model.device), state)]
    for token in PROBE_STEPS:
        logits.append(model.forward_one(torch.tensor([token], device=model.device), state))
    return [x.float().cpu() for x in logits]


def accuracy(logits, reference):
    """(max relative error ||x - ref|| / ||ref||, steps whose top token agrees)."""
    errors = [((x - r).norm() / r.norm()).item() for x, r in zip(logits, reference)]
    return max(errors), sum(int(x.argmax() == r.argmax()) for x, r in zip(logits, reference))


def bench_ours(weights, precision, prompt, repeats, device="cpu", batches=BATCHES, reference=None):
    model = RWKV7Model(weights, device=device, precision=precision)
    results = {}
    if reference is not None:
        results["error"], results["top1"] = accuracy(probe_logits(model), reference)
    guess = 40.0
    for batch in batches:
        state = model.zero_state(batch)
        tokens = torch.arange(batch, dtype=torch.long, device=device) + 100
        model.forward_seq(torch.tensor([prompt[:8]] * batch), state)
        steps = steps_for(guess, batch)

        def decode():
            for _ in range(steps):
                model.forward_one(tokens, state)

        results[batch] = median_rate(decode, steps * batch, repeats)
        guess = results[batch]
    tokens = torch.tensor([prompt])
    results["prefill"] = median_rate(lambda: model.forward_seq(tokens, model.zero_state(1)), len(prompt),
                                     max(1, repeats - 1))
    return results


class Constant(torch.nn.Module):
    """Stands in for a matrix product: a constant of the product's output shape."""

    def __init__(self, width):
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], self.width), 0.01, device=x.device)


def bench_without_products(weights, precision, device, batches, repeats):
    """ms per decode step of the compiled pass with every matrix product replaced by a Constant."""
    model = RWKV7Model(weights, device=device, precision=precision, jit=False)
    network = model._network

    products = [(block, name) for block in network.blocks for name in ("RKV", "lora_down", "lora_up", "O", "FK", "FV")]
    products.append((network, "head_linear"))
    widths = {}  # each product's output width, seen in one eager step
    hooks = [getattr(owner, name).register_forward_hook(
        lambda module, args, out, key=(id(owner), name): widths.__setitem__(key, out.shape[1]))
        for owner, name in products]
    model.forward([[100]], model.zero_state(1))
    for hook in hooks:
        hook.remove()
    for owner, name in products:
        setattr(owner, name, Constant(widths[(id(owner), name)]))
    compiled = torch.jit.script(network)
    results = {}
    for batch in batches:
        state = model.zero_state(batch)
        tokens = torch.arange(batch, dtype=torch.long, device=device) + 100
        rows = rwkv7.layout([1] * batch, model.device)
        steps = steps_for(500.0, batch)

        def decode():
            with torch.inference_mode():
                for _ in range(steps):
                    compiled.logits(tokens, state, rows, [])

        results[batch] = batch * 1e3 / median_rate(decode, steps * batch, repeats)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=1000, help="prompt length for prefill")
    parser.add_argument("--precisions", default="fp32,bf16,int8")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help='"cpu" or "cuda"')
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--wait-quiet", type=float, default=120,
                        help="wait up to this many seconds for other processes to leave the CPUs")
    parser.add_argument("--no-package", action="store_true", help="skip the rwkv package baseline")
    parser.add_argument("--fused", choices=("on", "off"), default="on",
                        help="off: each layer's elementwise work as PyTorch operations, the products still ours")
    parser.add_argument("--without-products", action="store_true",
                        help="also time the pass with its matrix products replaced by constants")
    args = parser.parse_args()
    if args.fused == "off":
        # The model's layers call these names (TorchScript reads them when a model is compiled).
        rwkv7.model._shift_mix, rwkv7.model._prepare, rwkv7.model._finish = (
            ops._shift_mix_ops, ops._prepare_ops, ops._finish_ops)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = tuple(int(b) for b in args.batches.split(","))

    path = model_path(args.layers, args.embd)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 65536, (args.prompt,), generator=gen).tolist()
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"model {path.name}, torch {torch.__version__}, {where}, median of {args.repeats} repeats, fused "
          f"elementwise passes {args.fused}", flush=True)

    wait_for_quiet(args.wait_quiet)
    base_one = base_prefill = float("nan")
    if not args.no_package:
        # In a process of its own: measured in this one first, it left ours ~40 % slower after it.
        print("  measuring the rwkv package (its own process) ...", flush=True)
        base = baseline_subprocess(path, "cpu fp32", tokens=64, prompt_tokens=args.prompt, runs=args.repeats)
        base_one, base_prefill = base["decode_tok_s"], base["prefill_tok_s"]
    weights = load_weights(path)
    reference = probe_logits(RWKV7Model(weights))  # cpu fp32
    rows = []
    for precision in args.precisions.split(","):
        print(f"  measuring ours {precision} ...", flush=True)
        rows.append((precision, bench_ours(weights, precision, prompt, args.repeats, args.device, batches,
                                           reference)))
    if args.without_products:
        print()
        for precision in args.precisions.split(","):
            rest = bench_without_products(weights, precision, args.device, batches, args.repeats)
            print(f"ours {precision}, the pass without its products (constants instead): " +
                  ", ".join(f"{rest[b]:.2f} ms at B={b}" for b in batches))

    cols = [f"B={b}" for b in batches] + [f"prefill {args.prompt}"]
    head = f"{'':18}" + "".join(f"{c:>14}" for c in cols)
    print()
    print("tokens/s (aggregate over the batch)       ratio vs package: decode vs its single stream, prefill vs its prefill")
    print(head)
    print(f"{'rwkv package fp32':18}{base_one:14.1f}{'':{14 * (len(batches) - 1)}}{base_prefill:14.1f}")
    for precision, res in rows:
        print(f"{'ours ' + precision:18}" + "".join(f"{res[k]:14.1f}" for k in (*batches, "prefill")))
    for precision, res in rows:
        ratios = [res[b] / base_one for b in batches] + [res["prefill"] / base_prefill]
        print(f"{'  ratio ' + precision:18}" + "".join(f"{r:13.2f}x" for r in ratios))
    print()
    print(f"accuracy against cpu fp32 over a {len(PROBE)}-token prompt and {len(PROBE_STEPS)} decode steps "
          f"(the bound is PRECISION_TOLERANCE in inference/rwkv7/model.py):")
    for precision, res in rows:
        print(f"  {precision:5} max relative logit error {100 * res['error']:.2f} %, top token agrees "
              f"{res['top1']} of {len(PROBE_STEPS) + 1}")


if __name__ == "__main__":
    main()
