"""The benchmarks' API client: the legacy API over HTTP, streams timed frame by frame."""

import asyncio
import time

from script import BenchError


def check_envelope(route, response):
    if response.status_code != 200:
        raise BenchError(f"{route}: HTTP {response.status_code}: {response.text[:300]}")
    try:
        body = response.json()
    except ValueError:
        raise BenchError(f"{route}: not JSON: {response.text[:300]}")
    if body.get("code") != 200:
        raise BenchError(f"{route}: code {body.get('code')}: {body.get('message')}")
    return body.get("data")


class StreamResult:
    def __init__(self):
        self.started = 0.0  # monotonic time the request was sent
        self.first_frame = None  # seconds from sending to the first frame
        self.total = None  # seconds from sending to the end of the stream
        self.frames = 0
        self.text = ""


class Client:
    """One simulated person: a guest account and its own HTTP connection."""

    def __init__(self, base_url, timeout=600.0):
        import httpx
        self.http = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout, connect=30.0))
        self.user_name = None
        self.token = None

    async def close(self):
        await self.http.aclose()

    def _auth(self, fields):
        data = dict(fields)
        if self.token is not None:
            data.update(user_name=self.user_name, token=self.token)
        return data

    async def call(self, route, **fields):
        response = await self.http.post(route, data=self._auth(fields))
        return check_envelope(route, response)

    async def login_guest(self):
        data = await self.call("/login/tmp")
        self.user_name, self.token = data["user_name"], data["token"]
        return data

    async def save_character(self, bot, user, greeting, persona, example_message=""):
        return await self.call("/characters/save", bot=bot, user=user, greeting=greeting,
                               bot_persona=persona, example_message=example_message)

    async def load(self, name):
        return (await self.call("/characters/load", character_name=name))["chat"]

    async def token_count(self, name):
        return (await self.call("/debug/token", character_name=name))["token_count"]

    async def back(self, name, log_index):
        return await self.call("/chat/back", character_name=name, log_index=log_index)

    async def reply(self, name, prompt, route="/chat/reply"):
        """Stream a reply to the end; time the first frame and the whole stream."""
        result = StreamResult()
        result.started = time.monotonic()
        async with self.http.stream("POST", route, data=self._auth(
                {"character_name": name, "prompt": prompt})) as response:
            content_type = response.headers.get("content-type", "")
            if response.status_code != 200 or not content_type.startswith("text/event-stream"):
                await response.aread()
                check_envelope(route, response)  # raises with the server's message
                raise BenchError(f"{route}: expected an event stream, got {content_type!r}")
            buffer = ""
            async for chunk in response.aiter_text():
                if result.first_frame is None and chunk:
                    result.first_frame = time.monotonic() - result.started
                buffer += chunk
            result.total = time.monotonic() - result.started
        pieces = buffer.split("\n\ndata:")
        result.frames = len(pieces) - 1
        if result.frames < 1:
            raise BenchError(f"{route}: the stream had no frames: {buffer[:200]!r}")
        result.text = pieces[-1].strip()
        return result


async def gather_strict(*aws):
    """asyncio.gather that cancels the rest as soon as one fails."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
