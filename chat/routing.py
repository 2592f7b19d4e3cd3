from django.urls import path

from .consumers import ReplyConsumer, ResayConsumer

http_routes = [
    path("chat/reply", ReplyConsumer.as_asgi()),
    path("chat/resay", ResayConsumer.as_asgi()),
]
