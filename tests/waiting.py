"""Waiting for events, never for time: how a test knows that what it waits for has happened.

A test may not assume that anything happens within some time (a reply still runs, a lock is
already free, two requests overlap): CI shares its cores with other work. It waits for the event
itself: an answer, a frame of a stream, a thread's end, or, where nothing can tell it, a condition
polled with a deadline far beyond any wait on a loaded machine (wait_for).
"""

import threading
import time


def wait_for(condition, what, seconds=120, every=0.05):
    """condition()'s first true value, polled every `every` s: for a test that waits for an event it
    cannot be told of. Fails after `seconds` (far beyond any wait on a loaded machine), saying `what`
    it waited for."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(every)
    return value


def at_once(work, arguments):
    """work(*args) for each tuple in `arguments`, each in its own thread, all started before any is
    waited for; their results in order. An exception in one is raised here once all have ended.
    (At once means started together: that their requests overlap is not assumed; a test that needs
    them to overlap holds one open until the others have answered.)"""
    results, errors = [None] * len(arguments), []

    def run(i, args):
        try:
            results[i] = work(*args)
        except BaseException as exc:  # raised in the test's thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, args)) for i, args in enumerate(arguments)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
