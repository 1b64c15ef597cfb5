"""
The keys behind a ``jwks_url`` (or found through an ``oidc_issuer``'s
discovery document), kept fresh without ever mistaking an identity
provider's outage for a bad token.

:class:`KeySet` owns the fetch: a refresh every ``jwks_refresh`` seconds,
each fetch given up after ``jwks_timeout`` seconds,
retries with backoff (1, 2, 4 ... 60 s) while the URL cannot be fetched,
independent of traffic, and an early refetch for a token whose ``kid`` is new.
It knows whether the keys it holds are current (:attr:`KeySet.failing`), which
is what lets :mod:`twisted_gateway.auth` answer 503 rather than 401 when a
``kid`` is missing only because the provider could not be reached.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable, Mapping
from urllib.parse import urlsplit

import jwt
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from twisted_gateway.deferreds import when_done
from twisted_gateway.faults import describe
from twisted_gateway.schema import PublicKey
from twisted_gateway.tls import describe_tls_failure

#: An unknown ``kid`` refetches the JWKS at most this often (after a successful fetch).
REFETCH_INTERVAL = 60.0
#: Retries of a failed fetch wait 1, 2, 4 ... seconds, never more than this.
MAX_BACKOFF = 60.0
#: The most a JWKS document may weigh.
MAX_DOCUMENT_SIZE = 1024 * 1024
USER_AGENT = b"twisted_gateway (JWKS fetch)"


class FetchFailed(Exception):
    """A fetch that failed: ``reason`` is a metric label, the message a readable line."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


def parse_jwks(data: bytes) -> dict[str | None, list[PublicKey]]:
    """The public signing keys of a JWKS document by ``kid`` (several may share one)."""
    try:
        document = json.loads(data)
    except ValueError:
        raise FetchFailed("not_json", "not a JSON document") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise FetchFailed("not_jwks", 'not a JWKS document (no "keys" list)')
    keys: dict[str | None, list[PublicKey]] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig" or jwk.get("kty") == "oct":
            continue
        try:
            key = PublicKey.from_jwk(jwk)
        except (jwt.PyJWTError, ValueError, TypeError, NotImplementedError, KeyError):
            continue
        keys.setdefault(jwk.get("kid"), []).append(key)
    if not keys:
        raise FetchFailed("not_jwks", "no usable signing key")
    return keys


def discovery_url(issuer: str) -> str:
    """OpenID Connect Discovery 1.0, section 4: the issuer, less a trailing slash, + the well-known path."""
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def parse_discovery(data: bytes, issuer: str) -> str:
    """
    The ``jwks_uri`` of an OpenID provider's discovery document, which must
    name exactly ``issuer`` (section 4.3: else anyone serving a document could
    speak for the provider) and must not downgrade an https issuer to http.
    """
    try:
        document = json.loads(data)
    except ValueError:
        raise FetchFailed("not_json", "discovery document is not JSON") from None
    if not isinstance(document, dict):
        raise FetchFailed("discovery", "discovery document is not a JSON object")
    if document.get("issuer") != issuer:
        raise FetchFailed(
            "discovery", f"discovery document names issuer {document.get('issuer')!r}, not {issuer!r}"
        )
    jwks_uri = document.get("jwks_uri")
    parts = urlsplit(jwks_uri) if isinstance(jwks_uri, str) else None
    if (
        not isinstance(jwks_uri, str)
        or parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
    ):
        raise FetchFailed("discovery", "discovery document has no http(s) jwks_uri")
    if parts.scheme == "http" and urlsplit(issuer).scheme == "https":
        raise FetchFailed("discovery", f"jwks_uri {jwks_uri!r} is plain http for an https issuer")
    return jwks_uri


def describe_failure(error: BaseException) -> FetchFailed:
    """What went wrong with a fetch, as a metric label and one readable line."""
    if isinstance(error, FetchFailed):
        return error
    if isinstance(error, ConnectionRefusedError):
        return FetchFailed("connect", "connection refused")
    if isinstance(error, DNSLookupError):
        return FetchFailed("connect", "DNS lookup failed")
    if isinstance(error, ConnectError):
        return FetchFailed("connect", f"cannot connect ({type(error).__name__})")
    if isinstance(error, (ResponseFailed, ResponseNeverReceived)):
        tls = describe_tls_failure(error)
        if tls is not None:
            return FetchFailed("tls", f"TLS handshake failed: {tls}")
        return FetchFailed("connection_lost", "connection lost before a complete answer")
    return FetchFailed("other", describe(error))


class KeySet:
    """
    The keys of one ``jwks_url``, fetched in the background; see the module
    docstring. With ``discovery`` (an ``oidc_issuer``), each fetch reads the
    provider's discovery document first and takes the keys from its ``jwks_uri``.
    """

    _log = Logger()

    def __init__(
        self,
        url: str,
        clock: IReactorTime,
        http_client: HTTPClient,
        *,
        refresh: float,
        timeout: float,
        wait_limit: float,
        discovery: str | None = None,
    ) -> None:
        #: the JWKS URL; with ``discovery``, the issuer's until a document names one
        self.url = url
        self._issuer = discovery
        self._clock = clock
        self._http = http_client
        self._refresh = refresh
        #: a fetch (the discovery document and the keys) not finished after this long has failed
        self._timeout = timeout
        #: the most a request waits for a fetch in flight (the gateway's connect_timeout)
        self._wait_limit = wait_limit
        self.keys: Mapping[str | None, list[PublicKey]] = {}
        #: a fetch has succeeded once
        self.loaded = False
        #: the last fetch failed: a missing ``kid`` may be a key the provider could not tell us of
        self.failing = False
        #: failed fetches by reason (``wsgateway_jwks_fetch_failures_total``)
        self.failures: dict[str, int] = {}
        self._consecutive_failures = 0
        self._last_success = -math.inf
        self._last_attempt_end = -math.inf
        self._fetching: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None
        self._next_fetch_at = math.inf
        self._running = False

    def start(self) -> None:
        """Fetch now, then keep the keys fresh until :meth:`stop`."""
        if not self._running:
            self._running = True
            self._fetch()

    def stop(self) -> Deferred[None]:
        """Cancel the timer and the fetch in flight; fires when the fetch has ended."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        fetching = self._fetching
        if fetching is None:
            return succeed(None)
        done = when_done(fetching)
        fetching.cancel()
        return done

    def retry_after(self) -> int:
        """Seconds until the next attempt to fetch (for ``Retry-After``), at least 1."""
        if self._fetching is not None:
            return 1
        return max(1, math.ceil(self._next_fetch_at - self._clock.seconds()))

    async def refetch_for_unknown_kid(self) -> None:
        """
        A token names a ``kid`` we do not hold: join the fetch in flight or
        start one (after a success, at most once a minute; while failing, at
        most once a second), waiting at most ``wait_limit`` for it. Never fails.
        """
        now = self._clock.seconds()
        if self._fetching is None:
            if self.failing or not self.loaded:
                if now - self._last_attempt_end < 1.0:
                    return
            elif now - self._last_success < REFETCH_INTERVAL:
                return
            self._fetch()
        fetching = self._fetching
        if fetching is None:
            return
        waiter = when_done(fetching)  # timing out leaves the fetch running
        waiter.addTimeout(self._wait_limit, self._clock)
        try:
            await waiter
        except DeferredTimeout:
            pass

    def _fetch(self) -> None:
        """Start a fetch now (unless one is in flight), replacing the scheduled one."""
        if self._fetching is not None or not self._running:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._fetching = Deferred.fromCoroutine(self._fetch_once())
        self._fetching.addBoth(self._fetched)

    def _fetched(self, result: object) -> None:
        """Forget the fetch and schedule the next; a cancelled one ends here quietly."""
        self._fetching = None
        self._last_attempt_end = self._clock.seconds()
        if not self._running:
            return
        if self.failing:
            delay = min(MAX_BACKOFF, 2.0 ** (self._consecutive_failures - 1))
        else:
            delay = self._refresh
        self._next_fetch_at = self._clock.seconds() + delay
        self._timer = self._clock.callLater(delay, self._fetch)

    async def _fetch_once(self) -> None:
        download = Deferred.fromCoroutine(self._download())
        timed_out: list[bool] = []

        def time_out() -> None:
            timed_out.append(True)
            download.cancel()

        timer = self._clock.callLater(self._timeout, time_out)
        try:
            keys = parse_jwks(await download)
        except Exception as e:
            if timed_out:
                self._failed(FetchFailed("timeout", f"timed out after {self._timeout:g} s"))
            elif self._running and not isinstance(e, CancelledError):  # else: stopped
                self._failed(describe_failure(e))
            return
        finally:
            if timer.active():
                timer.cancel()
        self.keys = keys
        self._last_success = self._clock.seconds()
        count = sum(len(k) for k in keys.values())
        if self.failing:
            self._log.info(
                "JWKS from {url}: {count} keys, after {failures} failed fetches",
                url=self.url,
                count=count,
                failures=self._consecutive_failures,
            )
        elif not self.loaded:
            self._log.info("JWKS from {url}: {count} keys", url=self.url, count=count)
        self.loaded, self.failing, self._consecutive_failures = True, False, 0

    def _failed(self, failure: FetchFailed) -> None:
        """Count a failed fetch; only the first of an outage is logged."""
        self.failures[failure.reason] = self.failures.get(failure.reason, 0) + 1
        self._consecutive_failures += 1
        if not self.failing:
            self._log.warn(
                "JWKS fetch from {url} failed: {reason}; keeping {count} known keys,"
                " retrying with backoff up to {cap:g} s",
                url=self.url,
                reason=str(failure),
                count=sum(len(k) for k in self.keys.values()),
                cap=MAX_BACKOFF,
            )
        self.failing = True

    async def _download(self) -> bytes:
        if self._issuer is not None:
            self.url = parse_discovery(await self._get(discovery_url(self._issuer)), self._issuer)
        return await self._get(self.url)

    async def _get(self, url: str) -> bytes:
        headers: dict[bytes | str, list[bytes | str]] = {
            b"Accept": [b"application/json"],
            b"User-Agent": [USER_AGENT],
        }
        response = await self._http.get(url, headers=headers)
        if response.code != 200:
            await response.content()  # read it, so the connection can end cleanly
            raise FetchFailed("http_status", f"HTTP {response.code}")
        body = await response.content()
        if len(body) > MAX_DOCUMENT_SIZE:
            raise FetchFailed("not_jwks", "larger than 1 MiB")
        return body


#: For the metrics: the number of keys and the failures by reason.
JWKSState = Callable[[], tuple[int, Mapping[str, int]]]
