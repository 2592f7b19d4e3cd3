from django.core.management.base import BaseCommand

from ...services import idle_guests, purge_guest


class Command(BaseCommand):
    help = ("Delete guest accounts idle for more than N hours, with their characters, "
            "conversations and stored files (state blobs, avatars).")

    def add_arguments(self, parser):
        parser.add_argument("--idle-hours", type=float, required=True)

    def handle(self, idle_hours, **options):
        removed = 0
        for guest in idle_guests(idle_hours).order_by("pk"):
            characters = guest.characters.count()
            purge_guest(guest)
            removed += 1
            self.stdout.write(f"removed {guest.username} (last seen {guest.last_seen}, {characters} characters)")
        self.stdout.write(f"removed {removed} guest account(s) idle for more than {idle_hours:g} hours")
