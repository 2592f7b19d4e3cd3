"""Replies being generated: a new reply, a swipe, a continuation, a draft of the person's turn.

Each starts under the conversation's lock (chat.lease) and runs as a
replies.RunningReply (the reply rate, the user's engine share, cancel on
disconnect: replies/services.py, shared with the OpenAI door) whose work is
a RoundReply here, streaming the growing reply text. When the reply ends,
its round is stored (chat.states.store_round) and made the head of the
path, and the lock is released with that commit. When the client goes away
(Stop), the legacy routes store nothing; the REST API's streams
(`keep_partial`) keep the text written so far as the reply, with its
states, ready to continue.

A reply costs two trips to the database thread: `prepare_reply` (rate
limit, lock, the path, where its state is) and `commit_round` (store,
prune, release); state blobs are read and written beside it.
"""

import dataclasses
import logging

from django.conf import settings

from inference import prompt as prompt_format
from inference.runtime import get_engine
from lore import services as lore_services
from replies import services as replies
from rpserver.errors import ApiError
from statecache.services import state_cache

from .lease import acquire, acquire_chat, db, let_go, release
from .models import Round
from .states import first_readable, round_zero_state, state_before_reply, state_on_path, store_round, \
    stored_states, tokens_between
from .tree import path_of, path_tokens, speaker_names

logger = logging.getLogger(__name__)

NO_REPLY_YET = "the last message is yours and has no reply yet: regenerate to get one"


def reply_text(tokens):
    """The text of a reply's tokens as shown: up to the first blank line, stripped."""
    text = get_engine().tokenizer.decode(tokens)
    cut = text.find("\n\n")
    return (text if cut < 0 else text[:cut]).strip()


class RoundReply:
    """A reply being generated under a lease, to be stored as a round: the work of a
    replies.RunningReply, whose updates are the growing text.

    When the reply ends (`finish`), the round is stored (and the lock
    released with it); if the client goes away, generation stops and nothing
    is stored, unless `keep_partial`: then the text so far is stored as the
    reply (`stopped`; its tokens read from `start_state`, after `prompt`, the
    tokens from there to the reply). The lock is let go either way (`release`).
    """

    def __init__(self, lease, generation, round_, pre_state=None, replayed=0, prefix_tokens=(),
                 prefix_text="", keep_partial=False, start_state=None, prompt=(), reply_base=None):
        self.lease = lease
        self.generation = generation
        self.round = round_
        self.pre_state = pre_state  # to store, when it had to be rebuilt
        self.replayed = replayed  # tokens of earlier rounds the job re-read before this round's
        self.prefix_tokens = list(prefix_tokens)  # a continued reply's earlier tokens
        self.prefix_text = prefix_text
        self.keep_partial = keep_partial
        self.start_state = start_state
        self.prompt = list(prompt)
        # The state before the round's last prompt token, when the job started there (a swipe, a
        # continuation); else the job's snapshot at that point.
        self.reply_base = reply_base
        self.text = ""

    def shown(self, text):
        """The reply so far as one turn of the prompt format (prompt_format.clean_turn); a
        continuation shows the reply it continues first."""
        if self.prefix_text:
            text = f"{self.prefix_text} {text}" if text else self.prefix_text
        return prompt_format.clean_turn(text)

    async def as_read(self, reply):
        """(the reply's tokens, the state after them), in the format's spelling of the reply's text.

        When the model wrote it otherwise (no space after the colon, spaces around a line break, a
        blank line that is not "\n\n"), the reply is read again in that spelling from the state
        before it, so that the context is always exactly the chat and the state the one it gives."""
        engine = get_engine()
        written = self.prefix_tokens + reply.tokens
        tokens = engine.tokenizer.encode(prompt_format.reply_part(self.text))
        if tokens == written:
            return written, reply.state
        round_ = self.round
        start = self.reply_base
        if start is None:
            start = reply.snapshots[self.replayed + round_.reply_start - 1]
        last_prompt_token = round_.token_list[round_.reply_start - 1:round_.reply_start]
        state, _ = await engine.read(start, last_prompt_token + tokens)
        return tokens, state

    async def updates(self):
        async for text in self.generation:
            self.text = self.shown(text)
            yield self.text

    async def finish(self):
        reply = self.generation.reply
        if self.prefix_tokens:  # a continuation: the whole reply, as the model's tokens give it
            self.text = prompt_format.clean_turn(reply_text(self.prefix_tokens + reply.tokens))
        else:
            self.text = self.shown(reply.text)
        tokens, state = await self.as_read(reply)
        round_ = self.round
        round_.bot_text = self.text
        round_.set_tokens(round_.token_list[:round_.reply_start] + tokens)
        pre_state = reply.snapshots.get(self.replayed + round_.reply_start - 1, self.pre_state)
        remembered = (round_.parent_id, reply.snapshots[self.replayed]) if self.replayed else None
        await store_round(self.lease, round_, pre_state, state, get_engine().backend, remembered)

    def cancel(self):
        self.generation.cancel()

    async def stopped(self):
        if self.keep_partial and self.text:
            await self._keep_partial()

    async def release(self):
        await let_go(self.lease)

    async def _keep_partial(self):
        """Stop: store the text shown so far as the reply, reading it (and the prompt before it) again.

        On the way, the state at the open end of the reply (after its text but the last token,
        before the closing blank line) is kept in the state store, where a continuation of this
        reply finds it (kept_open_end) and goes on reading one token instead of the whole reply."""
        engine = get_engine()
        round_ = self.round
        reply_tokens = engine.tokenizer.encode(prompt_format.reply_part(self.text))
        open_tokens = continuation_tokens(prompt_format.clean_turn(self.text))
        open_end = len(self.prompt) + len(open_tokens) - 1
        keeps_open_end = 1 < len(open_tokens) < len(reply_tokens) \
            and open_tokens[:-1] == reply_tokens[:len(open_tokens) - 1]
        snapshot_at = {len(self.prompt) - 1} | ({open_end} if keeps_open_end else set())
        state, snapshots = await engine.read(self.start_state, self.prompt + reply_tokens, snapshot_at=snapshot_at)
        round_.bot_text = prompt_format.clean_turn(self.text)
        round_.set_tokens(round_.token_list[:round_.reply_start] + reply_tokens)
        await store_round(self.lease, round_, snapshots[len(self.prompt) - 1], state, engine.backend)
        if keeps_open_end:
            try:  # a shortcut for a later continue: its failure must not keep the lock or the share
                path = await db(path_of)(self.lease.conversation, round_.parent_id)
                await state_cache().keep(open_end_key(path, round_, open_tokens), snapshots[open_end])
            except Exception:
                logger.exception("could not keep the open end of a stopped reply")


async def start_locked(lease, make_work):
    """Under `lease`: begin `make_work()` as a reply in its user's share of the engine
    (replies.start; the share is taken under the lock, so that a second reply to a busy
    conversation is told it is busy rather than over its share). On any failure the share and
    the lock are given back."""
    return await replies.start(lease.conversation.owner_id, make_work, release=lambda: let_go(lease))


@dataclasses.dataclass
class ReplyPlan:
    """What prepare_reply found: the lease, the current path, and where its state is."""

    lease: object
    path: list
    candidates: list  # stored_states() at the head, newest first


def plan_for(lease, backend):
    path = path_of(lease.conversation)
    return ReplyPlan(lease, path, stored_states(path, len(path) - 1, backend))


def admit_reply(owner):
    """acquire's `admit` for a reply: refused before the conversation is opened when the user
    has no room in the engine (the share itself is taken by start_locked)."""
    return lambda character: replies.check_share(owner.id)


def prepare_reply(owner, name, backend, chat_id=None):
    """The database part of a new reply, in one trip: the reply rate limit, the
    lock, the conversation's path, where its latest state may be stored."""
    replies.check_rate(owner)
    admit = admit_reply(owner)
    lease = acquire(owner, name, admit) if chat_id is None else acquire_chat(owner, chat_id, admit)
    try:
        return plan_for(lease, backend)
    except BaseException:
        release(lease)
        raise


async def start_reply(owner, name, prompt, sampling, seed=None, chat_id=None, keep_partial=False):
    """Begin the character's reply to `prompt` at the end of the current path
    (the main conversation with `name`, or chat `chat_id`); returns a RunningReply. Takes the lock."""
    if not prompt_format.clean_turn(prompt):
        raise ApiError("prompt must not be empty")
    engine = get_engine()
    plan = await db(prepare_reply)(owner, name, engine.backend, chat_id)
    lease = plan.lease

    async def make_stream():
        if not lease.last.has_reply:
            raise ApiError(NO_REPLY_YET)
        # When the head's state is not stored, one job re-reads the rounds
        # since the newest stored one and then the new turn (the state in
        # between is remembered when the reply is stored).
        last = len(plan.path) - 1
        base_index, state = await first_readable(plan.candidates, engine.backend)
        if base_index < 0:  # a new conversation (or its states are gone): round 0's shared state
            base_index, state = 0, await round_zero_state(plan.path[0].token_list)
        replay = tokens_between(plan.path, base_index, last)
        user, bot = speaker_names(lease.character)
        lore = ""  # lore/: what the lore the turn's messages mention makes the model read first
        if lore_services.character_books(lease.character):
            lore = await db(lore_services.lore_for_turn)(lease.character, lease.conversation, prompt, user, bot)
        head = engine.tokenizer.encode(lore + prompt_format.user_turn(user, bot, prompt))
        round_ = Round(conversation=lease.conversation, parent=lease.last, index=lease.last.index + 1,
                       user_text=prompt, reply_start=len(head))
        round_.set_tokens(head)
        tokens = replay + head
        # Snapshots: before the reply's last prompt token, and after the re-read rounds if any (a
        # snapshot at 0 would be a copy of `state` taken on the event loop, ~2.4 MB, for nothing).
        keep = {len(tokens) - 1} | ({len(replay)} if replay else set())
        generation = engine.generate(state, tokens, sampling, settings.RPSERVER["MAX_REPLY_TOKENS"],
                                     seed=seed, snapshot_at=keep)
        return RoundReply(lease, generation, round_, replayed=len(replay), keep_partial=keep_partial,
                           start_state=state, prompt=tokens)

    return await start_locked(lease, make_stream)


def continuation_tokens(reply_text):
    """What a continuation of a reply with the text `reply_text` reads after the last prompt token."""
    return get_engine().tokenizer.encode(" " + reply_text)


def open_end_key(path, round_, open_tokens):
    """The exact tokens from the zero state up to the open end of round_'s reply (its text but the
    last token; `path` runs through round_'s parent): the state store's key of the state there."""
    return path_tokens(path[:round_.index]) + round_.token_list[:round_.reply_start] + open_tokens[:-1]


async def kept_open_end(path, round_, open_tokens):
    """The state at the open end of round_'s reply if the state store keeps it (a Stop keeps it);
    None otherwise."""
    if len(open_tokens) < 2:
        return None
    return await state_cache().get(open_end_key(path, round_, open_tokens))


def alternative_of(round_, reply_tokens=None, bot_text=""):
    """A new round beside `round_` with the same person's message (and its pre-reply state, shared)."""
    alternative = Round(conversation_id=round_.conversation_id, parent_id=round_.parent_id, index=round_.index,
                        user_text=round_.user_text, bot_text=bot_text, reply_start=round_.reply_start,
                        pre_state=round_.pre_state.name, state_model=round_.state_model)
    alternative.set_tokens(round_.token_list[:round_.reply_start] + list(reply_tokens or []))
    return alternative


async def start_swipe(lease, round_, sampling, seed=None, keep_partial=False, continue_reply=False):
    """Under `lease`: a new reply for `round_`'s person's message (any round on any
    branch), as a new alternative beside it (or in it, when it has no reply yet);
    with `continue_reply`, one that continues round_'s reply. Returns a RunningReply."""

    async def make_stream():
        engine = get_engine()
        path = await db(path_of)(lease.conversation, round_.parent_id)
        pre_state, rebuilt = await state_before_reply(lease.conversation, path, round_)
        target = alternative_of(round_) if round_.has_reply else round_
        last_prompt_token = round_.token_list[round_.reply_start - 1:round_.reply_start]
        prefix_tokens, prefix_text, open_end = [], "", None
        if continue_reply:
            if not round_.has_reply or not round_.bot_text:
                raise ApiError("there is no reply to continue here")
            prefix_text = round_.bot_text
            prefix_tokens = continuation_tokens(prefix_text)
            open_end = await kept_open_end(path, round_, prefix_tokens)
        if open_end is not None:  # kept (a Stop kept it): read the reply's last token only
            generation = engine.generate(open_end, prefix_tokens[-1:], sampling, settings.RPSERVER["MAX_REPLY_TOKENS"],
                                         seed=seed, history=last_prompt_token + prefix_tokens[:-1])
        else:  # read the reply again from the state before it
            generation = engine.generate(pre_state, last_prompt_token + prefix_tokens, sampling,
                                         settings.RPSERVER["MAX_REPLY_TOKENS"], seed=seed)
        return RoundReply(lease, generation, target, pre_state=pre_state if rebuilt else None,
                           prefix_tokens=prefix_tokens, prefix_text=prefix_text, keep_partial=keep_partial,
                           start_state=pre_state, prompt=last_prompt_token, reply_base=pre_state)

    return await start_locked(lease, make_stream)


async def start_resay(owner, name, sampling, seed=None):
    """Begin a new version of the last reply of the main conversation, as a new
    alternative of it (the old one stays in the tree); returns a RunningReply. Takes the lock."""
    await db(replies.check_rate)(owner)
    lease = await db(acquire)(owner, name, admit_reply(owner))
    return await start_swipe(lease, lease.last, sampling, seed)


class DraftReply:
    """The model's draft of the person's next message (impersonate): the work of a
    replies.RunningReply; nothing is stored, the lock is let go at the end."""

    def __init__(self, lease, generation):
        self.lease = lease
        self.generation = generation
        self.text = ""

    async def updates(self):
        async for text in self.generation:
            self.text = text
            yield text

    async def finish(self):
        pass

    def cancel(self):
        self.generation.cancel()

    async def stopped(self):
        pass

    async def release(self):
        await let_go(self.lease)


async def start_impersonate(lease, sampling, seed=None):
    """Under `lease`: the model writes the person's next turn after the head (not stored)."""

    async def make_stream():
        if not lease.last.has_reply:
            raise ApiError(NO_REPLY_YET)
        engine = get_engine()
        path = await db(path_of)(lease.conversation)
        state = await state_on_path(lease.conversation, path, len(path) - 1)
        user, _ = speaker_names(lease.character)
        generation = engine.generate(state, engine.tokenizer.encode(f"{user}:"), sampling,
                                     settings.RPSERVER["MAX_REPLY_TOKENS"], seed=seed)
        return DraftReply(lease, generation)

    return await start_locked(lease, make_stream)
