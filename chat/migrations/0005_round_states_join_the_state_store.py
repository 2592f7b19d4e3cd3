"""The states rounds keep join the one state store (statecache.StoredState, issue 19).

Each blob a round names becomes (or joins) the row of its key: the model the
round's states belong to and the SHA-256 of the exact tokens of the path up
to the state (the state before the reply: all but the last token before it;
the state after the round: all its tokens). Where the store already has the
key (two rounds that named different blobs for one state, or the shared
cache's spilled copy), the round pins the row's blob instead; the blob it no
longer names is left for the orphans sweep (remove_orphan_files), never
deleted inside a migration that could still roll back.
"""

import hashlib

from django.core.files.storage import default_storage
from django.db import migrations
from django.utils import timezone


def blob_size(name):
    try:
        return default_storage.size(name)
    except OSError:  # missing: the row is forgotten when a load fails, and the state rebuilt
        return 0


def round_states_join_the_store(apps, schema_editor):
    Round = apps.get_model("chat", "Round")
    StoredState = apps.get_model("statecache", "StoredState")
    now = timezone.now()
    with_states = Round.objects.exclude(pre_state="", post_state="").exclude(state_model="")
    for conversation_id in with_states.values_list("conversation_id", flat=True).distinct():
        rounds = {r.pk: r for r in Round.objects.filter(conversation_id=conversation_id)}
        for round_ in rounds.values():
            if not (round_.pre_state.name or round_.post_state.name) or not round_.state_model:
                continue
            path, pk = [], round_.parent_id
            while pk is not None:
                path.append(bytes(rounds[pk].tokens))
                pk = rounds[pk].parent_id
            before = b"".join(reversed(path))
            own = bytes(round_.tokens)
            ends = {"pre_state": len(before) + 4 * (round_.reply_start - 1), "post_state": len(before) + len(own)}
            changed = []
            for field, end in ends.items():
                name = getattr(round_, field).name
                if not name:
                    continue
                digest = hashlib.sha256((before + own)[:end]).hexdigest()
                row = StoredState.objects.filter(digest=digest, state_model=round_.state_model).first()
                if row is None:
                    StoredState.objects.create(digest=digest, state_model=round_.state_model, tokens=end // 4,
                                               nbytes=blob_size(name), state=name, cached=False, last_used=now)
                elif row.state.name != name:
                    setattr(round_, field, row.state.name)
                    changed.append(field)
            if changed:
                round_.save(update_fields=changed)


def rows_of_rounds_leave_the_store(apps, schema_editor):
    """Back: the store keeps only the cache's rows (the rounds still name their blobs)."""
    StoredState = apps.get_model("statecache", "StoredState")
    StoredState.objects.filter(cached=False).delete()


class Migration(migrations.Migration):

    dependencies = [
        ("chat", "0004_conversations_become_trees"),
        ("statecache", "0002_one_state_store"),
    ]

    operations = [
        migrations.RunPython(round_states_join_the_store, rows_of_rounds_leave_the_store),
    ]
