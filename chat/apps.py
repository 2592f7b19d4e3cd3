from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self):
        from rpserver.files import connect_file_cleanup

        from .models import PromptState, Round

        connect_file_cleanup(Round, PromptState)
