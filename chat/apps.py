from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self):
        from characters.signals import character_changed
        from rpserver.files import connect_file_cleanup

        from .models import Round
        from .services import discard_conversations

        connect_file_cleanup(Round)
        character_changed.connect(discard_conversations, dispatch_uid="discard-conversations")
