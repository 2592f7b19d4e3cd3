"""The one state store (statecache.store): one row per (model, token digest), pinned by the rounds that
need it and by the shared cache, deleted when nothing holds it; a chat finds a state by its digest."""

import asyncio
import uuid

import httpx
import pytest

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import QuerySet

from chat import services, states
from chat.models import Conversation, Round
from chat.states import stored_states
from chat.tree import path_of, path_tokens
from conftest import assert_same_state, server_precision
from inference.runtime import get_engine
from statecache import store
from statecache.models import StoredState


def blob():
    return default_storage.save(f"states/store/test-{uuid.uuid4().hex}.safetensors", ContentFile(b"state"))


def key():
    return uuid.uuid4().hex + uuid.uuid4().hex


def test_two_writers_of_one_state_share_the_first_blob_and_the_second_is_deleted():
    digest, first, second = key(), blob(), blob()
    with transaction.atomic():
        assert store.put_state("m", digest, 5, 100, first) == first
    with transaction.atomic():
        assert store.put_state("m", digest, 5, 100, second) == first
    assert StoredState.objects.filter(digest=digest).count() == 1
    assert default_storage.exists(first) and not default_storage.exists(second)


def test_a_writer_that_finds_no_row_and_then_loses_the_insert_race_shares_the_winners_blob(monkeypatch):
    # Two processes on PostgreSQL: both look the key up (no row to lock), both insert; the second
    # insert waits for the first to commit and fails on the unique key. Here the lookup is made to
    # miss a row already stored, as the second process's did (tests/test_scaleout.py saw the error).
    digest, first, second = key(), blob(), blob()
    with transaction.atomic():
        store.put_state("m", digest, 5, 100, first)
    real_filter = QuerySet.filter
    misses = iter([True])

    def filter_missing_once(self, *args, **kwargs):
        found = real_filter(self, *args, **kwargs)
        return found.none() if next(misses, False) else found

    monkeypatch.setattr(QuerySet, "filter", filter_missing_once)
    with transaction.atomic():
        assert store.put_state("m", digest, 5, 100, second) == first
    assert StoredState.objects.filter(digest=digest).count() == 1
    assert default_storage.exists(first) and not default_storage.exists(second)


def test_a_state_goes_when_nothing_pins_it_and_stays_while_the_cache_or_a_round_holds_it(mira):
    mira.reply("Mira", "hello")
    pinned = Round.objects.get(conversation__owner__username=mira.user_name, index=1).post_state.name
    store.release(pinned)  # a round still names it
    assert StoredState.objects.filter(state=pinned).exists() and default_storage.exists(pinned)

    loose, cached = blob(), blob()
    with transaction.atomic():
        store.put_state("m", key(), 5, 100, loose)
        store.put_state("m", key(), 5, 100, cached, cached=True)
    store.release(loose)
    store.release(cached)
    assert not StoredState.objects.filter(state=loose).exists() and not default_storage.exists(loose)
    assert StoredState.objects.filter(state=cached).exists() and default_storage.exists(cached)


def test_a_chat_finds_a_state_it_does_not_pin_by_its_digest_and_reads_nothing(mira):
    for prompt in ("one", "two", "three"):
        mira.reply("Mira", prompt)
    conversation = Conversation.objects.get(owner__username=mira.user_name, character__name="Mira")
    last = Round.objects.get(conversation=conversation, index=3)
    name = last.post_state.name
    # As if another chat (or the OpenAI door) held the state: the store has the row, this round no pin.
    Round.objects.filter(pk=last.pk).update(post_state="")
    path = path_of(conversation)
    assert stored_states(path, 3, get_engine().backend)[0] == (3, name)
    engine = get_engine()
    before = engine.tokens_read
    asyncio.run(services.state_after(conversation, 3))
    assert engine.tokens_read == before


def test_a_swipe_finds_the_state_before_the_reply_that_another_swipe_pinned(mira):
    for prompt in ("one", "two", "three"):
        mira.reply("Mira", prompt)
    conversation = Conversation.objects.get(owner__username=mira.user_name, character__name="Mira")
    original = Round.objects.get(conversation=conversation, index=1)
    assert not original.pre_state  # not kept (K = 3): the first swipe rebuilds it
    http = httpx.Client(base_url=mira.url, timeout=120, headers={"Authorization": f"Token {mira.token}"})
    assert http.post(f"/api/v1/chats/{conversation.pk}/swipe", data={"round": original.pk}).status_code == 200
    swipe = Round.objects.get(parent_id=original.parent_id, index=1, user_text="one", pre_state__gt="")
    original.refresh_from_db()
    assert swipe.pk != original.pk and not original.pre_state  # the swipe pins it, not the original
    # The next swipe of the original finds it under its digest: no token read for it.
    engine = get_engine()
    before = engine.tokens_read
    path = path_of(conversation, original.parent_id)
    state, not_pinned = asyncio.run(states.state_before_reply(conversation, path, original))
    assert engine.tokens_read == before and not_pinned
    tokens = path_tokens(path[:1]) + original.token_list[:original.reply_start - 1]
    assert_same_state(state, asyncio.run(engine.read(None, tokens))[0], server_precision())


# ---- Stop, then continue from the state Stop kept ----------------------------------------


def run_until_stopped(start, enough):
    """Start a stream (`await start()` -> ReplyStream) and Stop it (close it, as a client going away
    does) once its text satisfies `enough`; the text then."""

    async def go():
        stream = await start()
        frames = stream.__aiter__()
        text = ""
        async for text in frames:
            if enough(text):
                break
        await frames.aclose()
        return text

    return asyncio.run(go())


def test_stop_keeps_the_open_end_of_the_reply_and_continue_reads_one_token_from_it(mira, monkeypatch):
    from chat.replies import continuation_tokens, open_end_key
    from inference.sampling import SamplingSettings
    from statecache.services import state_cache

    mira.reply("Mira", "tell me a story")
    conversation = Conversation.objects.get(owner__username=mira.user_name, character__name="Mira")
    owner, reply = conversation.owner, Round.objects.get(pk=conversation.head_id)
    engine = get_engine()
    long_enough = lambda text: len(continuation_tokens(text)) >= 3  # noqa: E731
    shown = run_until_stopped(lambda: services.swipe(owner, conversation.pk, reply.pk, SamplingSettings(), seed=7),
                             long_enough)
    kept = Round.objects.get(pk=Conversation.objects.get(pk=conversation.pk).head_id)
    assert kept.pk != reply.pk and kept.bot_text == shown.strip() and long_enough(kept.bot_text)
    # The state at the reply's open end is in the store: the one read from scratch up to there.
    open_tokens = continuation_tokens(kept.bot_text)
    key = open_end_key(path_of(conversation, kept.parent_id), kept, open_tokens)
    open_end = asyncio.run(state_cache().get(key))
    assert open_end is not None
    assert_same_state(open_end, asyncio.run(engine.read(None, key))[0], server_precision())
    # Continue goes on from it: the engine is asked to read the reply's last token only.
    asked = []
    real_generate = engine.generate

    def generate(state, tokens, *args, **kwargs):
        asked.append(list(tokens))
        return real_generate(state, tokens, *args, **kwargs)

    monkeypatch.setattr(engine, "generate", generate)
    continued = run_until_stopped(lambda: services.swipe(owner, conversation.pk, kept.pk, SamplingSettings(), seed=8,
                                                         continue_reply=True), lambda text: True)
    assert asked == [open_tokens[-1:]]
    assert continued.startswith(kept.bot_text)


def test_a_store_that_fails_half_way_through_a_round_leaves_no_row_no_blob_and_the_round_as_it_was(mira,
                                                                                                  monkeypatch):
    mira.reply("Mira", f"hello {uuid.uuid4().hex}")
    conversation = Conversation.objects.get(owner__username=mira.user_name, character__name="Mira")
    head = Round.objects.get(pk=conversation.head_id)
    rows_before = set(StoredState.objects.values_list("pk", flat=True))
    engine = get_engine()
    real_put, calls = store.put_state, []
    real_save, written = states.save_state, []

    def save_state(*args):
        written.append(real_save(*args))
        return written[-1]

    def second_put_fails(model, digest, *args, **kwargs):
        # The first state is recorded as a new row and pinned, then the database goes away.
        calls.append(digest)
        if len(calls) == 2:
            raise OSError("the database went away")
        return real_put(model, key(), *args, **kwargs)

    monkeypatch.setattr(store, "put_state", second_put_fails)
    monkeypatch.setattr(states, "save_state", save_state)
    lease = services.acquire(conversation.owner, "Mira")
    try:
        with pytest.raises(OSError, match="went away"):
            asyncio.run(services.store_round(lease, lease.last, engine.zero_state(), engine.zero_state(),
                                             engine.backend))
    finally:
        services.release(lease)
    assert len(calls) == 2 and len(written) == 2
    assert set(StoredState.objects.values_list("pk", flat=True)) - rows_before == set()  # the first row rolled back
    assert not any(default_storage.exists(name) for name in written)  # both blobs deleted again
    after = Round.objects.get(pk=head.pk)
    assert (after.pre_state.name, after.post_state.name) == (head.pre_state.name, head.post_state.name)
