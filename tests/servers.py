"""Servers the tests start: `manage.py serve` (Server) and anything else that listens on a port,
with one loop that waits until it listens."""

import os
import socket
import subprocess
import sys
import time

from environment import DATA_DIR, ROOT, TINY_MODEL

# With the endless model, a server with these settings streams every reply until its reader leaves:
# the model never ends its turn, and no test reads a billion tokens. A test that needs a reply still
# running uses one (clients.running_reply), never a long reply that will "surely" outlast its other
# requests: on a loaded machine it may not.
UNTIL_THE_READER_LEAVES = {"RPSERVER_MAX_REPLY_TOKENS": "1000000000"}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_listening(port, process, log, seconds=120):
    """Return once something accepts connections on `port`; fail if `process` exits first, or after
    `seconds` (far beyond a start on a loaded machine), with its `log()`."""
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode} before listening on {port}:\n{log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not listening on {port} after {seconds} s:\n{log()}") from None
            time.sleep(0.1)


class Server:
    """`manage.py serve` in a subprocess, on a free port, its output in DATA_DIR/<name>.log."""

    def __init__(self, model=TINY_MODEL, env=None, name="server"):
        self.model = model
        self.env = {**os.environ, **(env or {})}
        self.log_path = DATA_DIR / f"{name}.log"
        self.process = None
        self.url = None

    def command(self, port):
        return [sys.executable, "manage.py", "serve", "--model", str(self.model), "--port", str(port)]

    def start(self):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(self.command(port), cwd=ROOT, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)
        wait_until_listening(port, self.process, self.log)
        return self

    def stop(self):
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def restart(self):
        self.stop()
        return self.start()

    def log(self):
        return self.log_path.read_text(errors="replace")
