"""Stored files follow their rows: a file is deleted once the deletion of its row commits, and a file
written for a new row is deleted if the transaction that stores the row does not commit (when the
writer runs inside a `deleted_on_rollback` block: Django has no rollback hook)."""

import contextlib
import threading

from django.db import models, transaction

_blocks = threading.local()  # the open deleted_on_rollback blocks of this thread, innermost last


def delete_file_on_commit(field_file):
    """Delete a stored file after the current transaction commits (at once outside one)."""
    if field_file and field_file.name:
        name, storage = field_file.name, field_file.storage
        transaction.on_commit(lambda: storage.delete(name))


def delete_file_on_rollback(field_file):
    """A file just written for a row of the current transaction: deleted if the innermost enclosing
    deleted_on_rollback block ends with an error (nothing is done outside such a block)."""
    blocks = getattr(_blocks, "open", None)
    if blocks and field_file and field_file.name:
        blocks[-1].append((field_file.name, field_file.storage))


@contextlib.contextmanager
def deleted_on_rollback():
    """Wrap a transaction that stores rows with new files (an account import: avatars): if the block
    raises, the files its writers registered (delete_file_on_rollback) are deleted, for their rows
    are rolled back with it."""
    written = []
    blocks = _blocks.__dict__.setdefault("open", [])
    blocks.append(written)
    try:
        yield
    except BaseException:
        for name, storage in written:
            storage.delete(name)
        raise
    finally:
        blocks.pop()  # ours: blocks nest


def delete_stored_files(sender, instance, **kwargs):
    """post_delete receiver: removes every file a deleted row pointed to."""
    for field in instance._meta.concrete_fields:
        if isinstance(field, models.FileField):
            delete_file_on_commit(getattr(instance, field.attname))


def connect_file_cleanup(*model_classes):
    for model_class in model_classes:
        models.signals.post_delete.connect(
            delete_stored_files, sender=model_class, dispatch_uid=f"files-{model_class.__name__}"
        )
