"""
The design this project started from, as a benchmark peer: an aiohttp gateway.

It is the seed's gateway reduced to its proxying: one catch-all route that
checks for a WebSocket upgrade (``Upgrade: websocket`` and ``Connection:
upgrade``); an upgrade opens the upstream with ``ClientSession.ws_connect``,
answers the client with ``web.WebSocketResponse`` and runs two pump tasks,
one per direction, until either side closes; anything else is forwarded with
one shared ``aiohttp.ClientSession`` (keep-alive pool), the answer read whole
and sent back with its status and end-to-end headers. No auth, no limits, no
access log: what ``bench/run.py`` measures beside nginx and the gateway is the
cost of the design itself.

    python bench/aiohttp_gateway.py --upstream http://127.0.0.1:PORT [--port 0]

prints ``aiohttp gateway listening on HOST (port N)`` once it accepts
connections, and stops on SIGTERM or SIGINT. Needs the ``bench`` extra
(``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
from aiohttp import web

#: Headers that belong to one hop (RFC 9110, 7.6.1) and are never forwarded.
HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    )
)
#: As large as the gateway's ``ws_max_message_size`` in the benchmark (figure 5: 16 MiB).
MAX_MESSAGE = 32 * 1024 * 1024


def is_websocket_request(request: web.Request) -> bool:
    """The seed's upgrade detection."""
    return (
        request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


def end_to_end(headers) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP]


async def proxy_request(request: web.Request, upstream: str) -> web.Response:
    session: aiohttp.ClientSession = request.app["session"]
    body = await request.read() if request.can_read_body else None
    async with session.request(
        request.method,
        upstream + request.rel_url.raw_path_qs,
        headers=end_to_end(request.headers),
        data=body,
        allow_redirects=False,
    ) as answer:
        payload = await answer.read()
        return web.Response(status=answer.status, body=payload, headers=end_to_end(answer.headers))


async def _pump(source, sink) -> None:
    """Copy messages one way until ``source`` closes, then close ``sink``."""
    async for message in source:
        if message.type == aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        else:
            break
    if not sink.closed:
        await sink.close()


async def proxy_websocket(request: web.Request, upstream: str) -> web.StreamResponse:
    session: aiohttp.ClientSession = request.app["session"]
    url = "ws" + upstream[len("http") :] + request.rel_url.raw_path_qs
    try:
        upstream_ws = await session.ws_connect(url, max_msg_size=MAX_MESSAGE)
    except aiohttp.ClientError:
        return web.json_response({"error": "bad_gateway"}, status=502)
    client_ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE)
    await client_ws.prepare(request)
    pumps = [
        asyncio.create_task(_pump(client_ws, upstream_ws)),
        asyncio.create_task(_pump(upstream_ws, client_ws)),
    ]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await upstream_ws.close()
        await client_ws.close()
    return client_ws


def make_app(upstream: str) -> web.Application:
    async def route(request: web.Request) -> web.StreamResponse:
        if is_websocket_request(request):
            return await proxy_websocket(request, upstream)
        return await proxy_request(request, upstream)

    async def session(app: web.Application):
        # No cap on pooled connections: every WebSocket holds one (figure 4 opens 5,000).
        app["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        )
        yield
        await app["session"].close()

    app = web.Application(client_max_size=MAX_MESSAGE)
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", route)
    return app


async def serve(host: str, port: int, upstream: str) -> None:
    runner = web.AppRunner(make_app(upstream), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"aiohttp gateway listening on {host} (port {bound})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT of the backend")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.upstream.rstrip("/")))


if __name__ == "__main__":
    main()
