"""OpenAI-compatible API benchmark: a client re-sending its whole conversation every turn.

OpenAI clients (SillyTavern, Open WebUI, the `openai` libraries) send the
whole history with every request. rpserver's state cache keeps the RNN state
at the end of each reply, keyed by the exact tokens, so each turn should read
only its new tokens and time to first token should stay flat however long
the history grows.

1. Growing conversation, cache on: one client talks for max(--turns) turns
   (a user message of ~--user-tokens tokens, a reply of up to
   --reply-tokens: ~40 tokens per turn), streaming; time to first token
   (the first chunk with text) and the prompt/cached token counts are
   recorded per turn.
2. The same histories without the cache (RPSERVER_STATE_CACHE_MB=0 and
   RPSERVER_STATE_CACHE_DISK_MB=0, a fresh server): the request of turn T
   for each T in --turns, i.e. what a server without the cache pays: the
   whole history re-read.
3. N concurrent clients (--clients), each re-sending its own growing
   conversation for --throughput-turns turns, cache on: aggregate completion
   tokens per second and time to first token.

Each server is fresh (`manage.py serve`, its own temp data dir, anonymous
/v1 access) on a random-weight RWKV-7 shaped like the 0.1B model (12 layers,
768 wide).

    .venv/bin/python bench/openai.py                      # full run (~5 min on 2 cores)
    .venv/bin/python bench/openai.py --quick              # smoke run (tiny model, 10/20 turns)
    .venv/bin/python bench/openai.py --strategy "cpu int8" --turns 10,50,200 --clients 1,4,8

4. With --sillytavern, instead: SillyTavern-shaped traffic, as SillyTavern
   1.12 sends it by default: a character card as the first system message, a
   lorebook entry as the second that changes as the story moves on, and a
   context budget (--budget, 4,095 tokens by the server's own /tokenize
   count) that drops the oldest messages once the chat is longer. --st-turns
   turns (30) of Chat Completion, then the same story as Text Completion
   (one prompt string, trimmed at the head alike). Per turn: prompt tokens,
   tokens read (not cached) and the cached fraction. The counts do not depend
   on the model's size (a tiny model by default here).

    .venv/bin/python bench/openai.py --sillytavern
"""

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import CpuMeter, machine_note, wait_for_quiet  # noqa: E402
from script import BenchError, install_sigterm_handler, run_script  # noqa: E402
from server import Server, ensure_model  # noqa: E402
from stats import fmt, median, table  # noqa: E402
from text import filler_text  # noqa: E402

SYSTEM = ("You are Bob, a cheerful lighthouse keeper on a windy island. You love the sea, old maps, strong tea "
          "and long stories about ships, and you answer kindly and with curiosity.")


class Turn:
    def __init__(self, ttft, total, prompt_tokens, cached_tokens, completion_tokens, text):
        self.ttft = ttft
        self.total = total
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
        self.completion_tokens = completion_tokens
        self.text = text


async def complete(http, messages, max_tokens, seed):
    """One streamed chat completion: a Turn (time to the first text, usage, the reply)."""
    body = {"model": "rwkv", "messages": messages, "max_tokens": max_tokens, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft, parts, usage = None, [], None
    async with http.stream("POST", "/v1/chat/completions", json=body) as answer:
        if answer.status_code != 200:
            raise BenchError(f"/v1/chat/completions answered {answer.status_code}: {(await answer.aread())[:300]!r}")
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                text = choice["delta"].get("content")
                if text:
                    ttft = ttft or time.perf_counter() - started
                    parts.append(text)
    total = time.perf_counter() - started
    if usage is None:
        raise BenchError("the stream carried no usage chunk")
    return Turn(ttft or total, total, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"],
                usage["completion_tokens"], "".join(parts))


def user_message(turn, words):
    return f"Turn {turn}: {filler_text(words, offset=turn * 7)}?"


async def conversation(base_url, turns, user_words, reply_tokens, client_id=0, on_turn=None):
    """One client's growing conversation; returns ([Turn], the message list of every request)."""
    messages = [{"role": "system", "content": f"{SYSTEM} (client {client_id})"}]
    results, requests = [], []
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:
        for turn in range(1, turns + 1):
            messages.append({"role": "user", "content": user_message(turn, user_words)})
            requests.append(list(messages))
            result = await complete(http, messages, reply_tokens, seed=client_id * 1000 + turn)
            results.append(result)
            if on_turn:
                on_turn(turn, result)
            messages.append({"role": "assistant", "content": result.text})
    return results, requests


def server_env(cache, prefill_threads=0):
    env = {"RPSERVER_OPENAI_ANONYMOUS": "1"}  # anonymous: no per-user limits
    if prefill_threads:
        env["RPSERVER_PREFILL_THREADS"] = str(prefill_threads)
    if not cache:
        env.update({"RPSERVER_STATE_CACHE_MB": "0", "RPSERVER_STATE_CACHE_DISK_MB": "0"})
    return env


async def warm_up(base_url):
    """A short and a long prompt first: the compiled forward specialises on its first shapes."""
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:
        await complete(http, [{"role": "user", "content": "Hello."}], 4, seed=0)
        await complete(http, [{"role": "user", "content": filler_text(600)}], 4, seed=0)


def around(results, turn, width=3):
    """The median time to first token over the `width` turns ending at `turn` (1-based)."""
    window = results[max(0, turn - width):turn]
    return median([r.ttft for r in window])


def growing_phase(model, data_root, args, checkpoints):
    last = max(checkpoints)
    print(f"\n[1] one client, {last} turns re-sent whole each turn, cache on", flush=True)
    with Server(model, Path(data_root) / "cache", args.strategy, server_env(True, args.prefill_threads)) as server:
        asyncio.run(warm_up(server.url))
        meter = CpuMeter([server.proc.pid])

        def progress(turn, result):
            if turn in checkpoints:
                print(f"  turn {turn}: history {result.prompt_tokens} tokens, {result.cached_tokens} cached, "
                      f"first token {1000 * result.ttft:.0f} ms", flush=True)

        results, requests = asyncio.run(conversation(server.url, last, args.user_words, args.reply_tokens,
                                                     on_turn=progress))
        others_cached = meter.others()

    print("[2] the same requests without the cache (fresh server)", flush=True)
    uncached = {}
    with Server(model, Path(data_root) / "nocache", args.strategy, server_env(False, args.prefill_threads)) as server:
        asyncio.run(warm_up(server.url))
        meter = CpuMeter([server.proc.pid])

        async def replay():
            async with httpx.AsyncClient(base_url=server.url, timeout=600) as http:
                for turn in checkpoints:
                    runs = []
                    for repeat in range(args.nocache_runs):
                        runs.append(await complete(http, requests[turn - 1], args.reply_tokens, seed=turn))
                    uncached[turn] = runs
                    print(f"  turn {turn}: history {runs[0].prompt_tokens} tokens, first token "
                          f"{1000 * median([r.ttft for r in runs]):.0f} ms", flush=True)

        asyncio.run(replay())
        others_uncached = meter.others()
    return results, uncached, max(others_cached, others_uncached)


def throughput_phase(model, data_root, args, clients):
    print(f"\n[3] {clients} concurrent clients, {args.throughput_turns} turns each, cache on", flush=True)
    env = server_env(True, args.prefill_threads)
    with Server(model, Path(data_root) / f"clients{clients}", args.strategy, env) as server:
        asyncio.run(warm_up(server.url))
        meter = CpuMeter([server.proc.pid])

        async def run_all():
            started = time.perf_counter()
            done = await asyncio.gather(*(conversation(server.url, args.throughput_turns, args.user_words,
                                                       args.reply_tokens, client_id=i + 1)
                                          for i in range(clients)))
            return [turn for results, _ in done for turn in results], time.perf_counter() - started

        turns, wall = asyncio.run(run_all())
        others = meter.others()
    generated = sum(t.completion_tokens for t in turns)
    read = sum(t.prompt_tokens - t.cached_tokens for t in turns)
    sent = sum(t.prompt_tokens for t in turns)
    return {"clients": clients, "generated": generated, "wall": wall, "agg": generated / wall,
            "ttft_p50": median([t.ttft for t in turns]), "read_share": read / sent, "others": others}


# ---- SillyTavern-shaped traffic -----------------------------------------------------------------------

CARD = ("{{char}} is Mira, the keeper of the Greywater lighthouse. She is patient, dry-humoured and curious, "
        "keeps a logbook of every ship that passes, and brews strong tea for anyone who climbs the stairs. ") * 3
LORE = [
    "[Lore: The Greywater light has burned for two hundred years; its lens came from a wrecked frigate.]",
    "[Lore: The harbour town below trades in salt cod and rope; its mayor distrusts the keeper.]",
    "[Lore: A storm season begins each autumn; ships anchor in the lee of the northern cliffs.]",
    "[Lore: The old smugglers' tunnel runs from the cellar of the lighthouse to the cove.]",
]
NEVER_ENDING = None  # a logit_bias that keeps a reply from ending early (no token holding a blank line)


def never_ending():
    global NEVER_ENDING
    if NEVER_ENDING is None:
        from text import tokenizer
        NEVER_ENDING = {str(t): -100 for t, piece in tokenizer().idx2token.items() if b"\n\n" in piece}
    return NEVER_ENDING


def lore_for(turn):
    """The lorebook entry a keyword in the latest messages triggers: it changes every few turns."""
    return LORE[(turn // 3) % len(LORE)]


async def token_count(http, text):
    answer = await http.post("/tokenize", json={"content": text})
    answer.raise_for_status()
    return answer.json()["count"]


async def trimmed_history(http, fixed_tokens, history, budget):
    """The newest messages of `history` that fit the budget with the fixed parts (SillyTavern's trim)."""
    kept, used = [], fixed_tokens
    for message in reversed(history):
        cost = await token_count(http, message["content"]) + 4  # the speaker's name and the turn's end
        if used + cost > budget:
            break
        kept.insert(0, message)
        used += cost
    return kept


async def sillytavern_chat(http, args):
    """Chat Completion: card, lore, trimmed history. Returns [(prompt tokens, cached tokens)] per turn, and
    the story (the messages) for the text completion run."""
    history, rows = [], []
    card = CARD.replace("{{char}}", "Mira")
    for turn in range(1, args.st_turns + 1):
        history.append({"role": "user", "name": "Ann", "content": user_message(turn, args.st_user_words)})
        lore = lore_for(turn)
        fixed = await token_count(http, card) + await token_count(http, lore) + 12
        kept = await trimmed_history(http, fixed, history, args.budget)
        if args.lore_at_end:  # SillyTavern's "in-chat @ depth 0": after the history, before the reply
            messages = [{"role": "system", "content": card}, *kept, {"role": "system", "content": lore}]
        else:  # its default, "before the character's definitions": the second system message
            messages = [{"role": "system", "content": card}, {"role": "system", "content": lore}, *kept]
        body = {"model": "rwkv", "messages": messages, "max_tokens": args.st_reply_tokens, "seed": turn,
                "logit_bias": never_ending()}
        answer = (await http.post("/v1/chat/completions", json=body)).json()
        usage = answer["usage"]
        rows.append((usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]))
        history.append({"role": "assistant", "name": "Mira", "content": answer["choices"][0]["message"]["content"]})
        print(f"  chat turn {turn}: {rows[-1][0]} prompt tokens, {rows[-1][0] - rows[-1][1]} read", flush=True)
    return rows, history


async def sillytavern_text(http, args, story):
    """Text Completion (Oobabooga mode): the same story as one string, trimmed at the head alike."""
    rows = []
    card = CARD.replace("{{char}}", "Mira")
    lines = []
    for turn in range(1, args.st_turns + 1):
        lines.append(f"Ann: {story[2 * (turn - 1)]['content']}\n\n")
        lore = f"{lore_for(turn)}\n\n"
        head = f"{card}\n\n" if args.lore_at_end else f"{card}\n{lore}"
        budget = args.budget - await token_count(http, card + lore) - 4
        kept, used = [], 0
        for line in reversed(lines):
            cost = await token_count(http, line)
            if used + cost > budget:
                break
            kept.insert(0, line)
            used += cost
        prompt = head + "".join(kept) + (lore if args.lore_at_end else "") + "Mira:"
        body = {"model": "rwkv", "prompt": prompt, "max_tokens": args.st_reply_tokens, "seed": -1,
                "logit_bias": never_ending(), "temperature": 0.7, "repetition_penalty": 1.1, "top_k": 40}
        answer = (await http.post("/v1/completions", json=body)).json()
        usage = answer["usage"]
        rows.append((usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]))
        lines.append(f"Mira:{answer['choices'][0]['text'] and ' ' + answer['choices'][0]['text']}\n\n")
        print(f"  text turn {turn}: {rows[-1][0]} prompt tokens, {rows[-1][0] - rows[-1][1]} read", flush=True)
    return rows


def sillytavern_phase(model, data_root, args):
    print(f"\n[4] SillyTavern-shaped traffic: {args.st_turns} turns, a {args.budget}-token budget trimming the head, "
          "lore that changes", flush=True)
    with Server(model, Path(data_root) / "sillytavern", args.strategy, server_env(True)) as server:
        async def run():
            async with httpx.AsyncClient(base_url=server.url, timeout=600) as http:
                chat_rows, story = await sillytavern_chat(http, args)
                text_rows = await sillytavern_text(http, args, story)
                return chat_rows, text_rows

        chat_rows, text_rows = asyncio.run(run())
    table_rows = []
    for turn, ((chat_prompt, chat_cached), (text_prompt, text_cached)) in enumerate(zip(chat_rows, text_rows), 1):
        table_rows.append([turn, chat_prompt, chat_prompt - chat_cached, f"{100 * chat_cached / chat_prompt:.0f}%",
                           text_prompt, text_prompt - text_cached, f"{100 * text_cached / text_prompt:.0f}%"])
    print("\nPrompt tokens per turn: sent, read (not cached), cached fraction")
    print(table(["turn", "chat prompt", "chat read", "chat cached", "text prompt", "text read", "text cached"],
                table_rows))
    for name, rows in (("chat", chat_rows), ("text", text_rows)):
        sent, cached = sum(p for p, _ in rows), sum(c for _, c in rows)
        print(f"{name}: {sent:,} prompt tokens sent over {len(rows)} turns, {sent - cached:,} read, "
              f"{100 * cached / sent:.0f}% cached")


def main():
    install_sigterm_handler()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", default="10,50,200", help="turns at which to report (default 10,50,200)")
    parser.add_argument("--clients", default="1,4,8", help="concurrent clients for the throughput phase")
    parser.add_argument("--throughput-turns", type=int, default=10)
    parser.add_argument("--user-words", type=int, default=14,
                        help="words per user message (with the names and the reply: ~40 tokens per turn)")
    parser.add_argument("--reply-tokens", type=int, default=16, help="max_tokens per reply")
    parser.add_argument("--nocache-runs", type=int, default=3, help="repeats of each uncached request")
    parser.add_argument("--strategy", default="auto", help="the server's --strategy (default: its default, auto)")
    parser.add_argument("--prefill-threads", type=int, default=0,
                        help="RPSERVER_PREFILL_THREADS for both servers (default: the server's own); 1 on a machine "
                             "whose cores others are using: 2-thread prompt reads then stall on each other")
    parser.add_argument("--model", help="checkpoint to serve (default: a cached random 0.1B-shaped RWKV-7)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--quick", action="store_true", help="tiny model, 10/20 turns, 1 and 2 clients")
    parser.add_argument("--quiet-wait", type=int, default=60, help="seconds to wait for idle CPUs first")
    parser.add_argument("--sillytavern", action="store_true", help="only the SillyTavern-shaped phase ([4])")
    parser.add_argument("--budget", type=int, default=4095, help="SillyTavern's context budget in tokens")
    parser.add_argument("--st-turns", type=int, default=30)
    parser.add_argument("--lore-at-end", action="store_true",
                        help="the lore entry after the history (SillyTavern's in-chat @ depth 0) instead of second")
    parser.add_argument("--st-user-words", type=int, default=60, help="words per user message ([4])")
    parser.add_argument("--st-reply-tokens", type=int, default=120, help="tokens per reply ([4])")
    args = parser.parse_args()
    if args.sillytavern:
        model = Path(args.model) if args.model else ensure_model(2, 128)
        print(machine_note())
        with tempfile.TemporaryDirectory(prefix="rpbench-openai-") as data_root:
            sillytavern_phase(model, data_root, args)
        return
    if args.quick:
        args.layers, args.embd, args.turns, args.clients, args.throughput_turns = 2, 128, "10,20", "1,2", 4
    checkpoints = sorted({int(t) for t in args.turns.split(",")})
    model = Path(args.model) if args.model else ensure_model(args.layers, args.embd)
    wait_for_quiet(args.quiet_wait)
    print(machine_note())
    print(f"model: {model.name}, strategy {args.strategy}; user messages ~{args.user_words} words, "
          f"replies up to {args.reply_tokens} tokens", flush=True)
    with tempfile.TemporaryDirectory(prefix="rpbench-openai-") as data_root:
        results, uncached, others = growing_phase(model, data_root, args, checkpoints)
        rates = [throughput_phase(model, data_root, args, int(n)) for n in args.clients.split(",")]

    rows = []
    for turn in checkpoints:
        result = results[turn - 1]
        without = median([r.ttft for r in uncached[turn]])
        rows.append([turn, result.prompt_tokens, result.prompt_tokens - result.cached_tokens,
                     f"{1000 * around(results, turn):.0f}", f"{1000 * without:.0f}",
                     fmt(without / around(results, turn), 1) + "x"])
    print("\nTime to first token as the re-sent history grows (cache: median of the 3 turns ending there)")
    print(table(["turn", "history tokens", "read (cache)", "first token, cache (ms)", "without cache (ms)",
                 "speed-up"], rows))
    first = [r.ttft for r in results[:10]]
    tail = [r.ttft for r in results[-10:]]
    print(f"first-token median, turns 1-10: {1000 * median(first):.0f} ms; last 10 turns: {1000 * median(tail):.0f} ms")
    print(f"CPU used by other processes meanwhile: {100 * others:.0f}%")
    print("\nConcurrent clients, each re-sending its own growing conversation (cache on)")
    print(table(["clients", "completion tokens", "wall (s)", "tok/s", "first token p50 (ms)",
                 "prompt tokens read", "others' CPU"],
                [[r["clients"], r["generated"], fmt(r["wall"]), fmt(r["agg"]), f"{1000 * r['ttft_p50']:.0f}",
                  f"{100 * r['read_share']:.0f}%", f"{100 * r['others']:.0f}%"] for r in rates]))


if __name__ == "__main__":
    run_script(main)
