"""Orphan files: stored files that no row references, left behind by a crash.

Files are written before the row that references them commits (a state blob
under a fresh random name, then the round that points at it), and deleted
after the row's deletion commits (rpserver.files). A process killed between
the two leaves a file that nothing references and nothing will ever delete.
`find_orphans` lists them and `remove_orphans` deletes them, through the
storage API (local disk or S3), never touching a referenced file. The
`remove_orphan_files` command runs them once (from cron); `start_sweeping`
runs them in a daemon thread of the calling process (for `serve`: a few
minutes after start-up, then hourly).
How a referenced file, or one being written, is kept safe:

- The referencing columns are discovered from the models: every FileField
  (ImageField included) of every installed model. A model added later that
  stores files through a FileField is protected without a change here.
- Only files older than a grace period are candidates. A file written a
  moment ago is not referenced yet because its row has not committed; the
  grace period (an hour by default, far longer than any request) keeps the
  sweep from deleting it under the writer.
- Each candidate's references are checked again just before it is deleted,
  so a row committed while the sweep was listing the storage keeps its file.
"""

import datetime
import logging
import posixpath
import threading
import time

from django.apps import apps
from django.db import models
from django.utils import timezone

logger = logging.getLogger(__name__)

# The storage directories rpserver writes to (statecache.blobs, characters.models).
# Nothing outside them is ever considered, so files an operator keeps in the
# same media root or bucket are safe.
STORED_FILE_DIRS = ("states", "avatars")
DEFAULT_GRACE = datetime.timedelta(hours=1)


def file_fields():
    """(model, field) for every FileField of every installed model."""
    return [
        (model, field)
        for model in apps.get_models()
        for field in model._meta.concrete_fields
        if isinstance(field, models.FileField)
    ]


def referenced_names(storage):
    """Every file name a row references in `storage`."""
    names = set()
    for model, field in file_fields():
        if field.storage is not storage:
            continue
        rows = model._default_manager.exclude(**{field.attname: ""}).exclude(**{f"{field.attname}__isnull": True})
        names.update(rows.values_list(field.attname, flat=True))
    return names


def is_referenced(storage, name):
    """Whether a row references `name` in `storage` now (one query per FileField)."""
    return any(
        model._default_manager.filter(**{field.attname: name}).exists()
        for model, field in file_fields()
        if field.storage is storage
    )


def stored_names(storage, directory):
    """Every file under `directory`, walked with the storage API (listdir works on disk and on S3)."""
    try:
        subdirectories, files = storage.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in files:
        yield posixpath.join(directory, name)
    for subdirectory in subdirectories:
        yield from stored_names(storage, posixpath.join(directory, subdirectory))


def find_orphans(storage, grace=DEFAULT_GRACE, now=None):
    """Names of the files in rpserver's directories that no row references and that are older than `grace`."""
    cutoff = (now or timezone.now()) - grace
    referenced = referenced_names(storage)
    orphans = []
    for directory in STORED_FILE_DIRS:
        for name in stored_names(storage, directory):
            if name in referenced:
                continue
            try:
                modified = storage.get_modified_time(name)
            except (FileNotFoundError, OSError):
                continue  # deleted while we were listing
            if timezone.is_naive(modified):
                modified = timezone.make_aware(modified, datetime.timezone.utc)
            if modified < cutoff:
                orphans.append(name)
    return orphans


def remove_orphans(storage, names):
    """Delete those of `names` (from `find_orphans`) that are still unreferenced; returns [(name, bytes)] removed.

    Each file's references are read again right before it goes: a row that
    committed after the listing started keeps its file.
    """
    removed = []
    for name in names:
        if is_referenced(storage, name):
            continue
        try:
            size = storage.size(name)
        except (FileNotFoundError, OSError):
            continue  # already gone (another process's sweep)
        storage.delete(name)
        logger.info("removed orphan file %s (%d bytes)", name, size)
        removed.append((name, size))
    return removed


def sweep(storage, grace=DEFAULT_GRACE):
    """Find and remove the orphans of `storage`; returns [(name, bytes)] removed."""
    return remove_orphans(storage, find_orphans(storage, grace))


def start_sweeping(interval=datetime.timedelta(hours=1), first_after=datetime.timedelta(minutes=5)):
    """Sweep the default storage in a daemon thread: once `first_after` a start, then every `interval`.

    For `serve`: a crash's orphans go without a cron job. The first sweep
    waits a few minutes so that it never slows a start-up; several server
    processes sweeping one store is harmless (deletion is idempotent and
    each file's references are checked just before it goes).
    """
    from django.core.files.storage import default_storage
    from django.db import connection

    def run():
        delay = first_after
        while True:
            time.sleep(delay.total_seconds())
            delay = interval
            try:
                removed = sweep(default_storage)
                if removed:
                    logger.info("removed %d orphan file(s), %d bytes", len(removed), sum(s for _, s in removed))
            except Exception:
                logger.exception("orphan sweep failed; the next one runs in %s", interval)
            finally:
                connection.close()

    thread = threading.Thread(target=run, name="orphan-sweep", daemon=True)
    thread.start()
    return thread
