from django.apps import AppConfig


class LoreConfig(AppConfig):
    name = "lore"
    verbose_name = "Lore (world info)"

    def ready(self):
        from characters.models import Character

        from .services import active_lorebooks

        Character.chat_readers["lorebooks"] = lambda character: active_lorebooks(character.owner_id)
