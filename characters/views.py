from urllib.parse import quote

from django.http import HttpResponse
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.views import APIView

from rpserver.envelope import ok

from . import services
from .avatars import avatar_data_url
from .serializers import (CharacterNameSerializer, ExportCardSerializer, ImportCardSerializer,
                          SaveCharacterSerializer)


def character_data(character):
    return {
        "user": character.user_name,
        "bot": character.name,
        "greeting": character.greeting,
        "bot_persona": character.persona,
        "example_message": character.example_message,
        "use_qa": character.use_qa,
        "avatar": avatar_data_url(character),
    }


def character_name(request):
    form = CharacterNameSerializer(data=request.data)
    form.is_valid(raise_exception=True)
    return form.validated_data["character_name"]


class ListView(APIView):
    def post(self, request):
        characters = request.user.characters.all()
        return ok({"list": [
            {"char_name": c.name, "file_name": c.name, "avatar": avatar_data_url(c)} for c in characters
        ]})


class GetView(APIView):
    def post(self, request):
        return ok(character_data(services.get_character(request.user, character_name(request))))


class SaveView(APIView):
    def post(self, request):
        form = SaveCharacterSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        fields = form.validated_data
        services.save_character(
            request.user,
            name=fields["bot"],
            user_name=fields["user"],
            greeting=fields["greeting"],
            persona=fields["bot_persona"],
            example_message=fields["example_message"],
            use_qa=fields["use_qa"],
            avatar=fields.get("avatar"),
        )
        return ok()


class DeleteView(APIView):
    def post(self, request):
        services.delete_character(request.user, character_name(request))
        return ok()


# ---- /api/v1/: character cards ------------------------------------------------------


class ImportCardView(APIView):
    def post(self, request):
        form = ImportCardSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        character = services.import_card(request.user, form.validated_data["file"],
                                         name=form.validated_data.get("name"))
        return ok({"name": character.name, "spec": character.card_spec})


class FileAnswerNegotiation(BaseContentNegotiation):
    """The export answers a file whatever the request asks: `?format=` names the card's format
    here, not DRF's renderer (which would answer 404 to format=png)."""

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class ExportCardView(APIView):
    content_negotiation_class = FileAnswerNegotiation

    def get(self, request, name):
        form = ExportCardSerializer(data=request.query_params)
        form.is_valid(raise_exception=True)
        body, content_type, file_name = services.export_card(
            request.user, name, form.validated_data["format"], form.validated_data["spec"])
        answer = HttpResponse(body, content_type=content_type)
        answer["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(file_name, safe='')}"
        return answer
