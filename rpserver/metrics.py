"""/metrics: what an operator watches, in Prometheus' text format.

Off unless RPSERVER_METRICS_TOKEN is set; then GET /metrics answers only a
request that sends `Authorization: Bearer <that token>` (anything else gets
404, so the route does not exist for the public API). Each server process
answers for itself: scrape every process, not the load balancer.

Where the numbers come from:
- requests and errors by route, first-token latency, reply duration: the
  ASGI middleware `MetricsMiddleware` (rpserver/asgi.py puts it around every
  route), through the plain functions `observe_request`, `observe_first_token`
  and `observe_reply`, which another layer may call instead;
- the engine's batch, queue and token counters: read from
  `Engine.stats()` at scrape time (a custom collector, so nothing in the
  engine's loop pays for metrics);
- locks held: counted in the database at scrape time;
- the state cache's size and hits: its `stats()` at scrape time;
- resident memory (RSS), CPU time, open files: prometheus-client's process
  collector.
"""

import hmac
import re
import time
from functools import lru_cache

from django.apps import apps
from django.conf import settings
from django.http import HttpResponse
from django.urls import Resolver404, resolve
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from rpserver.envelope import not_found

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes and friends

REQUESTS = Counter("rpserver_requests", "Requests answered, by route and status (the envelope's code "
                   "where the answer is one, else the HTTP status).", ["route", "status"], registry=REGISTRY)
ERRORS = Counter("rpserver_request_errors", "Requests answered with an error (status 400 or more), by route.",
                 ["route"], registry=REGISTRY)
FIRST_TOKEN = Histogram("rpserver_first_token_seconds", "From a streaming request's arrival to its first frame.",
                        buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60), registry=REGISTRY)
DURATION = Histogram("rpserver_request_seconds", "From a request's arrival to the end of its answer, by route.",
                     ["route"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
                     registry=REGISTRY)
REPLY = Histogram("rpserver_reply_seconds", "From a streaming request's arrival to its last frame.",
                  buckets=(0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 120, 300), registry=REGISTRY)


def enabled():
    return bool(settings.RPSERVER.get("METRICS_TOKEN"))


def observe_request(route, status, seconds):
    """Count one answered request and how long it took."""
    REQUESTS.labels(route, str(status)).inc()
    DURATION.labels(route).observe(seconds)
    if int(status) >= 400:
        ERRORS.labels(route).inc()


def observe_first_token(seconds):
    FIRST_TOKEN.observe(seconds)


def observe_reply(seconds):
    REPLY.observe(seconds)


class EngineCollector:
    """The engine's numbers, read when Prometheus scrapes."""

    def collect(self):
        from inference.runtime import get_engine

        stats = get_engine().stats()
        gauges = {
            "running": ("rpserver_engine_replies_running", "Jobs (replies and prompt reads) in the engine's batch."),
            "waiting": ("rpserver_engine_replies_waiting", "Jobs waiting for a row in the batch."),
            "last_batch_size": ("rpserver_engine_batch_size", "Rows in the engine's latest forward pass."),
            "max_batch": ("rpserver_engine_max_batch", "The most rows one pass takes (RPSERVER_MAX_BATCH)."),
        }
        counters = {
            "steps": ("rpserver_engine_steps", "Forward passes run."),
            "tokens_read": ("rpserver_engine_prompt_tokens", "Prompt tokens read (rate(): prompt tokens/s)."),
            "tokens_generated": ("rpserver_engine_generated_tokens", "Tokens generated (rate(): tokens/s)."),
            "rows": ("rpserver_engine_rows", "Rows of all forward passes (per step: the average batch)."),
            "pass_seconds": ("rpserver_engine_pass_seconds", "Time in forward passes (rate(): the share of time)."),
            "step_seconds": ("rpserver_engine_step_seconds",
                             "Time in engine steps: the pass, sampling, emitting text, finishing replies."),
        }
        for key, (name, help_text) in gauges.items():
            if key in stats:
                yield GaugeMetricFamily(name, help_text, value=stats[key])
        for key, (name, help_text) in counters.items():
            if key in stats:
                yield CounterMetricFamily(name, help_text, value=stats[key])


class LockCollector:
    """Locks held now, counted in the database (the same figure from every process)."""

    def collect(self):
        from locks.services import held_count

        held = held_count()
        yield GaugeMetricFamily("rpserver_locks_held", "Locks held now (one per conversation being changed).",
                                value=held)


class StateCacheCollector:
    """The process's state cache (RNN states at turn boundaries): size and hits."""

    def collect(self):
        if not apps.is_installed("statecache"):
            return
        from statecache.services import state_cache

        stats = state_cache().stats()
        yield GaugeMetricFamily("rpserver_state_cache_bytes", "Bytes of states held in RAM.", value=stats["bytes"])
        yield GaugeMetricFamily("rpserver_state_cache_budget_bytes", "The RAM budget (RPSERVER_STATE_CACHE_MB).",
                                value=stats["budget_bytes"])
        yield GaugeMetricFamily("rpserver_state_cache_entries", "States held in RAM.", value=stats["entries"])
        hits = CounterMetricFamily("rpserver_state_cache_hits", "Lookups answered, by where the state was.",
                                   labels=["tier"])
        hits.add_metric(["ram"], stats.get("ram_hits", 0))
        hits.add_metric(["store"], stats.get("disk_hits", 0))
        yield hits
        for key, help_text in (("misses", "Lookups that found nothing."),
                               ("stored", "States put in the cache."),
                               ("evicted", "States pushed out of RAM (least recently used)."),
                               ("spilled", "States written to the state store on their way out.")):
            yield CounterMetricFamily(f"rpserver_state_cache_{key}", help_text, value=stats.get(key, 0))


REGISTRY.register(EngineCollector())
REGISTRY.register(LockCollector())
REGISTRY.register(StateCacheCollector())


def metrics_view(request):
    """GET /metrics with the bearer token; 404 when metrics are off or the token is wrong."""
    token = settings.RPSERVER.get("METRICS_TOKEN") or ""
    sent = request.headers.get("Authorization", "")
    if not token or not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        return not_found(request)  # the same answer as any unknown route
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


# ---- the ASGI middleware ----------------------------------------------------

ENVELOPE_CODE = re.compile(rb'"code":\s*(\d{3})\}\s*$')


@lru_cache(maxsize=512)
def route_of(path, stream_routes=()):
    """A route label of bounded cardinality: the URL pattern, not the path."""
    try:
        return "/" + resolve(path).route
    except Resolver404:
        pass
    relative = path.lstrip("/")
    for pattern in stream_routes:
        if pattern.resolve(relative):
            return "/" + str(pattern.pattern)
    return "unmatched"


class MetricsMiddleware:
    """Times and counts every HTTP request; event streams also give first-token and reply times.

    The status counted is the envelope's `code` when the answer is a JSON
    envelope (the legacy API answers errors with HTTP 200 and code 400),
    else the HTTP status.
    """

    def __init__(self, app, stream_routes=()):
        self.app = app
        self.stream_routes = tuple(stream_routes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        seen = {"status": 500, "stream": False, "json": False, "first": False, "code": None}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                headers = {name.lower(): value for name, value in message.get("headers", [])}  # Django capitalises
                content_type = headers.get(b"content-type", b"").lower()
                seen["stream"] = content_type.startswith(b"text/event-stream")
                seen["json"] = content_type.startswith(b"application/json")
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if seen["stream"] and body and not seen["first"]:
                    seen["first"] = True
                    observe_first_token(time.monotonic() - started)
                if seen["json"] and body:
                    found = ENVELOPE_CODE.search(body[-32:])
                    seen["code"] = int(found.group(1)) if found else None
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            seconds = time.monotonic() - started
            if seen["stream"] and seen["first"]:
                observe_reply(seconds)
            status = seen["code"] if seen["code"] is not None else seen["status"]
            observe_request(route_of(scope["path"], self.stream_routes), status, seconds)
