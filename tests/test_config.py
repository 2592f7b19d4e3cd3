"""Configuration: errors name their variable (no traceback), the generated secret key,
and the password validators in createuser and the admin."""

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import httpx
import pytest
from django.core.management import CommandError, call_command

from accounts.models import User
from conftest import DATA_DIR, ROOT, TINY_MODEL


def environment(env):
    """The test settings plus `env` (a None value unsets that variable)."""
    full_env = {**os.environ, **(env or {})}
    for name, value in (env or {}).items():
        if value is None:
            full_env.pop(name)
    return full_env


def manage(*args, env=None, prefix=(), timeout=120):
    """Run manage.py in a subprocess with the test settings plus `env`: (exit code, output)."""
    done = subprocess.run(
        [*prefix, sys.executable, "manage.py", *args], cwd=ROOT, env=environment(env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )
    return done.returncode, done.stdout


def assert_refused_naming(variable, code, output, *phrases):
    assert code == 1, output
    assert f"rpserver: configuration error: {variable}" in output, output
    assert "Traceback" not in output, output
    for phrase in phrases:
        assert phrase in output, output


def test_a_missing_data_dir_is_named_not_a_traceback():
    missing = DATA_DIR / "no-such-dir" / "data"
    for command in (["check"], ["serve", "--port", "0"]):
        code, output = manage(*command, env={"RPSERVER_DATA_DIR": str(missing)})
        assert_refused_naming("RPSERVER_DATA_DIR", code, output, f"{str(missing)!r}, which does not exist")


def test_a_data_dir_that_is_a_file_is_named():
    code, output = manage("check", env={"RPSERVER_DATA_DIR": str(TINY_MODEL)})
    assert_refused_naming("RPSERVER_DATA_DIR", code, output, "which is not a directory")


def test_an_unwritable_data_dir_is_named():
    read_only = Path(tempfile.mkdtemp(prefix="rpserver-ro-"))
    read_only.chmod(0o555)
    prefix = ()
    if os.geteuid() == 0:
        # root writes anywhere: without the capability that lets it, it sees what an ordinary account sees.
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a directory unwritable to this test")
        prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
    code, output = manage("check", env={"RPSERVER_DATA_DIR": str(read_only)}, prefix=prefix)
    assert_refused_naming("RPSERVER_DATA_DIR", code, output, "cannot write to")
    assert not (read_only / "secret_key").exists()


@pytest.mark.parametrize("variable,value,phrase", [
    ("RPSERVER_MAX_BATCH", "many", "must be an integer, got 'many'"),
    ("RPSERVER_THREADS", "-2", "must be at least 0, got -2"),
    ("RPSERVER_DEBUG", "maybe", "must be 0/1/true/false, got 'maybe'"),
    ("RPSERVER_BACKEND", "fast", "must be one of auto, rwkv, got 'fast'"),
    ("RPSERVER_DATABASE_URL", "db.example.com/rpserver", "is not a database URL"),
    ("RPSERVER_MAX_AVATAR_PIXELS", "0", "must be at least 1, got 0"),
])
def test_a_bad_value_is_named(variable, value, phrase):
    code, output = manage("check", env={variable: value})
    assert_refused_naming(variable, code, output, phrase)


def test_a_database_url_with_a_password_is_not_echoed():
    code, output = manage("check", env={"RPSERVER_DATABASE_URL": "nosuchdb://rp:hunter2-secret@db/rp"})
    assert_refused_naming("RPSERVER_DATABASE_URL", code, output)
    assert "hunter2-secret" not in output


@pytest.mark.parametrize("variable,value,phrase", [
    ("RPSERVER_STRATEGY", "gpu fast", "RPSERVER_STRATEGY: unsupported strategy 'gpu fast'"),
    ("RPSERVER_MODEL", "/nowhere/model.pth", "RPSERVER_MODEL: no RWKV checkpoint at /nowhere/model.pth"),
])
def test_serve_names_a_bad_model_setting(variable, value, phrase):
    # Without --model, serve reads RPSERVER_MODEL: the error says which variable to fix.
    code, output = manage("serve", "--port", "0", env={variable: value})
    assert code == 1, output
    assert phrase in output, output
    assert "Traceback" not in output, output


def test_serve_names_an_unreachable_database():
    # Port 9 on the loopback: nothing listens there.
    code, output = manage("serve", "--port", "0",
                          env={"RPSERVER_DATABASE_URL": "postgres://rp:pw@127.0.0.1:9/rpserver"})
    assert code == 1, output
    assert "the database cannot be reached (RPSERVER_DATABASE_URL)" in output, output
    assert "Traceback" not in output, output


# Loading the settings is what reads or generates the key (as every command and the server do).
PRINT_KEY = "import django.conf; print(django.conf.settings.SECRET_KEY)"


def print_secret_key(data, extra=None):
    done = subprocess.run([sys.executable, "-c", PRINT_KEY], cwd=ROOT, text=True, capture_output=True,
                          env=environment({"RPSERVER_DATA_DIR": str(data), "RPSERVER_SECRET_KEY": None, **(extra or {})}))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_secret_key_is_generated_once_and_kept_private():
    data = Path(tempfile.mkdtemp(prefix="rpserver-key-"))
    first = print_secret_key(data)
    stored = data / "secret_key"
    assert stored.read_text().strip() == first and len(first) >= 50
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert "insecure" not in first
    assert print_secret_key(data) == first  # reused after a restart
    other = Path(tempfile.mkdtemp(prefix="rpserver-key-"))
    assert print_secret_key(other) != first  # every installation has its own
    assert [p.name for p in data.iterdir() if p.name.startswith(".secret_key")] == []


def test_a_given_secret_key_is_used_and_nothing_is_written():
    data = Path(tempfile.mkdtemp(prefix="rpserver-key-"))
    assert print_secret_key(data, {"RPSERVER_SECRET_KEY": "k" * 60}) == "k" * 60
    assert not (data / "secret_key").exists()


def test_processes_starting_together_agree_on_one_key():
    data = Path(tempfile.mkdtemp(prefix="rpserver-key-"))
    env = environment({"RPSERVER_DATA_DIR": str(data), "RPSERVER_SECRET_KEY": None})
    processes = [
        subprocess.Popen([sys.executable, "-c", PRINT_KEY], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    keys = {process.communicate(timeout=120)[0].strip() for process in processes}
    assert keys == {(data / "secret_key").read_text().strip()}


def test_a_damaged_key_file_is_named():
    data = Path(tempfile.mkdtemp(prefix="rpserver-key-"))
    (data / "secret_key").write_text("short\n")
    code, output = manage("check", env={"RPSERVER_DATA_DIR": str(data), "RPSERVER_SECRET_KEY": None})
    assert_refused_naming("RPSERVER_SECRET_KEY", code, output, f"{data / 'secret_key'} is damaged")


@pytest.mark.parametrize("password,problems", [
    ("1", ["too short", "too common", "entirely numeric"]),
    ("password", ["too common"]),
    ("98234712", ["entirely numeric"]),
    ("dora-the-user", ["too similar to the username"]),
])
def test_createuser_refuses_a_weak_password(password, problems):
    name = f"dora-the-user-{uuid.uuid4().hex[:4]}"
    with pytest.raises(CommandError) as refused:
        call_command("createuser", name, "--password", password)
    message = str(refused.value)
    assert message.startswith("the password is refused:")
    for problem in problems:
        assert problem in message
    assert not User.objects.filter(username=name).exists()


def test_createuser_prints_the_refusal_without_a_traceback():
    code, output = manage("createuser", "weak-one", "--password", "1234")
    assert code == 1 and "Traceback" not in output
    assert "the password is refused:\n  This password is too short." in output


class Admin:
    """A browser-like session in Django's admin (cookies and CSRF tokens)."""

    def __init__(self, url):
        self.http = httpx.Client(base_url=url, timeout=60, follow_redirects=False)

    def form_token(self, path):
        page = self.http.get(path)
        assert page.status_code == 200, page.text[:300]
        return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)

    def post(self, path, **fields):
        return self.http.post(path, data={"csrfmiddlewaretoken": self.form_token(path), **fields})

    def log_in(self, name, password):
        answer = self.post("/admin/login/?next=/admin/", username=name, password=password)
        assert answer.status_code == 302, answer.text[:500]


def test_the_admin_refuses_a_weak_password(server):
    boss = f"boss-{uuid.uuid4().hex[:6]}"
    User.objects.create_superuser(boss, password="lighthouse-keeper-42")
    admin = Admin(server.url)
    admin.log_in(boss, "lighthouse-keeper-42")

    name = f"new-{uuid.uuid4().hex[:6]}"
    weak = admin.post("/admin/accounts/user/add/", username=name, password1="12345", password2="12345",
                      usable_password="true")
    assert weak.status_code == 200  # the form again, with its errors
    assert "This password is too short" in weak.text and "This password is entirely numeric" in weak.text
    assert not User.objects.filter(username=name).exists()

    strong = admin.post("/admin/accounts/user/add/", username=name, password1="copper-kettle-19",
                        password2="copper-kettle-19", usable_password="true")
    assert strong.status_code == 302, strong.text[:500]
    user = User.objects.get(username=name)

    change = f"/admin/accounts/user/{user.pk}/password/"
    weak = admin.post(change, password1="password", password2="password", usable_password="true")
    assert weak.status_code == 200 and "This password is too common" in weak.text
    user.refresh_from_db()
    assert user.check_password("copper-kettle-19")
