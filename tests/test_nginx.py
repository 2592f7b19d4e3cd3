"""deploy/nginx.conf, run by Debian's nginx in front of two servers.

The configuration is used as written, with only its ports changed (its
upstream's two servers become two test servers, its `listen 80` a free
port), inside a minimal main configuration whose paths are in a temporary
directory and which, like many servers' main configurations, compresses
text responses (gzip). The tests stream replies through it and look at how
the frames arrive: each read of the response should carry the frame the
server just wrote, not many frames held back in a buffer.

To show the test can tell, the same stream goes through the configuration
without its stream settings (`gzip off`, `proxy_buffering off`, and the
server's `X-Accel-Buffering: no` ignored): the frames must then bunch.
"""

import os
import re
import shutil
import subprocess
import tempfile

import httpx
import pytest

from conftest import CHARACTER, ENDLESS_MODEL, ONE_CORE, ROOT, Api, Server, free_port, wait_until_listening

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CONFIG = ROOT / "deploy" / "nginx.conf"
BUFFERED = """
        proxy_buffering on;
        proxy_ignore_headers X-Accel-Buffering;
"""
# An operator's global compression, as found in many main configurations.
GZIP = """
    gzip on;
    gzip_min_length 0;
    gzip_types text/event-stream application/json text/plain;
"""


def site_config(upstreams, port, buffered=False):
    """deploy/nginx.conf with the test's ports (and, for the control, buffering forced on)."""
    text = CONFIG.read_text()
    listed = re.findall(r"server 127\.0\.0\.1:(\d+)", text)
    assert listed == ["8001", "8002"], listed  # the ports the README and the units use
    for deployed, url in zip(listed, upstreams):
        text = text.replace(f"127.0.0.1:{deployed}", url.removeprefix("http://"))
    assert text.count("listen 80;") == 1
    text = text.replace("listen 80;", f"listen 127.0.0.1:{port};")
    if buffered:
        text = text.replace("        proxy_buffering off;\n", BUFFERED).replace("        gzip off;\n", "")
    return text


class Nginx:
    def __init__(self, upstreams, buffered=False):
        if not os.path.exists(NGINX):
            raise RuntimeError("nginx is not installed: apt-get install nginx-light (.ci/run does)")
        self.dir = tempfile.mkdtemp(prefix="rpserver-nginx-")
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        site = os.path.join(self.dir, "rpserver.conf")
        with open(site, "w") as out:
            out.write(site_config(upstreams, self.port, buffered))
        temp = os.path.join(self.dir, "temp")
        os.mkdir(temp)
        os.chmod(temp, 0o777)  # the workers may run as another user
        main = f"""
daemon off;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format upstreams '$request_uri $status $upstream_addr';
    access_log {self.dir}/access.log upstreams;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{GZIP}
    include {site};
}}
"""
        self.config = os.path.join(self.dir, "nginx.conf")
        with open(self.config, "w") as out:
            out.write(main)
        self.process = None

    def start(self):
        check = subprocess.run([NGINX, "-t", "-p", self.dir, "-c", self.config, "-e", f"{self.dir}/error.log"],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.process = subprocess.Popen([NGINX, "-p", self.dir, "-c", self.config, "-e", f"{self.dir}/error.log"])
        wait_until_listening(self.port, self.process, self.log)
        return self

    def stop(self):
        if self.process is not None:
            self.process.terminate()
            self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self):
        with open(os.path.join(self.dir, "error.log")) as log:
            return log.read()


@pytest.fixture(scope="module")
def backends():
    """Two servers on the run's database and media, with replies of 120 tokens (the endless model's
    replies always run to the limit)."""
    started = []
    try:
        for name in ("nginx-a", "nginx-b"):
            # One core each, as two processes sharing a machine should be set (see "Deploying beyond one
            # process"): with every core in each engine, the test's own client, reading frame by frame,
            # gets too little CPU and finds two frames in one read. Without the compiled kernels
            # (RPSERVER_KERNELS=off): with them the tiny model's tokens came ~1 ms apart, and two frames
            # met in one read of the client's socket even without nginx's buffering (one CI run).
            env = {"RPSERVER_MAX_REPLY_TOKENS": "120", "RPSERVER_KERNELS": "off", **ONE_CORE}
            started.append(Server(model=ENDLESS_MODEL, env=env, name=name).start())
        yield started
    finally:
        for running in started:
            running.stop()


@pytest.fixture
def nginx(backends):
    running = Nginx([b.url for b in backends]).start()
    yield running
    running.stop()


def reads_of_a_reply(url):
    """Stream a reply through `url`: (frames per read of the response, the frames, the guest, its encoding)."""
    api = Api(url)
    data = api.ok("/login/tmp")
    guest = Api(url, data["user_name"], data["token"])
    guest.ok("/characters/save", **CHARACTER)
    guest.chat("Mira")
    fields = {**guest.auth(), "character_name": "Mira", "prompt": "tell me about the sea"}
    per_read, body = [], b""
    with guest.http.stream("POST", "/chat/reply", data=fields) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        encoding = answer.headers.get("content-encoding", "identity")
        for chunk in answer.iter_bytes():  # each read of the socket, decompressed if it was compressed
            per_read.append(chunk.count(b"\n\ndata: "))
            body += chunk
    frames = body.decode().split("\n\ndata: ")[1:]
    return per_read, frames, guest, encoding


def test_a_stream_through_nginx_arrives_frame_by_frame(nginx):
    per_read, frames, guest, encoding = reads_of_a_reply(nginx.url)
    assert encoding == "identity"
    assert len(frames) >= 40
    assert per_read[0] == 1  # the first token is not held back waiting for more
    # Each read carries about one frame (two frames can meet in the client's
    # socket buffer when the machine is busy), not a buffer's worth.
    assert sorted(per_read)[len(per_read) // 2] == 1
    assert len(per_read) >= len(frames) // 2
    for before, after in zip(frames, frames[1:]):
        assert after.startswith(before)
    assert guest.chat("Mira")[-1] == ["tell me about the sea", frames[-1]]


def test_the_control_with_buffering_forced_on_bunches_the_frames(backends):
    buffered = Nginx([b.url for b in backends], buffered=True).start()
    try:
        per_read, frames, _, encoding = reads_of_a_reply(buffered.url)
    finally:
        buffered.stop()
    assert encoding == "gzip"
    assert len(frames) >= 40
    assert per_read[0] > 1
    assert len(per_read) < len(frames) // 4


def test_nginx_balances_requests_over_both_processes_and_hides_metrics(nginx, backends):
    for _ in range(6):
        Api(nginx.url).ok("/login/tmp")
    assert httpx.get(f"{nginx.url}/metrics").status_code == 404
    with open(os.path.join(nginx.dir, "access.log")) as log:
        served_by = [line.split()[2] for line in log if line.startswith("/login/tmp 200 ")]
    assert len(served_by) == 6
    assert {b.url.removeprefix("http://") for b in backends} == set(served_by)
