"""deploy/'s systemd units: systemd itself reads them, and they run what exists.

`systemd-analyze verify` parses each unit as systemd would at boot (unknown
keys, bad values, a timer without its service, a command that is not
there). The units name the checkout as /srv/rpserver; here it becomes this
checkout, so the commands they start are checked too. The commands
themselves (`serve`, `purge_guests`) are tested elsewhere in the suite.
"""

import shutil
import subprocess
import tempfile
from pathlib import Path

from conftest import ROOT

DEPLOY = ROOT / "deploy"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def test_the_systemd_units_are_valid_and_start_existing_commands():
    assert Path(SYSTEMD_ANALYZE).exists(), "systemd-analyze is missing: apt-get install systemd"
    units = Path(tempfile.mkdtemp(prefix="rpserver-units-"))
    try:
        for unit in DEPLOY.glob("rpserver*.service"):
            (units / unit.name).write_text(unit.read_text().replace("/srv/rpserver", str(ROOT)))
        shutil.copy(DEPLOY / "rpserver-purge-guests.timer", units)
        (units / "rpserver@8001.service").symlink_to(units / "rpserver@.service")
        names = ["rpserver@8001.service", "rpserver-purge-guests.service", "rpserver-purge-guests.timer"]
        done = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", *[str(units / name) for name in names]],
                              capture_output=True, text=True, cwd=units)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert (ROOT / ".venv" / "bin" / "python").exists()
    finally:
        shutil.rmtree(units)


def test_the_units_run_the_commands_the_readme_documents():
    serve = (DEPLOY / "rpserver@.service").read_text()
    assert "ExecStart=/srv/rpserver/.venv/bin/python manage.py serve --host 127.0.0.1 --port %i" in serve
    purge = (DEPLOY / "rpserver-purge-guests.service").read_text()
    assert "manage.py purge_guests --idle-hours 168" in purge
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert "server 127.0.0.1:8001" in nginx and "server 127.0.0.1:8002" in nginx
