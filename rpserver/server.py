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
        self.refused = False

    def gotLength(self, length):
        if length is not None and length > self.limit:
            self.too_large = True
            if length > self.limit * CUT_OFF_FACTOR:
                self.refuse_now()
        super().gotLength(None if self.too_large else length)

    def handleContentChunk(self, data):
        self.received += len(data)
        if self.received > self.limit:
            if not self.too_large:
                self.too_large = True
                self.content.truncate(0)
            if self.received > self.limit * CUT_OFF_FACTOR:
                self.refuse_now()
            return
        super().handleContentChunk(data)

    def too_large_answer(self, path):
        """(status, headers, body) of the refusal, in the route's error shape."""
        route = path.split(b"?", 1)[0].decode("latin-1")
        status, content_type, body = error_response(route, pipeline.too_large_message(), 400)
        scope = {"path": route, "headers": [(name.lower(), value) for name, values
                                            in self.requestHeaders.getAllRawHeaders() for value in values]}
        return status, [(b"content-type", content_type)] + pipeline.SECURITY_HEADERS + pipeline.cors_headers(
            scope), body

    def refuse_now(self):
        """Far too much: answer before the body is in, and close the connection."""
        if self.refused:
            return
        self.refused = True
        status, headers, body = self.too_large_answer(getattr(self.channel, "_path", b"/"))
        head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        self.channel.transport.write(b"HTTP/1.1 %d %s\r\n%scontent-length: %d\r\nconnection: close\r\n\r\n%s" % (
            status, b"OK" if status == 200 else b"Bad Request", head, len(body), body))
        self.channel.transport.loseConnection()

    def requestReceived(self, command, path, version):
        if self.refused:
            return
        if not self.too_large:
            return super().requestReceived(command, path, version)
        # Over the limit, but not by far: the body was counted and dropped; answer now that it is in.
        self.method, self.uri, self.clientproto = command, path, version
        self.path = path.split(b"?", 1)[0]
        status, headers, body = self.too_large_answer(path)
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
