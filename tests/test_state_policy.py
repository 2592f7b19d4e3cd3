"""The state policy, "ends, forks and every K, within the owner's budget" (docs/conversation-tree.md):
which states a chat keeps, that a pruned one is rebuilt exactly, reading at most K rounds, and that a
budget lets go of the least needed states first and never of a chat's head.

A rebuilt state is checked the strictest way the model allows: it equals the state read from scratch
(assert_same_state), and the model's greedy continuation from it is token for token the one from the
state read from scratch.
"""

import asyncio

from django.conf import settings
from django.db import transaction

from chat import services
from chat.models import Conversation, Round
from chat.states import keep_within_budget
from chat.tree import path_of, path_tokens
from conftest import CHARACTER, assert_same_state, server_precision
from inference.runtime import get_engine
from inference.sampling import SamplingSettings

GREEDY = SamplingSettings(top_p=0.0)


def chat_of(user):
    return Conversation.objects.get(owner__username=user.user_name, character__name="Mira", is_fork=False)


def greedy_continuation(state):
    """The model's greedy reply (token ids) to one more message, from `state` (after a round)."""
    engine = get_engine()

    async def run():
        generation = engine.generate(state, engine.tokenizer.encode("friend: And then?\n\nMira:"), GREEDY, 12)
        async for _ in generation:
            pass
        return generation.reply.tokens

    return asyncio.run(run())


def assert_rebuilt_exactly(conversation, index):
    """The state after path position `index`, as the chat gets it (kept or rebuilt), is the state read
    from scratch, and continues greedily exactly as that one does. Returns the tokens read for it."""
    engine = get_engine()
    path = path_of(conversation)
    before = engine.tokens_read
    state = asyncio.run(services.state_after(conversation, index))
    read = engine.tokens_read - before
    from_scratch = asyncio.run(engine.read(None, path_tokens(path[:index + 1])))[0]
    assert_same_state(state, from_scratch, server_precision())
    assert greedy_continuation(state) == greedy_continuation(from_scratch)
    return read


def test_a_chat_keeps_ends_and_every_k_and_rebuilds_the_rest_reading_at_most_k_rounds(alice):
    alice.ok("/characters/save", **CHARACTER)
    for i in range(7):
        alice.reply("Mira", f"ship {i}")
    conversation = chat_of(alice)
    every = settings.RPSERVER["STATE_CHECKPOINT_EVERY"]  # K = 3 in the suite
    rounds = path_of(conversation)
    kept = {r.index for r in rounds if r.post_state}
    assert kept == {index for index in range(1, 8) if index % every == 0} | {7}
    for index in (1, 2, 4, 5):  # pruned: rebuilt from the nearest kept ancestor (round 0: the cache's)
        assert index not in kept
        nearest = max(i for i in kept | {0} if i < index)
        read = assert_rebuilt_exactly(chat_of(alice), index)
        since_nearest = sum(len(r.token_list) for r in rounds[nearest + 1:index + 1])
        if nearest == 0:  # round 0's state is the shared cache's, which a busy run may have evicted
            assert read in (since_nearest, since_nearest + len(rounds[0].token_list)), read
        else:
            assert read == since_nearest
        assert index - nearest <= every
    assert assert_rebuilt_exactly(chat_of(alice), 6) == 0  # kept: nothing read


def test_a_budget_lets_go_of_the_least_needed_states_and_each_is_rebuilt_exactly(mira, monkeypatch):
    for i in range(7):
        mira.reply("Mira", f"ship {i}")
    conversation = chat_of(mira)
    head = Round.objects.get(pk=conversation.head_id)
    checkpoint = Round.objects.get(conversation=conversation, index=6)
    assert head.pre_state and head.post_state and checkpoint.post_state
    monkeypatch.setitem(settings.RPSERVER, "GUEST_STATE_BUDGET_COUNT", 2)
    with transaction.atomic():
        assert keep_within_budget(conversation.owner) >= 1
    rounds = Round.objects.filter(conversation__owner=conversation.owner)
    pinned = {name for pair in rounds.values_list("pre_state", "post_state") for name in pair if name}
    assert len(pinned) <= 2
    head.refresh_from_db()
    assert head.pre_state and head.post_state  # the head's states are never let go
    assert not Round.objects.get(pk=checkpoint.pk).post_state
    for index in range(1, 7):  # every one rebuilt (from round 0 now: a guest over its budget reads more)
        assert_rebuilt_exactly(chat_of(mira), index)
