"""The streaming routes (/chat/reply, /chat/resay): Server-Sent Events over Channels.

Each frame is "\\n\\ndata: " + the whole reply so far, flushed as soon as a
token arrives. Errors before the stream starts are ordinary envelopes.
A client that disconnects cancels its reply in the engine.
"""

from channels.db import database_sync_to_async

from accounts.auth import authenticate_legacy
from rpserver.envelope import validation_message
from rpserver.errors import ApiError
from rpserver.pipeline import note_caller
from rpserver.streams import ApiConsumer

from . import services
from .serializers import ReplySerializer, SamplingFieldsSerializer, SamplingSerializer, TreeReplySerializer, \
    TreeSwipeSerializer


def frame(text):
    return ("\n\ndata: " + text).encode("utf-8")


async def reply_frames(reply):
    """The frames of a running reply (replies.RunningReply): its text each time it changes, and
    once more at the end."""
    sent = None
    async for text in reply:
        if text != sent:
            yield frame(text)
            sent = text
    if reply.work.text != sent:
        yield frame(reply.work.text)


class StreamConsumer(ApiConsumer):
    serializer_class = SamplingSerializer

    async def respond(self, fields):
        user = await database_sync_to_async(authenticate_legacy)(self.header(b"authorization"), fields)
        note_caller(self.scope, user)
        form = self.serializer_class(data=fields)
        if not form.is_valid():
            raise ApiError(validation_message(form.errors))
        reply = await self.start(user, form)
        await self.stream(reply_frames(reply), reply)


class ReplyConsumer(StreamConsumer):
    serializer_class = ReplySerializer

    async def start(self, user, form):
        fields = form.validated_data
        return await services.start_reply(user, fields["character_name"], fields["prompt"], form.sampling)


class ResayConsumer(StreamConsumer):
    async def start(self, user, form):
        return await services.start_resay(user, form.validated_data["character_name"], form.sampling)


# ---- the REST API's streams: /api/v1/chats/<id>/reply, swipe, continue, impersonate ----
# The same frames; when the client goes away (Stop), what was written is kept as the reply.


class ChatStreamConsumer(StreamConsumer):
    @property
    def chat_id(self):
        return self.scope["url_route"]["kwargs"]["chat_id"]


class ChatReplyConsumer(ChatStreamConsumer):
    serializer_class = TreeReplySerializer

    async def start(self, user, form):
        return await services.reply(user, self.chat_id, form.validated_data["prompt"], form.sampling)


class SwipeConsumer(ChatStreamConsumer):
    """A new alternative of a round's reply; ContinueConsumer: that reply, continued."""

    serializer_class = TreeSwipeSerializer
    continue_reply = False

    async def start(self, user, form):
        return await services.swipe(user, self.chat_id, form.validated_data["round"], form.sampling,
                                    continue_reply=self.continue_reply)


class ContinueConsumer(SwipeConsumer):
    continue_reply = True


class ImpersonateConsumer(ChatStreamConsumer):
    serializer_class = SamplingFieldsSerializer

    async def start(self, user, form):
        return await services.impersonate(user, self.chat_id, form.sampling)
