"""The conversation tree's costs (issue 19): what a switch, a swipe, an edit and a rebuild read.

One server (a fresh data dir) and one registered user under the default
state policy ("ends, forks and every K", K = RPSERVER_STATE_CHECKPOINT_EVERY=8,
within the default budget);
a 200-message chat (100 rounds: the person's message and the character's
reply, replies of --tokens tokens) built through the legacy API. Then,
--reps times each, through the REST API (/api/v1/chats/...):

- switch between two alternatives at message 100 (round 50): tokens read
  and time; then the time to the first frame of a reply at the end of the
  path after a switch, against one at the end of a path nobody switched;
- swipe at message 10 (round 5's reply): tokens read (the new reply, and
  the state before it if it had to be rebuilt), against what a transformer
  server re-reads to come back to the old branch (every token after message
  10 on it: its cache holds one sequence);
- edit of the person's message at 150 (round 75) and its reply: tokens read;
- disk: the state store's blobs the chat pins (states/store/; the shared
  cache's round-0 state is under states/cache/), per message and for the chat;
- rebuild of a pruned state: /chat/back to a round whose state is not kept
  (rebuilt from the nearest kept one, at most K rounds before it).

Tokens read are the engine's counter (/v1/debug/stats: prompt tokens read,
plus the tokens a reply generates, each read once after it is sampled).

    .venv/bin/python bench/tree.py            # the 0.1B shape (~10 min on 2 shared cores)
    .venv/bin/python bench/tree.py --quick    # smoke run: tiny model, 20 rounds
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import CpuMeter, machine_note  # noqa: E402
from script import BenchError, install_sigterm_handler, run_script  # noqa: E402
from server import MANAGE, PYTHON, ROOT, Server, ensure_model  # noqa: E402
from stats import fmt, median, table  # noqa: E402

PASSWORD = "red-sails-at-night-7481"
CHARACTER = {"bot": "Bob", "user": "Ann", "greeting": "Welcome back to the lighthouse, Ann.",
             "bot_persona": "Bob is a cheerful lighthouse keeper who loves the sea and long stories."}


class Person:
    def __init__(self, url, user_name, token):
        self.http = httpx.Client(base_url=url, timeout=600, headers={"Authorization": f"Token {token}"})
        self.user_name = user_name

    def legacy(self, route, **fields):
        body = self.http.post(route, data=fields).json()
        if body["code"] != 200:
            raise BenchError(f"{route}: {body['message']}")
        return body["data"]

    def api(self, route, **fields):
        """GET a chat or its context; POST any change."""
        reading = not fields and not route.endswith(("undo", "discard"))
        answer = self.http.get(route) if reading else self.http.post(route, data=fields)
        body = answer.json()
        if body["code"] != 200:
            raise BenchError(f"{route}: {body['message']}")
        return body["data"]

    def stream(self, route, **fields):
        """(seconds to the first frame, the last frame)."""
        started, first, raw = time.monotonic(), None, b""
        with self.http.stream("POST", route, data=fields) as answer:
            if not answer.headers["content-type"].startswith("text/event-stream"):
                raise BenchError(f"{route}: {answer.read().decode()}")
            for chunk in answer.iter_raw():
                raw += chunk
                if first is None and b"data: " in raw:
                    first = time.monotonic() - started
        return first, raw.decode(errors="replace").split("\n\ndata: ")[-1]

    def tokens_read(self):
        answer = self.http.get("/v1/debug/stats", headers={"Authorization": self.http.headers["Authorization"]
                                                           .replace("Token", "Bearer")})
        return answer.json()["engine"]["tokens_read"]

    def measured(self, call):
        """(tokens read, seconds, value) of call()."""
        before, started = self.tokens_read(), time.monotonic()
        value = call()
        seconds = time.monotonic() - started
        return self.tokens_read() - before, seconds, value


def prompt_of(n):
    return f"Tell me about the ship number {n}, the one with the red sails, and what the crew did that night."


def blob_bytes(data_dir, owner_id):
    """(files, bytes) of the state store's blobs that rounds write (one user in the bench: all theirs)."""
    folder = Path(data_dir) / "media" / "states" / "store"
    files = list(folder.glob("*.safetensors")) if folder.exists() else []
    return len(files), sum(f.stat().st_size for f in files)


def main():
    install_sigterm_handler()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100, help="rounds after the greeting (2 messages each)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16, help="RPSERVER_MAX_REPLY_TOKENS")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny model, 20 rounds, 2 reps")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.reps, args.layers, args.embd = 20, 2, 2, 128
    switch_round, swipe_round, edit_round = args.rounds // 2, 5, args.rounds * 3 // 4
    model = ensure_model(args.layers, args.embd)
    print(machine_note(), flush=True)
    with tempfile.TemporaryDirectory(prefix="rpbench-tree-") as data_dir:
        env = {"RPSERVER_MAX_REPLY_TOKENS": args.tokens}
        user_name = "bench-tree"
        for command in (["migrate"], ["createuser", user_name, "--password", PASSWORD]):
            subprocess.run([PYTHON, str(MANAGE), *command], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                           env=dict(os.environ, RPSERVER_DATA_DIR=data_dir))
        with Server(model, data_dir, args.strategy, env) as server:
            meter = CpuMeter([server.proc.pid])
            login = httpx.post(f"{server.url}/login", data={"user_name": user_name, "password": PASSWORD}).json()
            person = Person(server.url, user_name, login["data"]["token"])
            person.legacy("/characters/save", **CHARACTER)
            person.legacy("/characters/load", character_name="Bob")
            started = time.monotonic()
            for n in range(args.rounds):
                person.stream("/chat/reply", character_name="Bob", prompt=prompt_of(n))
            print(f"built a {2 * args.rounds}-message chat in {fmt(time.monotonic() - started, 0)} s", flush=True)
            chat_id = person.api("/api/v1/chats?character=Bob")["chats"][0]["id"]
            view = person.api(f"/api/v1/chats/{chat_id}")
            context_tokens = person.legacy("/debug/token", character_name="Bob")["token_count"]
            rounds = [m["round"] for m in view["messages"] if m["role"] == "character"]
            if person.api(f"/api/v1/chats/{chat_id}/context")["token_count"] != context_tokens:
                raise BenchError("the REST API's context differs from /debug/token's")

            # Disk under the default policy, before the tree has branches.
            files, size = blob_bytes(data_dir, person_owner_id(data_dir, user_name))

            # An alternative at message 100 (round 50), then the path back to the original's end.
            original = rounds[switch_round]
            person.stream(f"/api/v1/chats/{chat_id}/swipe", round=original)
            alternative = person.api(f"/api/v1/chats/{chat_id}")["head"]
            switches, ttft_switched, ttft_plain = [], [], []
            for rep in range(args.reps):
                for target in (original, alternative):
                    switches.append(person.measured(lambda: person.api(f"/api/v1/chats/{chat_id}/switch",
                                                                       round=target))[:2])
                person.api(f"/api/v1/chats/{chat_id}/switch", round=original)  # back at the long path's end
                ttft_switched.append(person.stream(f"/api/v1/chats/{chat_id}/reply", prompt="And then?")[0])
                ttft_plain.append(person.stream(f"/api/v1/chats/{chat_id}/reply", prompt="Go on.")[0])

            # Swipes at message 10 (round 5), and the way back to the long branch.
            path = person.api(f"/api/v1/chats/{chat_id}")
            long_end = path["head"]
            after_ten = context_tokens_after(person, chat_id, swipe_round)
            swipes, returns = [], []
            for rep in range(args.reps):
                swipes.append(person.measured(lambda: person.stream(f"/api/v1/chats/{chat_id}/swipe",
                                                                    round=rounds[swipe_round]))[:2])
                returns.append(person.measured(lambda: person.api(f"/api/v1/chats/{chat_id}/switch",
                                                                  round=long_end))[:2])

            # Edits of the person's message at 150 (round 75), each answered.
            edits = []
            for rep in range(args.reps):
                def edit_and_answer(rep=rep):
                    edited = person.api(f"/api/v1/chats/{chat_id}/edit", round=rounds[edit_round], role="user",
                                        text=prompt_of(1000 + rep))
                    return person.stream(f"/api/v1/chats/{chat_id}/swipe", round=edited["head"])
                edits.append(person.measured(edit_and_answer)[:2])
                person.api(f"/api/v1/chats/{chat_id}/switch", round=long_end)

            # A pruned state rebuilt: back to rounds whose post-round state the policy dropped.
            rebuilds = []
            pruned = [i for i in range(args.rounds - 5) if i % 8 == 5][-args.reps:]  # 5 rounds past a checkpoint
            for index in pruned:
                rebuilds.append(person.measured(lambda: person.legacy("/chat/back", character_name="Bob",
                                                                      log_index=index))[:2])
                person.api(f"/api/v1/chats/{chat_id}/switch", round=rounds[index + 1])
            others = meter.others()
            files_after, size_after = blob_bytes(data_dir, person_owner_id(data_dir, user_name))

    print()
    print(f"== The conversation tree: {model.name}, {args.strategy}, a {2 * args.rounds}-message chat "
          f"({context_tokens} tokens), medians of {args.reps} ==")
    rows = [
        [f"switch at message {2 * switch_round} (both ways)", fmt(median([t for t, _ in switches]), 0),
         fmt(median([s for _, s in switches]) * 1000, 0), "0"],
        [f"swipe at message {2 * swipe_round}", fmt(median([t for t, _ in swipes]), 0),
         fmt(median([s for _, s in swipes]) * 1000, 0), "the new reply"],
        ["  then back to the long branch", fmt(median([t for t, _ in returns]), 0),
         fmt(median([s for _, s in returns]) * 1000, 0), f"{after_ten} (re-read after message {2 * swipe_round})"],
        [f"edit the person's message {2 * edit_round - 1} + its reply", fmt(median([t for t, _ in edits]), 0),
         fmt(median([s for _, s in edits]) * 1000, 0), "the message + the reply"],
        ["back to a pruned round (rebuilt)", fmt(median([t for t, _ in rebuilds]), 0),
         fmt(median([s for _, s in rebuilds]) * 1000, 0), "-"],
    ]
    print(table(["operation", "tokens read", "ms", "a transformer server reads"], rows))
    print(f"tokens read by each run: swipes {[t for t, _ in swipes]}, edits {[t for t, _ in edits]}, "
          f"rebuilds {[t for t, _ in rebuilds]} (the first swipe and edit rebuild the pruned state before them)")
    print(f"first frame of a reply at the path's end: after a switch {fmt(median(ttft_switched) * 1000, 0)} ms, "
          f"without {fmt(median(ttft_plain) * 1000, 0)} ms")
    print(f"disk after the build: {files} state blobs, {fmt(size / 2**20, 1)} MiB for the chat, "
          f"{fmt(size / (2 * args.rounds) / 2**20, 2)} MiB per message; at the end (with the branches): "
          f"{files_after} blobs, {fmt(size_after / 2**20, 1)} MiB")
    print(f"other processes used {fmt(100 * others, 0)}% of the CPUs meanwhile")


def person_owner_id(data_dir, user_name):
    env = dict(os.environ, RPSERVER_DATA_DIR=data_dir)
    done = subprocess.run([PYTHON, str(MANAGE), "shell", "-c",
                           f"from accounts.models import User; print(User.objects.get(username={user_name!r}).pk)"],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def context_tokens_after(person, chat_id, round_index):
    """Tokens of the current path after round `round_index`'s reply (what a transformer re-reads)."""
    whole = person.api(f"/api/v1/chats/{chat_id}/context")["token_count"]
    view = person.api(f"/api/v1/chats/{chat_id}")
    upto = [m for m in view["messages"] if m["role"] == "character"][round_index]["round"]
    fork = person.api(f"/api/v1/chats/{chat_id}/fork", round=upto)
    before = person.api(f"/api/v1/chats/{fork['id']}/context")["token_count"]
    person.api(f"/api/v1/chats/{fork['id']}/discard")
    return whole - before


if __name__ == "__main__":
    run_script(main)
