"""Parked conversations: resuming reads the stored state, never the history."""

import asyncio
import threading
from pathlib import Path

import pytest
from django.conf import settings

from chat import services, states
from chat.models import Conversation, Round
from statecache.blobs import decode_state, encode_state
from conftest import assert_same_state, server_precision
from inference.runtime import get_engine


def conversation_of(guest):
    return Conversation.objects.get(owner__username=guest.user_name, character__name="Mira")


def state_after(conversation, index):
    return asyncio.run(services.state_after(conversation, index))


def test_resuming_reads_no_history(mira):
    for i in range(3):
        mira.reply("Mira", f"message {i}")
    engine = get_engine()
    before = engine.tokens_read
    state_after(conversation_of(mira), 3)
    assert engine.tokens_read == before


def test_an_old_round_is_rebuilt_from_the_nearest_checkpoint(mira):
    for i in range(5):
        mira.reply("Mira", f"message {i}")
    conversation = conversation_of(mira)
    engine = get_engine()
    # Round 0's state comes from the shared state cache; other tests' servers (some on another
    # storage, S3) share this database's spilled-state rows, so make sure this process has it.
    state_after(conversation, 0)
    before = engine.tokens_read
    state = state_after(conversation, 2)  # rounds 1 and 2 are not kept (K = 3: round 3 is)
    rounds = {r.index: r for r in conversation.rounds.all()}
    assert engine.tokens_read - before == len(rounds[1].token_list) + len(rounds[2].token_list)
    from_scratch = asyncio.run(engine.read(None, sum((rounds[i].token_list for i in range(3)), [])))[0]
    assert_same_state(state, from_scratch, server_precision())


def test_a_damaged_snapshot_is_ignored_and_rebuilt(mira):
    for i in range(2):
        mira.reply("Mira", f"message {i}")
    conversation = conversation_of(mira)
    last = conversation.rounds.get(index=2)
    good = state_after(conversation, 2)
    path = Path(last.post_state.path)
    path.write_bytes(path.read_bytes()[:100])  # as if the writer crashed half-way
    rebuilt = state_after(conversation, 2)
    assert_same_state(rebuilt, good, server_precision())
    assert Path(Round.objects.get(pk=last.pk).post_state.path) != path  # remembered under a new name


def test_a_state_never_loads_into_another_model():
    engine = get_engine()
    blob = encode_state(engine.backend, engine.zero_state())
    assert decode_state(engine.backend, blob) is not None

    class OtherModel:
        model_id = "0123456789abcdef"

    assert decode_state(OtherModel(), blob) is None


def test_a_failed_blob_write_leaves_the_round_and_the_files_as_they_were(mira, monkeypatch):
    mira.reply("Mira", "hello")
    conversation = conversation_of(mira)
    folder = Path(settings.MEDIA_ROOT) / "states" / "store"  # (statecache.models.STORE_DIR)
    before_files = sorted(folder.iterdir())
    before_round = Round.objects.get(conversation=conversation, index=1)
    engine = get_engine()
    pre, post = engine.zero_state(), engine.zero_state()
    real_save, failed, written = states.save_state, threading.Event(), threading.Event()

    def pre_state_write_fails(owner_id, backend, state):
        if state is pre:
            failed.set()
            raise OSError("disk full")
        failed.wait(10)  # the other blob is still being written when the first write fails
        name = real_save(owner_id, backend, state)
        written.set()
        return name

    monkeypatch.setattr(states, "save_state", pre_state_write_fails)
    lease = services.acquire(conversation.owner, "Mira")
    try:
        with pytest.raises(OSError, match="disk full"):
            asyncio.run(services.store_round(lease, lease.last, pre, post, engine.backend))
    finally:
        services.release(lease)
    assert written.wait(10)
    assert sorted(folder.iterdir()) == before_files  # the blob that was written is gone again
    after_round = Round.objects.get(pk=before_round.pk)
    assert (after_round.pre_state.name, after_round.post_state.name) == (before_round.pre_state.name,
                                                                         before_round.post_state.name)
