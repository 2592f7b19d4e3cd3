"""Servers the tests start: `manage.py serve` (Server) and anything else that listens on a port,
with one loop that waits until it listens."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def listening_sockets(port):
    """The inodes of the sockets listening on 127.0.0.1:`port` (or on every address), from /proc/net/tcp."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, local_port = fields[1].split(":")
        if int(local_port, 16) == port and fields[3] == "0A" and address in ("0100007F", "00000000"):
            inodes.add(fields[9])
    return inodes


def listens(process, port):
    """Whether `process` itself holds a socket listening on `port`: a free port can be taken by
    another program (another suite's server, a client's ephemeral port) between free_port() and the
    bind, and a connection that succeeds would then reach that program instead."""
    inodes = listening_sockets(port)
    if not inodes:
        return False
    fds = Path(f"/proc/{process.pid}/fd")
    try:
        held = {os.readlink(fd) for fd in fds.iterdir()}
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any(f"socket:[{inode}]" in held for inode in inodes)


def wait_until_listening(port, process, log, seconds=120):
    """Return once `process` itself listens on `port`; fail if it exits first, or after `seconds` (far
    beyond a start on a loaded machine), with its `log()`."""
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode} before listening on {port}:\n{log()}")
        if listens(process, port):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.pid} not listening on {port} after {seconds} s:\n{log()}")
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
