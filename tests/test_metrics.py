"""/metrics: off by default, behind a bearer token, and its numbers move during a reply."""

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import CHARACTER, ENDLESS_MODEL, UNTIL_THE_READER_LEAVES, Api, Server, running_reply, wait_for

TOKEN = "metrics-test-token"


@pytest.fixture(scope="module")
def metered():
    """A server with metrics on, whose replies run until their reader leaves."""
    running = Server(model=ENDLESS_MODEL, env={"RPSERVER_METRICS_TOKEN": TOKEN, **UNTIL_THE_READER_LEAVES},
                     name="metrics-server").start()
    yield running
    running.stop()


def scrape(url, token=TOKEN):
    answer = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape_when(url, condition, what):
    """The first scrape whose samples meet `condition` (polled: see conftest.wait_for)."""
    def met():
        samples = scrape(url)
        return samples if condition(samples) else None

    return wait_for(met, what)


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_do_not_exist_without_the_setting(server):
    answer = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer anything"})
    assert answer.json()["code"] == 404
    assert "rpserver_" not in answer.text


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}", TOKEN])
def test_metrics_refuse_a_missing_or_wrong_token(metered, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    answer = httpx.get(f"{metered.url}/metrics", headers=headers)
    assert answer.json()["code"] == 404
    assert "rpserver_" not in answer.text


def test_the_numbers_move_during_a_reply(metered):
    api = Api(metered.url)
    data = api.ok("/login/tmp")
    guest = Api(metered.url, data["user_name"], data["token"])
    before = scrape(metered.url)
    guest.ok("/characters/save", **CHARACTER)
    guest.chat("Mira")
    assert value(before, "rpserver_locks_held") == 0
    assert value(before, "process_resident_memory_bytes") > 50 * 2**20

    sent = time.monotonic()  # the engine is idle until this reply: every step counted below comes after
    with running_reply(guest, character_name="Mira", prompt="tell me a long story"):
        begun = time.monotonic()  # the reply's first frame has come
        refused = guest.call("/chat/tamper", character_name="Mira", message="not now")
        during = scrape(metered.url)
        steps = value(during, "rpserver_engine_steps_total")
        later = scrape_when(metered.url, lambda later: value(later, "rpserver_engine_steps_total") >= steps + 2,
                            "two more forward passes")
        since_sent = time.monotonic() - sent
    held = time.monotonic() - begun  # the reply ran at least this long: it ends after its reader left
    assert refused["code"] == 400  # the reply holds the conversation's lock

    assert value(during, "rpserver_engine_replies_running") >= 1
    assert value(during, "rpserver_engine_batch_size") >= 1
    assert value(during, "rpserver_locks_held") == 1
    assert value(during, "rpserver_first_token_seconds_count") == value(before, "rpserver_first_token_seconds_count") + 1
    assert value(later, "rpserver_engine_generated_tokens_total") > value(during, "rpserver_engine_generated_tokens_total")
    assert value(during, "rpserver_engine_prompt_tokens_total") > value(before, "rpserver_engine_prompt_tokens_total")
    steps = value(later, "rpserver_engine_steps_total") - value(during, "rpserver_engine_steps_total")
    assert value(later, "rpserver_engine_rows_total") - value(during, "rpserver_engine_rows_total") == steps  # one row each
    in_passes = value(later, "rpserver_engine_pass_seconds_total") - value(during, "rpserver_engine_pass_seconds_total")
    in_steps = value(later, "rpserver_engine_step_seconds_total") - value(during, "rpserver_engine_step_seconds_total")
    # Seconds (not milliseconds): the engine's steps, one after the other, all since the reply was sent.
    assert 0 < in_passes < in_steps < since_sent

    # The client left: the reply is cancelled, its lock freed, its duration and request counted.
    after = scrape_when(metered.url, lambda after: value(after, "rpserver_locks_held") == 0
                        and value(after, "rpserver_engine_replies_running") == 0, "the reply's lock and row let go of")
    assert value(after, "rpserver_locks_held") == 0
    assert value(after, "rpserver_engine_replies_running") == 0
    assert value(after, "rpserver_reply_seconds_count") == value(before, "rpserver_reply_seconds_count") + 1
    assert value(after, "rpserver_reply_seconds_sum") >= value(before, "rpserver_reply_seconds_sum") + held
    assert value(after, "rpserver_requests_total", route="/chat/reply", status="200") == 1
    assert value(after, "rpserver_requests_total", route="/chat/tamper", status="400") == 1
    assert value(after, "rpserver_request_errors_total", route="/chat/tamper") == 1
    assert value(after, "rpserver_requests_total", route="/login/tmp", status="200") >= 1
    assert value(after, "rpserver_request_seconds_count", route="/chat/reply") == 1
    assert value(after, "rpserver_request_seconds_sum", route="/chat/reply") >= held

    # The state cache: Mira's prompt was looked up (a miss, read and kept; or,
    # when an earlier test's server spilled the same prompt's state to the
    # shared store, a hit there) and is in RAM now ...
    looked_up = ("rpserver_state_cache_misses_total", {}), ("rpserver_state_cache_hits_total", {"tier": "store"})
    assert (sum(value(after, name, **labels) for name, labels in looked_up)
            == sum(value(before, name, **labels) for name, labels in looked_up) + 1)
    assert value(after, "rpserver_state_cache_bytes") > value(before, "rpserver_state_cache_bytes")
    # ... and the conversation started over finds it in RAM.
    guest.ok("/chat/reset", character_name="Mira")
    with running_reply(guest, character_name="Mira", prompt="tell me a long story"):
        again = scrape(metered.url)
    assert (value(again, "rpserver_state_cache_hits_total", tier="ram")
            > value(after, "rpserver_state_cache_hits_total", tier="ram"))
