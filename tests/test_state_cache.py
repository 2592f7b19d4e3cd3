"""The shared state cache: exact-prefix keys, least-recently-used RAM, spilling to the state store."""

import array
import asyncio
import hashlib
import time
import uuid

import httpx
import openai
import pytest
import torch
from conftest import Api, Server, at_once, make_user
from django.core.files.storage import default_storage

from statecache.blobs import blob_metadata
from inference.runtime import get_engine
from statecache.models import StoredState
from statecache.services import StateCache, prefix_digests, state_bytes


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture
def backend():
    return get_engine().backend


def tokens(n, salt=None):
    """n distinct-looking token ids, different for each salt."""
    start = (uuid.uuid4().int if salt is None else salt) % 30000 + 100
    return [start + i for i in range(n)]


def state_like(backend, value):
    return [torch.full_like(t, value) for t in backend.zero_state()]


def same(a, b):
    return all(torch.equal(x.float(), y.float()) for x, y in zip(a, b))


def test_a_key_is_the_digest_of_the_exact_prefix():
    sequence = tokens(10)
    digests = prefix_digests(sequence, [3, 10, 7])
    for n in (3, 7, 10):
        assert digests[n] == hashlib.sha256(array.array("I", sequence[:n]).tobytes()).hexdigest()


def test_a_lookup_finds_the_longest_cached_prefix(backend):
    cache = StateCache(backend, ram_bytes=10**9, disk_bytes=0)
    sequence = tokens(20)

    async def go():
        cache.put(sequence[:5], state_like(backend, 5))
        cache.put(sequence[:12], state_like(backend, 12))
        found = await cache.longest(sequence, [5, 12, 19])
        other = await cache.longest(sequence[:4] + [1] + sequence[5:], [5, 12, 19])
        return found, other

    (n, state), other = run(go())
    assert n == 12 and same(state, state_like(backend, 12))
    assert other == (0, None)  # one token differs: nothing applies


def test_ram_keeps_the_most_recently_used_states_within_its_budget(backend):
    one = state_bytes(backend.zero_state())
    cache = StateCache(backend, ram_bytes=2 * one, disk_bytes=0)
    a, b, c = tokens(4), tokens(4), tokens(4)

    async def go():
        cache.put(a, state_like(backend, 1))
        cache.put(b, state_like(backend, 2))
        assert (await cache.longest(a, [4]))[0] == 4  # a is now the most recently used
        cache.put(c, state_like(backend, 3))
        return [(await cache.longest(s, [4]))[0] for s in (a, b, c)]

    assert run(go()) == [4, 0, 4]
    assert cache.stats()["bytes"] == 2 * one and cache.stats()["evicted"] == 1


def test_an_evicted_state_is_spilled_to_the_store_and_found_by_another_process(backend):
    one = state_bytes(backend.zero_state())
    cache = StateCache(backend, ram_bytes=one, disk_bytes=10**12)
    first, second = tokens(6), tokens(6)

    async def go():
        cache.put(first, state_like(backend, 7))
        cache.put(second, state_like(backend, 8))  # pushes `first` out of RAM
        await cache.drain()
        elsewhere = StateCache(backend, ram_bytes=10 * one, disk_bytes=10**12)  # as in a second process
        return await elsewhere.longest(first + [5, 6], [3, 6, 7]), elsewhere

    (n, state), elsewhere = run(go())
    assert n == 6 and same(state, state_like(backend, 7))
    assert elsewhere.stats()["disk_hits"] == 1
    row = StoredState.objects.get(digest=prefix_digests(first, [6])[6])
    assert row.state_model == backend.model_id and row.tokens == 6 and row.nbytes == one
    with default_storage.open(row.state.name, "rb") as stored:
        assert blob_metadata(stored.read())["model"] == backend.model_id


def test_spilled_states_past_their_budget_go_least_recently_used_first(backend):
    from datetime import timedelta

    from django.utils import timezone

    one = state_bytes(backend.zero_state())
    # Other tests' spilled states share the table (and the budget): for this test they count as
    # the most recently used, so that only this test's states can be the least recently used.
    others = dict(StoredState.objects.values_list("pk", "last_used"))
    StoredState.objects.filter(pk__in=others).update(last_used=timezone.now() + timedelta(days=1))
    existing = sum(StoredState.objects.filter(cached=True).values_list("nbytes", flat=True))  # (rounds' don't count)
    cache = StateCache(backend, ram_bytes=0, disk_bytes=existing + 2 * one)  # straight to the store
    sequences = [tokens(3) for _ in range(3)]
    digests = [prefix_digests(s, [3])[3] for s in sequences]

    async def spill(sequence, value):
        cache.put(sequence, state_like(backend, value))
        await cache.drain()

    try:
        run(spill(sequences[0], 0))
        oldest_blob = StoredState.objects.get(digest=digests[0]).state.name
        run(spill(sequences[1], 1))
        run(spill(sequences[2], 2))
        kept = set(StoredState.objects.filter(digest__in=digests).values_list("digest", flat=True))
        assert kept == set(digests[1:])
        assert set(StoredState.objects.values_list("pk", flat=True)) >= set(others)
        assert not default_storage.exists(oldest_blob)  # the blob went with its row
    finally:
        for pk, last_used in others.items():
            StoredState.objects.filter(pk=pk).update(last_used=last_used)


def test_a_damaged_spilled_state_is_forgotten_not_used(backend):
    cache = StateCache(backend, ram_bytes=0, disk_bytes=10**12)
    sequence = tokens(5)

    async def spill():
        cache.put(sequence, state_like(backend, 1))
        await cache.drain()

    run(spill())
    row = StoredState.objects.get(digest=prefix_digests(sequence, [5])[5])
    with default_storage.open(row.state.name, "wb") as stored:
        stored.write(b"not a state")
    assert run(cache.longest(sequence, [5])) == (0, None)
    assert not StoredState.objects.filter(digest=prefix_digests(sequence, [5])[5]).exists()


@pytest.fixture(scope="module")
def spilling_server():
    """A server that keeps no state in RAM: every cached state goes to the store.
    (It also lets /v1 requests in without a key, as on a private host.)"""
    running = Server(env={"RPSERVER_STATE_CACHE_MB": "0", "RPSERVER_OPENAI_ANONYMOUS": "1"},
                     name="spilling-server").start()
    yield running
    running.stop()


def test_over_http_a_conversation_resumes_from_spilled_states(spilling_server):
    key = make_user(Api(spilling_server.url), "sc").token
    client = openai.OpenAI(base_url=f"{spilling_server.url}/v1", api_key=key, max_retries=0)
    messages = [{"role": "system", "content": f"Spilled {uuid.uuid4().hex}"}, {"role": "user", "content": "One."}]
    first = client.chat.completions.create(model="rwkv", messages=messages, max_tokens=5, seed=1)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Two."}]
    before = httpx.get(f"{spilling_server.url}/v1/debug/stats", headers={"Authorization": f"Bearer {key}"}).json()
    second = client.chat.completions.create(model="rwkv", messages=messages, max_tokens=5, seed=2)
    after = httpx.get(f"{spilling_server.url}/v1/debug/stats", headers={"Authorization": f"Bearer {key}"}).json()
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens
    assert after["state_cache"]["disk_hits"] == before["state_cache"].get("disk_hits", 0) + 1
    assert after["state_cache"]["entries"] == 0


def test_eight_guests_opening_the_same_default_character_read_its_header_once(spilling_server):
    from chat.models import Round
    from statecache.services import tokens_digest

    guests = []
    for _ in range(8):
        data = Api(spilling_server.url).ok("/login/tmp")
        guests.append(Api(spilling_server.url, data["user_name"], data["token"]))
    guests[0].chat("Ellie")
    round_zero = Round.objects.get(conversation__owner__username=guests[0].user_name, index=0).token_list
    StoredState.objects.filter(digest=tokens_digest(round_zero)).delete()  # whatever an earlier test left
    headers = {"Authorization": f"Bearer {guests[0].token}"}
    before = httpx.get(f"{spilling_server.url}/v1/debug/stats", headers=headers).json()

    at_once(Api.reply, [(guest, "Ellie", "Hello!") for guest in guests])
    after = httpx.get(f"{spilling_server.url}/v1/debug/stats", headers=headers).json()

    replies = Round.objects.filter(conversation__owner__username__in=[g.user_name for g in guests], index=1)
    assert replies.count() == 8
    head = replies[0].reply_start  # the user's turn, read by each reply
    read = after["engine"]["tokens_read"] - before["engine"]["tokens_read"]
    # The header and greeting read once and kept once (the seven others waited for that read or found
    # its state kept); each reply's own turn read. (What else a reply reads varies: its last token
    # and closing blank line, and its whole text again where the model spelled it otherwise than
    # the format.)
    stored = after["state_cache"].get("stored", 0) - before["state_cache"].get("stored", 0)  # (counted from the first)
    assert stored == 1
    assert read >= len(round_zero) + 8 * head
    assert StoredState.objects.filter(digest=tokens_digest(round_zero)).count() == 1


def test_a_private_host_may_allow_requests_without_a_key(spilling_server):
    body = {"model": "rwkv", "max_tokens": 3, "messages": [{"role": "user", "content": "Anyone there?"}]}
    answer = httpx.post(f"{spilling_server.url}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
    wrong = httpx.post(f"{spilling_server.url}/v1/chat/completions", json=body, timeout=60,
                       headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401  # a key that is sent must still be right


def test_concurrent_callers_share_one_read_and_a_failed_read_is_retried(backend):
    cache = StateCache(backend, ram_bytes=10**9, disk_bytes=0)
    sequence = tokens(8)
    calls = []

    async def read(prefix):
        calls.append(len(prefix))
        # Each read ends only once the other callers wait for it: the four others for the first; for
        # the second (by one of them, after the first failed), the three left.
        waiting = 4 if len(calls) == 1 else 4 + 3
        deadline = time.monotonic() + 120
        while cache.counters["shared_reads"] < waiting:
            assert time.monotonic() < deadline, f"{cache.counters['shared_reads']} callers wait, not {waiting}"
            await asyncio.sleep(0.001)
        if len(calls) == 1:
            raise RuntimeError("the first reader fails")
        return state_like(backend, 4)

    async def go():
        return await asyncio.gather(*(cache.state_after(sequence, read) for _ in range(5)), return_exceptions=True)

    results = run(go())
    assert isinstance(results[0], RuntimeError)
    assert all(same(state, state_like(backend, 4)) for state in results[1:])
    assert calls == [8, 8]  # the failed read, then one read for the four that waited
