from django.apps import AppConfig


class PersonasConfig(AppConfig):
    name = "personas"
    verbose_name = "Personas"

    def ready(self):
        from rpserver.files import connect_file_cleanup

        from .models import Persona

        connect_file_cleanup(Persona)
