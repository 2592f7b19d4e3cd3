"""Stored files follow their rows: a file is deleted once the deletion of its row commits."""

from django.db import models, transaction


def delete_file_on_commit(field_file):
    """Delete a stored file after the current transaction commits (at once outside one)."""
    if field_file and field_file.name:
        name, storage = field_file.name, field_file.storage
        transaction.on_commit(lambda: storage.delete(name))


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
