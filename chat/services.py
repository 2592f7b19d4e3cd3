"""Conversations: the operations on a chat, each one function (views and consumers call these).

A conversation is a tree of rounds with one current path (chat.tree); the
legacy API sees the path as its rounds. Its states are kept, loaded and
rebuilt by chat.states, replies stream from chat.replies, and every change
runs under the character's lock (chat.lease). The rules live in those
modules, once; this module is the list of what can be done to a chat.

Every change that stores something re-checks the lock in its transaction,
which also makes the last deletion final (undo is offered until another
change) and releases the lock.
"""

from django.db import transaction
from django.utils import timezone

from characters.services import get_character
from inference import prompt as prompt_format
from inference.runtime import get_engine
from replies import services as replies
from rpserver.errors import ApiError

from .lease import BUSY, LOST, Lease, acquire, acquire_chat, check_lease, commit_and_release, db, let_go, \
    release, run_locked  # noqa: F401 (the lock's names, for callers and tests)
from .models import Conversation, Round
from .replies import alternative_of, start_impersonate, start_reply, start_resay, \
    start_swipe  # noqa: F401
from .states import finish_undo, make_current, state_after, state_before_reply, state_on_path, \
    store_round  # noqa: F401
from .tree import chat_log, chat_of, context, context_of, conversation_of, end_of_branch, first_round, last_round_index, \
    load_chat, open_conversation, path_of, round_in, siblings_of, speaker_names, tree_view  # noqa: F401


def discard_conversations(character, **kwargs):
    """characters.signals.character_changed receiver: the character's prompt changed
    (or it is deleted), so its conversations go (forks too). (The state after
    its old prompt stays in the shared state cache, keyed by those exact
    tokens, for whoever else starts with them, until it is the least
    recently used.)

    The characters service holds the character's lock and a transaction."""
    for conversation in Conversation.objects.filter(character=character):
        conversation.delete()


# ---- the legacy API's changes --------------------------------------------------------


async def tamper(owner, name, message):
    """Overwrite the last reply of the main conversation with `message`: a new
    alternative of it (the old one stays), with the state that text produces."""
    if not prompt_format.clean_turn(message):
        raise ApiError("message must not be empty")
    lease = await db(acquire)(owner, name)
    await run_locked(lease, lambda lease: write_reply(lease, lease.last, message))


async def write_reply(lease, round_, message):
    """Under `lease`: `message` as round_'s reply, a new alternative beside it (or in it when it has
    none yet), made current; reads only the reply's tokens, from the state before it."""
    engine = get_engine()
    path = await db(path_of)(lease.conversation, round_.parent_id)
    pre_state, rebuilt = await state_before_reply(lease.conversation, path, round_)
    reply_tokens = engine.tokenizer.encode(prompt_format.reply_part(message))
    target = alternative_of(round_, reply_tokens, message.strip()) if round_.has_reply else round_
    if target is round_:
        round_.set_tokens(round_.token_list[:round_.reply_start] + reply_tokens)
        round_.bot_text = message.strip()
    tokens = target.token_list
    state, _ = await engine.read(pre_state, tokens[target.reply_start - 1:])
    await store_round(lease, target, pre_state if rebuilt else None, state, engine.backend)
    return target


def move_head(lease, round_):
    """Inside the lock: the current path ends at `round_` now (the rounds after it stay, as a branch)."""
    with transaction.atomic():
        check_lease(lease)
        finish_undo(lease.conversation)
        make_current(lease.conversation, round_)


async def back(owner, name, log_index):
    """The current path ends at round log_index; the state becomes exactly the one
    after it. The later rounds stay in the tree as a branch."""

    def admit(character):
        # Checked before the conversation is opened: a conversation not opened yet has round 0 only.
        last_index = last_round_index(character)
        if log_index > last_index:
            raise ApiError(f"log_index {log_index} is past the last round ({last_index})")

    async def work(lease):
        path = await db(path_of)(lease.conversation)
        await db(move_head)(lease, path[log_index])
        await state_on_path(lease.conversation, path, log_index)  # stored if it had to be rebuilt

    await run_locked(await db(acquire)(owner, name, admit), work)


def restart(lease):
    with transaction.atomic():
        check_lease(lease)
        conversation = lease.conversation
        Conversation.objects.filter(pk=conversation.pk).update(head=None, undo_round=None, undo_head=None)
        for round_ in conversation.rounds.filter(parent=None):
            round_.delete()  # and everything under it
        start = first_round(conversation, lease.character)
        start.save()
        make_current(conversation, start)
        commit_and_release(lease)
    return chat_log(conversation)


async def reset(owner, name):
    """Start the main conversation over from the greeting (its tree goes); returns the new chat log."""
    lease = await db(acquire)(owner, name)
    return await run_locked(lease, lambda lease: db(restart)(lease))


# ---- the tree's operations (the REST API) -----------------------------------------------


def chats_of(owner, name):
    """The owner's chats with a character: the main one (opened if new) and its forks."""
    character = get_character(owner, name)
    open_conversation(owner, name)
    return [{"id": c.pk, "is_fork": c.is_fork, "forked_from": c.forked_from_id, "updated": c.updated.isoformat()}
            for c in Conversation.objects.filter(character=character).order_by("is_fork", "pk")]


def show_chat(owner, chat_id):
    return tree_view(chat_of(owner, chat_id))


async def locked_chat(owner, chat_id, round_id=None):
    """(lease, the round `round_id` of it or None), with the chat's lock held."""
    lease = await db(acquire_chat)(owner, chat_id)
    try:
        round_ = await db(round_in)(lease.conversation, round_id) if round_id is not None else None
    except BaseException:
        await let_go(lease)
        raise
    return lease, round_


def switch_to(lease, round_):
    """The path goes through `round_` (an alternative of a message) and on down its branch."""
    end = end_of_branch(round_)
    move_head(lease, end)
    return end


async def switch(owner, chat_id, round_id):
    """Make round `round_id` current (an alternative of its message): no token is read."""
    lease, round_ = await locked_chat(owner, chat_id, round_id)
    await run_locked(lease, lambda lease: db(switch_to)(lease, round_))
    return await db(show_chat)(owner, chat_id)


async def reply(owner, chat_id, prompt, sampling, seed=None):
    """Begin the character's reply to `prompt` at the end of chat `chat_id`'s path; Stop keeps it."""
    return await start_reply(owner, None, prompt, sampling, seed=seed, chat_id=chat_id, keep_partial=True)


async def swipe(owner, chat_id, round_id, sampling, seed=None, continue_reply=False):
    """Begin a new alternative of round `round_id`'s reply (or continue it); Stop keeps what is written."""
    await db(replies.check_rate)(owner)
    lease, round_ = await locked_chat(owner, chat_id, round_id)
    return await start_swipe(lease, round_, sampling, seed, keep_partial=True, continue_reply=continue_reply)


async def impersonate(owner, chat_id, sampling, seed=None):
    """Begin the model's draft of the person's next message (stored nowhere)."""
    await db(replies.check_rate)(owner)
    lease, _ = await locked_chat(owner, chat_id)
    return await start_impersonate(lease, sampling, seed)


def add_person_alternative(lease, round_, text):
    """A new round beside `round_` with the person's message `text` and no reply yet, made current."""
    engine = get_engine()
    user, bot = speaker_names(lease.character)
    head = engine.tokenizer.encode(prompt_format.user_turn(user, bot, text))
    alternative = Round(conversation=lease.conversation, parent_id=round_.parent_id, index=round_.index,
                        user_text=text, bot_text="", reply_start=len(head))
    alternative.set_tokens(head)
    with transaction.atomic():
        check_lease(lease)
        finish_undo(lease.conversation)
        alternative.save()
        make_current(lease.conversation, alternative)
    return alternative


async def edit(owner, chat_id, round_id, role, text):
    """Edit a message: the edited text is a new alternative, made current.

    The character's message: its tokens are read from the state before it
    (nothing else). The person's message: a new round with that message and
    no reply yet (ask for one with swipe); its tokens are read when it is
    answered.
    """
    if not prompt_format.clean_turn(text):
        raise ApiError("text must not be empty")
    lease, round_ = await locked_chat(owner, chat_id, round_id)
    if role == "user":
        if round_.user_text is None:
            await let_go(lease)
            raise ApiError("round 0 has no message of the person's: edit the character's greeting instead")
        await run_locked(lease, lambda lease: db(add_person_alternative)(lease, round_, text))
    else:
        await run_locked(lease, lambda lease: write_reply(lease, round_, text))
    return await db(show_chat)(owner, chat_id)


def add_greeting_alternatives(character, greetings):
    """Alternate greetings (a card's) as alternatives of the main conversation's round 0, not made
    current and not read yet (their states are built when first used). The caller holds the
    character's lock (characters.services, saving the character); returns the new rounds."""
    conversation = conversation_of(character)
    rounds = []
    with transaction.atomic():
        for greeting in greetings:
            if prompt_format.clean_turn(greeting):
                alternative = first_round(conversation, character, greeting=greeting)
                alternative.save()
                rounds.append(alternative)
    return rounds


def add_alternative(owner, chat_id, round_id, text):
    """An extra alternative of round `round_id`'s reply with the text `text`, NOT made current and
    NOT read yet (its states are built when it is first used): for card imports (alternate
    greetings become alternatives of round 0). Runs under the chat's lock; returns the round."""
    lease = acquire_chat(owner, chat_id)
    try:
        round_ = round_in(lease.conversation, round_id)
        engine = get_engine()
        alternative = alternative_of(round_, engine.tokenizer.encode(prompt_format.reply_part(text)),
                                     prompt_format.clean_turn(text))
        alternative.pre_state = ""
        with transaction.atomic():
            check_lease(lease)
            alternative.save()
        return alternative
    finally:
        release(lease)


def delete_round(lease, round_):
    """Hide `round_` and its subtree (undoable until the next change); the path ends before it."""
    with transaction.atomic():
        check_lease(lease)
        finish_undo(lease.conversation)
        head_before = Conversation.objects.filter(pk=lease.conversation.pk).values_list("head_id", flat=True)[0]
        hidden, layer = [], [round_.pk]
        while layer:
            hidden += layer
            layer = list(Round.objects.filter(parent_id__in=layer).values_list("pk", flat=True))
        Round.objects.filter(pk__in=hidden).update(deleted=True)
        head = round_.parent_id if head_before in hidden else head_before
        Conversation.objects.filter(pk=lease.conversation.pk).update(
            head_id=head, undo_round=round_, undo_head_id=head_before, updated=timezone.now())


async def delete(owner, chat_id, round_id):
    """Delete round `round_id` (a person's message, its reply and all that follows); undo can bring it back."""
    lease, round_ = await locked_chat(owner, chat_id, round_id)
    if round_.parent_id is None:
        await let_go(lease)
        raise ApiError("the greeting cannot be deleted: reset the chat, or switch to another greeting")
    await run_locked(lease, lambda lease: db(delete_round)(lease, round_))
    return await db(show_chat)(owner, chat_id)


def restore_deleted(lease):
    with transaction.atomic():
        check_lease(lease)
        conversation = Conversation.objects.get(pk=lease.conversation.pk)
        if conversation.undo_round_id is None:
            raise ApiError("there is nothing to undo")
        hidden, layer = [], [conversation.undo_round_id]
        while layer:
            hidden += layer
            layer = list(Round.objects.filter(parent_id__in=layer).values_list("pk", flat=True))
        Round.objects.filter(pk__in=hidden).update(deleted=False)
        Conversation.objects.filter(pk=conversation.pk).update(
            head=conversation.undo_head_id, undo_round=None, undo_head=None, updated=timezone.now())


async def undo(owner, chat_id):
    """Bring back the last deleted message and what followed it (until another change)."""
    lease, _ = await locked_chat(owner, chat_id)
    await run_locked(lease, lambda lease: db(restore_deleted)(lease))
    return await db(show_chat)(owner, chat_id)


def copy_path(lease, round_):
    """A fork: a new chat whose rounds are copies of the path to `round_`, pointing at the same blobs."""
    path = path_of(lease.conversation, round_.pk)
    with transaction.atomic():
        check_lease(lease)
        source = lease.conversation
        fork = Conversation.objects.create(owner_id=source.owner_id, character_id=source.character_id,
                                           is_fork=True, forked_from=source)
        parent = None
        for original in path:
            copy = Round(conversation=fork, parent=parent, index=original.index, user_text=original.user_text,
                         bot_text=original.bot_text, tokens=original.tokens, reply_start=original.reply_start,
                         state_model=original.state_model, pre_state=original.pre_state.name,
                         post_state=original.post_state.name)
            copy.save()
            if parent is not None:
                Round.objects.filter(pk=parent.pk).update(chosen=copy)
            parent = copy
        Conversation.objects.filter(pk=fork.pk).update(head=parent)
        commit_and_release(lease)
    return fork.pk


async def fork(owner, chat_id, round_id):
    """A new chat with the same character from round `round_id` of chat `chat_id`: its path up to
    there, sharing the original's stored states (no blob is copied); returns the new chat."""
    lease, round_ = await locked_chat(owner, chat_id, round_id)
    new_id = await run_locked(lease, lambda lease: db(copy_path)(lease, round_))
    return await db(show_chat)(owner, new_id)


def delete_chat(owner, chat_id):
    """Delete a fork (a character's main chat is reset, not deleted)."""
    conversation = chat_of(owner, chat_id)
    if not conversation.is_fork:
        raise ApiError("the main chat cannot be deleted: reset it instead")
    lease = acquire_chat(owner, chat_id)
    try:
        with transaction.atomic():
            check_lease(lease)
            conversation.delete()
    finally:
        release(lease)


def reading_context(owner, chat_id):
    """(token count, text) of chat `chat_id`'s current path, as /debug/token shows the main chat's."""
    return context_of(chat_of(owner, chat_id))



