"""
``/admin`` on the ``[admin]`` listeners: sessions, disconnect, revoke, cluster.

An operator's answers to "kick this user off now" and "make that stolen token
useless": JSON in and out, a bearer secret (``[admin] token``) compared in
constant time, never served on the public listeners. Every verb is carried out
by :class:`cluster.Cluster`, on every worker of every gateway that shares the
Redis (or on this gateway alone without ``[cluster]``).
"""

from __future__ import annotations

import hmac
import json
import math
from typing import Coroutine

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from twisted_gateway._bases import Resource
from twisted_gateway.cluster import Cluster, JSONObject
from twisted_gateway.errors import BadRequest, GatewayError, NotFound, render_error, render_json

log = Logger()

#: Bytes of a request body the admin API reads at most.
MAX_BODY = 16 * 1024


class AdminAPI(Resource):
    """The ``/admin`` resource; ``token`` is the bearer secret it requires."""

    isLeaf = True

    def __init__(self, cluster: Cluster, token: bytes) -> None:
        super().__init__()
        self.cluster = cluster
        self.token = token

    def render(self, request: Request) -> bytes | int:
        try:
            self._authorize(request)
            verb = self._verb(request)
        except GatewayError as e:
            return render_error(request, e)
        d = Deferred.fromCoroutine(verb)
        d.addCallbacks(lambda body: _answer(request, 200, body), lambda f: _failed(request, f))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    def _authorize(self, request: Request) -> None:
        values = request.requestHeaders.getRawHeaders(b"authorization", [])
        scheme, _, given = (values[0] if len(values) == 1 else b"").partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
            raise GatewayError(
                "the admin API needs [admin] token as a bearer token",
                status=401,
                error="unauthorized",
                headers=[(b"WWW-Authenticate", b'Bearer realm="wsgateway-admin"')],
            )

    def _verb(self, request: Request) -> Coroutine[Deferred[object], object, JSONObject]:
        """The coroutine that answers this method and path (the request is checked first)."""
        path = request.path.rstrip(b"/")
        method = request.method
        if path == b"/admin/sessions" and method == b"GET":
            sub = request.args.get(b"sub", [None])[0]
            return self._sessions(sub.decode("utf-8", "replace") if sub is not None else None)
        if path == b"/admin/cluster" and method == b"GET":
            return self._cluster()
        if path == b"/admin/disconnect" and method == b"POST":
            return self._disconnect(_json_body(request))
        if path == b"/admin/revoke" and method == b"POST":
            return self._revoke(_json_body(request))
        if path in (b"/admin/sessions", b"/admin/cluster", b"/admin/disconnect", b"/admin/revoke"):
            raise GatewayError(f"{method.decode('latin-1')} is not allowed here", status=405,
                               error="method_not_allowed")
        raise NotFound("no such admin endpoint")

    async def _sessions(self, sub: str | None) -> JSONObject:
        answers = await self.cluster.broadcast("sessions", {"sub": sub})
        sessions = [s for answer in answers for s in answer or ()]
        return {"sessions": sorted(sessions, key=lambda s: (s["opened_at"], s["id"]))}

    async def _cluster(self) -> JSONObject:
        nodes = await self.cluster.nodes()
        return {"node": self.cluster.node_id, "nodes": nodes,
                "websockets": sum(n.get("websockets") or 0 for n in nodes)}

    async def _disconnect(self, body: JSONObject) -> JSONObject:
        sub, session = body.get("sub"), body.get("session")
        if (sub is None) == (session is None) or not isinstance(sub or session, str) or not (sub or session):
            raise BadRequest('give exactly one of "sub" or "session", a non-empty string')
        args = {"sub": sub} if sub is not None else {"session": session}
        closed = sum(await self.cluster.broadcast("disconnect", args))
        log.info("admin: disconnect {what}: {closed} WebSockets closed", what=_what(args), closed=closed,
                 event="admin_disconnect")
        return {"closed": closed}

    async def _revoke(self, body: JSONObject) -> JSONObject:
        if "jti" in body:
            jti, exp = body.get("jti"), _time(body, "exp")
            if not isinstance(jti, str) or not jti or set(body) - {"jti", "exp"}:
                raise BadRequest('a revocation by token is {"jti": "...", "exp": <unix time>}')
            closed = await self.cluster.revoke(jti=jti, exp=exp)
        elif "sub" in body:
            sub, before = body.get("sub"), _time(body, "before")
            if not isinstance(sub, str) or not sub or set(body) - {"sub", "before"}:
                raise BadRequest('a revocation by subject is {"sub": "...", "before": <unix time>}')
            closed = await self.cluster.revoke(sub=sub, before=before)
        else:
            raise BadRequest('give {"jti": ..., "exp": ...} or {"sub": ..., "before": ...}')
        log.info("admin: revoke {what}: {closed} WebSockets closed", what="jti" if "jti" in body else "sub",
                 closed=closed, event="admin_revoke")
        return {"revoked": True}


def _what(args: JSONObject) -> str:
    return "session" if "session" in args else "sub"


def _time(body: JSONObject, key: str) -> float:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f'"{key}" must be a unix time (a number)')
    return float(value)


def _json_body(request: Request) -> JSONObject:
    assert request.content is not None  # the body, stored before render
    data = request.content.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise GatewayError("the body is too large", status=413, error="body_too_large")
    try:
        body = json.loads(data)
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _answer(request: Request, status: int, body: JSONObject) -> None:
    if request.finished or request._disconnected:
        return
    request.write(render_json(request, status, body))
    request.finish()


def _failed(request: Request, failure: Failure) -> None:
    if request.finished or request._disconnected:
        return
    error = failure.value
    if not isinstance(error, GatewayError):
        from twisted.internet.defer import CancelledError

        if failure.check(CancelledError):
            return
        log.failure("admin API error", failure)
        error = GatewayError("the admin action failed")
    request.write(render_error(request, error))
    request.finish()
