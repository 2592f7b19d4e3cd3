"""remove_orphan_files: stored files no row references go, referenced and young files stay."""

import datetime
import io
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.management import call_command
from django.test import override_settings

from characters.models import Character
from conftest import ROOT, S3_CREDENTIALS, s3_bucket, wait_for
from rpserver.orphans import find_orphans, referenced_names, remove_orphans, start_sweeping, sweep
from test_characters import PNG_URL

HOURS = 3600


def age(path, seconds):
    """Set a file's modification time `seconds` in the past."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def orphan(name, seconds_old=2 * HOURS):
    """A real file in the media dir that no row references, as a crash leaves one."""
    name = default_storage.save(name, ContentFile(b"left behind by a crash"))
    age(default_storage.path(name), seconds_old)
    return name


def remove_orphan_files(*args):
    out = io.StringIO()
    call_command("remove_orphan_files", *args, stdout=out)
    return out.getvalue()


def test_it_removes_old_orphans_and_nothing_else(mira):
    mira.ok("/characters/save", bot="Mira", user="you", greeting="Hi", bot_persona="P", avatar=PNG_URL)
    mira.reply("Mira", "hello")
    mira.reply("Mira", "and again")
    # Every referenced file (this avatar, these rounds' states, the state cache's
    # blobs, other tests' files), as old as any orphan: only its reference keeps it.
    referenced = [Path(default_storage.path(name)) for name in referenced_names(default_storage)]
    referenced = [path for path in referenced if path.exists()]
    assert len(referenced) >= 4
    for path in referenced:
        age(path, 5 * HOURS)
    owner = Character.objects.get(owner__username=mira.user_name, name="Mira").owner_id
    old_blob = orphan(f"states/{owner}/{uuid.uuid4().hex}.safetensors")
    old_avatar = orphan(f"avatars/{owner}/{uuid.uuid4().hex}.png")
    deep = orphan(f"states/{owner}/nested/{uuid.uuid4().hex}.safetensors")
    young = orphan(f"states/{owner}/{uuid.uuid4().hex}.safetensors", seconds_old=60)  # being written now
    outside = orphan("operator-notes.txt")  # not in a directory rpserver writes to

    listed = remove_orphan_files("--dry-run")
    assert f"would remove {old_blob} (22 bytes)" in listed and default_storage.exists(old_blob)

    out = remove_orphan_files()
    assert f"removed {old_blob} (22 bytes)" in out and f"removed {old_avatar} (22 bytes)" in out
    assert f"removed {deep} (22 bytes)" in out
    for name in (old_blob, old_avatar, deep):
        assert not default_storage.exists(name)
    for name in (young, outside):
        assert default_storage.exists(name)
    assert all(path.exists() for path in referenced)

    assert f"removed {young} (22 bytes)" in remove_orphan_files("--grace-minutes", "0.5")  # old enough now
    assert not default_storage.exists(young) and default_storage.exists(outside)
    assert all(path.exists() for path in referenced)
    default_storage.delete(outside)
    # The conversation goes on from its stored states.
    assert mira.chat("Mira")[-1][0] == "and again"
    mira.reply("Mira", "still here?")
    assert mira.chat("Mira")[-1][0] == "still here?"


def test_a_file_referenced_after_the_listing_is_kept(mira):
    owner = Character.objects.get(owner__username=mira.user_name, name="Mira").owner_id
    name = orphan(f"avatars/{owner}/{uuid.uuid4().hex}.png")
    candidates = find_orphans(default_storage)
    assert name in candidates
    # A row commits a reference to the file while the sweep is between listing and deleting.
    Character.objects.filter(owner_id=owner, name="Mira").update(avatar=name, avatar_type="image/png")
    removed = remove_orphans(default_storage, candidates)
    assert name not in [n for n, _ in removed]
    assert default_storage.exists(name)


def test_the_server_side_sweep_removes_orphans_on_its_own(mira):
    owner = Character.objects.get(owner__username=mira.user_name, name="Mira").owner_id
    name = orphan(f"states/{owner}/{uuid.uuid4().hex}.safetensors")
    start_sweeping(first_after=datetime.timedelta(0))
    wait_for(lambda: not default_storage.exists(name), "the sweep to remove the orphan")


def test_it_works_through_the_storage_api_not_the_disk(mira):
    """Another storage backend (Django's in-memory one) behind the same FileFields: nothing assumes a local disk."""
    with override_settings(STORAGES={"default": {"BACKEND": "django.core.files.storage.InMemoryStorage"}}):
        character = Character.objects.get(owner__username=mira.user_name, name="Mira")
        character.avatar.save("kept.png", ContentFile(b"an avatar"), save=True)
        kept = character.avatar.name
        lost = default_storage.save(f"states/{character.owner_id}/lost.safetensors", ContentFile(b"a blob"))
        assert type(default_storage._wrapped).__name__ == "InMemoryStorage"
        later = datetime.timedelta(seconds=-1)  # a negative grace: files written just now count as old
        removed = sweep(default_storage, grace=later)
        assert removed == [(lost, 6)]
        assert default_storage.exists(kept) and not default_storage.exists(lost)
    Character.objects.filter(pk=character.pk).update(avatar="", avatar_type="")


def test_it_works_on_an_s3_bucket(mira, s3_endpoint):
    """The command against a real S3 API (moto's server): listing, dates, sizes and deletes over HTTP."""
    bucket = s3_bucket(s3_endpoint, "rpserver-orphans")
    try:
        character = Character.objects.get(owner__username=mira.user_name, name="Mira")
        kept = f"avatars/{character.owner_id}/{uuid.uuid4().hex}.png"
        Character.objects.filter(pk=character.pk).update(avatar=kept, avatar_type="image/png")
        lost = f"states/{character.owner_id}/{uuid.uuid4().hex}.safetensors"
        for key in (kept, lost, "backups/operator.tar"):
            bucket.put_object(Key=key, Body=b"bytes in a bucket")

        env = {**os.environ, **S3_CREDENTIALS, "RPSERVER_S3_BUCKET": "rpserver-orphans",
               "RPSERVER_S3_ENDPOINT_URL": s3_endpoint}
        done = subprocess.run([sys.executable, "manage.py", "remove_orphan_files", "--grace-minutes", "0"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"removed {lost} (17 bytes)" in done.stdout
        assert "removed 1 orphan file(s), 17 bytes" in done.stdout
        assert {item.key for item in bucket.objects.all()} == {kept, "backups/operator.tar"}
    finally:
        Character.objects.filter(owner__username=mira.user_name).update(avatar="", avatar_type="")
