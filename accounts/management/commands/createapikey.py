from django.core.management.base import BaseCommand, CommandError

from ...models import User
from ...services import issue_api_key


class Command(BaseCommand):
    help = "Create an API key for a user (Authorization: Bearer <key>, e.g. for the OpenAI-compatible API)."

    def add_arguments(self, parser):
        parser.add_argument("name", help="the user's name")
        parser.add_argument("--label", default="", help="what the key is for, shown in the admin")

    def handle(self, name, label, **options):
        user = User.objects.filter(username=name).first()
        if user is None:
            raise CommandError(f"there is no user {name!r} (create one with createuser)")
        self.stdout.write(issue_api_key(user, label))
