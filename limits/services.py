"""Abuse limits: request rates, log-in backoff, and replies in the engine per user.

Rates and backoffs live in the database (limits.models.Counter) so that
several server processes on one database share them; each check is one
short transaction. The cap on a user's replies in the engine is about one
process's batch, so it is counted in that process.

Every refusal is ApiError(code 429) with a message that says when to come back.
"""

import math
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from rpserver.errors import ApiError

from .models import Counter

RATE_LIMITED = 429


def config(name):
    return settings.RPSERVER["LIMITS"][name]


def wait_message(what, seconds):
    return f"{what}: please try again in {max(1, math.ceil(seconds))} s"


def locked_counter(key, window, now):
    """The key's counter, row-locked, in a fresh window if the last one ended.
    Call inside a transaction."""
    counter = Counter.objects.select_for_update().filter(key=key).first()
    if counter is None:
        try:
            with transaction.atomic():  # two first hits at once: one creates, the other re-reads
                counter = Counter.objects.create(key=key, window_end=now + window)
        except IntegrityError:
            counter = Counter.objects.select_for_update().get(key=key)
    if counter.window_end <= now:
        counter.count, counter.window_end, counter.blocked_until = 0, now + window, None
    return counter


def hit(key, limit, window_seconds, what):
    """Count one request for `key`; ApiError(429) when it is past `limit` in its window."""
    if limit <= 0:  # 0 turns the limit off
        return
    now = timezone.now()
    with transaction.atomic():
        counter = locked_counter(key, timedelta(seconds=window_seconds), now)
        counter.count += 1
        counter.save()
    if counter.count > limit:
        raise ApiError(wait_message(what, (counter.window_end - now).total_seconds()), code=RATE_LIMITED)


# ---- log-in backoff -------------------------------------------------------------


def login_keys(user_name, address):
    """The backoffs a log-in attempt counts against: (key, free failures) per account and per address."""
    return [(f"login:user:{user_name.lower()}", config("LOGIN_FREE_FAILURES_PER_ACCOUNT")),
            (f"login:addr:{address}", config("LOGIN_FREE_FAILURES_PER_ADDRESS"))]


def check_login_allowed(user_name, address):
    """ApiError(429) while the account or the address is in a backoff.

    Checked before the password is hashed, so a flood of guesses costs no CPU.
    """
    now = timezone.now()
    for counter in Counter.objects.filter(key__in=[key for key, _ in login_keys(user_name, address)],
                                          blocked_until__gt=now):
        raise ApiError(wait_message("too many failed log-ins", (counter.blocked_until - now).total_seconds()),
                       code=RATE_LIMITED)


def login_failed(user_name, address):
    """Count a failed log-in: past the free failures, each one blocks for twice as long
    as the last (from LOGIN_BACKOFF_SECONDS up to LOGIN_BACKOFF_MAX_SECONDS)."""
    now = timezone.now()
    window = timedelta(seconds=config("LOGIN_FAILURE_WINDOW_SECONDS"))
    for key, free in login_keys(user_name, address):
        with transaction.atomic():
            counter = locked_counter(key, window, now)
            counter.count += 1
            if counter.count > free:
                seconds = min(config("LOGIN_BACKOFF_MAX_SECONDS"),
                              config("LOGIN_BACKOFF_SECONDS") * 2 ** min(30, counter.count - free - 1))
                counter.blocked_until = now + timedelta(seconds=seconds)
                counter.window_end = max(counter.window_end, counter.blocked_until)
            counter.save()


def login_succeeded(user_name):
    """A right password clears the account's failures (the address's stay)."""
    Counter.objects.filter(key=login_keys(user_name, "")[0][0]).delete()


# ---- request rates ------------------------------------------------------------------


def check_guest_rate(address):
    hit(f"guest:{address}", config("GUESTS_PER_HOUR_PER_ADDRESS"), 3600, "too many guest accounts from this address")


def check_signup_rate(address):
    hit(f"signup:{address}", config("SIGNUPS_PER_HOUR_PER_ADDRESS"), 3600, "too many sign-ups from this address")


def check_reply_rate(user):
    hit(f"reply:{user.pk}", config("REPLIES_PER_MINUTE"), 60, "too many replies in a minute")


def prune_counters():
    """Drop finished windows and backoffs (run by purge_guests)."""
    now = timezone.now()
    return Counter.objects.filter(window_end__lte=now).exclude(blocked_until__gt=now).delete()[0]


# ---- replies in the engine -------------------------------------------------------------


class EngineShare:
    """How many replies each user has in this process's engine; at most
    MAX_REPLIES_PER_USER at once, so that one account with many characters
    cannot take the whole batch. Used from the event loop only."""

    def __init__(self):
        self.running = {}

    def check(self, user_id):
        """ApiError(429) if the user has no room for another reply (takes nothing; a
        read, safe from any thread)."""
        limit = config("MAX_REPLIES_PER_USER")
        if limit and self.running.get(user_id, 0) >= limit:
            raise ApiError(f"you already have {limit} replies being generated: "
                           "please wait for one to finish", code=RATE_LIMITED)

    def take(self, user_id):
        self.check(user_id)
        self.running[user_id] = self.running.get(user_id, 0) + 1

    def give_back(self, user_id):
        left = self.running.get(user_id, 0) - 1
        if left > 0:
            self.running[user_id] = left
        else:
            self.running.pop(user_id, None)


engine_share = EngineShare()
