import datetime

from django.core.files.storage import default_storage
from django.core.management.base import BaseCommand, CommandError

from rpserver.orphans import find_orphans, remove_orphans


class Command(BaseCommand):
    help = ("Delete stored files (state blobs, avatars) that no row references, left behind by a crash. "
            "Only files older than --grace-minutes are considered; a referenced file is never touched.")

    def add_arguments(self, parser):
        parser.add_argument("--grace-minutes", type=float, default=60,
                            help="leave files younger than this alone (they may be being written now); default 60")
        parser.add_argument("--dry-run", action="store_true", help="list the orphans, delete nothing")

    def handle(self, grace_minutes, dry_run, **options):
        if grace_minutes < 0:
            raise CommandError("--grace-minutes must be 0 or more")
        orphans = find_orphans(default_storage, datetime.timedelta(minutes=grace_minutes))
        if dry_run:
            removed = [(name, default_storage.size(name)) for name in orphans]
        else:
            removed = remove_orphans(default_storage, orphans)
        verb = "would remove" if dry_run else "removed"
        for name, size in removed:
            self.stdout.write(f"{verb} {name} ({size} bytes)")
        total = sum(size for _, size in removed)
        self.stdout.write(f"{verb} {len(removed)} orphan file(s), {total} bytes, older than {grace_minutes:g} minutes")
