from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self):
        from django.db.models.signals import post_delete

        from characters.signals import character_changed

        from .models import Round
        from .services import discard_conversations
        from statecache import store

        from .states import blob_in_use, release_round_blobs

        # A round's blobs may be shared (alternatives, forks): they go once no round points to them.
        post_delete.connect(release_round_blobs, sender=Round, dispatch_uid="files-Round")
        # The state store deletes a state only when no round pins it (nor the shared cache).
        if blob_in_use not in store.pin_holders:
            store.pin_holders.append(blob_in_use)
        character_changed.connect(discard_conversations, dispatch_uid="discard-conversations")
