"""Micro-benchmark: the sampler's step 4 (top_k, typical_p, XTC) and DRY's search, compiled
(inference/kernels/sampling.cpp: sampling_truncate, dry_repeats) against the numpy and Python
code they replace (Sampler.truncate, Sampler.dry_repeats_reference), in the same run.

    .venv/bin/python bench/sampler.py [--rows 16] [--repeats 21]

For a batch of `rows` replies over the 65,536-token vocabulary, with logits
drawn as a random model gives them (normal, spread 2.5), the median time of:

* step 4 alone on the batch's survivors, numpy row by row against one
  compiled call, for the settings clients send: top_k 40 and typical_p 0.9
  with min_p 0 (every token survives min_p: SillyTavern's presets that use
  them turn min_p off), top_k 40 and XTC with rpserver's min_p 0.05;
* DRY's search on a 4,096-token context (prompt and reply), for every row;
* a whole sampler step (sample_batch: penalties, min_p, step 4, DRY, the
  draw) with step 4 and DRY compiled against the same step with them in
  numpy and Python (everything else compiled in both).

Times are medians over the repeats, old and new measured in turn within
each repeat, so a machine shared with other work slows both alike; the
ratio is the figure to read. The machine's load average is printed.
Needs the kernels built (`make install`).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from inference import kernels, sampling  # noqa: E402
from inference.sampling import Sampler, SamplingSettings  # noqa: E402

VOCAB = 65536
BANNED = torch.tensor([0], dtype=torch.long)

STEP4_CASES = {
    "top_k 40, min_p 0": SamplingSettings(min_p=0.0, top_k=40),
    "typical_p 0.9, min_p 0": SamplingSettings(min_p=0.0, typical_p=0.9),
    "top_k 40, min_p 0.05": SamplingSettings(top_k=40),
    "XTC 0.1 / 0.5, min_p 0.05": SamplingSettings(xtc_threshold=0.1, xtc_probability=0.5),
}
DRY = SamplingSettings(dry_multiplier=0.8, dry_breakers=frozenset(range(10, 20)))


def timed(work):
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def compare(old, new, repeats):
    """Median seconds of old() and new(), run in turn `repeats` times."""
    olds, news = [], []
    for _ in range(repeats):
        olds.append(timed(old))
        news.append(timed(new))
    return statistics.median(olds), statistics.median(news)


def report(name, old, new):
    print(f"| {name} | {old * 1e3:.2f} ms | {new * 1e3:.3f} ms | {old / new:.1f}x |", flush=True)


def samplers_for(settings, rows, history=()):
    return [Sampler(settings, BANNED, seed=row, history=history) for row in range(rows)]


def numpy_step4_and_dry():
    """sample_batch's step 4 and DRY search in numpy and Python (the code before the compiled ones)."""
    compiled_truncate, compiled_dry = sampling._truncate_compiled, Sampler._dry_repeats_compiled
    sampling._truncate_compiled = sampling._truncate_numpy
    Sampler._dry_repeats_compiled = Sampler.dry_repeats_reference
    return lambda: (setattr(sampling, "_truncate_compiled", compiled_truncate),
                    setattr(Sampler, "_dry_repeats_compiled", compiled_dry))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    if not kernels.available():
        sys.exit("the kernels are not built: run `.venv/bin/python -m inference.kernels`")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(args.rows, VOCAB, generator=generator) * 2.5
    history = torch.randint(1, 400, (4096,), generator=generator).tolist()
    print(f"{args.rows} rows, {VOCAB} tokens, {args.repeats} repeats; torch threads {torch.get_num_threads()}; "
          f"load average at the start {os.getloadavg()[0]:.1f}")
    print("\n| what | numpy / Python | compiled | ratio |\n|---|---|---|---|")
    for name, settings in STEP4_CASES.items():
        survivors = sampling.survivors(samplers_for(settings, args.rows), logits.clone())
        old_samplers, new_samplers = samplers_for(settings, args.rows), samplers_for(settings, args.rows)
        old, new = compare(lambda: sampling._truncate_numpy(old_samplers, *survivors),
                           lambda: sampling._truncate_compiled(new_samplers, *survivors), args.repeats)
        report(f"step 4, {name} ({survivors[2].mean():.0f} survivors a row)", old, new)
    dry = samplers_for(DRY, args.rows, history)
    old, new = compare(lambda: [sampler.dry_repeats_reference() for sampler in dry],
                       lambda: [list(sampler._dry_repeats_compiled()) for sampler in dry], args.repeats)
    report("DRY's search, 4,096-token context", old, new)
    whole = {**STEP4_CASES, "DRY, 4,096-token context": DRY}
    for name, settings in whole.items():
        old_samplers = samplers_for(settings, args.rows, history)
        new_samplers = samplers_for(settings, args.rows, history)

        def old_step():
            restore = numpy_step4_and_dry()
            try:
                sampling.sample_batch(old_samplers, logits.clone())
            finally:
                restore()

        old, new = compare(old_step, lambda: sampling.sample_batch(new_samplers, logits.clone()), args.repeats)
        report(f"whole sampler step, {name}", old, new)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
