from django.urls import path

from .consumers import ChatReplyConsumer, ContinueConsumer, ImpersonateConsumer, ReplyConsumer, ResayConsumer, \
    SwipeConsumer

http_routes = [
    path("chat/reply", ReplyConsumer.as_asgi()),
    path("chat/resay", ResayConsumer.as_asgi()),
    path("api/v1/chats/<int:chat_id>/reply", ChatReplyConsumer.as_asgi()),
    path("api/v1/chats/<int:chat_id>/swipe", SwipeConsumer.as_asgi()),
    path("api/v1/chats/<int:chat_id>/continue", ContinueConsumer.as_asgi()),
    path("api/v1/chats/<int:chat_id>/impersonate", ImpersonateConsumer.as_asgi()),
]
