"""A conversation's states: which to load, how to rebuild one, what to store.

Every round may keep two states: the state before its reply (after all but
the last token before it, from which the reply is generated again) and the
state after it. They live in the one state store (statecache.store), keyed
by the model and the digest of the exact tokens of the path up to them; a
round pins a state by naming its blob in `pre_state`/`post_state`. Which
ones are kept is the policy in chat.tree.kept_states; any other is found in
the store by its digest (another chat, a fork, the OpenAI door may have it)
or rebuilt from the nearest kept one before it on its path by re-reading
the tokens in between (every round records exactly what the model read).

A state may be pinned by several rounds (the alternatives of a reply share
the state before it; a fork shares its source's states; two chats that
read the same tokens share one row): it is deleted once nothing pins it
(release_blob, statecache.store.release).

Blobs are written before the transaction that records and pins them, and
deleted again if that transaction fails: a crash leaves at worst an
unreferenced file (swept by the orphans command), never a row pointing at
a half-written state.
"""

import asyncio

from django.conf import settings
from django.db import models, transaction
from django.utils import timezone

from inference.runtime import get_engine
from statecache import store
from statecache.blobs import blob_io, delete_states, load_state, save_state
from statecache.models import STORE_DIR, StoredState
from statecache.services import prefix_digests, state_bytes, state_cache

from .lease import check_lease, commit_and_release, db
from .models import Conversation, Round
from .tree import kept_states, path_of, path_tokens


# ---- blobs shared by rounds ---------------------------------------------------------


def blob_in_use(name):
    return Round.objects.filter(models.Q(pre_state=name) | models.Q(post_state=name)).exists()


def release_blob(field_file):
    """A round lets go of a state: once the current transaction commits, the store deletes it
    unless something still pins it (another round, the shared cache)."""
    name = field_file.name if hasattr(field_file, "name") else field_file
    if name:
        transaction.on_commit(lambda: store.release(name))


def prefix_ends(path):
    """The length of the context after each round of `path`."""
    ends, total = [], 0
    for round_ in path:
        total += len(round_.token_list)
        ends.append(total)
    return ends


def pin(path_tokens_, length, written, model_id):
    """Inside a transaction: the blob to pin for the state after path_tokens_[:length], of which
    `written` (blob name, bytes) was just stored (the store may have had it already)."""
    name, nbytes = written
    digest = prefix_digests(path_tokens_, [length])[length]
    return store.put_state(model_id, digest, length, nbytes, name)


def release_round_blobs(sender, instance, **kwargs):
    """post_delete receiver for Round: its blobs go once no other round points to them."""
    release_blob(instance.pre_state)
    release_blob(instance.post_state)


# ---- loading and rebuilding ----------------------------------------------------------


def stored_states(path, index, backend):
    """Where usable post-round states at or before path position `index` may be
    stored, newest first: [(position, blob name)]: those its rounds pin, and
    those the store has under the path's digests (a fork's, another chat's,
    the OpenAI door's). (Round 0's state is in the shared state cache:
    round_zero_state.) On the ORM thread: one query."""
    pinned = {position: round_.post_state.name for position, round_ in enumerate(path[:index + 1])
              if round_.post_state and round_.state_model == backend.model_id}
    ends = prefix_ends(path[:index + 1])
    unpinned = [ends[position] for position in range(1, index + 1) if position not in pinned]
    if unpinned:
        digests = prefix_digests(path_tokens(path[:index + 1]), unpinned)
        found = store.find_states(backend.model_id, digests.values())
        position_of = {end: position for position, end in enumerate(ends)}
        for length, digest in digests.items():
            if digest in found:
                pinned[position_of[length]] = found[digest][1]
    return sorted(pinned.items(), reverse=True)


def tokens_between(path, after, upto):
    """The tokens of path positions after+1 .. upto, in order."""
    return [token for round_ in path[after + 1:upto + 1] for token in round_.token_list]


async def round_zero_state(tokens):
    """The state after a round 0 (the character's header and greeting), from the
    shared state cache (statecache), keyed by those exact tokens: every
    conversation that starts with the same tokens (the copies of a default
    character, a reset, a fork) shares it, and when several start at once it
    is read once for all of them."""
    engine = get_engine()

    async def read(tokens):
        state, _ = await engine.read(None, tokens)
        return state

    return await state_cache().state_after(list(tokens), read)


async def first_readable(candidates, backend):
    """The first of stored_states()'s candidates that loads: (position, state);
    (-1, None) when none does (start from round 0's state)."""
    for found_index, name in candidates:
        state = await load_or_forget(name, backend)
        if state is not None:
            return found_index, state
    return -1, None


async def load_or_forget(name, backend):
    """The state in blob `name`; None when it is missing or damaged, and then the store forgets it
    (the next writer of its key stores a good one)."""
    state = await blob_io(load_state)(name, backend)
    if state is None:
        await db(store.forget)(name)
    return state


async def base_state(path, index, backend):
    """The newest readable stored state at or before path position `index`: (position, state);
    at worst round 0's (round_zero_state)."""
    found = await first_readable(await db(stored_states)(path, index, backend), backend)
    if found[0] >= 0:
        return found
    return 0, await round_zero_state(path[0].token_list)


async def state_on_path(conversation, path, index):
    """The state right after path position `index`: stored, or rebuilt and remembered."""
    engine = get_engine()
    base_index, state = await base_state(path, index, engine.backend)
    if base_index == index:
        return state
    state, _ = await engine.read(state, tokens_between(path, base_index, index))
    await remember_state(conversation, path[index].pk, state, engine.backend)
    return state


async def state_after(conversation, index):
    """The model state right after round `index` of the current path, rebuilt and remembered if not stored."""
    path = await db(path_of)(conversation)
    return await state_on_path(conversation, path, index)


async def state_before_reply(conversation, path, round_):
    """The state from which round_'s reply is (re)generated: after all but the
    last token before the reply. Returns (state, whether round_ does not pin
    it: rebuilt, or found in the store under its digest, pinned by another
    round such as a swipe of the same reply). `path` is a path through
    round_'s parent."""
    engine = get_engine()
    own = round_.pre_state.name if round_.state_model == engine.model_id and round_.pre_state else ""
    for name in [own] + await db(stored_before_reply)(path, round_, engine.backend):
        state = await load_or_forget(name, engine.backend) if name else None
        if state is not None:
            return state, name != own
    base = await state_on_path(conversation, path, round_.index - 1) if round_.index > 0 else None
    state, _ = await engine.read(base, round_.token_list[:round_.reply_start - 1])
    return state, True


def stored_before_reply(path, round_, backend):
    """The blob the store has for the state before round_'s reply, under the digest of its tokens
    ([] or [name]); on the ORM thread."""
    tokens = path_tokens(path[:round_.index]) + round_.token_list[:round_.reply_start - 1]
    digest = prefix_digests(tokens, [len(tokens)])[len(tokens)]
    return [name for _, name in store.find_states(backend.model_id, [digest]).values()]


async def remember_state(conversation, round_pk, state, backend):
    """Store a rebuilt post-round state where it will be found next time (if the policy keeps it)."""
    await asyncio.shield(_remember_state(conversation, round_pk, state, backend))


async def _remember_state(conversation, round_pk, state, backend):
    # Shielded: a client going away mid-way must not leave a written blob unreferenced.
    name = await blob_io(save_state)(STORE_DIR, backend, state)
    try:
        kept = await db(keep_remembered)(conversation, round_pk, (name, state_bytes(state)), backend)
    except BaseException:
        await blob_io(delete_states)([name])
        raise
    if not kept:
        await blob_io(delete_states)([name])


def keep_remembered(conversation, round_pk, written, backend):
    """Pin the blob `written` (name, bytes: the state after round `round_pk`, just stored) to that
    round; False if the policy does not keep it (the caller deletes the blob)."""
    conversation = Conversation.objects.select_related("owner").get(pk=conversation.pk)
    kept = kept_states(conversation, conversation.head_id)
    if not kept.get(round_pk, (False, False))[1]:
        return False
    tokens = path_tokens(path_of(conversation, round_pk))
    with transaction.atomic():
        name = pin(tokens, len(tokens), written, backend.model_id)
        old = Round.objects.filter(pk=round_pk).values_list("post_state", flat=True).first()
        Round.objects.filter(pk=round_pk).update(post_state=name, state_model=backend.model_id)
        if old != name:
            release_blob(old or "")
    return True


# ---- storing a round -------------------------------------------------------------------


def prune_snapshots(conversation, head_id):
    """Drop the states the policy (chat.tree.kept_states) does not keep, on live rounds."""
    kept = kept_states(conversation, head_id)
    rows = Round.objects.filter(conversation_id=conversation.pk, deleted=False) \
        .exclude(pre_state="", post_state="").values_list("pk", "pre_state", "post_state")
    for pk, pre, post in rows:
        keep_pre, keep_post = kept.get(pk, (True, True))
        drop = {}
        if pre and not keep_pre:
            drop["pre_state"] = pre
        if post and not keep_post:
            drop["post_state"] = post
        if drop:
            Round.objects.filter(pk=pk).update(**{field: "" for field in drop})
            for name in drop.values():
                release_blob(name)


def finish_undo(conversation):
    """Another change makes the last deletion final: its rounds (and their blobs, if unshared) go."""
    undo = Conversation.objects.filter(pk=conversation.pk).values_list("undo_round_id", flat=True).first()
    if undo is not None:
        Conversation.objects.filter(pk=conversation.pk).update(undo_round=None, undo_head=None)
        for round_ in Round.objects.filter(pk=undo):
            round_.delete()


def make_current(conversation, round_):
    """Inside a transaction: the path now ends at `round_`; every round on it remembers the child it
    went through (`chosen`), so that switching back to any of them later finds this branch again."""
    path = path_of(conversation, round_.pk)
    for parent, child in zip(path, path[1:]):
        if parent.chosen_id != child.pk:
            Round.objects.filter(pk=parent.pk).update(chosen=child)
    Conversation.objects.filter(pk=conversation.pk).update(head=round_, updated=timezone.now())
    conversation.head_id = round_.pk


async def store_round(lease, round_, pre_state, post_state, backend, remembered=None):
    """Write a round's states, then save it, make it the head, prune and release
    the lock, in one transaction.

    `pre_state` None keeps the round's stored one (a swipe shares its
    sibling's). `remembered` (round pk, state) is a rebuilt earlier
    post-round state to keep too. On any failure the new blobs are deleted
    and the conversation is left as it was.
    """
    await asyncio.shield(_store_round(lease, round_, pre_state, post_state, backend, remembered))


async def _store_round(lease, round_, pre_state, post_state, backend, remembered):
    # Shielded: a client going away mid-way must not leave written blobs unreferenced.
    states = {"pre_state": pre_state, "post_state": post_state, "remembered": remembered and remembered[1]}
    states = {field: state for field, state in states.items() if state is not None}
    written = await asyncio.gather(*(blob_io(save_state)(STORE_DIR, backend, state)
                                     for state in states.values()), return_exceptions=True)
    names = [name for name in written if isinstance(name, str)]
    try:
        for failure in written:
            if isinstance(failure, BaseException):
                raise failure
        blobs = {field: (name, state_bytes(state)) for (field, state), name in zip(states.items(), names)}
        remembered_blob = (remembered[0], blobs.pop("remembered")) if remembered else None
        await db(commit_round)(lease, round_, blobs, backend, remembered_blob)
    except BaseException:
        await blob_io(delete_states)(names)
        raise


def commit_round(lease, round_, blobs, backend, remembered=None):
    """The database part of store_round: record the round's new blobs
    ({field: (name, bytes)}) in the state store and pin them, keep a
    remembered (round pk, (name, bytes)) if the policy wants it, save, make
    the round the head, prune, release the lock; the states it no longer
    pins go once this commits (if nothing else pins them)."""
    old_files = {field: getattr(round_, field).name for field in blobs}
    before = path_tokens(path_of(lease.conversation, round_.parent_id)) if round_.parent_id else []
    tokens = before + round_.token_list
    ends = {"pre_state": len(before) + round_.reply_start - 1, "post_state": len(tokens)}
    with transaction.atomic():
        check_lease(lease)
        for field, written in blobs.items():
            setattr(round_, field, pin(tokens, ends[field], written, backend.model_id))
        round_.state_model = backend.model_id
        finish_undo(lease.conversation)
        round_.save()
        make_current(lease.conversation, round_)
        if remembered and not keep_remembered(lease.conversation, *remembered, backend):
            transaction.on_commit(lambda: delete_states([remembered[1][0]]))
        prune_snapshots(lease.conversation, round_.pk)
        keep_within_budget(lease.conversation.owner)
        for field, old in old_files.items():
            if old != getattr(round_, field).name:
                release_blob(old)
        commit_and_release(lease)


# ---- the owner's budget ----------------------------------------------------------------


def state_budget(owner):
    """(most states, most bytes) the owner's rounds may pin together; None: no limit on that.
    Registered users: RPSERVER_STATE_BUDGET_COUNT / _MB; guests: RPSERVER_GUEST_STATE_BUDGET_COUNT."""
    config = settings.RPSERVER
    if owner.is_guest:
        return config["GUEST_STATE_BUDGET_COUNT"] or None, None
    return config["STATE_BUDGET_COUNT"] or None, config["STATE_BUDGET_MB"] * 2**20 or None


def keep_within_budget(owner):
    """Inside a transaction: while the states the owner's rounds pin (each counted once, however
    many of its rounds pin it) are over the owner's budget, unpin the least needed first: those of
    deleted rounds, then those off every chat's current path, then the rest on the paths, then the
    checkpoints (every K rounds deep), oldest round first in each; never a chat head's. A state no
    longer pinned goes once this commits (unless another owner's round or the cache holds it).
    Returns how many pins were dropped."""
    most_states, most_bytes = state_budget(owner)
    if most_states is None and most_bytes is None:
        return 0
    rows = list(Round.objects.filter(conversation__owner=owner)
                .values_list("pk", "parent_id", "index", "deleted", "pre_state", "post_state"))
    pins = {}  # blob name -> the (round pk, field) that pin it
    for pk, _, _, _, pre, post in rows:
        for field, name in (("pre_state", pre), ("post_state", post)):
            if name:
                pins.setdefault(name, set()).add((pk, field))
    sizes = dict(StoredState.objects.filter(state__in=list(pins)).values_list("state", "nbytes"))
    count, total = len(pins), sum(sizes.values())

    def over():
        return (most_states is not None and count > most_states) or (most_bytes is not None and total > most_bytes)

    if not over():
        return 0
    heads = set(Conversation.objects.filter(owner=owner).values_list("head_id", flat=True))
    parents = {pk: parent for pk, parent, *_ in rows}
    on_path = set()
    for pk in heads:
        while pk is not None and pk not in on_path:
            on_path.add(pk)
            pk = parents.get(pk)
    every = settings.RPSERVER["STATE_CHECKPOINT_EVERY"]
    candidates = []
    for pk, _, index, deleted, pre, post in rows:
        if pk in heads:
            continue
        for field, name in (("pre_state", pre), ("post_state", post)):
            if name:
                need = 0 if deleted else 1 if pk not in on_path else 3 if field == "post_state" and index % every == 0 \
                    else 2
                candidates.append((need, pk, field, name))
    dropped = 0
    for _, pk, field, name in sorted(candidates):
        if not over():
            break
        Round.objects.filter(pk=pk).update(**{field: ""})
        release_blob(name)
        dropped += 1
        pins[name].discard((pk, field))
        if not pins[name]:
            count, total = count - 1, total - sizes.get(name, 0)
    return dropped
