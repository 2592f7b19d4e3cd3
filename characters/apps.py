from django.apps import AppConfig


class CharactersConfig(AppConfig):
    name = "characters"
    verbose_name = "Characters"

    def ready(self):
        from django.contrib.auth import get_user_model
        from django.db.models.signals import post_save

        from rpserver.files import connect_file_cleanup

        from .models import Character
        from .services import give_default_characters

        connect_file_cleanup(Character)
        post_save.connect(give_default_characters, sender=get_user_model(),
                          dispatch_uid="default-characters")
