"""Conversations become trees of rounds (issue 19).

Every existing conversation is one path: each round hangs under the round
before it (its `chosen` child is the next one), and the conversation's head
is its last round, so every chat reads exactly as before. A character may
now have forks besides its one main conversation.
"""

import django.db.models.deletion
from django.db import migrations, models


def link_rounds_into_paths(apps, schema_editor):
    Conversation = apps.get_model("chat", "Conversation")
    Round = apps.get_model("chat", "Round")
    for conversation in Conversation.objects.all():
        previous = None
        for round_ in Round.objects.filter(conversation=conversation).order_by("index"):
            if previous is not None:
                Round.objects.filter(pk=round_.pk).update(parent=previous)
                Round.objects.filter(pk=previous.pk).update(chosen=round_)
            previous = round_
        Conversation.objects.filter(pk=conversation.pk).update(head=previous)


def unlink_paths(apps, schema_editor):
    """Back to the old schema: only the current path of each main conversation stays."""
    Conversation = apps.get_model("chat", "Conversation")
    Round = apps.get_model("chat", "Round")
    Conversation.objects.filter(is_fork=True).delete()
    for conversation in Conversation.objects.all():
        on_path, round_ = set(), conversation.head
        while round_ is not None:
            on_path.add(round_.pk)
            round_ = round_.parent
        Round.objects.filter(conversation=conversation).exclude(pk__in=on_path).delete()


class Migration(migrations.Migration):

    dependencies = [
        ("chat", "0003_prompt_states_move_to_the_state_cache"),
        ("characters", "0001_initial"),
    ]

    operations = [
        migrations.RemoveConstraint(model_name="round", name="unique_round_index"),
        migrations.AlterModelOptions(name="round", options={"ordering": ["index", "pk"]}),
        migrations.AddField(
            model_name="round", name="parent",
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE,
                                    related_name="children", to="chat.round"),
        ),
        migrations.AddField(
            model_name="round", name="chosen",
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL,
                                    related_name="+", to="chat.round"),
        ),
        migrations.AddField(model_name="round", name="deleted", field=models.BooleanField(default=False)),
        migrations.AlterField(
            model_name="conversation", name="character",
            field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="conversations",
                                    to="characters.character"),
        ),
        migrations.AddField(model_name="conversation", name="is_fork", field=models.BooleanField(default=False)),
        migrations.AddField(
            model_name="conversation", name="forked_from",
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL,
                                    related_name="forks", to="chat.conversation"),
        ),
        migrations.AddField(
            model_name="conversation", name="head",
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL,
                                    related_name="+", to="chat.round"),
        ),
        migrations.AddField(
            model_name="conversation", name="undo_round",
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL,
                                    related_name="+", to="chat.round"),
        ),
        migrations.AddField(
            model_name="conversation", name="undo_head",
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL,
                                    related_name="+", to="chat.round"),
        ),
        migrations.AddConstraint(
            model_name="conversation",
            constraint=models.UniqueConstraint(condition=models.Q(is_fork=False), fields=("character",),
                                               name="one_main_conversation_per_character"),
        ),
        migrations.RunPython(link_rounds_into_paths, unlink_paths),
    ]
