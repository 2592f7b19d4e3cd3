"""purge_guests: idle guests go, with every stored file of theirs."""

import io
from datetime import timedelta
from pathlib import Path

from django.core.management import call_command
from django.utils import timezone

from accounts.models import User
from test_characters import PNG_URL, a_prompt_of_its_own, stored_files


def idle_for(api, hours):
    User.objects.filter(username=api.user_name).update(last_seen=timezone.now() - timedelta(hours=hours))


def test_it_removes_idle_guests_and_their_files(api, mira, alice):
    recent = api.ok("/login/tmp")["user_name"]
    mira.ok("/characters/save", bot="Mira", user="you", greeting="Hi", bot_persona="P", avatar=PNG_URL)
    mira.reply("Mira", a_prompt_of_its_own())
    files = stored_files(mira.user_name)
    assert len(files) >= 3 and all(f.exists() for f in files)
    idle_for(mira, 48)
    User.objects.filter(username=recent).update(last_seen=timezone.now() - timedelta(hours=1))
    idle_for(alice, 48)
    out = io.StringIO()
    call_command("purge_guests", "--idle-hours", "24", stdout=out)
    assert f"removed {mira.user_name}" in out.getvalue()
    assert not User.objects.filter(username=mira.user_name).exists()
    assert not any(Path(f).exists() for f in files)
    assert mira.call("/characters/list")["code"] == 403
    assert User.objects.filter(username=recent).exists()  # not idle long enough
    assert User.objects.filter(username=alice.user_name).exists()  # not a guest
