"""The per-character PromptState goes: the states after a character's header
and greeting now live in the shared state cache (statecache), keyed by their
exact tokens. The old blobs are deleted with their rows (they are rebuilt, once
per distinct prompt, on first use)."""

from django.core.files.storage import default_storage
from django.db import migrations


def delete_prompt_state_blobs(apps, schema_editor):
    PromptState = apps.get_model("chat", "PromptState")
    for name in PromptState.objects.values_list("state", flat=True):
        if name:
            default_storage.delete(name)


class Migration(migrations.Migration):

    dependencies = [
        ("chat", "0002_conversation_lock_moves_to_locks"),
    ]

    operations = [
        migrations.RunPython(delete_prompt_state_blobs, migrations.RunPython.noop),
        migrations.DeleteModel(name="PromptState"),
    ]
