"""Shared helpers for the rpserver benchmarks (bench/throughput.py, bench/resume.py).

Everything here talks to the server only through its public HTTP API and its
`manage.py` commands; nothing imports the server's own modules, so the
benchmarks keep working while the engine changes underneath them.

Also runnable on its own, to measure the baseline (the `rwkv` package
decoding one stream) in a process of its own:

    .venv/bin/python bench/common.py baseline --model bench/.cache/x.pth --json
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache"
PYTHON = sys.executable
MANAGE = ROOT / "manage.py"

# A user turn / character that tokenizes predictably (plain ASCII words).
FILLER_WORDS = (
    "the quiet harbor town wakes slowly while fishing boats drift past old stone walls and "
    "gulls argue over bread crumbs near the market where a baker sings about distant mountains "
    "rivers lanterns winter gardens and the long road home through fields of golden wheat"
).split()


class BenchError(Exception):
    """An API error or a server that would not start: the benchmark fails (exit 1)."""


# ---- small utilities ----------------------------------------------------------------


def run_script(main):
    """Run a benchmark's main(): exit 1 with the message on a BenchError."""
    try:
        main()
    except BenchError as exc:
        print(f"\nERROR: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def median(values):
    return statistics.median(values) if values else float("nan")


def percentile(values, pct):
    """Nearest-rank-with-interpolation percentile (pct in 0..100)."""
    if not values:
        return float("nan")
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * pct / 100.0
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def fmt(value, digits=1):
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.{digits}f}"


def table(headers, rows):
    """A plain text table, right-aligned columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(cell.rjust(widths[i]) for i, cell in enumerate(row)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def install_sigterm_handler():
    """SIGTERM -> SystemExit, so that `finally` blocks (killing the server) run."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def cpu_busy_elsewhere(seconds=1.0):
    """Fraction of all CPUs busy over `seconds` (before we start anything): other
    people's jobs on this machine skew every figure, so the scripts warn about it."""
    def snapshot():
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle
    try:
        total0, idle0 = snapshot()
        time.sleep(seconds)
        total1, idle1 = snapshot()
    except OSError:
        return None
    total = total1 - total0
    return 1.0 - (idle1 - idle0) / total if total > 0 else None


def machine_note():
    """One line: cores, load average, and how busy the CPUs are right now."""
    busy = cpu_busy_elsewhere()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    cores = os.cpu_count()
    line = f"machine: {cores} CPU cores, load average {load:.2f}, CPUs {100 * (busy or 0):.0f}% busy before start"
    if busy is not None and busy > 0.25:
        line += "  ** WARNING: other processes are using the CPU; figures will be low and noisy **"
    return line


def wait_for_quiet(max_wait, threshold=0.25):
    """Wait (up to max_wait s) until the CPUs are mostly idle: on a shared machine
    another job's threads fighting ours for 2 cores makes every figure junk."""
    if max_wait <= 0:
        return
    started = time.monotonic()
    told = False
    while True:
        busy = cpu_busy_elsewhere(2.0)
        if busy is None or busy < threshold:
            if told:
                print(f"  CPUs quiet after {time.monotonic() - started:.0f} s", flush=True)
            return
        if time.monotonic() - started > max_wait:
            print(f"  ** CPUs still {100 * busy:.0f}% busy after {max_wait} s: measuring anyway **", flush=True)
            return
        if not told:
            print(f"  waiting for other processes to leave the CPUs ({100 * busy:.0f}% busy) ...", flush=True)
            told = True


def _cpu_ticks():
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:9]]  # guest time is already in user
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields), sum(fields) - idle


def _process_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


class CpuMeter:
    """How much of the machine's CPU others (not the server, not us) used meanwhile."""

    def __init__(self, pids):
        self.pids = list(pids)
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start()

    def _mine(self):
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system  # children: waited-for subprocesses
        return sum(_process_ticks(pid) for pid in self.pids) + own * self.hz

    def start(self):
        self.total0, self.busy0 = _cpu_ticks()
        self.mine0 = self._mine()

    def others(self):
        """Fraction (0..1) of all CPU time used by other processes since start()."""
        total1, busy1 = _cpu_ticks()
        total = total1 - self.total0
        if total <= 0:
            return 0.0
        other = (busy1 - self.busy0) - (self._mine() - self.mine0)
        return max(0.0, other / total)


def filler_text(words, offset=0):
    """`words` plain words (roughly `words` tokens with the world tokenizer)."""
    return " ".join(FILLER_WORDS[(offset + i) % len(FILLER_WORDS)] for i in range(words))


# ---- the world tokenizer (from the rwkv package) -------------------------------------

_tokenizer = None


def tokenizer():
    """The RWKV world tokenizer shipped in the `rwkv` package (no torch needed)."""
    global _tokenizer
    if _tokenizer is None:
        import rwkv
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
        _tokenizer = TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))
    return _tokenizer


def count_tokens(text):
    return len(tokenizer().encode(text)) if text else 0


def text_of_tokens(target, offset=0):
    """Filler text of about `target` tokens (within a token or two)."""
    words = max(1, target)
    text = filler_text(words, offset)
    while count_tokens(text) > target and words > 1:
        words -= max(1, (count_tokens(text) - target) // 2)
        text = filler_text(max(words, 1), offset)
    return text


def user_turn_tokens(user, bot, prompt):
    """Tokens the server reads for a user turn before the reply, in the legacy
    prompt format ("<User>: <prompt>\\n\\n<Bot>:"). Used only to split a
    /debug/token delta into prompt and generated tokens."""
    return count_tokens(f"{user}: {prompt.strip()}\n\n{bot}:")


# ---- models -------------------------------------------------------------------------


def ensure_model(layers, embd):
    """A cached random-weight RWKV-7 checkpoint (world vocab), written on first use."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    ignore = CACHE_DIR / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    path = CACHE_DIR / f"demo-rwkv7-L{layers}-D{embd}.pth"
    if not path.exists():
        print(f"writing a random-weight RWKV-7 model ({layers} layers, {embd} wide) to {path} ...", flush=True)
        tmp_data = tempfile.mkdtemp(prefix="rpbench-mk-")
        tmp_path = path.with_suffix(".tmp.pth")
        env = dict(os.environ, RPSERVER_DATA_DIR=tmp_data)
        try:
            subprocess.run([PYTHON, str(MANAGE), "make_demo_model", str(tmp_path), "--layers", str(layers),
                            "--embd", str(embd)], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        except subprocess.CalledProcessError as exc:
            raise BenchError(f"make_demo_model failed with status {exc.returncode}")
        finally:
            shutil.rmtree(tmp_data, ignore_errors=True)
        tmp_path.rename(path)
    return path


# ---- the server subprocess ---------------------------------------------------------


def read_status(pid):
    """{'VmRSS': kB, 'VmHWM': kB} of a process, from /proc (empty if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


# A benchmark is many guests and replies from one address: the server's abuse
# limits (README "Limits") would refuse it, and are not what is measured.
ABUSE_LIMITS_OFF = {
    "RPSERVER_GUESTS_PER_HOUR_PER_ADDRESS": "0",
    "RPSERVER_SIGNUPS_PER_HOUR_PER_ADDRESS": "0",
    "RPSERVER_REPLIES_PER_MINUTE": "0",
}


class Server:
    """`manage.py serve` in a subprocess on a free port, with its own data dir.

    Use as a context manager, or call start()/stop() (stop is idempotent and
    always kills what start launched).
    """

    def __init__(self, model, data_dir, strategy="cpu fp32", env=None, log_name="server.log"):
        self.model = Path(model)
        self.data_dir = Path(data_dir)
        self.strategy = strategy
        self.env = dict(env or {})
        self.log_path = self.data_dir / log_name
        self.proc = None
        self.port = None
        self._log = None
        self._sampling = False
        self._sampler = None
        self.rss_peak_kb = 0

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=180):
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        env = dict(os.environ)
        env.update({"RPSERVER_DATA_DIR": str(self.data_dir), "RPSERVER_LOG_LEVEL": "WARNING",
                    "PYTHONUNBUFFERED": "1"})
        env.update(ABUSE_LIMITS_OFF)
        env.update({k: str(v) for k, v in self.env.items()})
        self._log = open(self.log_path, "ab")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [PYTHON, str(MANAGE), "serve", "--model", str(self.model), "--port", str(self.port),
             "--strategy", self.strategy],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"the server exited with status {self.proc.returncode} while starting:\n"
                                 + self.log_tail())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                pass
            if time.monotonic() - started > timeout:
                raise BenchError(f"the server did not listen within {timeout}s:\n" + self.log_tail())
            time.sleep(0.1)
        self.startup_s = time.monotonic() - started
        return self

    def log_tail(self, lines=30):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def status(self):
        return read_status(self.proc.pid) if self.proc else {}

    def sample_rss(self, interval=0.05):
        """Start sampling VmRSS in a thread; self.rss_peak_kb keeps the maximum seen."""
        self.stop_sampling()
        self.rss_peak_kb = self.status().get("VmRSS", 0)
        self._sampling = True

        def loop():
            while self._sampling:
                rss = self.status().get("VmRSS", 0)
                if rss > self.rss_peak_kb:
                    self.rss_peak_kb = rss
                time.sleep(interval)

        self._sampler = threading.Thread(target=loop, daemon=True)
        self._sampler.start()

    def stop_sampling(self):
        self._sampling = False
        if self._sampler is not None:
            self._sampler.join()
            self._sampler = None
        return self.rss_peak_kb

    def stop(self):
        self.stop_sampling()
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # only the process this object started
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()


# ---- the API client ---------------------------------------------------------------


def check_envelope(route, response):
    if response.status_code != 200:
        raise BenchError(f"{route}: HTTP {response.status_code}: {response.text[:300]}")
    try:
        body = response.json()
    except ValueError:
        raise BenchError(f"{route}: not JSON: {response.text[:300]}")
    if body.get("code") != 200:
        raise BenchError(f"{route}: code {body.get('code')}: {body.get('message')}")
    return body.get("data")


class StreamResult:
    def __init__(self):
        self.started = 0.0  # monotonic time the request was sent
        self.first_frame = None  # seconds from sending to the first frame
        self.total = None  # seconds from sending to the end of the stream
        self.frames = 0
        self.text = ""


class Client:
    """One simulated person: a guest account and its own HTTP connection."""

    def __init__(self, base_url, timeout=600.0):
        import httpx
        self.http = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout, connect=30.0))
        self.user_name = None
        self.token = None

    async def close(self):
        await self.http.aclose()

    def _auth(self, fields):
        data = dict(fields)
        if self.token is not None:
            data.update(user_name=self.user_name, token=self.token)
        return data

    async def call(self, route, **fields):
        response = await self.http.post(route, data=self._auth(fields))
        return check_envelope(route, response)

    async def login_guest(self):
        data = await self.call("/login/tmp")
        self.user_name, self.token = data["user_name"], data["token"]
        return data

    async def save_character(self, bot, user, greeting, persona, example_message=""):
        return await self.call("/characters/save", bot=bot, user=user, greeting=greeting,
                               bot_persona=persona, example_message=example_message)

    async def load(self, name):
        return (await self.call("/characters/load", character_name=name))["chat"]

    async def token_count(self, name):
        return (await self.call("/debug/token", character_name=name))["token_count"]

    async def back(self, name, log_index):
        return await self.call("/chat/back", character_name=name, log_index=log_index)

    async def reply(self, name, prompt, route="/chat/reply"):
        """Stream a reply to the end; time the first frame and the whole stream."""
        result = StreamResult()
        result.started = time.monotonic()
        async with self.http.stream("POST", route, data=self._auth(
                {"character_name": name, "prompt": prompt})) as response:
            content_type = response.headers.get("content-type", "")
            if response.status_code != 200 or not content_type.startswith("text/event-stream"):
                await response.aread()
                check_envelope(route, response)  # raises with the server's message
                raise BenchError(f"{route}: expected an event stream, got {content_type!r}")
            buffer = ""
            async for chunk in response.aiter_text():
                if result.first_frame is None and chunk:
                    result.first_frame = time.monotonic() - result.started
                buffer += chunk
            result.total = time.monotonic() - result.started
        pieces = buffer.split("\n\ndata:")
        result.frames = len(pieces) - 1
        if result.frames < 1:
            raise BenchError(f"{route}: the stream had no frames: {buffer[:200]!r}")
        result.text = pieces[-1].strip()
        return result


async def gather_strict(*aws):
    """asyncio.gather that cancels the rest as soon as one fails."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


# ---- the baseline: the rwkv package, one stream ------------------------------------


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
    cmd = [PYTHON, str(Path(__file__).resolve()), "baseline", "--model", str(model), "--strategy", strategy,
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
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("baseline", help="the rwkv package decoding one stream")
    base.add_argument("--model", required=True)
    base.add_argument("--strategy", default="cpu fp32")
    base.add_argument("--tokens", type=int, default=64)
    base.add_argument("--prompt-tokens", type=int, default=1000)
    base.add_argument("--runs", type=int, default=3)
    base.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    result = run_baseline(args.model, args.strategy, args.tokens, args.prompt_tokens, args.runs)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
