from urllib.parse import quote

from asgiref.sync import async_to_sync
from django.http import HttpResponse
from rest_framework.views import APIView

from characters.serializers import CharacterNameSerializer
from characters.views import FileAnswerNegotiation, character_name
from rpserver.envelope import ok

from . import services, transfer
from .serializers import BackSerializer, EditSerializer, ImportChatSerializer, RoundSerializer, TamperSerializer


def validated(serializer_class, request):
    form = serializer_class(data=request.data)
    form.is_valid(raise_exception=True)
    return form.validated_data


class LoadView(APIView):
    def post(self, request):
        return ok({"chat": services.load_chat(request.user, character_name(request))})


class ResetView(APIView):
    def post(self, request):
        return ok({"chat": async_to_sync(services.reset)(request.user, character_name(request))})


class BackView(APIView):
    def post(self, request):
        fields = validated(BackSerializer, request)
        async_to_sync(services.back)(request.user, fields["character_name"], fields["log_index"])
        return ok()


class TamperView(APIView):
    def post(self, request):
        fields = validated(TamperSerializer, request)
        async_to_sync(services.tamper)(request.user, fields["character_name"], fields["message"])
        return ok()


class TokenView(APIView):
    def post(self, request):
        count, text = services.context(request.user, character_name(request))
        return ok({"token_count": count, "token_state": text})


# ---- the REST API: /api/v1/chats/... (docs/conversation-tree.md) ----
# Reads are GET, changes POST; the answer is the envelope, at the real HTTP status.


class ChatListView(APIView):
    def get(self, request):
        return ok({"chats": services.chats_of(request.user, character_name_in(request.query_params))})


def character_name_in(params):
    form = CharacterNameSerializer(data={"character_name": params.get("character", "")})
    form.is_valid(raise_exception=True)
    return form.validated_data["character_name"]


class ChatView(APIView):
    def get(self, request, chat_id):
        return ok(services.show_chat(request.user, chat_id))


class ChatContextView(APIView):
    def get(self, request, chat_id):
        count, text = services.reading_context(request.user, chat_id)
        return ok({"token_count": count, "token_state": text})


class SwitchView(APIView):
    def post(self, request, chat_id):
        fields = validated(RoundSerializer, request)
        return ok(async_to_sync(services.switch)(request.user, chat_id, fields["round"]))


class EditView(APIView):
    def post(self, request, chat_id):
        fields = validated(EditSerializer, request)
        return ok(async_to_sync(services.edit)(request.user, chat_id, fields["round"], fields["role"],
                                               fields["text"]))


class DeleteView(APIView):
    def post(self, request, chat_id):
        fields = validated(RoundSerializer, request)
        return ok(async_to_sync(services.delete)(request.user, chat_id, fields["round"]))


class UndoView(APIView):
    def post(self, request, chat_id):
        return ok(async_to_sync(services.undo)(request.user, chat_id))


class ForkView(APIView):
    def post(self, request, chat_id):
        fields = validated(RoundSerializer, request)
        return ok(async_to_sync(services.fork)(request.user, chat_id, fields["round"]))


class DiscardView(APIView):
    def post(self, request, chat_id):
        services.delete_chat(request.user, chat_id)
        return ok()


# ---- chats in and out (docs/import-export.md) ----


def attachment(body, content_type, file_name):
    answer = HttpResponse(body, content_type=content_type)
    answer["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(file_name, safe='')}"
    return answer


class ExportChatView(APIView):
    content_negotiation_class = FileAnswerNegotiation

    def get(self, request, chat_id):
        body, file_name = transfer.export_chat(request.user, chat_id)
        return attachment(body, "application/jsonl; charset=utf-8", file_name)


class ImportChatView(APIView):
    def post(self, request):
        fields = validated(ImportChatSerializer, request)
        return ok(async_to_sync(transfer.import_chat)(request.user, fields["character"], fields["file"]))
