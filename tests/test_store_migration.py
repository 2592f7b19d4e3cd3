"""Migration chat 0005 (with statecache 0002): the states rounds kept, and the shared cache's
spilled states, become the rows of the one state store, keyed by model and token digest.

Runs in a process of its own, on a database and a media folder of its own (the suite's servers share
the run's database, whose schema must never move back under them).
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import ROOT

SCRIPT = r'''
import array, hashlib
import django
django.setup()
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

executor = MigrationExecutor(connection)
leaves = [node for node in executor.loader.graph.leaf_nodes() if node[0] not in ("chat", "statecache")]
before = leaves + [("chat", "0004_conversations_become_trees"), ("statecache", "0001_initial")]
after = executor.loader.graph.leaf_nodes()
executor.migrate(after)
executor = MigrationExecutor(connection)
executor.migrate(before)
old = MigrationExecutor(connection).loader.project_state(before).apps
User = old.get_model("accounts", "User")
Character = old.get_model("characters", "Character")
Conversation = old.get_model("chat", "Conversation")
Round = old.get_model("chat", "Round")
SpilledState = old.get_model("statecache", "SpilledState")

def blob(name, size):
    return default_storage.save(name, ContentFile(b"x" * size))

def digest(tokens):
    return hashlib.sha256(array.array("I", tokens).tobytes()).hexdigest()

owner = User.objects.create(username="old-timer")
character = Character.objects.create(owner=owner, name="Mira", user_name="friend", greeting="hi")
conversation = Conversation.objects.create(owner=owner, character=character)
round_tokens = [[1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]  # round 0; round 1 and its swipe (same prompt 4, 5)
swipe_tokens = [4, 5, 11, 12]
zero = Round.objects.create(conversation=conversation, index=0, bot_text="b0", reply_start=2,
                            tokens=array.array("I", round_tokens[0]).tobytes(), state_model="m1")
one = Round.objects.create(conversation=conversation, parent=zero, index=1, user_text="u1", bot_text="b1",
                           reply_start=2, tokens=array.array("I", round_tokens[1]).tobytes(), state_model="m1",
                           pre_state=blob("states/1/pre1.safetensors", 10),
                           post_state=blob("states/1/post1.safetensors", 11))
swipe = Round.objects.create(conversation=conversation, parent=zero, index=1, user_text="u1", bot_text="b1'",
                             reply_start=2, tokens=array.array("I", swipe_tokens).tobytes(), state_model="m1",
                             pre_state=blob("states/1/pre1-copy.safetensors", 10),
                             post_state=blob("states/1/post1b.safetensors", 12))
two = Round.objects.create(conversation=conversation, parent=one, index=2, user_text="u2", bot_text="b2",
                           reply_start=1, tokens=array.array("I", round_tokens[2]).tobytes(), state_model="m1",
                           post_state=blob("states/1/post2.safetensors", 13))
Conversation.objects.filter(pk=conversation.pk).update(head=two)
# The cache spilled the state after round 2 too (another door sent the same tokens), and another one.
SpilledState.objects.create(digest=digest(sum(round_tokens, [])), state_model="m1", tokens=10, nbytes=14,
                            state=blob("states/cache/c1.safetensors", 14), last_used=timezone.now())
SpilledState.objects.create(digest=digest([7, 7]), state_model="m1", tokens=2, nbytes=15,
                            state=blob("states/cache/c2.safetensors", 15), last_used=timezone.now())

executor = MigrationExecutor(connection)
executor.migrate(after)
new = MigrationExecutor(connection).loader.project_state(after).apps
Round = new.get_model("chat", "Round")
StoredState = new.get_model("statecache", "StoredState")
expected = {
    digest([1, 2, 3, 4]): "pre of round 1 and of its swipe",
    digest([1, 2, 3, 4, 5, 6, 7]): "post of round 1",
    digest([1, 2, 3, 4, 5, 11, 12]): "post of the swipe",
    digest(sum(round_tokens, [])): "post of round 2",
    digest([7, 7]): "the cache's other",
}
for row in StoredState.objects.order_by("tokens", "pk"):
    print(expected[row.digest], row.state_model, row.tokens, row.nbytes, row.state.name, row.cached)
for round_ in Round.objects.order_by("pk"):
    print(round_.pk, round_.pre_state.name, round_.post_state.name)
'''


def test_kept_and_spilled_states_become_one_store_keyed_by_model_and_token_digest():
    data_dir = Path(tempfile.mkdtemp(prefix="rpserver-store-migration-"))
    env = {**os.environ, "RPSERVER_DATA_DIR": str(data_dir), "DJANGO_SETTINGS_MODULE": "rpserver.settings"}
    env.pop("RPSERVER_DATABASE_URL", None)  # a SQLite database of its own, whatever the run uses
    env.pop("RPSERVER_S3_BUCKET", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        # The cache's rows stay the cache's; the rounds' join them, one row per key.
        "the cache's other m1 2 15 states/cache/c2.safetensors True",
        "pre of round 1 and of its swipe m1 4 10 states/1/pre1.safetensors False",
        "post of round 1 m1 7 11 states/1/post1.safetensors False",
        "post of the swipe m1 7 12 states/1/post1b.safetensors False",
        "post of round 2 m1 10 14 states/cache/c1.safetensors True",
        # Rounds that named another blob for a stored key now pin the store's (the swipe's copy of the
        # state before the reply, round 2's state that the cache had too).
        "1  ",
        "2 states/1/pre1.safetensors states/1/post1.safetensors",
        "3 states/1/pre1.safetensors states/1/post1b.safetensors",
        "4  states/cache/c1.safetensors",
    ]
