"""The server under the benchmark: `manage.py serve` in a subprocess, and the models it serves.

Everything talks to the server only through its public HTTP API and its
`manage.py` commands, so the benchmarks keep working while the engine
changes underneath them.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from machine import read_status
from script import BenchError

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache"
PYTHON = sys.executable
MANAGE = ROOT / "manage.py"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


# A benchmark is many guests and replies from one address: the server's abuse
# limits (docs/configuration.md, "Abuse limits") would refuse it, and are not what is measured.
ABUSE_LIMITS_OFF = {
    "RPSERVER_GUESTS_PER_HOUR_PER_ADDRESS": "0",
    "RPSERVER_SIGNUPS_PER_HOUR_PER_ADDRESS": "0",
    "RPSERVER_REPLIES_PER_MINUTE": "0",
}


# The bearer token of /metrics in servers started with it (bench/throughput.py --engine-stats).
METRICS_TOKEN = "bench-metrics"


class Server:
    """`manage.py serve` in a subprocess on a free port, with its own data dir.

    Use as a context manager, or call start()/stop() (stop is idempotent and
    always kills what start launched).
    """

    def __init__(self, model, data_dir, strategy="auto", env=None, log_name="server.log"):
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

    def engine_counters(self):
        """The engine's counters from /metrics (the server needs RPSERVER_METRICS_TOKEN=METRICS_TOKEN):
        {"steps": ..., "rows": ..., "pass_seconds": ..., "step_seconds": ..., ...}."""
        answer = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10)
        answer.raise_for_status()
        counters = {}
        for line in answer.text.splitlines():
            if line.startswith("rpserver_engine_") and line.split()[0].endswith("_total"):
                name, value = line.split()
                counters[name[len("rpserver_engine_"):-len("_total")]] = float(value)
        return counters

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
