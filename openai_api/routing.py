from django.urls import path, re_path

from .consumers import (ChatCompletionsConsumer, CompletionsConsumer, DebugStatsConsumer, ModelsConsumer,
                        NotFoundConsumer)

http_routes = [
    path("v1/models", ModelsConsumer.as_asgi()),
    path("v1/chat/completions", ChatCompletionsConsumer.as_asgi()),
    path("v1/completions", CompletionsConsumer.as_asgi()),
    path("v1/debug/stats", DebugStatsConsumer.as_asgi()),
    re_path(r"^v1/", NotFoundConsumer.as_asgi()),
]
