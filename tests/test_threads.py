"""The engine's thread policy on a shared machine: the cores other processes keep busy are left to them."""

import subprocess
import sys
import threading

import pytest

from inference.threads import CpuShare, ThreadPolicy

BUSY_LOOP = "print('ready', flush=True)\nwhile True: pass"


@pytest.fixture
def busy_core():
    """A process keeping one core busy (the issue's `python3 -c 'while True: pass'`), once it runs."""
    process = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "ready\n"
        yield process
    finally:
        process.kill()
        process.wait()


def test_a_busy_process_beside_the_engine_leaves_it_one_thread(busy_core):
    # Over a window in which a busy loop ran, the others' share is at least half a core whatever
    # else runs (alone it is one core; among more runnable threads than cores the rest is others'
    # too), so a policy that wants both cores of a 2-core machine runs on one.
    share = CpuShare(interval=0)
    share.update()
    threading.Event().wait(0.3)  # the measured window, not a synchronisation
    assert share.update() >= 0.5
    policy = ThreadPolicy(decode=2, wide=2, share=share, cores=2)
    share.interval = 3600  # keep the measurement just made
    assert policy.threads_for(prompt_tokens=1) == 1
    assert policy.threads_for(prompt_tokens=1000) == 1


def test_the_policy_follows_the_measured_share_and_never_goes_below_one_thread():
    share = CpuShare(interval=3600)
    policy = ThreadPolicy(decode=4, wide=8, share=share, cores=8)
    share.update()  # the first measurement only starts the window: nothing is taken away yet
    for others, decode, wide in [(0.0, 4, 8), (0.4, 4, 8), (0.6, 4, 7), (3.0, 4, 5), (7.6, 1, 1), (12.0, 1, 1)]:
        share.others = others
        assert (policy.threads_for(1), policy.threads_for(64)) == (decode, wide), others
    fixed = ThreadPolicy.for_machine(decode=2, wide=2, adapt=False)
    assert fixed.share is None and fixed.threads_for(1) == 2
