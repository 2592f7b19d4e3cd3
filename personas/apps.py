from django.apps import AppConfig


class PersonasConfig(AppConfig):
    name = "personas"
    verbose_name = "Personas"

    def ready(self):
        from characters.models import Character
        from rpserver.files import connect_file_cleanup

        from .models import Persona
        from .services import persona_of_chat

        connect_file_cleanup(Persona)
        Character.chat_readers["persona"] = persona_of_chat
