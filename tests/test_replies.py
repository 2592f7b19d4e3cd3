"""replies.RunningReply: a reply's end, whichever way it comes, keeps its order (what was written is
kept, then the share given back and the lock let go), however often the task running it is cancelled."""

import asyncio

from replies.services import RunningReply


class Work:
    """A door's work whose reply never ends by itself and whose `stopped()` waits until let through."""

    def __init__(self):
        self.events = []
        self.keep = asyncio.Event()
        self.streaming = asyncio.Event()

    async def updates(self):
        self.streaming.set()
        await asyncio.Event().wait()  # runs until cancelled
        yield "never"

    def cancel(self):
        self.events.append("cancel")

    async def finish(self):
        self.events.append("finish")

    async def stopped(self):
        await self.keep.wait()
        self.events.append("kept")

    async def release(self):
        self.events.append("released")


def test_a_second_cancellation_does_not_let_go_of_the_lock_before_the_stopped_reply_is_kept():
    async def scenario():
        work = Work()
        reply = RunningReply(None, work)

        async def serve():
            async for _ in reply:
                pass

        serving = asyncio.ensure_future(serve())
        await work.streaming.wait()
        serving.cancel()  # the client went away
        while "cancel" not in work.events:  # the end began: stopped() waits to be let through
            await asyncio.sleep(0)
        serving.cancel()  # and again (the server's close timeout)
        for _ in range(100):
            await asyncio.sleep(0)
        assert "released" not in work.events, work.events  # the lock is held while the reply is kept
        work.keep.set()
        for _ in range(100):
            await asyncio.sleep(0)
        return work.events

    assert asyncio.run(scenario()) == ["cancel", "kept", "released"]
