"""
The gateway's HTTP front door: a ``Site`` speaking HTTP/1.1 only, with the
gateway's limits on the request head and body, JSON for what it refuses, and
an access log that never shows a token.
"""

from __future__ import annotations

from typing import Any

from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from twisted_gateway.config import Settings
from twisted_gateway.errors import GatewayError
from twisted_gateway.http_proxy import GatewayRequest
from twisted_gateway.logs import access_log_formatter, secret_names


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


class GatewaySite(Site):
    """One access-log line per request: the forwarder's own event where it has one."""

    def log(self, request: Any) -> None:
        if not getattr(request, "gateway_logged", False):
            super().log(request)


def build_site(resource: Any, settings: Settings) -> Site:
    """A ``Site`` for the gateway's resource tree with the gateway's HTTP rules."""
    site = GatewaySite(resource, logFormatter=access_log_formatter(secret_names(settings.auth)))
    site.requestFactory = GatewayRequest.for_settings(settings.gateway)
    header_limit = settings.gateway.max_header_size

    def channel() -> GatewayChannel:
        made = GatewayChannel()
        made.totalHeadersSize = made.MAX_LENGTH = header_limit
        return made

    site.protocol = channel
    site.noisy = False
    return site
