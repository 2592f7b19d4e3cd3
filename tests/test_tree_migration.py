"""Migration 0004: chats written with the old schema (a list of rounds) become one path of a tree.

Runs in a process of its own, on a database of its own (the suite's servers
share the run's database, whose schema must never move back under them).
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import ROOT

SCRIPT = r'''
import django
from django.core.management import call_command
django.setup()
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

executor = MigrationExecutor(connection)
leaves = [node for node in executor.loader.graph.leaf_nodes() if node[0] != "chat"]
before = leaves + [("chat", "0003_prompt_states_move_to_the_state_cache")]  # every other app as it is now
after = leaves + [("chat", "0004_conversations_become_trees")]
executor.migrate(executor.loader.graph.leaf_nodes())
executor = MigrationExecutor(connection)
executor.migrate(before)
old = MigrationExecutor(connection).loader.project_state(before).apps
User = old.get_model("accounts", "User")
Character = old.get_model("characters", "Character")
Conversation = old.get_model("chat", "Conversation")
Round = old.get_model("chat", "Round")
owner = User.objects.create(username="old-timer")
for name, rounds in (("Mira", 4), ("Ann", 1)):
    character = Character.objects.create(owner=owner, name=name, user_name="friend", greeting="hi")
    conversation = Conversation.objects.create(owner=owner, character=character)
    for index in range(rounds):
        Round.objects.create(conversation=conversation, index=index, user_text=None if index == 0 else f"u{index}",
                             bot_text=f"b{index}", tokens=bytes(4 * (index + 3)), reply_start=index + 1,
                             post_state=f"states/1/r{index}.safetensors")
executor = MigrationExecutor(connection)
executor.migrate(after)
new = MigrationExecutor(connection).loader.project_state(after).apps
Conversation = new.get_model("chat", "Conversation")
Round = new.get_model("chat", "Round")
for conversation in Conversation.objects.order_by("pk"):
    path, round_ = [], Round.objects.get(pk=conversation.head_id)
    while round_ is not None:
        path.append(round_)
        round_ = Round.objects.filter(pk=round_.parent_id).first()
    path.reverse()
    chosen = [r.chosen_id for r in path]
    print(conversation.character.name, conversation.is_fork, [(r.index, r.user_text, r.bot_text) for r in path],
          chosen == [r.pk for r in path[1:]] + [None], [r.post_state.name for r in path],
          [len(bytes(r.tokens)) for r in path])
'''


def test_old_chats_become_one_path_each_with_their_rounds_and_states():
    data_dir = Path(tempfile.mkdtemp(prefix="rpserver-migration-"))
    env = {**os.environ, "RPSERVER_DATA_DIR": str(data_dir), "DJANGO_SETTINGS_MODULE": "rpserver.settings"}
    env.pop("RPSERVER_DATABASE_URL", None)  # a SQLite database of its own, whatever the run uses
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines == [
        "Mira False [(0, None, 'b0'), (1, 'u1', 'b1'), (2, 'u2', 'b2'), (3, 'u3', 'b3')] True "
        "['states/1/r0.safetensors', 'states/1/r1.safetensors', 'states/1/r2.safetensors', "
        "'states/1/r3.safetensors'] [12, 16, 20, 24]",
        "Ann False [(0, None, 'b0')] True ['states/1/r0.safetensors'] [12]",
    ]
