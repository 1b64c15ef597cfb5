"""
The gateway's HTTP front door: a ``Site`` speaking HTTP/1.1 only, with the
gateway's limits on the request head and body, JSON for what it refuses, and
an access log that never shows a token.

The site also knows its open client connections, so that a stopping gateway
can tell them to go (``Connection: close`` on every response) and close the
idle ones once its listeners are closed, instead of turning anyone away.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakSet

from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from twisted_gateway.config import Settings
from twisted_gateway.errors import GatewayError
from twisted_gateway.http_proxy import GatewayRequest
from twisted_gateway.logs import access_log_formatter


class GatewayChannel(HTTPChannel):
    """HTTP/1.1 with a configurable head size; refusals carry a JSON body."""

    def lineLengthExceeded(self, line: bytes) -> None:
        self._receivedHeaderSize = self.totalHeadersSize + 1
        self._respondToBadRequestAndDisconnect()

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self._receivedHeaderSize > self.totalHeadersSize:
            error = GatewayError(
                f"the request head is larger than {self.totalHeadersSize} bytes",
                status=431,
                error="header_too_large",
            )
        else:
            error = GatewayError("malformed HTTP request", status=400, error="bad_request")
        self.transport.write(error.raw_response())
        self.loseConnection()

    # -- a stopping gateway (GatewaySite.start_closing) -----------------------

    #: requests this connection has answered: 0 for a new one, more for a kept-alive one
    answered = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.client_connections.add(self)

    def connectionLost(self, reason: Any) -> None:
        self.site.client_connections.discard(self)
        super().connectionLost(reason)

    def requestDone(self, request: Any) -> None:
        self.answered += 1
        super().requestDone(request)

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        """While the gateway stops, every response says ``Connection: close`` and ends its connection."""
        if self.site.closing:
            headers.setRawHeaders(b"connection", [b"close"])
            self.persistent = False
        super().writeHeaders(version, code, reason, headers)

    def is_open(self) -> bool:
        """Still an HTTP connection (not lost, not handed over to a WebSocket)."""
        return self.transport is not None

    def is_idle(self) -> bool:
        """Open, and waiting for its next request (none received or in progress)."""
        return self.is_open() and not self.requests


class GatewaySite(Site):
    """One access-log line per request: the forwarder's own event where it has one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: HTTP client connections; weak, because a WebSocket hand-over never
        #: tells the channel it is done (its transport becomes None)
        self.client_connections: WeakSet[GatewayChannel] = WeakSet()
        #: set when the gateway stops: responses say ``Connection: close``
        self.closing = False

    def log(self, request: Any) -> None:
        if not getattr(request, "gateway_logged", False):
            super().log(request)

    # -- a stopping gateway ---------------------------------------------------

    def start_closing(self) -> None:
        """
        From now on every response says ``Connection: close`` and its
        connection ends after it, including responses in progress; a
        connection idle now stays open and its next request is served.
        """
        self.closing = True
        for channel in self.open_connections():
            if channel.requests:
                channel.persistent = False

    def close_idle(self, *, new_ones: bool) -> int:
        """
        Close the connections waiting for a request: the kept-alive ones, and
        with ``new_ones`` also those that never sent one. Returns how many.
        """
        idle = [
            channel
            for channel in self.open_connections()
            if channel.is_idle() and (new_ones or channel.answered)
        ]
        for channel in idle:
            channel.loseConnection()
        return len(idle)

    def close_all(self) -> int:
        """Abort every client HTTP connection, busy or not (the drain timed out)."""
        channels = self.open_connections()
        for channel in channels:
            channel.transport.abortConnection()
        return len(channels)

    def open_connections(self) -> list[GatewayChannel]:
        return [channel for channel in self.client_connections if channel.is_open()]


def build_site(resource: Any, settings: Settings) -> Site:
    """A ``Site`` for the gateway's resource tree with the gateway's HTTP rules."""
    token_params = [settings.auth.query_param] if settings.auth is not None else []
    site = GatewaySite(resource, logFormatter=access_log_formatter(token_params))
    site.requestFactory = GatewayRequest.for_settings(settings.gateway)
    header_limit = settings.gateway.max_header_size

    def channel() -> GatewayChannel:
        made = GatewayChannel()
        made.totalHeadersSize = made.MAX_LENGTH = header_limit
        return made

    site.protocol = channel
    site.noisy = False
    return site
