from rest_framework.views import APIView

from characters.avatars import avatar_data_url
from characters.services import get_character
from rpserver.envelope import ok

from . import services
from .serializers import ChoosePersonaSerializer, PersonaSerializer


def persona_data(persona):
    return {"id": persona.pk, "name": persona.name, "description": persona.description,
            "avatar": avatar_data_url(persona), "default": persona.is_default}


class PersonasView(APIView):
    """GET: the person's personas. POST: a new one."""

    def get(self, request):
        return ok({"personas": [persona_data(p) for p in services.list_personas(request.user)]})

    def post(self, request):
        form = PersonaSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        fields = form.validated_data
        persona = services.save_persona(request.user, fields["name"], fields["description"],
                                        avatar=fields.get("avatar"), is_default=fields.get("default"))
        return ok(persona_data(persona))


class PersonaView(APIView):
    """POST: change a persona (the fields sent; the others stay)."""

    def post(self, request, persona_id):
        persona = services.get_persona(request.user, persona_id)
        form = PersonaSerializer(data={"name": persona.name, "description": persona.description,
                                       **request.data})
        form.is_valid(raise_exception=True)
        fields = form.validated_data
        persona = services.save_persona(request.user, fields["name"], fields["description"],
                                        avatar=fields.get("avatar"), is_default=fields.get("default"),
                                        persona=persona)
        return ok(persona_data(persona))


class DeletePersonaView(APIView):
    def post(self, request, persona_id):
        services.delete_persona(request.user, persona_id)
        return ok()


class ChatPersonaView(APIView):
    """GET: the persona the chat with a character speaks as. POST {"persona": id | null}: choose it."""

    def get(self, request, name):
        return ok(chat_persona_data(get_character(request.user, name)))

    def post(self, request, name):
        form = ChoosePersonaSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        character = services.choose_persona(request.user, name, form.validated_data["persona"])
        return ok(chat_persona_data(character))


def chat_persona_data(character):
    persona = character.chat_persona
    return {"chosen": character.chosen_persona_id, "persona": persona_data(persona) if persona else None}
