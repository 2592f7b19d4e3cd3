from django.core.management.base import BaseCommand, CommandError

from rpserver.envelope import ApiError

from ...services import create_user


class Command(BaseCommand):
    help = "Create an account that can log in through /login."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--password", required=True)

    def handle(self, name, password, **options):
        try:
            user = create_user(name, password)
        except ApiError as exc:
            raise CommandError(exc.message)
        self.stdout.write(f"created user {user.username}")
