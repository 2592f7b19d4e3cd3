"""The one state store (statecache.store): one row per (model, token digest), pinned by the rounds that
need it and by the shared cache, deleted when nothing holds it; a chat finds a state by its digest."""

import asyncio
import uuid

import httpx

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction

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
