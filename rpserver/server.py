"""daphne, as rpserver runs it: an early body limit and a clean stop.

* Twisted (under daphne) receives a whole request body before the app sees
  any of it, and parses form bodies itself (answering a multipart body
  without a boundary with a bare HTTP 400 of its own). Here the body limit
  is applied while receiving: a body declared or found to be over
  RPSERVER_MAX_BODY_BYTES is not kept (its bytes are counted and dropped)
  and answered with the route's code-400 error once it is in; one that goes
  on past 16 times the limit is cut off. Twisted's own form parsing is off:
  the pipeline parses every body (rpserver/pipeline.py).
* SIGTERM/SIGINT: stop accepting connections, let the requests in flight
  finish for up to RPSERVER_SHUTDOWN_GRACE_SECONDS, then cancel the rest
  (a cancelled reply stores nothing and releases its lock), stop the
  engine's thread, free this process's locks, exit 0.
"""

import logging
import signal
import time

from daphne import http_protocol
from daphne import server as daphne_server
from django.conf import settings
from twisted.internet import reactor

from . import pipeline
from .envelope import error_response

logger = logging.getLogger(__name__)

CUT_OFF_FACTOR = 16


class Request(http_protocol.WebRequest):
    """daphne's request, with the body limit applied while the body arrives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, parsePOSTFormSubmission=False, **kwargs)
        self.limit = settings.RPSERVER["MAX_BODY_BYTES"]
        self.received = 0
        self.too_large = False

    def gotLength(self, length):
        if length is not None and length > self.limit:
            self.too_large = True
        super().gotLength(None if self.too_large else length)

    def handleContentChunk(self, data):
        self.received += len(data)
        if self.received > self.limit:
            if not self.too_large:
                self.too_large = True
                self.content.truncate(0)
            if self.received > self.limit * CUT_OFF_FACTOR:
                self.channel.loseConnection()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if not self.too_large:
            return super().requestReceived(command, path, version)
        self.method, self.uri, self.clientproto = command, path, version
        self.path = path.split(b"?", 1)[0]
        route = self.path.decode("latin-1")
        status, content_type, body = error_response(route, pipeline.too_large_message(), 400)
        scope = {"path": route, "headers": self.requestHeaders.getAllRawHeaders()}
        headers = [(b"content-type", content_type)] + pipeline.SECURITY_HEADERS + pipeline.cors_headers(
            {"path": route, "headers": [(name.lower(), value) for name, values in scope["headers"]
                                        for value in values]})
        self.handle_reply({"type": "http.response.start", "status": status, "headers": headers})
        self.handle_reply({"type": "http.response.body", "body": body})


class HTTPFactory(http_protocol.HTTPFactory):
    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        protocol.requestFactory = Request
        return protocol


class Server(daphne_server.Server):
    """daphne's server with rpserver's requests and a clean stop."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, signal_handlers=False, **kwargs)
        self.ports = []
        self.stopping = False

    def run(self):
        # daphne.server.Server.run builds its factory from this module-level name.
        daphne_server.HTTPFactory = HTTPFactory
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: reactor.callFromThread(self.begin_stop))
        super().run()

    def listen_success(self, port):
        self.ports.append(port)
        super().listen_success(port)

    def begin_stop(self):
        """Stop accepting; finish what runs within the grace period; then stop."""
        if self.stopping:  # a second signal: stop now
            self.stop()
            return
        self.stopping = True
        grace = settings.RPSERVER["SHUTDOWN_GRACE_SECONDS"]
        logger.info("stopping: %d requests in flight get up to %s s to finish", pipeline.in_flight, grace)
        for port in self.ports:
            port.stopListening()
        self.wait_for_requests(time.monotonic() + grace)

    def wait_for_requests(self, deadline):
        if pipeline.in_flight == 0 or time.monotonic() >= deadline:
            if pipeline.in_flight:
                logger.info("stopping: cancelling %d requests still running", pipeline.in_flight)
            self.stop()  # daphne cancels what still runs, and waits for it, before the reactor stops
            return
        reactor.callLater(0.1, self.wait_for_requests, deadline)
