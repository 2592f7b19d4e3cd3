"""Resume benchmark: returning to a parked conversation, and /chat/back.

1. Build (server #1, fresh temp data dir): through the API, one conversation
   per history length (--lengths, default 100, 1000, 10000 tokens of context,
   as /debug/token counts them), made of rounds with long prompts; and --reps
   "back" conversations of --back-rounds rounds each.
2. Measure: --reps times, restart the server on the same data dir (nothing
   cached in memory), warm it up on a throwaway account, then
   - for each history length: /characters/load, then the time to the first
     frame of a short /chat/reply (a person coming back to the chat), then
     /chat/back to the round before it (so the history stays the same);
   - on one untouched back conversation: /chat/back to the round before the
     last and then to an old round whose snapshot was pruned
     (RPSERVER_STATE_CHECKPOINT_EVERY=8, the state policy of
     docs/conversation-tree.md: the server rebuilds each from the nearest
     kept state, at most 8 rounds back), checking /debug/token.
Figures are medians over the reps. Resuming should not grow with history.

    .venv/bin/python bench/resume.py            # default run (~3-5 min on 2 cores)
    .venv/bin/python bench/resume.py --quick    # smoke run (tiny model, ~1 min)

Exit status 1 on any API error or if the server fails to start.
"""

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from client import Client, gather_strict  # noqa: E402
from machine import CpuMeter, machine_note, wait_for_quiet  # noqa: E402
from script import install_sigterm_handler, run_script  # noqa: E402
from server import Server, ensure_model  # noqa: E402
from stats import fmt, median, table  # noqa: E402
from text import text_of_tokens, user_turn_tokens  # noqa: E402

USER = "Ann"
GREETING = "Welcome back to the lighthouse, Ann."
PERSONA = "Bob is a cheerful lighthouse keeper who loves the sea and long stories."
SHORT_PROMPT = "So, where were we?"
MAX_ROUND_PROMPT = 900  # tokens of prompt per history round


def server_env(args):
    return {
        "RPSERVER_MAX_REPLY_TOKENS": args.tokens,
        "RPSERVER_STATE_CHECKPOINT_EVERY": 8,
        "RPSERVER_MAX_PROMPT_CHARS": 100000,
    }


async def new_character(client, name):
    await client.save_character(name, USER, GREETING, PERSONA)
    await client.load(name)
    return await client.token_count(name)


async def build_history(client, name, target, max_tokens, log):
    """Rounds of long prompts until the context reaches ~target tokens."""
    count = await new_character(client, name)
    rounds = 0
    prefill = []  # (prompt tokens, first-token seconds) of long rounds
    while count < target:
        room = target - count - max_tokens - 4
        size = max(4, min(MAX_ROUND_PROMPT, room))
        prompt = text_of_tokens(size, offset=rounds * 7)
        result = await client.reply(name, prompt)
        head = user_turn_tokens(USER, name, prompt)
        if head >= 300:
            prefill.append((head, result.first_frame))
        count = await client.token_count(name)
        rounds += 1
    log(f"  {name}: {rounds + 1} rounds, {count} tokens")
    return {"name": name, "target": target, "tokens": count, "last": rounds, "prefill": prefill}


async def build_back_conversation(client, name, rounds, round_tokens, index):
    """`rounds` rounds of ~round_tokens prompts; returns the token count after each round."""
    cumulative = [await new_character(client, name)]
    for n in range(rounds):
        prompt = text_of_tokens(round_tokens, offset=index * 3 + n)
        await client.reply(name, prompt)
        cumulative.append(await client.token_count(name))
    return {"name": name, "cumulative": cumulative, "last": rounds}


async def build(base_url, args, log):
    client = Client(base_url)
    try:
        await client.login_guest()
        histories = []
        for target in args.lengths:
            histories.append(await build_history(client, f"hist-{target}", target, args.tokens, log))
        log(f"  building {args.reps} back conversations of {args.back_rounds} rounds concurrently ...")
        backs = await gather_strict(*(build_back_conversation(client, f"back-{k}", args.back_rounds,
                                                              args.back_round_tokens, k)
                                      for k in range(args.reps)))
        return {"user": (client.user_name, client.token), "histories": histories, "backs": backs}
    finally:
        await client.close()


async def timed(coro):
    started = time.monotonic()
    value = await coro
    return time.monotonic() - started, value


async def warm_up(base_url):
    client = Client(base_url)
    try:
        await client.login_guest()
        await new_character(client, "warm-up")
        await client.reply("warm-up", SHORT_PROMPT)
        await client.back("warm-up", 0)
    finally:
        await client.close()


async def measure(base_url, built, back_conv, old_round, checkpoint_every, warnings):
    client = Client(base_url)
    client.user_name, client.token = built["user"]
    out = {"resume": {}, "back": {}}
    try:
        for history in built["histories"]:
            name, last = history["name"], history["last"]
            load_s, chat = await timed(client.load(name))
            if len(chat) != last + 1:
                warnings.append(f"{name}: /characters/load gave {len(chat)} rounds, expected {last + 1}")
            result = await client.reply(name, SHORT_PROMPT)
            back_s, _ = await timed(client.back(name, last))
            count = await client.token_count(name)
            if count != history["tokens"]:
                warnings.append(f"{name}: after /chat/back to round {last} token_count is {count}, "
                                f"expected {history['tokens']}")
            out["resume"][history["target"]] = {"load": load_s, "ttft": result.first_frame,
                                                "reply": result.total, "back_prev": back_s}
        name, cumulative, last = back_conv["name"], back_conv["cumulative"], back_conv["last"]
        recent = last - 1
        recent_s, _ = await timed(client.back(name, recent))
        count = await client.token_count(name)
        if count != cumulative[recent]:
            warnings.append(f"{name}: after /chat/back to round {recent} token_count is {count}, "
                            f"expected {cumulative[recent]}")
        old_s, _ = await timed(client.back(name, old_round))
        count = await client.token_count(name)
        if count != cumulative[old_round]:
            warnings.append(f"{name}: after /chat/back to round {old_round} token_count is {count}, "
                            f"expected {cumulative[old_round]}")
        checkpoint = old_round - old_round % checkpoint_every
        out["back"] = {"recent": recent_s, "old": old_s,
                       "rebuilt": cumulative[old_round] - cumulative[checkpoint], "checkpoint": checkpoint}
        return out
    finally:
        await client.close()


def main():
    install_sigterm_handler()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="100,1000,10000", help="history lengths in tokens")
    parser.add_argument("--reps", type=int, default=3, help="server restarts / samples per figure (default 3)")
    parser.add_argument("--tokens", type=int, default=16, help="RPSERVER_MAX_REPLY_TOKENS (default 16)")
    parser.add_argument("--back-rounds", type=int, default=20, help="rounds of each back conversation")
    parser.add_argument("--back-round-tokens", type=int, default=120, help="prompt tokens per back round")
    parser.add_argument("--old-round", type=int, default=15,
                        help="the old round to go back to (snapshot pruned; default 15, rebuilt from 8)")
    parser.add_argument("--strategy", default="auto", help="default: auto, what the server picks by default")
    parser.add_argument("--model", help="checkpoint to serve (default: a cached random 0.1B-shaped RWKV-7)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--wait-idle", type=int, default=0, metavar="S",
                        help="before each measurement, wait up to S seconds for other processes to leave "
                             "the CPUs (shared machines; default 0: don't wait)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 2 reps")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.embd = 2, 256
        args.reps = min(args.reps, 2)
    args.lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
    keep_recent, checkpoint_every = 1, 8  # (the last round's state is kept: the path's end)
    if not (0 < args.old_round < args.back_rounds - keep_recent) or args.old_round % checkpoint_every == 0:
        parser.error(f"--old-round must be a round whose snapshot is pruned: not a multiple of "
                     f"{checkpoint_every}, below {args.back_rounds - keep_recent}")
    if args.reps < 1 or not args.lengths:
        parser.error("--reps must be at least 1 and --lengths non-empty")

    began = time.monotonic()
    print(machine_note(), flush=True)
    model = Path(args.model) if args.model else ensure_model(args.layers, args.embd)
    print(f"model: {model} ({model.stat().st_size / 1e6:.0f} MB), strategy {args.strategy!r}, "
          f"{args.tokens} tokens per reply, CHECKPOINT_EVERY={checkpoint_every}",
          flush=True)

    def log(line):
        print(line, flush=True)

    warnings = []
    samples = []
    startups = []
    with tempfile.TemporaryDirectory(prefix="rpbench-resume-") as data_dir:
        print("build: server #1 ...", flush=True)
        wait_for_quiet(args.wait_idle)
        build_started = time.monotonic()
        with Server(model, data_dir, args.strategy, server_env(args)) as server:
            built = asyncio.run(build(server.url, args, log))
        print(f"  built in {fmt(time.monotonic() - build_started, 0)} s", flush=True)
        for rep in range(args.reps):
            wait_for_quiet(args.wait_idle)
            with Server(model, data_dir, args.strategy, server_env(args)) as server:
                startups.append(server.startup_s)
                asyncio.run(warm_up(server.url))
                meter = CpuMeter([server.proc.pid])
                sample = asyncio.run(measure(server.url, built, built["backs"][rep], args.old_round,
                                             checkpoint_every, warnings))
                sample["others"] = meter.others()
                samples.append(sample)
            ttfts = ", ".join(f"{t}: {fmt(s['ttft'] * 1000, 0)} ms" for t, s in sample["resume"].items())
            print(f"restart {rep + 1}/{args.reps} (server up in {fmt(server.startup_s, 1)} s): first token {ttfts}; "
                  f"back recent {fmt(sample['back']['recent'] * 1000, 0)} ms, old "
                  f"{fmt(sample['back']['old'] * 1000, 0)} ms; others CPU {fmt(100 * sample['others'], 0)}%", flush=True)

    print()
    print(f"== Resume a parked conversation after a server restart: {model.name}, {args.strategy} "
          f"(medians of {args.reps}) ==")
    rows = []
    base_ttft = None
    for history in built["histories"]:
        target = history["target"]
        per = [s["resume"][target] for s in samples]
        ttft = median([p["ttft"] for p in per])
        base_ttft = base_ttft or ttft
        rows.append([target, history["tokens"], history["last"] + 1, fmt(median([p["load"] for p in per]) * 1000, 0),
                     fmt(ttft * 1000, 0), fmt(ttft / base_ttft, 2),
                     ", ".join(fmt(p["ttft"] * 1000, 0) for p in per),
                     fmt(median([p["back_prev"] for p in per]) * 1000, 0)])
    print(table(["history", "tokens", "rounds", "load ms", "first token ms", "vs first row", "runs ms",
                 "back to prev ms"], rows))
    print("  first token = from sending /chat/reply (short prompt) to the first frame; load = /characters/load; "
          "back to prev = /chat/back to the round before that reply")

    prefill = [p for h in built["histories"] for p in h["prefill"]]
    if prefill:
        rate = sum(n for n, _ in prefill) / sum(t for _, t in prefill)
        longest = max(h["tokens"] for h in built["histories"])
        print(f"  for scale: the server read the build prompts at ~{fmt(rate, 0)} tok/s, so re-reading the "
              f"{longest}-token history would take ~{fmt(longest / rate, 1)} s")

    print()
    print(f"== /chat/back (CHECKPOINT_EVERY={checkpoint_every}; "
          f"conversations of {args.back_rounds + 1} rounds, ~{args.back_round_tokens}-token prompts; "
          f"medians of {args.reps}) ==")
    backs = [s["back"] for s in samples]
    recent = args.back_rounds - 1
    rebuilt = median([b["rebuilt"] for b in backs])
    print(table(["back to", "snapshot", "latency ms", "runs ms"], [
        [f"round {recent} (recent)", "kept", fmt(median([b["recent"] for b in backs]) * 1000, 0),
         ", ".join(fmt(b["recent"] * 1000, 0) for b in backs)],
        [f"round {args.old_round} (old)", f"pruned: rebuilt from round {backs[0]['checkpoint']}, "
         f"{rebuilt:.0f} tokens", fmt(median([b["old"] for b in backs]) * 1000, 0),
         ", ".join(fmt(b["old"] * 1000, 0) for b in backs)],
    ]))
    print(f"  old / recent = {fmt(median([b['old'] for b in backs]) / median([b['recent'] for b in backs]), 1)}x")
    print(f"server start-up (migrations + model load): median {fmt(median(startups), 1)} s")
    if warnings:
        print()
        print("WARNINGS (state/accounting mismatches seen through the API):")
        for line in warnings:
            print(f"  - {line}")
    print(f"total benchmark time: {fmt(time.monotonic() - began, 0)} s")


if __name__ == "__main__":
    run_script(main)
