"""Soak test: N users for M minutes doing everything a person does to a chat.

A fresh server (`manage.py serve`, its own temp data dir) is started on a
random-weight RWKV-7 model, by default a small one (2 layers, 256 wide, the
world vocabulary): the soak exercises the server's machinery (HTTP, the
database, the state store, locks, the engine's batch) and a small model puts
more requests through it per minute; --layers 12 --embd 768 is 0.1B-shaped.
Each of --users simulated people logs in as a guest, saves a character, and
then, until --minutes are over, picks at random one of:

    reply   (/chat/reply, a new round, streamed)       weight 50
    resay   (/chat/resay, regenerate the last reply)   weight 15
    tamper  (/chat/tamper, overwrite the last reply)   weight 15
    back    (/chat/back to a random earlier round)     weight 12
    reset   (/chat/reset)                              weight  5
    load    (/characters/load, compared at once)       weight  3

Each client keeps its own record of its conversation (what it sent, the
final frame of every stream) and at the end compares it with what the
server answers on /characters/load. After every operation it reads
/debug/token and checks the invariant: the context the model has read is
exactly its chat's text in the documented format (docs/legacy-api.md, "What
the model reads"; inference/prompt.py), built from the client's own record.
A failed request is an error; after a transport error (no answer) the client
re-reads its conversation and counts the round as an error.

Printed: requests and errors per kind, latency percentiles (p50/p90/p99 of
the whole request; of the first frame for streams), mismatched
conversations, contexts that differ from their chat (the first difference), the server's RSS after warm-up,
at the end and its peak (sampled every 50 ms), and the error/traceback lines
of the server log.

The reply rate limits are turned off for the soak's server (it measures
reliability, not the limits): --keep-limits leaves them on.

    .venv/bin/python bench/soak.py                          # 16 users, 5 minutes
    .venv/bin/python bench/soak.py --minutes 0.5 --users 4  # a quick run
    .venv/bin/python bench/soak.py --minutes 2 --layers 12 --embd 768  # a 0.1B-shaped model

Exit status 1 if any request failed, any conversation differs from the
client's record, any context differs from its chat, or the server would not start.
"""

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # inference.prompt: the documented format

from client import Client  # noqa: E402
from machine import machine_note, wait_for_quiet  # noqa: E402
from script import BenchError, install_sigterm_handler, run_script  # noqa: E402
from server import Server, ensure_model  # noqa: E402
from stats import fmt, percentile, table  # noqa: E402
from text import filler_text  # noqa: E402

from inference import prompt as prompt_format  # noqa: E402

USER = "Ann"
GREETING = "Hello Ann, it is good to see you again. What shall we talk about today?"
PERSONA = ("{{char}} is a cheerful lighthouse keeper on a windy island. {{char}} loves the sea, old maps "
           "and strong tea, and answers {{user}} kindly and with curiosity.")
ACTIONS = {"reply": 50, "resay": 15, "tamper": 15, "back": 12, "reset": 5, "load": 3}
STREAMS = ("reply", "resay")



class Record:
    """What one client did and saw: latencies, errors, and its own copy of the chat."""

    def __init__(self):
        self.latency = defaultdict(list)  # kind -> seconds for the whole request
        self.first_frame = defaultdict(list)  # stream kind -> seconds to the first frame
        self.errors = defaultdict(list)  # kind -> messages
        self.mismatches = []
        self.context_breaks = []  # (bot, after which action, where the context and the chat part)
        self.context_checks = 0


class Person:
    """One simulated user with one character and its own record of the conversation."""

    def __init__(self, base_url, index, rng, record):
        self.client = Client(base_url, timeout=300.0)
        self.bot = f"Keeper{index}"
        self.rng = rng
        self.record = record
        self.chat = None  # the client's own record: [[user_msg, bot_msg], ...]

    async def start(self):
        await self.client.login_guest()
        await self.client.save_character(self.bot, USER, GREETING, PERSONA)
        self.chat = await self.client.load(self.bot)

    def choose(self):
        kinds = [k for k in ACTIONS if len(self.chat) > 1 or k not in ("resay", "tamper", "back")]
        return self.rng.choices(kinds, weights=[ACTIONS[k] for k in kinds])[0]

    async def act(self):
        kind = self.choose()
        started = time.monotonic()
        try:
            await getattr(self, kind)()
        except BenchError as exc:  # the server answered with an error envelope: nothing changed
            self.record.errors[kind].append(str(exc))
            return
        except Exception as exc:  # no answer: the outcome is unknown, so re-read it
            self.record.errors[kind].append(f"{type(exc).__name__}: {exc}")
            try:
                self.chat = await self.client.load(self.bot)
            except Exception as again:
                self.record.errors["load"].append(f"after a failed {kind}: {type(again).__name__}: {again}")
            return
        self.record.latency[kind].append(time.monotonic() - started)
        await self.check_context(f"after {kind} (round {len(self.chat) - 1})")

    async def stream(self, route, **fields):
        """Stream to the end: the final reply text; records the first frame's latency."""
        started = time.monotonic()
        first = None
        buffer = ""
        data = self.client._auth({"character_name": self.bot, **fields})
        async with self.client.http.stream("POST", route, data=data) as response:
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                await response.aread()
                body = response.json() if response.headers.get("content-type", "").startswith("application/json") \
                    else {"code": response.status_code, "message": response.text[:200]}
                raise BenchError(f"{route}: code {body.get('code')}: {body.get('message')}")
            async for chunk in response.aiter_text():
                if first is None and chunk:
                    first = time.monotonic() - started
                buffer += chunk
        pieces = buffer.split("\n\ndata: ")
        if len(pieces) < 2:
            raise BenchError(f"{route}: a stream without frames: {buffer[:200]!r}")
        self.record.first_frame[route.rsplit("/", 1)[-1]].append(first)
        return pieces[-1]

    async def reply(self):
        prompt = filler_text(self.rng.randint(3, 30), offset=self.rng.randrange(1000))
        text = await self.stream("/chat/reply", prompt=prompt)
        self.chat.append([prompt, text])

    async def resay(self):
        text = await self.stream("/chat/resay")
        self.chat[-1][1] = text

    async def tamper(self):
        message = filler_text(self.rng.randint(2, 20), offset=self.rng.randrange(1000)).capitalize() + "."
        await self.client.call("/chat/tamper", character_name=self.bot, message=message)
        self.chat[-1][1] = message

    async def back(self):
        index = self.rng.randrange(len(self.chat) - 1)
        await self.client.call("/chat/back", character_name=self.bot, log_index=index)
        del self.chat[index + 1:]

    async def reset(self):
        data = await self.client.call("/chat/reset", character_name=self.bot)
        self.chat = [[None, GREETING]]
        if data["chat"] != self.chat:
            self.record.mismatches.append((self.bot, "reset answered", data["chat"]))

    async def load(self):
        self.compare(await self.client.load(self.bot), "during the run")

    def compare(self, stored, when):
        if stored != self.chat:
            self.record.mismatches.append((self.bot, when, first_difference(self.chat, stored)))

    def expected_context(self):
        """The client's chat as the model must have read it: the documented format."""
        user, bot = prompt_format.speaker_names(USER, self.bot, False)
        parts = [prompt_format.character_header(user, bot, PERSONA, ""), prompt_format.reply_part(self.chat[0][1])]
        for user_text, bot_text in self.chat[1:]:
            parts += [prompt_format.user_turn(user, bot, user_text), prompt_format.reply_part(bot_text)]
        return "".join(parts)

    async def check_context(self, when):
        """The invariant: what the model has read (/debug/token) is exactly the chat in the documented format."""
        context = (await self.client.call("/debug/token", character_name=self.bot))["token_state"]
        self.record.context_checks += 1
        expected = self.expected_context()
        if context != expected:
            at = next((i for i, (a, b) in enumerate(zip(context, expected)) if a != b), min(len(context), len(expected)))
            self.record.context_breaks.append(
                (self.bot, when, f"at char {at}: context {context[max(0, at - 40):at + 40]!r} "
                                 f"!= chat {expected[max(0, at - 40):at + 40]!r}"))

    async def check(self):
        """The end: the server's chat equals the client's record, and the context is the chat."""
        self.compare(await self.client.load(self.bot), "at the end")
        await self.check_context("at the end")


def first_difference(expected, stored):
    for index, (mine, theirs) in enumerate(zip(expected, stored)):
        if mine != theirs:
            return f"round {index}: client {mine!r} != server {theirs!r}"
    return f"client has {len(expected)} rounds, server {len(stored)}"


async def soak(base_url, users, seconds, seed):
    records = [Record() for _ in range(users)]
    people = [Person(base_url, i, random.Random(seed * 1000 + i), records[i]) for i in range(users)]
    try:
        await asyncio.gather(*(person.start() for person in people))
        deadline = time.monotonic() + seconds

        async def live(person):
            while time.monotonic() < deadline:
                await person.act()

        started = time.monotonic()
        await asyncio.gather(*(live(person) for person in people))
        wall = time.monotonic() - started
        await asyncio.gather(*(person.check() for person in people))
    finally:
        await asyncio.gather(*(person.client.close() for person in people), return_exceptions=True)
    return records, wall


async def warm_up(base_url):
    """One reply on a throwaway account: first-use costs (TorchScript) are not part of the soak."""
    client = Client(base_url)
    try:
        await client.login_guest()
        await client.save_character("Warm", USER, GREETING, PERSONA)
        await client.load("Warm")
        await client.reply("Warm", "hello")
    finally:
        await client.close()


def server_log_problems(server):
    try:
        lines = server.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if "Traceback" in line or " ERROR " in line or "CRITICAL" in line]


def report(records, wall, rss, problems):
    merged = Record()
    for record in records:
        for kind, values in record.latency.items():
            merged.latency[kind] += values
        for kind, values in record.first_frame.items():
            merged.first_frame[kind] += values
        for kind, values in record.errors.items():
            merged.errors[kind] += values
        merged.mismatches += record.mismatches
        merged.context_breaks += record.context_breaks
        merged.context_checks += record.context_checks
    rows = []
    for kind in ACTIONS:
        done = merged.latency.get(kind, [])
        failed = merged.errors.get(kind, [])
        first = merged.first_frame.get(kind, [])
        rows.append([kind, len(done) + len(failed), len(failed)]
                    + [fmt(percentile(done, p) * 1000, 0) if done else "-" for p in (50, 90, 99)]
                    + [fmt(percentile(first, p) * 1000, 0) if first else "-" for p in (50, 90, 99)])
    total = sum(row[1] for row in rows)
    errors = sum(row[2] for row in rows)
    print()
    print(table(["kind", "requests", "errors", "p50 ms", "p90 ms", "p99 ms",
                 "first frame p50", "p90", "p99"], rows))
    print(f"\n{total} requests in {wall:.0f} s ({total / wall:.1f}/s), {errors} errors")
    for kind, messages in merged.errors.items():
        for message in sorted(set(messages))[:5]:
            print(f"  {kind} error x{messages.count(message)}: {message}")
    print(f"conversations checked against /characters/load: {len(records)}, differing: "
          f"{len({m[0] for m in merged.mismatches})}")
    for bot, when, what in merged.mismatches[:10]:
        print(f"  {bot} {when}: {what}")
    print(f"contexts checked against the chat (/debug/token after every operation): {merged.context_checks}, "
          f"differing: {len(merged.context_breaks)} (of {len({b[0] for b in merged.context_breaks})} users)")
    for bot, when, what in merged.context_breaks[:10]:
        print(f"  {bot} {when}: {what}")
    start_mb, end_mb, peak_mb = (kb / 1024 for kb in rss)
    print(f"server RSS: {start_mb:.0f} MB after warm-up, {end_mb:.0f} MB at the end "
          f"({end_mb - start_mb:+.0f} MB), peak {peak_mb:.0f} MB")
    print(f"server log: {len(problems)} error/traceback lines")
    for line in problems[:10]:
        print(f"  {line}")
    return errors == 0 and not merged.mismatches and not merged.context_breaks


def main():
    install_sigterm_handler()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=16, help="simulated people (default 16)")
    parser.add_argument("--minutes", type=float, default=5, help="how long they keep at it (default 5; 0.5 is a quick run)")
    parser.add_argument("--tokens", type=int, default=32, help="RPSERVER_MAX_REPLY_TOKENS (default 32)")
    parser.add_argument("--strategy", default="cpu fp32")
    parser.add_argument("--model", help="checkpoint to serve (default: a cached random RWKV-7 of --layers x --embd)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--embd", type=int, default=256)
    parser.add_argument("--wait-quiet", type=int, default=120,
                        help="wait up to this many seconds for other processes to leave the CPUs (default 120)")
    parser.add_argument("--seed", type=int, default=1, help="the clients' random choices")
    parser.add_argument("--keep-limits", action="store_true", help="leave the reply rate limits on")
    args = parser.parse_args()

    wait_for_quiet(args.wait_quiet)
    print(machine_note(), flush=True)
    model = Path(args.model) if args.model else ensure_model(args.layers, args.embd)
    env = {"RPSERVER_MAX_REPLY_TOKENS": args.tokens}
    if not args.keep_limits:
        env.update({"RPSERVER_REPLIES_PER_MINUTE": 0, "RPSERVER_MAX_REPLIES_PER_USER": 0})
    data_dir = Path(tempfile.mkdtemp(prefix="rpsoak-"))
    print(f"soak: {args.users} users for {args.minutes:g} min on {model.name} ({args.strategy}), "
          f"replies up to {args.tokens} tokens, data in {data_dir}", flush=True)
    with Server(model, data_dir, args.strategy, env) as server:
        asyncio.run(warm_up(server.url))
        start_kb = server.status().get("VmRSS", 0)
        server.sample_rss()
        records, wall = asyncio.run(soak(server.url, args.users, args.minutes * 60, args.seed))
        peak_kb = server.stop_sampling()
        end_kb = server.status().get("VmRSS", 0)
        problems = server_log_problems(server)
    if not report(records, wall, (start_kb, end_kb, peak_kb), problems):
        sys.exit(1)


if __name__ == "__main__":
    run_script(main)
