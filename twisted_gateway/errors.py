"""
Errors the gateway answers itself: an HTTP status, a JSON body, extra headers.

Every refusal, whether it ends an HTTP request or a WebSocket handshake, is one
of these, so clients always get ``{"error": ..., "detail": ...}``.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Sequence

from twisted.web.http import RESPONSES, Request


class GatewayError(Exception):
    """An error with the HTTP status and JSON body the client should receive."""

    status: int = 500
    error: str = "internal_error"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        error: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        if error is not None:
            self.error = error
        self.headers = tuple(headers)

    @property
    def phrase(self) -> bytes:
        phrase = RESPONSES.get(self.status)
        if phrase is None:
            try:
                phrase = HTTPStatus(self.status).phrase.encode("ascii")
            except ValueError:
                phrase = b"Error"
        return phrase

    def body(self) -> bytes:
        return json_body(self.error, self.detail)

    def raw_response(self, extra: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
        """
        The whole HTTP/1.1 answer, for the places that write to the transport
        themselves (a refused WebSocket handshake, a refused head or body).
        """
        body = self.body()
        lines = [
            b"HTTP/1.1 %d %s" % (self.status, self.phrase),
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(body),
            b"Connection: close",
        ]
        lines += [name + b": " + value for name, value in (*self.headers, *extra)]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body


def json_body(error: str, detail: str) -> bytes:
    return json.dumps({"error": error, "detail": detail}).encode("utf-8") + b"\n"


class NotFound(GatewayError):
    status = 404
    error = "not_found"


class BadRequest(GatewayError):
    status = 400
    error = "bad_request"


class BadGateway(GatewayError):
    status = 502
    error = "bad_gateway"


class GatewayTimeout(GatewayError):
    status = 504
    error = "gateway_timeout"


class Overloaded(GatewayError):
    """The gateway itself is short of something (file descriptors, ports): not the upstream."""

    status = 503
    error = "overloaded"


class UpstreamRefused(GatewayError):
    """The upstream answered a WebSocket handshake with an error status."""

    error = "upstream_refused"

    def __init__(
        self,
        detail: str,
        *,
        refusal: object = None,
        status: int | None = None,
        error: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(detail, status=status, error=error, headers=headers)
        #: the upstream's own answer (a ``refusals.Refusal``): what the client gets
        self.refusal = refusal


def render_error(request: Request, error: GatewayError) -> bytes:
    """Set status and headers on a twisted.web request; return the JSON body."""
    request.setResponseCode(error.status, error.phrase)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    for name, value in error.headers:
        request.responseHeaders.addRawHeader(name, value)
    return error.body()


def render_json(request: Request, status: int, body: object) -> bytes:
    """Set the status and JSON content type on a twisted.web request; return the body."""
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    return json.dumps(body).encode() + b"\n"
