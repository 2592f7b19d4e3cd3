"""The web client: one page at `/` (the app is static ES modules) and its config.

The page is served with a strict Content-Security-Policy: scripts, styles and
connections only from this origin, no inline script, images also from data:
URLs (avatars) and blob: URLs (previews). The client inserts every text from
users and the model as text, so a reply cannot become markup; the policy is
the second wall behind that.
"""

from django.shortcuts import render
from django.views.decorators.http import require_safe
from rest_framework import serializers
from rest_framework.views import APIView

from characters.serializers import CharacterNameSerializer
from rpserver.envelope import envelope, json_response, ok

from . import services

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "font-src 'self'",
    "manifest-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])


def secure(response):
    response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response["Referrer-Policy"] = "no-referrer"
    response["X-Content-Type-Options"] = "nosniff"
    response["Cache-Control"] = "no-cache"
    return response


@require_safe
def index(request):
    return secure(render(request, "web/index.html"))


@require_safe
def config(request):
    """Server facts for the client, in the legacy envelope: {"data": {...}, "code": 200}."""
    return secure(json_response(envelope(services.client_config())))


class GalleryView(APIView):
    """POST /web/characters (token as on the legacy routes): the characters, each with a line about it."""

    def post(self, request):
        return ok({"list": services.gallery(request.user)})


class ChatSerializer(CharacterNameSerializer):
    chat = serializers.IntegerField(required=False, min_value=1)


class ChatView(APIView):
    """POST /web/chat (character_name, optionally chat: a fork's id): the chat, its tree view, and whether
    a reply is being written for it now."""

    def post(self, request):
        form = ChatSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        return ok(services.chat_now(request.user, form.validated_data["character_name"],
                                    form.validated_data.get("chat")))
