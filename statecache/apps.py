from django.apps import AppConfig


class StateCacheConfig(AppConfig):
    name = "statecache"
    verbose_name = "state cache"

    def ready(self):
        from rpserver.files import connect_file_cleanup

        from .models import StoredState

        connect_file_cleanup(StoredState)
