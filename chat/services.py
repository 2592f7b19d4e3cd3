"""Conversations: what the model reads, which state to load, what to store, when to lock.

Every rule about a conversation lives here, once. A conversation is a list
of rounds; each round records exactly the tokens the model read for it (see
chat.models.Round), so the context can always be rebuilt, and keeps state
snapshots so that it usually need not be.

Locking: every change (reply, regenerate, overwrite, back, reset, and saving
or deleting the character) runs under the character's lock (locks.services:
a lock held by a live server process, freed when it dies). A second request
meanwhile gets code 400 at once instead of racing the first. The holder
re-checks the lock in the transaction that stores its result, and that
transaction also releases it.

A reply costs two trips to the database thread: `prepare_reply` (rate limit,
lock, conversation, where its state is) and `commit_round` (store, prune,
release); state blobs are read and written beside it (chat.snapshots).
"""

import asyncio
import contextlib
import dataclasses
import logging

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from characters.services import get_character
from inference import prompt as prompt_format
from inference.runtime import get_engine
from limits import services as limits
from locks import services as locks
from lore import services as lore_services
from rpserver.errors import ApiError
from rpserver.files import delete_file_on_commit

from statecache.services import state_cache

from .models import Conversation, Round, decode_tokens
from .snapshots import blob_io, delete_states, load_state, save_state

logger = logging.getLogger(__name__)

LOST = "this conversation was changed by another request meanwhile, please reload it"


def db(function):
    """Run a sync ORM function from async code, on Django's sync thread (state
    blobs are written and read beside it, see chat.snapshots.blob_io)."""
    return sync_to_async(function, thread_sensitive=True)


# ---- reading ----------------------------------------------------------------


def speaker_names(character):
    persona = character.chat_persona  # personas/: who the person is in this chat, if they chose
    user_name = persona.name if persona is not None else character.user_name
    return prompt_format.speaker_names(user_name, character.name, character.use_qa)


def first_round(conversation, character):
    """Round 0: the character header, then the greeting as the character's reply."""
    user, bot = speaker_names(character)
    tokenizer = get_engine().tokenizer
    persona = character.chat_persona
    header = tokenizer.encode(prompt_format.character_header(
        user, bot, character.persona, character.example_message,
        user_persona=persona.description if persona is not None else ""))
    greeting = prompt_format.substitute(character.greeting, user, bot)
    round_ = Round(conversation=conversation, index=0, user_text=None, bot_text=greeting.strip(),
                   reply_start=len(header))
    round_.set_tokens(header + tokenizer.encode(prompt_format.reply_part(greeting)))
    return round_


def open_conversation(owner, name):
    """The owner's conversation with a character, created with round 0 if there is none."""
    return conversation_of(get_character(owner, name))


def latest_round(character):
    """(conversation, its last round) of a character's conversation, opened if new: one query
    (a join) when it has rounds, which is every time but the first."""
    last = Round.objects.filter(conversation__character=character).select_related("conversation") \
        .order_by("-index").first()
    if last is not None:
        return last.conversation, last
    conversation = conversation_of(character)
    return conversation, conversation.rounds.order_by("-index").first()


def last_round_index(character):
    """The index of the last round of the character's conversation; 0 (its greeting) if it is not opened yet."""
    last = Round.objects.filter(conversation__character=character).order_by("-index") \
        .values_list("index", flat=True).first()
    return last or 0


def conversation_of(character):
    conversation = Conversation.objects.filter(character=character).first()
    if conversation is not None and conversation.rounds.exists():
        return conversation
    try:
        with transaction.atomic():
            conversation, _ = Conversation.objects.get_or_create(character=character, owner=character.owner)
            if not conversation.rounds.exists():
                first_round(conversation, character).save()
    except IntegrityError:  # another request created it meanwhile
        conversation = Conversation.objects.get(character=character)
    return conversation


def chat_log(conversation):
    """[[user_msg, bot_msg], ...] as the UI shows it; round 0 is [None, greeting]."""
    return [list(pair) for pair in conversation.rounds.order_by("index").values_list("user_text", "bot_text")]


def load_chat(owner, name):
    return chat_log(open_conversation(owner, name))


def context(owner, name):
    """(token count, text) of everything the model has read in this conversation."""
    conversation = open_conversation(owner, name)
    tokens = []
    for round_ in conversation.rounds.order_by("index"):
        tokens += round_.token_list
    return len(tokens), get_engine().tokenizer.decode(tokens)


# ---- the lock ------------------------------------------------------------------


@dataclasses.dataclass
class Lease:
    """A held conversation lock, with what the holder needs to know."""

    conversation: Conversation
    character: object
    key: str
    last: Round
    released: bool = False

    @property
    def lock_name(self):
        return self.character.lock_name


def acquire(owner, name, admit=None):
    """Lock the owner's conversation with `name` (opened if new); locks.Busy if it is taken.

    `admit(character)`, when given, runs under the lock before the conversation
    is opened (a new one is written with its round 0): a request it refuses
    (ApiError) leaves nothing written.
    """
    character = get_character(owner, name)
    with contextlib.ExitStack() as until_leased:
        key = until_leased.enter_context(locks.held(character.lock_name))
        if admit is not None:
            admit(character)
        conversation, last = latest_round(character)
        until_leased.pop_all()  # leased: commit_and_release or release lets go of it
    return Lease(conversation, character, key, last)


def release(lease):
    if not lease.released:
        locks.release(lease.lock_name, lease.key)
        lease.released = True


async def let_go(lease):
    """Release the lease's lock, unless the commit that stored its round already did (then without a
    trip to the database thread)."""
    if not lease.released:
        await db(release)(lease)


def check_lease(lease):
    """Inside the storing transaction: the lock is still ours."""
    try:
        locks.check(lease.lock_name, lease.key)
    except locks.Lost:
        raise ApiError(LOST)


def commit_and_release(lease):
    """Inside the storing transaction: release the lock with the commit (one trip for both)."""
    locks.release(lease.lock_name, lease.key)
    transaction.on_commit(lambda: setattr(lease, "released", True))


def discard_conversations(character, **kwargs):
    """characters.signals.character_changed receiver: the character's prompt changed
    (or it is deleted), so its conversation goes. (The state after its old
    prompt stays in the shared state cache, keyed by those exact tokens, for
    whoever else starts with them, until it is the least recently used.)

    The characters service holds the character's lock and a transaction."""
    for conversation in Conversation.objects.filter(character=character):
        conversation.delete()


# ---- states --------------------------------------------------------------------


def stored_states(conversation, index, backend):
    """Where usable states at or before round `index` may be stored, newest
    first: [(round index, blob name)]. (Round 0's state is in the shared
    state cache: round_zero_state.)"""
    return list(conversation.rounds.filter(index__lte=index, state_model=backend.model_id)
                .exclude(post_state="").order_by("-index").values_list("index", "post_state"))


def round_tokens(conversation, index):
    return conversation.rounds.get(index=index).token_list


async def round_zero_state(conversation, tokens=None):
    """The state after round 0 (the character's header and greeting; `tokens`
    when the caller has them), from the shared state cache (statecache),
    keyed by those exact tokens: every conversation that starts with the
    same tokens (the copies of a default character, a reset) shares it, and
    when several start at once it is read once for all of them."""
    if tokens is None:
        tokens = await db(round_tokens)(conversation, 0)
    engine = get_engine()

    async def read(tokens):
        state, _ = await engine.read(None, tokens)
        return state

    return await state_cache().state_after(list(tokens), read)


async def first_readable(candidates, backend):
    """The first of stored_states()'s candidates that loads: (round index, state);
    (-1, None) when none does (start from the zero state)."""
    for found_index, name in candidates:
        state = await blob_io(load_state)(name, backend)
        if state is not None:
            return found_index, state
    return -1, None


async def base_state(conversation, index, backend):
    """The newest readable stored state at or before round `index`: (round index, state);
    at worst round 0's (round_zero_state)."""
    found = await first_readable(await db(stored_states)(conversation, index, backend), backend)
    if found[0] >= 0:
        return found
    return 0, await round_zero_state(conversation)


def tokens_between(conversation, after, upto):
    """The tokens of rounds after+1 .. upto, in order."""
    tokens = []
    for round_ in conversation.rounds.filter(index__gt=after, index__lte=upto).order_by("index"):
        tokens += round_.token_list
    return tokens


def keeps_snapshot(conversation, index, last_index):
    """Which rounds keep their post-round snapshot: the recent ones, and checkpoints.

    Guests keep no checkpoints: that is their stored-state quota (at most
    STATE_KEEP_RECENT + 2 blobs per character, however long they chat; an
    old round is rebuilt by re-reading from the nearest one).
    """
    config = settings.RPSERVER
    if index > last_index - config["STATE_KEEP_RECENT"]:
        return True
    return index % config["STATE_CHECKPOINT_EVERY"] == 0 and not conversation.owner.is_guest


async def remember_state(conversation, index, state, backend):
    """Store a rebuilt post-round state where it will be found next time."""
    await asyncio.shield(_remember_state(conversation, index, state, backend))


async def _remember_state(conversation, index, state, backend):
    # Shielded: a client going away mid-way must not leave a written blob unreferenced.
    name = await blob_io(save_state)(conversation.owner_id, backend, state)
    try:
        kept = await db(keep_remembered)(conversation, index, name, backend)
    except BaseException:
        await blob_io(delete_states)([name])
        raise
    if not kept:
        await blob_io(delete_states)([name])


def keep_remembered(conversation, index, name, backend):
    """Attach the blob `name` (the state after round `index`); False if it is not kept.

    A round keeps it if it is recent or a checkpoint; never round 0, whose
    state lives in the shared state cache (round_zero_state).
    """
    round_ = conversation.rounds.get(index=index)
    last_index = conversation.rounds.order_by("-index").values_list("index", flat=True).first()
    if index == 0 or not keeps_snapshot(conversation, index, last_index):
        return False
    old = round_.post_state
    with transaction.atomic():
        Round.objects.filter(pk=round_.pk).update(post_state=name, state_model=backend.model_id)
        delete_file_on_commit(old)
    return True


async def state_after(conversation, index):
    """The model state right after round `index`, rebuilt and remembered if not stored."""
    engine = get_engine()
    base_index, state = await base_state(conversation, index, engine.backend)
    if base_index == index:
        return state
    tokens = await db(tokens_between)(conversation, base_index, index)
    state, _ = await engine.read(state, tokens)
    await remember_state(conversation, index, state, engine.backend)
    return state


async def state_before_reply(lease, round_):
    """The state from which round_'s reply is (re)generated: after all but the
    last token before the reply. Returns (state, whether it was rebuilt)."""
    engine = get_engine()
    if round_.state_model == engine.model_id:
        state = await blob_io(load_state)(round_.pre_state.name, engine.backend)
        if state is not None:
            return state, False
    base = await state_after(lease.conversation, round_.index - 1) if round_.index > 0 else None
    state, _ = await engine.read(base, round_.token_list[:round_.reply_start - 1])
    return state, True


# ---- storing rounds ------------------------------------------------------------


def prune_snapshots(conversation, last_index):
    """Keep pre-reply snapshots for the last round only, post-round ones by keeps_snapshot()."""
    for round_ in conversation.rounds.exclude(pre_state="").exclude(index=last_index):
        delete_file_on_commit(round_.pre_state)
        Round.objects.filter(pk=round_.pk).update(pre_state="")
    for round_ in conversation.rounds.exclude(post_state="").filter(index__lt=last_index):
        if not keeps_snapshot(conversation, round_.index, last_index):
            delete_file_on_commit(round_.post_state)
            Round.objects.filter(pk=round_.pk).update(post_state="")


async def store_round(lease, round_, pre_state, post_state, backend, remembered=None):
    """Write a round's snapshots, then save it and release the lock, in one transaction.

    `pre_state` None keeps the round's stored one. `remembered` (round index,
    state) is a rebuilt earlier state to keep too. On any failure the new
    blobs are deleted and the conversation is left as it was.
    """
    await asyncio.shield(_store_round(lease, round_, pre_state, post_state, backend, remembered))


async def _store_round(lease, round_, pre_state, post_state, backend, remembered):
    # Shielded: a client going away mid-way must not leave written blobs unreferenced.
    states = {"pre_state": pre_state, "post_state": post_state, "remembered": remembered and remembered[1]}
    states = {field: state for field, state in states.items() if state is not None}
    written = await asyncio.gather(*(blob_io(save_state)(lease.conversation.owner_id, backend, state)
                                     for state in states.values()), return_exceptions=True)
    names = [name for name in written if isinstance(name, str)]
    try:
        for failure in written:
            if isinstance(failure, BaseException):
                raise failure
        blobs = dict(zip(states, names))
        remembered_blob = (remembered[0], blobs.pop("remembered")) if remembered else None
        await db(commit_round)(lease, round_, blobs, backend, remembered_blob)
    except BaseException:
        await blob_io(delete_states)(names)
        raise


def commit_round(lease, round_, blobs, backend, remembered=None):
    """The database part of store_round: point the round at its new blobs
    ({field: name}), keep a remembered (index, name) if it is wanted, save,
    prune, release the lock; the blobs it no longer points to go once this commits."""
    old_files = [getattr(round_, field) for field in blobs]
    for field, name in blobs.items():
        setattr(round_, field, name)
    round_.state_model = backend.model_id
    with transaction.atomic():
        check_lease(lease)
        round_.save()
        if remembered and not keep_remembered(lease.conversation, *remembered, backend):
            transaction.on_commit(lambda: delete_states([remembered[1]]))
        prune_snapshots(lease.conversation, round_.index)
        Conversation.objects.filter(pk=lease.conversation.pk).update(updated=timezone.now())
        for old in old_files:
            delete_file_on_commit(old)
        commit_and_release(lease)


@dataclasses.dataclass
class ReplyPlan:
    """What prepare_reply found: the lease, and where the conversation's state is."""

    lease: Lease
    candidates: list  # stored_states() at the last round, newest first
    tokens: dict  # {round index: tokens} of every round after the oldest candidate

    def replay_after(self, base_index):
        """The tokens of the rounds after `base_index`; None if they were not fetched."""
        indexes = range(base_index + 1, self.lease.last.index + 1)
        if any(index not in self.tokens for index in indexes):
            return None
        return [token for index in indexes for token in self.tokens[index]]


def admit_reply(owner):
    """acquire's `admit` for a reply: refused before the conversation is opened when the user
    has no room in the engine (the share itself is taken by start_stream)."""
    return lambda character: limits.engine_share.check(owner.id)


def prepare_reply(owner, name, backend):
    """The database part of a new reply, in one trip: the reply rate limit, the
    lock, the conversation, where its latest state may be stored."""
    limits.check_reply_rate(owner)
    lease = acquire(owner, name, admit_reply(owner))
    try:
        candidates = stored_states(lease.conversation, lease.last.index, backend)
        oldest = min([index for index, _ in candidates], default=-1)
        rows = lease.conversation.rounds.filter(index__gt=oldest).values_list("index", "tokens")
        return ReplyPlan(lease, candidates, {index: decode_tokens(raw) for index, raw in rows})
    except BaseException:
        release(lease)
        raise


class ReplyStream:
    """A reply being generated under a lease: iterate for the growing text.

    When the reply ends, the round is stored (and the lock released with
    it); if the client goes away (the iteration is cancelled), generation
    stops and nothing is stored. The lock and the user's engine share are
    given back either way.

    The text is the reply as one turn of the prompt format (lines stripped,
    no blank line: prompt_format.clean_turn), as it grows; and what the round
    stores as read is that text spelled as the format spells it. When the
    model wrote it otherwise (no space after the colon, spaces around a line
    break, a blank line that is not "\n\n" such as "\r\n\r\n"), the reply is
    read again in that spelling from the state before it, so that the context
    is always exactly the chat (/debug/token) and the state the one it gives.
    """

    def __init__(self, lease, generation, round_, pre_state=None, replayed=0, start_state=None):
        self.lease = lease
        self.generation = generation
        self.round = round_
        self.pre_state = pre_state  # to store, when it had to be rebuilt
        self.replayed = replayed  # tokens of earlier rounds the job re-read before this round's
        # The state before the round's last prompt token, when the job started there (a regeneration);
        # else the job's snapshot at that point.
        self.start_state = start_state
        self.text = ""

    def __aiter__(self):
        return self._run()

    async def as_read(self, reply):
        """(the reply's tokens, the state after them), in the format's spelling of the reply's text."""
        engine = get_engine()
        tokens = engine.tokenizer.encode(prompt_format.reply_part(self.text))
        if tokens == reply.tokens:
            return reply.tokens, reply.state
        round_ = self.round
        start = self.start_state
        if start is None:
            start = reply.snapshots[self.replayed + round_.reply_start - 1]
        last_prompt_token = round_.token_list[round_.reply_start - 1:round_.reply_start]
        state, _ = await engine.read(start, last_prompt_token + tokens)
        return tokens, state

    async def _run(self):
        finished = False
        try:
            async for text in self.generation:
                self.text = prompt_format.clean_turn(text)
                yield self.text
            reply = self.generation.reply
            self.text = prompt_format.clean_turn(reply.text)
            tokens, state = await self.as_read(reply)
            round_ = self.round
            round_.bot_text = self.text
            round_.set_tokens(round_.token_list[:round_.reply_start] + tokens)
            pre_state = reply.snapshots.get(self.replayed + round_.reply_start - 1, self.pre_state)
            remembered = (round_.index - 1, reply.snapshots[self.replayed]) if self.replayed else None
            await store_round(self.lease, round_, pre_state, state, get_engine().backend, remembered)
            finished = True
        finally:
            if not finished:
                self.generation.cancel()
            limits.engine_share.give_back(self.lease.conversation.owner_id)
            await let_go(self.lease)


async def run_locked(owner, name, work, admit=None):
    """Run `work(lease)` under the conversation's lock (`admit`: see acquire)."""
    lease = await db(acquire)(owner, name, admit)
    try:
        return await work(lease)
    finally:
        await let_go(lease)


async def start_stream(lease, make_stream):
    """Under `lease`: count the reply in its user's share of the engine
    (limits.engine_share; taken under the lock, so that a second reply to a
    busy conversation is told it is busy rather than over its share), then
    `make_stream()`. On any failure the share and the lock are given back."""
    owner_id = lease.conversation.owner_id
    shared = False
    try:
        limits.engine_share.take(owner_id)
        shared = True
        return await make_stream()
    except BaseException:
        if shared:
            limits.engine_share.give_back(owner_id)
        await let_go(lease)
        raise


async def start_reply(owner, name, prompt, sampling, seed=None):
    """Begin the character's reply to `prompt`; returns a ReplyStream. Takes the lock."""
    if not prompt_format.clean_turn(prompt):
        raise ApiError("prompt must not be empty")
    engine = get_engine()
    plan = await db(prepare_reply)(owner, name, engine.backend)
    lease = plan.lease

    async def make_stream():
        # When the last round's state is not stored, one job re-reads the
        # rounds since the newest snapshot and then the new turn (the state
        # in between is remembered when the reply is stored).
        last = lease.last.index
        base_index, state = await first_readable(plan.candidates, engine.backend)
        if base_index < 0:  # a new conversation (or its snapshots are gone): round 0's shared state
            base_index, state = 0, await round_zero_state(lease.conversation, plan.tokens.get(0))
        replay = plan.replay_after(base_index)
        if replay is None:  # no stored state was readable: re-read everything
            replay = await db(tokens_between)(lease.conversation, base_index, last)
        user, bot = speaker_names(lease.character)
        lore = ""  # lore/: what the lore the turn's messages mention makes the model read first
        if lore_services.character_books(lease.character):
            lore = await db(lore_services.lore_for_turn)(lease.character, lease.conversation, prompt, user, bot)
        head = engine.tokenizer.encode(lore + prompt_format.user_turn(user, bot, prompt))
        round_ = Round(conversation=lease.conversation, index=last + 1, user_text=prompt, reply_start=len(head))
        round_.set_tokens(head)
        tokens = replay + head
        # Snapshots: before the reply's last prompt token, and after the re-read rounds if any (a
        # snapshot at 0 would be a copy of `state` taken on the event loop, ~2.4 MB, for nothing).
        keep = {len(tokens) - 1} | ({len(replay)} if replay else set())
        generation = engine.generate(state, tokens, sampling, settings.RPSERVER["MAX_REPLY_TOKENS"],
                                     seed=seed, snapshot_at=keep)
        return ReplyStream(lease, generation, round_, replayed=len(replay))

    return await start_stream(lease, make_stream)


async def start_resay(owner, name, sampling, seed=None):
    """Begin a new version of the last reply; returns a ReplyStream. Takes the lock."""
    await db(limits.check_reply_rate)(owner)
    lease = await db(acquire)(owner, name, admit_reply(owner))

    async def make_stream():
        engine = get_engine()
        round_ = lease.last
        pre_state, rebuilt = await state_before_reply(lease, round_)
        last_prompt_token = round_.token_list[round_.reply_start - 1:round_.reply_start]
        generation = engine.generate(pre_state, last_prompt_token, sampling,
                                     settings.RPSERVER["MAX_REPLY_TOKENS"], seed=seed)
        return ReplyStream(lease, generation, round_, pre_state=pre_state if rebuilt else None,
                           start_state=pre_state)

    return await start_stream(lease, make_stream)


async def tamper(owner, name, message):
    """Replace the last reply with `message`, and the state with the one it produces."""
    if not prompt_format.clean_turn(message):
        raise ApiError("message must not be empty")

    async def work(lease):
        engine = get_engine()
        round_ = lease.last
        pre_state, rebuilt = await state_before_reply(lease, round_)
        reply_tokens = engine.tokenizer.encode(prompt_format.reply_part(message))
        tokens = round_.token_list[:round_.reply_start] + reply_tokens
        state, _ = await engine.read(pre_state, tokens[round_.reply_start - 1:])
        round_.set_tokens(tokens)
        round_.bot_text = message.strip()
        await store_round(lease, round_, pre_state if rebuilt else None, state, engine.backend)

    await run_locked(owner, name, work)


def drop_rounds_after(lease, index):
    with transaction.atomic():
        check_lease(lease)
        for round_ in lease.conversation.rounds.filter(index__gt=index):
            round_.delete()


async def back(owner, name, log_index):
    """Keep rounds 0..log_index; the state becomes exactly the one after round log_index."""

    def admit(character):
        # Checked before the conversation is opened: a conversation not opened yet has round 0 only.
        last_index = last_round_index(character)
        if log_index > last_index:
            raise ApiError(f"log_index {log_index} is past the last round ({last_index})")

    async def work(lease):
        await db(drop_rounds_after)(lease, log_index)
        await state_after(lease.conversation, log_index)  # stored if it had to be rebuilt

    await run_locked(owner, name, work, admit)


def restart(lease):
    with transaction.atomic():
        check_lease(lease)
        for round_ in lease.conversation.rounds.all():
            round_.delete()
        first_round(lease.conversation, lease.character).save()
        commit_and_release(lease)
    return chat_log(lease.conversation)


async def reset(owner, name):
    """Start the conversation over from the greeting; returns the new chat log."""

    async def work(lease):
        return await db(restart)(lease)

    return await run_locked(owner, name, work)
