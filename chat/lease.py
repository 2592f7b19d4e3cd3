"""A conversation's lock, as its changes hold it.

Every change to a character's conversations (a reply, a swipe, an edit, a
switch, back, reset, a fork, and saving or deleting the character) runs
under the character's lock (locks.services: a lock held by a live server
process, freed when it dies). A second request meanwhile gets code 400 at
once instead of racing the first. The holder re-checks the lock in the
transaction that stores its result, and that transaction also releases it.
"""

import contextlib
import dataclasses

from asgiref.sync import sync_to_async
from django.db import transaction

from characters.services import get_character
from locks import services as locks
from rpserver.errors import BUSY, ApiError  # noqa: F401 (BUSY: what a second change meanwhile is told)

from . import tree
from .models import Conversation, Round

LOST = "this conversation was changed by another request meanwhile, please reload it"


def db(function):
    """Run a sync ORM function from async code, on Django's sync thread (state
    blobs are written and read beside it, see statecache.blobs.blob_io)."""
    return sync_to_async(function, thread_sensitive=True)


@dataclasses.dataclass
class Lease:
    """A held conversation lock, with what the holder needs to know: the
    conversation and its head (`last`, the end of the current path)."""

    conversation: Conversation
    character: object
    key: str
    last: Round
    released: bool = False

    @property
    def lock_name(self):
        return self.character.lock_name


def lock_character(character, open_conversation, admit=None):
    """Take `character`'s lock, then `open_conversation()` -> (conversation, head); locks.Busy (an
    ApiError with BUSY) if it is taken.

    `admit(character)`, when given, runs under the lock before the conversation
    is opened (a new one is written with its round 0): a request it refuses
    (ApiError) leaves nothing written.
    """
    with contextlib.ExitStack() as until_leased:
        key = until_leased.enter_context(locks.held(character.lock_name))  # locks.Busy: answered BUSY
        if admit is not None:
            admit(character)
        conversation, last = open_conversation()
        until_leased.pop_all()  # leased: commit_and_release or release lets go of it
    return Lease(conversation, character, key, last)


def acquire(owner, name, admit=None):
    """Lock the owner's main conversation with `name` (opened if new); ApiError(BUSY) if it is taken.
    (`admit`: see lock_character.)"""
    character = get_character(owner, name)
    return lock_character(character, lambda: tree.latest_round(character), admit)


def acquire_chat(owner, chat_id, admit=None):
    """Lock the owner's conversation `chat_id` (a main one or a fork); ApiError(BUSY) if it is taken."""
    conversation = tree.chat_of(owner, chat_id)

    def reopen():
        fresh = Conversation.objects.select_related("head").get(pk=conversation.pk)
        return fresh, fresh.head

    return lock_character(conversation.character, reopen, admit)


def release(lease):
    if not lease.released:
        locks.release(lease.lock_name, lease.key)
        lease.released = True


async def let_go(lease):
    """Release the lease's lock, unless the commit that stored its change already did (then without a
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


async def run_locked(lease, work):
    """Run `work(lease)` under an acquired lease, releasing it afterwards."""
    try:
        return await work(lease)
    finally:
        await let_go(lease)
