from django.urls import path, re_path

from .consumers import (ChatCompletionsConsumer, CompletionsConsumer, DebugStatsConsumer, DetokenizeConsumer,
                        ModelsConsumer, NotFoundConsumer, TokenizeConsumer)

http_routes = [
    path("v1/models", ModelsConsumer.as_asgi()),
    path("v1/chat/completions", ChatCompletionsConsumer.as_asgi()),
    path("v1/completions", CompletionsConsumer.as_asgi()),
    path("v1/debug/stats", DebugStatsConsumer.as_asgi()),
    # llama-server and vLLM answer these at the root; some clients look for them under /v1/.
    path("tokenize", TokenizeConsumer.as_asgi()),
    path("detokenize", DetokenizeConsumer.as_asgi()),
    path("v1/tokenize", TokenizeConsumer.as_asgi()),
    path("v1/detokenize", DetokenizeConsumer.as_asgi()),
    re_path(r"^v1/", NotFoundConsumer.as_asgi()),
]
