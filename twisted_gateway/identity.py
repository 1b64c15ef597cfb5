"""
Who a verified token says the caller is: the value the authenticator returns
and the forwarders turn into identity headers. A module of its own so that the
authenticator's interface (``interfaces.py``) can name it without importing
the authenticator.
"""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Identity:
    """Who a verified token says the caller is, and until when."""

    subject: str | None
    #: JSON as the token carries it (its times checked: auth.check_claim_times)
    claims: dict[str, Any] = field(hash=False)
    #: ``exp`` + leeway, when a live connection must be closed; None without ``exp``.
    expires_at: float | None = None

    def upstream_headers(self, claims_header: str | tuple[str, ...] = "full") -> list[tuple[bytes, bytes]]:
        """The headers for ``claims_header``; the full set is built once per identity."""
        if claims_header == "full":
            return list(self._full_headers)
        return self._headers(claims_header)

    @functools.cached_property
    def _full_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        # once per identity: a cached token's identity serves every request that brings it
        return tuple(self._headers("full"))

    def _headers(self, claims_header: str | tuple[str, ...]) -> list[tuple[bytes, bytes]]:
        """
        ``X-Auth-Subject`` (when there is a ``sub``) and ``X-Auth-Claims``: all
        the claims, none, or the named ones, as base64url of UTF-8 JSON (not
        ASCII-escaped: a CJK name would nearly double, past common header limits).
        """
        headers = [] if self.subject is None else [(b"X-Auth-Subject", self.subject.encode("utf-8"))]
        if claims_header == "none":
            return headers
        claims = self.claims
        if claims_header != "full":
            claims = {name: claims[name] for name in claims_header if name in claims}
        text = json.dumps(claims, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
        encoded = base64.urlsafe_b64encode(text.encode("utf-8")).rstrip(b"=")
        return [*headers, (b"X-Auth-Claims", encoded)]
