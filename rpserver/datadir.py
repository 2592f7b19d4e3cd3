"""The data directory, and the secret key rpserver keeps in it when none is given.

Both run while settings load, so their errors are ImproperlyConfigured
naming the variable to change; manage.py prints them without a traceback.
"""

import os
import tempfile
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from django.core.management.utils import get_random_secret_key

SECRET_KEY_FILE = "secret_key"


def data_dir(variable, default):
    """The directory named by environment variable `variable` (or `default`): it must exist and be writable."""
    raw = os.environ.get(variable) or str(default)
    path = Path(raw).expanduser()
    if not path.exists():
        raise ImproperlyConfigured(
            f"{variable} is {raw!r}, which does not exist: create that directory, or set {variable} to one that does"
        )
    if not path.is_dir():
        raise ImproperlyConfigured(f"{variable} is {raw!r}, which is not a directory: set {variable} to a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ImproperlyConfigured(
            f"{variable} is {raw!r}, which this user ({user_name()}) cannot write to: the database, stored files"
            f" and the secret key live there; give it write access or set {variable} to a writable directory"
        )
    return path


def stored_secret_key(directory, variable="RPSERVER_SECRET_KEY"):
    """The secret key kept in `directory`, generated (mode 0600) on first use.

    Several processes may start at once on one directory: the key is written
    to a temporary file and linked into place, which fails if another process
    linked its key first, so every process ends up reading the same complete
    key, never a half-written one.
    """
    path = directory / SECRET_KEY_FILE
    if not path.exists():
        write_new_key(path)
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise ImproperlyConfigured(f"{variable} is unset and the secret key file {path} cannot be read ({exc}):"
                                   f" set {variable}, or fix the file's permissions")
    if len(key) < 32:
        raise ImproperlyConfigured(f"{variable} is unset and the secret key file {path} is damaged (too short):"
                                   f" delete it to have a new key generated (signed-in admin sessions end), or set {variable}")
    return key


def write_new_key(path):
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".secret_key-")  # mode 0600
    try:
        with os.fdopen(descriptor, "w") as out:
            out.write(get_random_secret_key() + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.link(temporary, path)
    except FileExistsError:
        pass  # another process stored its key first: that one is read
    finally:
        os.unlink(temporary)


def user_name():
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid()) if hasattr(os, "geteuid") else "?"
