"""Accuracy, not speed: how far a state read again can be from the state first read, per precision.

    .venv/bin/python bench/reread.py [--layers 2 --embd 128] [--prompts 12]

A reply reads its tokens one per forward pass; rebuilding its state (after
/chat/back, or a lost snapshot) reads them all in one pass. At fp32 the two
differ by float rounding. At a lossy precision the activations are rounded
to a grid in every pass, and a last-bit difference between the two float
results can round a value to the other side of a grid step, after which the
difference propagates. For prompts of 80-280 random tokens this prints, per
precision and per prompt, the largest relative (Frobenius) error over the
state's tensors of:

* one per pass against all at once (the real paths, this machine);
* the same with every activation entering a matrix product nudged by a
  relative 1e-6 (far more than float rounding: many flips, the worst case);
* all at once against cpu fp32 (the precision's own error);
* the state one token earlier against the state (what a wrong rebuild gives).

The suite's check (`assert_same_state` in tests/conftest.py) allows the
precision's bound (inference/rwkv7/model.py PRECISION_TOLERANCE) for the first two.
Defaults: the suite's tiny model shape, written to a temp dir if not there.
"""

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.forward import model_path  # noqa: E402
from inference.checkpoint import load_weights  # noqa: E402
from inference.rwkv7 import PRECISION_TOLERANCE, RWKV7Model, linear  # noqa: E402

NUDGE = 1e-6


def error(state, reference):
    return max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(state, reference))


def read(model, token_lists):
    """The state after reading each list in one pass, one list after the other."""
    state = model.zero_state(1)
    for tokens in token_lists:
        model.forward([tokens], state)
    return state


class nudged:
    """Within: every activation entering a lossy matrix product is multiplied by 1 + NUDGE * noise."""

    CLASSES = (linear._Int8Linear, linear._Int8KernelLinear, linear._HalfLinear)

    def __enter__(self):
        generator = torch.Generator().manual_seed(1)
        self.saved = [cls.forward for cls in self.CLASSES]
        for cls, forward in zip(self.CLASSES, self.saved):
            def nudged_forward(module, x, forward=forward):
                return forward(module, x * (1 + NUDGE * torch.randn(x.shape, generator=generator)))
            cls.forward = nudged_forward

    def __exit__(self, *exc):
        for cls, forward in zip(self.CLASSES, self.saved):
            cls.forward = forward


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--embd", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--precisions", default="int8,bf16")
    args = parser.parse_args()

    weights = load_weights(model_path(args.layers, args.embd))
    exact = RWKV7Model(weights, precision="fp32", jit=False)
    print(f"model: {args.layers} layers x {args.embd}; relative error per tensor, the largest over the state")
    for precision in args.precisions.split(","):
        model = RWKV7Model(weights, precision=precision, jit=False)  # not scripted: the nudge patches Python
        worst = [0.0, 0.0, 0.0, float("inf")]
        print(f"\n{precision} (bound {PRECISION_TOLERANCE[precision]})")
        print("tokens  one-per-pass  nudged  vs-fp32  one-token-earlier")
        for i in range(args.prompts):
            rng = random.Random(i)
            tokens = [rng.randrange(model.vocab_size) for _ in range(80 + 40 * (i % 6))]
            at_once = read(model, [tokens])
            one_per_pass = read(model, [[t] for t in tokens])
            with nudged():
                nudged_state = read(model, [[t] for t in tokens])
            row = (error(one_per_pass, at_once), error(nudged_state, at_once),
                   error(at_once, read(exact, [tokens])), error(read(model, [tokens[:-1]]), at_once))
            worst = [max(worst[0], row[0]), max(worst[1], row[1]), max(worst[2], row[2]), min(worst[3], row[3])]
            print(f"{len(tokens):6d}  {row[0]:12.2e}  {row[1]:6.4f}  {row[2]:7.4f}  {row[3]:17.3f}")
        print(f"{'worst':>6}  {worst[0]:12.2e}  {worst[1]:6.4f}  {worst[2]:7.4f}  {worst[3]:17.3f} (least)")


if __name__ == "__main__":
    main()
