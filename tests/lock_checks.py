"""A dead process's locks, checked by its own bound rather than by a stopwatch.

A process proves it lives by heartbeats; each writes when the process would count as dead (its
beat's time plus its RPSERVER_LOCK_DEAD_AFTER_SECONDS). Its last beat came before it was killed,
so it counts as dead at most its dead-after past the kill. The rule a test holds the server to,
without timing anything: a request that asks after that bound is served; one that asks before it
may be refused (BUSY). A loaded machine makes the wait longer, never the assertion false.
"""

import time
from datetime import timedelta

from django.utils import timezone


def served_once_its_holder_is_past_its_bound(take, killed, dead_after):
    """After the process holding the lock that `take()` needs was killed (`killed`: timezone.now() taken
    after the kill; `dead_after`: its RPSERVER_LOCK_DEAD_AFTER_SECONDS): `take()` -> True when served,
    False when answered BUSY. Returns the seconds from the kill until served."""
    bound = killed + timedelta(seconds=dead_after)
    while True:
        asked = timezone.now()
        if take():
            return (timezone.now() - killed).total_seconds()
        assert asked <= bound, f"refused {(asked - bound).total_seconds():.2f} s past the dead process's bound"
        time.sleep(min(0.25, max(0.0, (bound - timezone.now()).total_seconds()) + 0.01))
