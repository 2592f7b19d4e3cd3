"""The test run's environment, set up once, when conftest.py first imports this (before anything
imports Django): a private data directory, the settings that this process and every server it
starts share, the run's database, and Django set up and migrated on it.

The test process and its servers share the data directory (SQLite database and media files), so
tests can drive a server over HTTP and then look at what it stored with the ORM.
"""

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(tempfile.mkdtemp(prefix="rpserver-test-"))
TINY_MODEL = DATA_DIR / "model" / "tiny-rwkv7.pth"
ENDLESS_MODEL = DATA_DIR / "model" / "endless-rwkv7.pth"

# For each of several servers sharing this machine: one core (docs/operations.md: processes sharing
# a machine take its cores / processes each).
ONE_CORE = {"RPSERVER_THREADS": "1", "RPSERVER_PREFILL_THREADS": "1"}

# Settings shared by this process and the servers it starts.
TEST_ENV = {
    "DJANGO_SETTINGS_MODULE": "rpserver.settings",
    "RPSERVER_DATA_DIR": str(DATA_DIR),
    "RPSERVER_MODEL": str(TINY_MODEL),
    "RPSERVER_MAX_REPLY_TOKENS": "12",
    "RPSERVER_STATE_CHECKPOINT_EVERY": "3",
    "RPSERVER_MAX_AVATAR_BYTES": "65536",
    "RPSERVER_LOG_LEVEL": "INFO",
    "RWKV_V7_ON": "1",
    "RWKV_JIT_ON": "1",
    "RWKV_CUDA_ON": "0",
    # The suite makes many guests and replies from one address: the abuse
    # limits are off here, and on in the servers of tests/test_limits.py.
    "RPSERVER_GUESTS_PER_HOUR_PER_ADDRESS": "0",
    "RPSERVER_SIGNUPS_PER_HOUR_PER_ADDRESS": "0",
    "RPSERVER_REPLIES_PER_MINUTE": "0",
}

# The database of the whole run: SQLite in DATA_DIR (the default), or with
# RPSERVER_TEST_DATABASE=postgres (`make test-postgres`) a private PostgreSQL
# server that this run starts from the system's binaries and removes at exit.
TEST_DATABASE = os.environ.get("RPSERVER_TEST_DATABASE", "") or "sqlite"
if TEST_DATABASE == "postgres":
    from postgres import PrivatePostgres

    TEST_ENV["RPSERVER_DATABASE_URL"] = PrivatePostgres().start()
elif TEST_DATABASE == "sqlite":
    os.environ.pop("RPSERVER_DATABASE_URL", None)  # never the operator's database
else:
    raise RuntimeError(f"RPSERVER_TEST_DATABASE must be sqlite or postgres, got {TEST_DATABASE!r}")

# Test files whose outcome does not depend on the run's database: no database
# at all (the model, the engine, the sampler, text, the deploy files), or a
# PostgreSQL of their own whatever the run uses (two processes). The
# PostgreSQL run leaves them out (pytest reports them as deselected): they
# ran in the SQLite run, and running them again would prove nothing new.
DATABASE_INDEPENDENT = {"test_engine.py", "test_rwkv7.py", "test_sampling.py", "test_text.py",
                        "test_deploy.py", "test_scaleout.py"}

os.environ.update(TEST_ENV)
sys.path.insert(0, str(ROOT))

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402

call_command("migrate", verbosity=0)
