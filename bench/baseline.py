"""The baseline: the `rwkv` package (the original server's engine) decoding one
stream, in a process of its own so that nothing else competes for the cores.

    .venv/bin/python bench/baseline.py --model bench/.cache/x.pth --json
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from script import BenchError  # noqa: E402
from server import PYTHON, ROOT  # noqa: E402
from stats import median  # noqa: E402
from text import text_of_tokens, tokenizer  # noqa: E402


def run_baseline(model, strategy="cpu fp32", tokens=64, prompt_tokens=1000, runs=3):
    """Decode tok/s (greedy argmax sampling included) and prompt-read tok/s of the
    plain `rwkv` package on `model`. Run it in a process of its own."""
    os.environ["RWKV_V7_ON"] = "1"
    os.environ["RWKV_JIT_ON"] = "1"
    os.environ["RWKV_CUDA_ON"] = "0"
    import torch
    from rwkv.model import RWKV

    path = str(model)
    if path.endswith(".pth"):
        path = path[:-4]
    started = time.monotonic()
    rwkv_model = RWKV(path, strategy)
    load_s = time.monotonic() - started

    prompt = tokenizer().encode(text_of_tokens(prompt_tokens))
    while len(prompt) < prompt_tokens:
        prompt += prompt[: prompt_tokens - len(prompt)]
    prompt = prompt[:prompt_tokens]
    short = tokenizer().encode("Ann: hello there, how are you today?\n\nBob:")

    # warm-up (TorchScript compiles on first use)
    out, state = rwkv_model.forward(short, None)
    for _ in range(4):
        out, state = rwkv_model.forward([int(torch.argmax(out))], state)

    decode = []
    for _ in range(runs):
        out, state = rwkv_model.forward(short, None)
        token = int(torch.argmax(out))
        started = time.monotonic()
        for _ in range(tokens):
            out, state = rwkv_model.forward([token], state)
            token = int(torch.argmax(out))  # greedy sampling step
        decode.append(tokens / (time.monotonic() - started))

    first_token = []
    for _ in range(runs):
        started = time.monotonic()
        out, state = rwkv_model.forward(prompt, None)
        int(torch.argmax(out))
        first_token.append(time.monotonic() - started)
    prefill = [len(prompt) / t for t in first_token]
    return {
        "model": str(model), "strategy": strategy, "threads": torch.get_num_threads(), "load_s": load_s,
        "decode_tokens": tokens, "decode_tok_s_runs": decode, "decode_tok_s": median(decode),
        "prompt_tokens": len(prompt), "prefill_tok_s_runs": prefill, "prefill_tok_s": len(prompt) / median(first_token),
        "prompt_first_token_s": median(first_token),
    }


def baseline_subprocess(model, strategy, tokens, prompt_tokens, runs):
    """run_baseline() in a separate Python process (so nothing else competes for the cores)."""
    cmd = [PYTHON, str(Path(__file__).resolve()), "--model", str(model), "--strategy", strategy,
           "--tokens", str(tokens), "--prompt-tokens", str(prompt_tokens), "--runs", str(runs), "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError("the baseline failed:\n" + proc.stderr[-3000:])
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise BenchError("the baseline printed no result:\n" + proc.stdout[-2000:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--strategy", default="cpu fp32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    result = run_baseline(args.model, args.strategy, args.tokens, args.prompt_tokens, args.runs)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
