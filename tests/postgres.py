"""A private PostgreSQL server for the tests, started from the system's binaries.

`PrivatePostgres().start()` runs initdb and pg_ctl from
/usr/lib/postgresql/<version>/bin (the newest installed) in a temporary
directory, listening only on a unix socket inside that directory (no TCP
port, so nothing else on the machine can reach it and no port can clash),
and returns a `postgres://` URL for RPSERVER_DATABASE_URL. `stop()` shuts it
down and deletes the directory: nothing is left behind.

PostgreSQL refuses to run as root. When the tests run as root, the server
runs as the existing unprivileged user `nobody` (the directory is handed to
it), so no system user has to be created and none is left behind.

Durability is switched off (fsync, synchronous_commit, full_page_writes):
the database lives only as long as the test run, and the tests check what
the application does, not what the disk does after a power cut.
"""

import atexit
import os
import pwd
import shutil
import subprocess
import tempfile
import urllib.parse
from pathlib import Path

DATABASE = "rpserver"
SUPERUSER = "rpserver"


def binaries():
    """The newest installed PostgreSQL's bin directory, or an error saying how to install one."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0)
    if not found:
        raise RuntimeError("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl): "
                           "apt-get install postgresql")
    return found[-1].parent


class PrivatePostgres:
    def __init__(self):
        self.bin = binaries()
        self.dir = None
        self.url = None
        self.user = None

    def run(self, *command):
        """Run a PostgreSQL tool as the server's (unprivileged) user; its output on failure."""
        account = {}
        if os.geteuid() == 0:
            account = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        done = subprocess.run([str(self.bin / command[0]), *command[1:]], cwd=self.dir,
                              capture_output=True, text=True, **account)
        if done.returncode != 0:
            log = self.dir / "postgres.log"
            raise RuntimeError(f"{command[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                               + (log.read_text(errors="replace") if log.exists() else ""))
        return done.stdout

    def start(self):
        self.dir = Path(tempfile.mkdtemp(prefix="rpserver-pg-"))
        if os.geteuid() == 0:
            self.user = pwd.getpwnam("nobody")
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        atexit.register(self.stop)
        data = self.dir / "data"
        self.run("initdb", "--pgdata", str(data), "--username", SUPERUSER, "--auth", "trust",
                 "--encoding", "UTF8", "--locale", "C", "--no-sync")
        options = " ".join([
            "-c listen_addresses=''",
            f"-c unix_socket_directories='{self.dir}'",
            "-c unix_socket_permissions=0700",
            "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
            "-c max_connections=200",
        ])
        self.run("pg_ctl", "start", "--pgdata", str(data), "--wait", "--timeout", "60",
                 "--log", str(self.dir / "postgres.log"), "-o", options)
        self.run("psql", "--host", str(self.dir), "--username", SUPERUSER, "--dbname", "postgres",
                 "--quiet", "--command", f"CREATE DATABASE {DATABASE}")
        host = urllib.parse.quote(str(self.dir), safe="")
        self.url = f"postgres://{SUPERUSER}@{host}/{DATABASE}"
        return self.url

    def stop(self):
        if self.dir is None:
            return
        if (self.dir / "data" / "postmaster.pid").exists():
            try:
                self.run("pg_ctl", "stop", "--pgdata", str(self.dir / "data"), "--mode", "immediate", "--wait")
            except RuntimeError:
                pass  # already gone; the directory goes anyway
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
