"""The reference server's HTTP transport: waitress, with the limits a port open to slow or hostile clients needs.

waitress alone lets anyone starve the server without a token. Its connection limit (100) stops it
accepting when reached, and its idle timeout (`channel_timeout`) counts from the last byte received,
so 100 connections that each send a byte a second are never idle and lock every other client out.
A WSGI-level deadline cannot help: waitress buffers a request completely before the app sees it.
So the deadlines live in the channel (one per connection) and the server's maintenance pass:

- a request (request line, headers and body) must arrive within `request_timeout` of its first
  byte, and a response must be taken by the client within `request_timeout` of being ready;
  a connection idle between requests is closed after `request_timeout` too. Closed means closed:
  a client that sends this slowly is not waiting for an answer.
- at most `max_connections` connections are open. waitress's own limit would stop accepting; here a
  new connection is always accepted and, when that makes one too many, the connection that has
  waited longest for its request, preferring those that never completed one, is closed instead.
  Connections whose request is being answered are never shed. A slow client thus loses its place
  to a healthy one, and a healthy client connects at once however many slow ones are open.
- poll() instead of select(), which fails on file descriptors above 1024.

Errors that waitress answers itself (a malformed request line or header, headers over
`max_request_header_size`, a Content-Length over the body cap, detected from the headers before any
of the body is read) get the server's JSON error contract instead of waitress's plain text. Only
what is not an HTTP answer at all stays outside it: a connection closed for a deadline or shed for
room gets no response.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import socket
import time
from collections.abc import Callable

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask

log = logging.getLogger("ref_server")

# How often (seconds) the deadlines are checked: the most a slow connection outlives its deadline
# by, together with waitress's loop timeout of 1 s. waitress takes an int.
CLEANUP_INTERVAL_SECONDS = 1
# How long a connection is drained after an error answer before it is closed (see GuardedChannel).
LINGER_SECONDS = 2.0
LINGER_READ_BYTES = 1 << 16
# File descriptors the process needs besides the connections: model files, pipes, logs, torch.
SPARE_FILE_DESCRIPTORS = 64


class JSONErrorTask(ErrorTask):
    """waitress's own error answers (400, 413, 431, 500, 501), as `{"error": ...}` JSON.

    The connection is still closed afterwards, as waitress does: after a request it could not
    parse, the next byte on the connection has no known meaning.
    """

    def execute(self):
        error = self.request.error
        server = self.channel.server
        message = f"{error.reason}: {error.body}"
        if error.code == 413:
            # A chunked body has no Content-Length: waitress stopped reading it at the cap.
            message = server.body_too_large_message(self.request.content_length or self.request.body_bytes_received)
        elif error.code == 431:
            message = (f"request line and headers are over the limit of {server.adj.max_request_header_size} bytes; "
                       "send a shorter request")
        body = json.dumps({"error": message}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)
        self.channel.linger_on_close = True
        server.count_error(_ERROR_KINDS.get(error.code, "bad_request"))


_ERROR_KINDS = {413: "too_large", 431: "too_large", 500: "server_error"}


class GuardedChannel(HTTPChannel):
    """One connection; remembers when its current request started and its response became ready."""

    error_task_class = JSONErrorTask
    request_started: float | None = None  # monotonic time of the first byte of the request being received
    response_ready: float = 0.0  # monotonic time the last response was handed to waitress to send
    served = 0  # requests answered on this connection
    # After an error answer, the client may still be sending (the body of a refused 413). Closing with
    # unread bytes makes the kernel send a reset, which can destroy the answer before the client reads
    # it; so the connection is half-closed and drained for at most LINGER_SECONDS first.
    linger_on_close = False
    lingering_until: float | None = None

    def __init__(self, server, sock, addr, adj, map=None):
        super().__init__(server, sock, addr, adj, map)
        self.opened = time.monotonic()

    def received(self, data):
        # On the loop thread, like the maintenance pass that reads these times.
        if data and self.request is None:
            self.request_started = time.monotonic()
        accepted = super().received(data)
        if self.request is None:
            self.request_started = None
        return accepted

    def service(self):
        # On a worker thread. Infinite while answering: the loop thread's maintenance pass may look
        # between waitress popping the request and the time below being set.
        self.response_ready = math.inf
        super().service()
        self.served += 1
        self.response_ready = time.monotonic()

    def handle_close(self):
        if self.linger_on_close and self.lingering_until is None and self.connected:
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                return super().handle_close()
            self.lingering_until = time.monotonic() + LINGER_SECONDS
            self.will_close = self.close_when_flushed = False
            return None
        return super().handle_close()

    def readable(self):
        return True if self.lingering_until is not None else super().readable()

    def writable(self):
        return False if self.lingering_until is not None else super().writable()

    def handle_read(self):
        if self.lingering_until is None:
            return super().handle_read()
        try:
            data = self.recv(LINGER_READ_BYTES)
        except OSError:
            data = b""
        if not data or time.monotonic() > self.lingering_until:
            self.linger_on_close = False
            super().handle_close()
        return None

    def waiting_since(self) -> float:
        """Since when this connection has held a place without being served (its shedding priority)."""
        if self.request_started is not None:
            return self.request_started
        return max(self.opened, self.response_ready)


class GuardedServer(TcpWSGIServer):
    """waitress's TCP server with the request deadline and connection shedding of the module docstring."""

    channel_class = GuardedChannel

    def __init__(self, application, *, max_connections: int, request_timeout: float,
                 body_too_large_message: Callable[[int], str], count_error: Callable[[str], None], **adjustments):
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.body_too_large_message = body_too_large_message
        self.count_error = count_error
        adj = Adjustments(
            # waitress stops accepting at its limit; kept out of reach so that shedding decides instead
            # (the socket map also holds the listener and waitress's trigger pipe).
            connection_limit=max_connections + 16,
            cleanup_interval=CLEANUP_INTERVAL_SECONDS,
            asyncore_use_poll=True,
            **adjustments,
        )
        if len(adj.listen) > 1:
            log.info("%s resolves to %d addresses; listening on the first, %s", adj.host, len(adj.listen),
                     adj.listen[0][3])
        super().__init__(application, adj=adj, sockinfo=adj.listen[0])
        _raise_file_limit(max_connections + SPARE_FILE_DESCRIPTORS)

    def handle_accept(self):
        before = set(self.active_channels)
        super().handle_accept()
        if len(self.active_channels) <= self.max_connections:
            return
        new = [self.active_channels[fd] for fd in set(self.active_channels) - before]
        sheddable = [
            channel for channel in self.active_channels.values()
            if not channel.requests and not channel.will_close and channel not in new
        ]
        if not sheddable:  # every other connection is being answered: turn the new one away
            sheddable = new
        victim = min(sheddable, key=lambda channel: (channel.served > 0, channel.waiting_since()))
        self.count_error("connection_shed")
        victim.linger_on_close = False  # shed for room: no draining
        victim.handle_close()

    def maintenance(self, now):
        # `now` is waitress's wall-clock time; the deadlines use the monotonic clock.
        now = time.monotonic()
        for channel in list(self.active_channels.values()):
            if channel.lingering_until is not None:
                if now > channel.lingering_until:
                    channel.linger_on_close = False
                    channel.handle_close()
                continue
            if channel.requests or channel.will_close:
                continue  # being answered: the app's business, not a slow client's
            if channel.request_started is not None:
                late = now - channel.request_started > self.request_timeout
            elif channel.total_outbufs_len:
                late = now - channel.response_ready > self.request_timeout
            else:
                late = now - max(channel.opened, channel.response_ready) > self.request_timeout
            if late:
                if channel.request_started is not None or channel.total_outbufs_len:
                    self.count_error("request_timeout")
                channel.will_close = True


def _raise_file_limit(needed: int) -> None:
    """Raise the soft limit on open files to `needed` where the hard limit allows; warn where it does not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        log.warning("open-file limit %d is below max_connections + %d = %d; lower --max_connections or raise "
                    "`ulimit -n`", target, SPARE_FILE_DESCRIPTORS, needed)


def create_http_server(server_app, config) -> GuardedServer:
    """The waitress server for a `ReferenceServerApp` under a `ServerConfig`'s limits (not yet running)."""
    return GuardedServer(
        server_app.app,
        max_connections=config.max_connections,
        request_timeout=config.request_timeout_seconds,
        body_too_large_message=server_app.body_too_large_message,
        count_error=server_app.count_error,
        host=config.host,
        port=config.port,
        threads=config.threads,
        # waitress answers a Content-Length >= this itself (through JSONErrorTask) without reading the body.
        max_request_body_size=config.max_body_bytes + 1,
        clear_untrusted_proxy_headers=True,
    )
