import getpass
import sys

from django.contrib.auth import password_validation
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from rpserver.errors import ApiError

from ...models import User
from ...services import create_user


class Command(BaseCommand):
    help = ("Create an account that can log in through /login. The password must pass the password "
            "validators (AUTH_PASSWORD_VALIDATORS: at least 8 characters, not common, not all digits, "
            "not like the name). Without --password it is asked for (not echoed).")

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--password", help="the password (beware: visible in the shell's history and ps)")

    def handle(self, name, password, **options):
        if password is None:
            password = self.ask_password()
        try:
            # Every rule the password breaks, one per line (the account is not created).
            password_validation.validate_password(password, User(username=name))
        except ValidationError as exc:
            raise CommandError("the password is refused:\n  " + "\n  ".join(exc.messages))
        try:
            user = create_user(name, password)
        except ApiError as exc:
            raise CommandError(exc.message)
        self.stdout.write(f"created user {user.username}")

    def ask_password(self):
        if not sys.stdin.isatty():
            raise CommandError("give the password with --password, or run the command in a terminal to type it")
        password = getpass.getpass("Password: ")
        if password != getpass.getpass("Password (again): "):
            raise CommandError("the two passwords differ")
        return password
