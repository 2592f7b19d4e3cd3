"""A reply running in the engine for a user, whichever door asked for it.

The legacy streams and the REST API's chat streams (chat/) and OpenAI's
/v1/ (openai_api/) start and end a reply through here, so that each rule
has one home:

- the reply rate (`check_rate`, on the database thread: one reply counted
  against RPSERVER_REPLIES_PER_MINUTE) and room in the user's engine share
  (`check_share`: at most RPSERVER_MAX_REPLIES_PER_USER replies at once in
  this process's engine; a door that takes a conversation's lock checks it
  under the lock, so that a busy conversation is told so first);
- `start`: the share is taken, the door's work begun; if beginning fails,
  the share is given back and the door's hold (a lock) let go;
- `RunningReply`: iterated for the work's updates. When they run out, the
  work's finishing hook runs (store the round, cache the states). When the
  client goes away (the consumer's disconnect race calls `cancel()`, then
  `close()`), the engine job is cancelled and the work's `stopped` hook runs
  (keep the text written so far). Either way, once, the share is given back
  and the door's hold let go.

A door's work is any object with `updates()` (an async iterator), `cancel()`
(stop the engine job now), `async finish()`, `async stopped()` and
`async release()`.
"""

import asyncio
import logging

from limits import services as limits

logger = logging.getLogger(__name__)


def check_rate(user):
    """Count a reply against the user's reply rate (ApiError 429 past it). On the database
    thread; anonymous use (user None, OpenAI's RPSERVER_OPENAI_ANONYMOUS) has no limits."""
    if user is not None:
        limits.check_reply_rate(user)


def check_share(owner_id):
    """ApiError(429) when the user has no room for another reply in the engine (takes nothing; a
    read, safe from any thread)."""
    if owner_id is not None:
        limits.engine_share.check(owner_id)


def replies_running(owner_id=...):
    """How many replies are in this process's engine under a user's share: `owner_id`'s, or every
    user's (anonymous ones are not counted). For /v1/debug/stats."""
    running = limits.engine_share.running
    if owner_id is ...:
        return sum(running.values())
    return running.get(owner_id, 0)


async def start(owner_id, begin, release=None):
    """Take a share of the engine for `owner_id` (None: anonymous, no share) and `await begin()`,
    the door's work; returns it as a RunningReply. If the share is refused or beginning fails,
    what was taken is given back and `release()` (the door's hold, e.g. the conversation's lock)
    awaited before the error goes on. On the event loop, like every use of the share."""
    taken = False
    try:
        if owner_id is not None:
            limits.engine_share.take(owner_id)
            taken = True
        work = await begin()
    except BaseException:
        if taken:
            limits.engine_share.give_back(owner_id)
        if release is not None:
            await release()
        raise
    return RunningReply(owner_id, work)


class RunningReply:
    """A reply in the engine under its user's share: iterate for the work's updates.

    It ends once: finished (the updates ran out and the work's `finish()`
    returned), or stopped (cancelled, failed, or closed before finishing:
    the engine job is cancelled and the work's `stopped()` runs, shielded
    from a second cancellation). Either way the share is given back and the
    work's `release()` awaited. `close()` ends it from outside the
    iteration (the consumer, after the client went away).
    """

    def __init__(self, owner_id, work):
        self.owner_id = owner_id
        self.work = work
        self.finished = False
        self._ended = False
        self._iteration = None

    def __aiter__(self):
        self._iteration = self._run()
        return self._iteration

    async def _run(self):
        try:
            async for update in self.work.updates():
                yield update
            await self.work.finish()
            self.finished = True
        finally:
            await self._end()

    def cancel(self):
        """Stop the engine job now (the client went away); `close()` does the rest."""
        self.work.cancel()

    async def close(self):
        """End the reply if it has not ended: the iteration, if one is suspended, is closed (its
        end runs there), else the reply is ended as stopped."""
        if self._iteration is not None:
            await self._iteration.aclose()
        await self._end()

    async def _end(self):
        if self._ended:
            return
        self._ended = True
        # Shielded as a whole, in order: a second cancellation (daphne's close timeout after the
        # client left, the server stopping) must not let go of the lock while what was written is
        # still being kept, or a next change would find the chat free before the reply is stored.
        await asyncio.shield(self._wind_up())

    async def _wind_up(self):
        try:
            if not self.finished:
                self.work.cancel()
                await self.work.stopped()
        finally:
            if self.owner_id is not None:
                limits.engine_share.give_back(self.owner_id)
            await self.work.release()
