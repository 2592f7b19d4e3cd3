"""Idle and loaded side by side: the server's speed while another process keeps one core busy.

Servers share their cores (a database, a web server, backups, other
tenants). One server is started (`manage.py serve`, the default strategy
unless --strategy, a random-weight RWKV-7 shaped like the 0.1B model);
then, in alternating rounds, --users clients stream replies of --tokens
tokens through /v1/chat/completions for --seconds, once with the machine as
it is ("idle") and once while this script runs `python3 -c 'while True:
pass'` beside it ("loaded"; the order swaps every round). Printed per round
and as medians: tokens per second for all users together (tokens streamed
within the window), the first token's p50, and loaded as a share of idle.

    .venv/bin/python bench/loaded.py                      # 8 users, 3 rounds of 20 s + 20 s
    .venv/bin/python bench/loaded.py --rounds 5 --env OMP_WAIT_POLICY=PASSIVE
    .venv/bin/python bench/loaded.py --env RPSERVER_ADAPT_THREADS=0   # the thread count held fixed

--env KEY=VALUE (repeatable) sets the server's environment, to compare
settings (docs/performance.md, "A shared machine"). The machine's own load
before the start is printed: other work on the machine makes "idle" less so.
"""

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_note  # noqa: E402
from script import BenchError, install_sigterm_handler, run_script  # noqa: E402
from server import Server, ensure_model  # noqa: E402
from stats import fmt, median, table  # noqa: E402
from text import filler_text  # noqa: E402

BUSY_LOOP = "while True: pass"


def share(part, whole, unit="%"):
    if not whole or part != part or whole != whole:
        return "-"
    return f"{100 * part / whole:.0f}%" if unit == "%" else f"{part / whole:.1f}x"


async def stream_reply(http, client_id, request_no, tokens, deadline, record):
    """One streamed completion; counts each text chunk as it arrives (within the window) and the first's delay."""
    body = {"model": "rwkv", "max_tokens": tokens, "stream": True, "seed": client_id * 1000 + request_no,
            "messages": [{"role": "system", "content": "You are Bob, a lighthouse keeper."},
                         {"role": "user", "content": f"({client_id}.{request_no}) "
                                                     + filler_text(20, offset=client_id * 31 + request_no)}]}
    started = time.perf_counter()
    first = None
    async with http.stream("POST", "/v1/chat/completions", json=body) as answer:
        if answer.status_code != 200:
            raise BenchError(f"/v1/chat/completions answered {answer.status_code}: {(await answer.aread())[:300]!r}")
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                if choice["delta"].get("content"):
                    now = time.perf_counter()
                    if first is None:
                        first = now - started
                        record["first"].append(first)
                    if now <= deadline:
                        record["chunks"] += 1
            if time.perf_counter() > deadline:
                return  # the window is over: leaving cancels the reply in the server


async def phase(base_url, users, tokens, seconds):
    """`users` clients streaming replies back to back for `seconds`: (chunks per second, first-token p50)."""
    record = {"chunks": 0, "first": []}
    started = time.perf_counter()
    deadline = started + seconds

    async def client(client_id):
        async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:
            request_no = 0
            while time.perf_counter() < deadline:
                request_no += 1
                await stream_reply(http, client_id, request_no, tokens, deadline, record)

    await asyncio.gather(*(client(i) for i in range(users)))
    return record["chunks"] / seconds, (median(record["first"]) if record["first"] else float("nan"))


def measure(server, args, loaded):
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if loaded else None
    try:
        return asyncio.run(phase(server.url, args.users, args.tokens, args.seconds))
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def main():
    install_sigterm_handler()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per reply (default 64)")
    parser.add_argument("--seconds", type=float, default=20, help="length of each measured window (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="idle/loaded pairs, alternating order (default 3)")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--model", help="checkpoint to serve (default: a cached random RWKV-7 of --layers x --embd)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="server environment")
    args = parser.parse_args()

    print(machine_note(), flush=True)
    model = Path(args.model) if args.model else ensure_model(args.layers, args.embd)
    env = {"RPSERVER_OPENAI_ANONYMOUS": "1", "RPSERVER_MAX_REPLY_TOKENS": str(args.tokens)}
    env.update(item.split("=", 1) for item in args.env)
    print(f"loaded: {args.users} users, {args.tokens}-token replies through /v1/chat/completions, "
          f"{args.rounds} rounds of {args.seconds:g} s idle and {args.seconds:g} s beside a busy loop; "
          f"{model.name}, strategy {args.strategy}, env {args.env or 'default'}", flush=True)
    rows, idle, loaded = [], [], []
    with Server(model, Path(tempfile.mkdtemp(prefix="rploaded-")), args.strategy, env) as server:
        asyncio.run(phase(server.url, 2, 8, 3))  # warm-up: first-use costs are not measured
        for round_no in range(args.rounds):
            order = (False, True) if round_no % 2 == 0 else (True, False)
            results = {kind: measure(server, args, kind) for kind in order}
            idle.append(results[False])
            loaded.append(results[True])
            rows.append([round_no + 1, fmt(results[False][0], 1), fmt(results[True][0], 1),
                         share(results[True][0], results[False][0]),
                         fmt(results[False][1], 2), fmt(results[True][1], 2),
                         share(results[True][1], results[False][1], "x")])
            print(f"round {round_no + 1}: idle {results[False][0]:.1f} tok/s, loaded {results[True][0]:.1f} tok/s",
                  flush=True)
    idle_tps, loaded_tps = median([r[0] for r in idle]), median([r[0] for r in loaded])
    idle_first, loaded_first = median([r[1] for r in idle]), median([r[1] for r in loaded])
    rows.append(["median", fmt(idle_tps, 1), fmt(loaded_tps, 1), share(loaded_tps, idle_tps),
                 fmt(idle_first, 2), fmt(loaded_first, 2), share(loaded_first, idle_first, "x")])
    print()
    print(table(["round", "idle tok/s", "loaded tok/s", "loaded/idle", "idle first s", "loaded first s",
                 "first loaded/idle"], rows))
    print("(targets, issue 18: loaded >= 40% of idle, first tokens within 3x)")


if __name__ == "__main__":
    run_script(main)
