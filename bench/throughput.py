"""Throughput benchmark: N concurrent simulated users against the real server.

For each N in --users, a fresh server (`manage.py serve`, its own temp data
dir) is started on a random-weight RWKV-7 model shaped like the 0.1B one
(12 layers, 768 wide, world vocab), warmed up with one reply, and then N
users each log in as a guest, save a character, load it, and stream
--replies replies through /chat/reply. Reported per N: aggregate generated
tokens/s, per-stream decode speed, first-token latency p50/p95 and the
server's memory (RSS sampled every 50 ms, and VmHWM).

Generated tokens are counted exactly from /debug/token's token_count before
and after each reply, minus the tokens of the user turn (world tokenizer);
with random weights a reply nearly always runs to RPSERVER_MAX_REPLY_TOKENS
(= --tokens), and the table says how many ended early.

Before any server starts, a separate process measures the baseline: the
`rwkv` package (RWKV_V7_ON=1, RWKV_JIT_ON=1) decoding one stream on the same
checkpoint with greedy sampling, and reading a --prefill-tokens prompt.

Then a prefill test: time to first token for a fresh character whose reply
prompt is ~--prefill-tokens tokens, versus the baseline reading as many.

    .venv/bin/python bench/throughput.py                 # full run (~5-8 min on 2 cores)
    .venv/bin/python bench/throughput.py --quick         # smoke run (~1 min, tiny model, N=1,2)
    .venv/bin/python bench/throughput.py --users 1,8 --tokens 128 --strategy "cpu bf16"
    .venv/bin/python bench/throughput.py --users 16 --runs 5 --strategy "cpu int8"   # median of 5 fresh servers

Exit status 1 on any API error or if the server fails to start.
"""

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import baseline_subprocess  # noqa: E402
from client import Client, gather_strict  # noqa: E402
from machine import CpuMeter, machine_note, wait_for_quiet  # noqa: E402
from script import install_sigterm_handler, run_script  # noqa: E402
from server import METRICS_TOKEN, Server, ensure_model  # noqa: E402
from stats import fmt, median, percentile, table  # noqa: E402
from text import text_of_tokens, user_turn_tokens  # noqa: E402

USER = "Ann"
BOT = "Bob"
GREETING = "Hello Ann, it is good to see you again. What shall we talk about today?"
PERSONA = ("Bob is a cheerful lighthouse keeper on a windy island. He loves the sea, old maps, "
           "strong tea and long stories about ships. He answers kindly and with curiosity.")
PROMPTS = [
    "Tell me about the storm that hit the island last winter.",
    "What was the strangest ship you ever saw from the lighthouse?",
    "Do you ever get lonely out there on the rocks?",
    "Which old map in your collection is your favourite, and why?",
]


class ReplyStats:
    def __init__(self, ttft, total, generated, early, frames):
        self.ttft = ttft
        self.total = total
        self.generated = generated
        self.early = early
        self.frames = frames


async def counted_reply(client, name, prompt, before, max_tokens, user=USER, bot=BOT):
    """Stream one reply; return (ReplyStats, token_count after)."""
    result = await client.reply(name, prompt)
    after = await client.token_count(name)
    extra = after - before - user_turn_tokens(user, bot, prompt)
    if extra >= max_tokens:
        generated, early = max_tokens, False  # cut at the limit ("\n\n" read after it)
    else:
        generated, early = max(extra, 1), True  # ended at a blank line the model wrote
    return ReplyStats(result.first_frame, result.total, generated, early, result.frames), after


async def setup_user(base_url, index):
    client = Client(base_url)
    await client.login_guest()
    await client.save_character(BOT, USER, GREETING, PERSONA)
    await client.load(BOT)
    before = await client.token_count(BOT)
    return client, before


async def user_session(client, before, replies, max_tokens, start_event, index):
    await start_event.wait()
    stats = []
    for n in range(replies):
        prompt = PROMPTS[(index + n) % len(PROMPTS)]
        reply, before = await counted_reply(client, BOT, prompt, before, max_tokens)
        stats.append(reply)
    return stats


async def run_users(base_url, users, replies, max_tokens):
    """N users: setup concurrently, then all start replying at once. Returns (stats, wall seconds)."""
    sessions = await gather_strict(*(setup_user(base_url, i) for i in range(users)))
    try:
        start = asyncio.Event()
        tasks = [user_session(client, before, replies, max_tokens, start, i)
                 for i, (client, before) in enumerate(sessions)]
        runner = asyncio.ensure_future(gather_strict(*tasks))
        await asyncio.sleep(0)
        started = time.monotonic()
        start.set()
        per_user = await runner
        wall = time.monotonic() - started
    finally:
        for client, _ in sessions:
            await client.close()
    return [s for stats in per_user for s in stats], wall


async def warm_up(base_url, max_tokens):
    """One reply on a throwaway account, so first-use costs (TorchScript) are not measured."""
    stats, _ = await run_users(base_url, 1, 1, max_tokens)
    return stats[0]


def mb(kb):
    return kb / 1024.0 if kb else float("nan")


def engine_figures(before, after, wall):
    """What the engine did during a run, from its /metrics counters before and after."""
    steps = after["steps"] - before["steps"]
    if not steps:
        return {}
    return {"rows_per_pass": (after["rows"] - before["rows"]) / steps,
            "pass_ms": 1000 * (after["pass_seconds"] - before["pass_seconds"]) / steps,
            "step_ms": 1000 * (after["step_seconds"] - before["step_seconds"]) / steps,
            "in_passes": (after["pass_seconds"] - before["pass_seconds"]) / wall,
            "in_steps": (after["step_seconds"] - before["step_seconds"]) / wall}


def phase(model, data_root, args, users):
    env = {"RPSERVER_MAX_REPLY_TOKENS": args.tokens}
    if args.engine_stats:
        env["RPSERVER_METRICS_TOKEN"] = METRICS_TOKEN
    with Server(model, Path(data_root) / f"n{users}", args.strategy, env) as server:
        asyncio.run(warm_up(server.url, args.tokens))
        idle_kb = server.status().get("VmRSS", 0)
        server.sample_rss()
        meter = CpuMeter([server.proc.pid])
        counters = server.engine_counters() if args.engine_stats else None
        stats, wall = asyncio.run(run_users(server.url, users, args.replies, args.tokens))
        engine = engine_figures(counters, server.engine_counters(), wall) if args.engine_stats else {}
        others = meter.others()
        peak_kb = server.stop_sampling()
        hwm_kb = server.status().get("VmHWM", 0)
        startup = server.startup_s
    generated = sum(s.generated for s in stats)
    ttfts = [s.ttft for s in stats]
    per_stream = [(s.generated - 1) / (s.total - s.ttft) for s in stats if s.generated > 1 and s.total > s.ttft]
    return {
        "users": users, "replies": len(stats), "generated": generated, "wall": wall,
        "agg": generated / wall, "per_stream": median(per_stream),
        "ttft_p50": percentile(ttfts, 50), "ttft_p95": percentile(ttfts, 95),
        "early": sum(s.early for s in stats), "idle_mb": mb(idle_kb), "peak_mb": mb(peak_kb),
        "hwm_mb": mb(hwm_kb), "startup": startup, "others": others, "engine": engine,
    }


async def prefill_runs(base_url, prompt, runs, max_tokens):
    """TTFT of a fresh character's first reply: a ~1000-token prompt, and a short one."""
    client = Client(base_url)
    try:
        await client.login_guest()
        out = {"long": [], "short": []}
        for run in range(runs):
            for kind, text in (("long", prompt), ("short", PROMPTS[0])):
                name = f"{BOT}-{kind}-{run}"
                await client.save_character(name, USER, "Hi.", "A lighthouse keeper.")
                await client.load(name)
                round0 = await client.token_count(name)
                result = await client.reply(name, text)
                head = user_turn_tokens(USER, name, text)
                out[kind].append({"ttft": result.first_frame, "read": round0 + head, "round0": round0,
                                  "head": head})
        return out
    finally:
        await client.close()


def prefill_phase(model, data_root, args):
    env = {"RPSERVER_MAX_REPLY_TOKENS": min(args.tokens, 16), "RPSERVER_MAX_PROMPT_CHARS": 100000}
    prompt = text_of_tokens(args.prefill_tokens - 12)  # "Ann: ...\n\nBob-long-0:" adds ~12
    with Server(model, Path(data_root) / "prefill", args.strategy, env) as server:
        asyncio.run(warm_up(server.url, min(args.tokens, 16)))
        meter = CpuMeter([server.proc.pid])
        result = asyncio.run(prefill_runs(server.url, prompt, args.prefill_runs, min(args.tokens, 16)))
        result["others"] = meter.others()
        return result


def main():
    install_sigterm_handler()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", default="1,4,8,16,32", help="comma-separated user counts (default 1,4,8,16,32)")
    parser.add_argument("--tokens", type=int, default=64, help="RPSERVER_MAX_REPLY_TOKENS (default 64)")
    parser.add_argument("--replies", type=int, default=2, help="replies per user (default 2)")
    parser.add_argument("--runs", type=int, default=1,
                        help="runs per user count, each on a fresh server; the table shows the run with the median "
                             "aggregate rate (default 1)")
    parser.add_argument("--strategy", default="auto", help="default: auto, what the server picks by default")
    parser.add_argument("--model", help="checkpoint to serve (default: a cached random 0.1B-shaped RWKV-7)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--prefill-tokens", type=int, default=1000, help="prompt length of the prefill test")
    parser.add_argument("--prefill-runs", type=int, default=3, help="0 skips the prefill test")
    parser.add_argument("--baseline-runs", type=int, default=5)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--wait-idle", type=int, default=0, metavar="S",
                        help="before each measurement, wait up to S seconds for other processes to leave "
                             "the CPUs (shared machines; default 0: don't wait)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, N=1,2, short replies")
    parser.add_argument("--engine-stats", action="store_true",
                        help="also print what the engine did in each run (from /metrics, which this turns on): "
                             "rows per forward pass, ms per pass and per whole step, share of the run in them")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.embd = 2, 256
        if args.users == parser.get_default("users"):
            args.users = "1,2"
        if args.tokens == parser.get_default("tokens"):
            args.tokens = 16
        args.prefill_runs = min(args.prefill_runs, 2)
        args.baseline_runs = min(args.baseline_runs, 2)
    user_counts = [int(n) for n in args.users.split(",") if n.strip()]
    if not user_counts or min(user_counts) < 1 or args.tokens < 2 or args.runs < 1:
        parser.error("--users needs positive counts, --tokens at least 2 and --runs at least 1")

    began = time.monotonic()
    print(machine_note(), flush=True)
    model = Path(args.model) if args.model else ensure_model(args.layers, args.embd)
    print(f"model: {model} ({model.stat().st_size / 1e6:.0f} MB), strategy {args.strategy!r}, "
          f"{args.tokens} tokens per reply, {args.replies} replies per user", flush=True)

    baseline = None
    if not args.no_baseline:
        print("baseline: the rwkv package, one stream, in its own process ...", flush=True)
        wait_for_quiet(args.wait_idle)
        meter = CpuMeter([])
        # The baseline is the original server's engine: the rwkv package, cpu fp32, whatever we serve with.
        baseline = baseline_subprocess(model, "cpu fp32", args.tokens, args.prefill_tokens, args.baseline_runs)
        baseline["others"] = meter.others()
        print(f"  decode {fmt(baseline['decode_tok_s'])} tok/s (runs: "
              f"{', '.join(fmt(x) for x in baseline['decode_tok_s_runs'])}); read {baseline['prompt_tokens']} "
              f"tokens at {fmt(baseline['prefill_tok_s'])} tok/s = {fmt(baseline['prompt_first_token_s'], 2)} s; "
              f"other processes used {fmt(100 * baseline['others'], 0)}% of the CPUs meanwhile", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="rpbench-tp-") as data_root:
        data_root = Path(data_root)
        for users in user_counts:
            runs = []
            for run in range(args.runs):
                print(f"N={users}: fresh server, warm-up, {users} users x {args.replies} replies ...", flush=True)
                wait_for_quiet(args.wait_idle)
                result = phase(model, data_root / f"run{run}", args, users)
                runs.append(result)
                print(f"  {result['generated']} tokens in {fmt(result['wall'], 2)} s = {fmt(result['agg'])} tok/s, "
                      f"first token p50 {fmt(result['ttft_p50'] * 1000, 0)} ms", flush=True)
                if result["engine"]:
                    e = result["engine"]
                    print(f"  engine: {fmt(e['rows_per_pass'])} rows per pass, {fmt(e['pass_ms'])} ms per pass, "
                          f"{fmt(e['step_ms'])} ms per step; {fmt(100 * e['in_passes'], 0)}% of the run in passes, "
                          f"{fmt(100 * e['in_steps'], 0)}% in steps", flush=True)
            runs.sort(key=lambda r: r["agg"])
            rows.append(runs[(len(runs) - 1) // 2])
            if len(runs) > 1:
                print(f"  N={users}: runs {', '.join(fmt(r['agg']) for r in runs)} tok/s; median "
                      f"{fmt(rows[-1]['agg'])}", flush=True)
        prefill = None
        if args.prefill_runs:
            print(f"prefill: fresh characters, ~{args.prefill_tokens}-token prompt, {args.prefill_runs} runs ...",
                  flush=True)
            wait_for_quiet(args.wait_idle)
            prefill = prefill_phase(model, data_root, args)

    base_decode = baseline["decode_tok_s"] if baseline else None
    print()
    print(f"== Throughput: {model.name}, {args.strategy}, {args.tokens} tokens/reply, "
          f"{args.replies} replies/user ==")
    headers = ["users", "replies", "gen tok", "wall s", "agg tok/s", "x baseline", "per-stream tok/s",
               "TTFT p50 ms", "TTFT p95 ms", "ended early", "RSS idle MB", "RSS peak MB", "VmHWM MB",
               "others CPU %"]
    body = []
    for r in rows:
        body.append([r["users"], r["replies"], r["generated"], fmt(r["wall"], 2), fmt(r["agg"]),
                     fmt(r["agg"] / base_decode, 2) if base_decode else "-", fmt(r["per_stream"]),
                     fmt(r["ttft_p50"] * 1000, 0), fmt(r["ttft_p95"] * 1000, 0), r["early"],
                     fmt(r["idle_mb"], 0), fmt(r["peak_mb"], 0), fmt(r["hwm_mb"], 0), fmt(100 * r["others"], 0)])
    print(table(headers, body))
    print("  agg tok/s = generated tokens of all replies / wall time from the first request to the last "
          "reply's end;\n  per-stream = median over replies of (tokens-1)/(end - first token); RSS peak = "
          "max VmRSS sampled during the N-user run; VmHWM includes model loading;\n  others CPU % = share of "
          "the machine's CPU time used by processes other than this benchmark and its server (should be ~0).")

    if prefill:
        long_runs, short_runs = prefill["long"], prefill["short"]
        long_ttft = median([x["ttft"] for x in long_runs])
        long_read = median([x["read"] for x in long_runs])
        short_ttft = median([x["ttft"] for x in short_runs])
        short_read = median([x["read"] for x in short_runs])
        print()
        print("== Prefill: first token of a fresh character's first reply (medians) ==")
        prefill_rows = [
            ["server, long prompt", int(long_read), fmt(long_ttft * 1000, 0), fmt(long_read / long_ttft)],
            ["server, short prompt", int(short_read), fmt(short_ttft * 1000, 0), fmt(short_read / short_ttft)],
        ]
        if baseline:
            prefill_rows.append(["baseline rwkv forward(list)", baseline["prompt_tokens"],
                                 fmt(baseline["prompt_first_token_s"] * 1000, 0), fmt(baseline["prefill_tok_s"])])
        print(table(["", "tokens read", "first token ms", "tok/s"], prefill_rows))
        print(f"  (tokens read = the character's round 0, {median([x['round0'] for x in long_runs]):.0f} tokens, "
              f"+ the user turn; runs: {', '.join(fmt(x['ttft'] * 1000, 0) for x in long_runs)} ms; "
              f"others CPU {fmt(100 * prefill['others'], 0)}%)")

    print()
    print("== Ratios ==")
    if baseline:
        print(f"baseline single stream (rwkv package, greedy): {fmt(base_decode)} tok/s")
        for r in rows:
            print(f"  aggregate at N={r['users']:<3d}: {fmt(r['agg']):>7} tok/s = {fmt(r['agg'] / base_decode, 2)}x "
                  f"baseline")
        one = next((r for r in rows if r["users"] == 1), None)
        if one:
            print(f"1 user vs baseline: aggregate {fmt(one['agg'] / base_decode, 2)}x, per-stream decode "
                  f"{fmt(one['per_stream'] / base_decode, 2)}x")
        if prefill:
            server_rate = long_read / long_ttft
            print(f"prefill: server {fmt(server_rate)} tok/s vs baseline {fmt(baseline['prefill_tok_s'])} tok/s = "
                  f"{fmt(server_rate / baseline['prefill_tok_s'], 2)}x; first token after ~{int(long_read)} tokens: "
                  f"{fmt(long_ttft * 1000, 0)} ms vs baseline {fmt(baseline['prompt_first_token_s'] * 1000, 0)} ms "
                  f"for {baseline['prompt_tokens']}")
    eight = next((r for r in rows if r["users"] == 8), None)
    if eight:
        print(f"first-token p50 at 8 users: {fmt(eight['ttft_p50'] * 1000, 0)} ms "
              f"(p95 {fmt(eight['ttft_p95'] * 1000, 0)} ms)")
    print(f"total benchmark time: {fmt(time.monotonic() - began, 0)} s")


if __name__ == "__main__":
    run_script(main)
