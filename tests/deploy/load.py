"""
Steady load through a balancer, as a rolling deploy meets it: ``--http``
clients sending GETs back to back (each on its own kept-alive connections),
one client opening, using and closing WebSockets back to back, and ``--held``
WebSockets held open that reconnect as soon as they are closed.

Prints ``READY`` once every held WebSocket is open, then runs until SIGTERM;
then prints one JSON object: counts of requests and handshakes done and
failed, the failures themselves (at most 20 of each), and every close of a
held WebSocket (code, and whether and how fast the reconnect that followed
succeeded).
"""

import argparse
import asyncio
import json
import signal
import time

import aiohttp

counts = {
    "http_ok": 0,
    "http_failed": 0,
    "handshakes_ok": 0,
    "handshakes_failed": 0,
    "handshakes_going_away": 0,
}
failures: dict[str, list[str]] = {"http": [], "handshakes": []}
held_closes: list[dict] = []
stopping = asyncio.Event()


def failed(kind: str, what: str) -> None:
    counts[f"{kind}_failed"] += 1
    if len(failures[kind]) < 20:
        failures[kind].append(f"{time.monotonic():.3f} {what}")


async def http_client(base: str) -> None:
    async with aiohttp.ClientSession() as session:
        while not stopping.is_set():
            try:
                async with session.get(base + "/v1/api/ping") as response:
                    body = await response.read()
                    if response.status == 200:
                        counts["http_ok"] += 1
                    else:
                        failed("http", f"{response.status} {body[:200]!r}")
            except Exception as e:  # every failure a client sees counts
                failed("http", f"{type(e).__name__}: {e}")


async def open_ws(session: aiohttp.ClientSession, url: str):
    """
    A WebSocket proven open by one echoed message, or None when the gateway
    said 1001 (going away) before the echo: a handshake that succeeded on a
    gateway stopping just then, not a failed one.
    """
    timeout = aiohttp.ClientWSTimeout(ws_close=5)
    ws = await session.ws_connect(url, autoping=True, heartbeat=None, timeout=timeout)
    await ws.send_str("hello")
    message = await ws.receive(timeout=10)
    if message.type == aiohttp.WSMsgType.TEXT and message.data == "hello":
        return ws
    if message.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1001:
        return None
    await ws.close()
    raise RuntimeError(f"no echo but {message.type.name} {message.data!r} {message.extra!r}")


async def handshake_client(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        while not stopping.is_set():
            try:
                ws = await open_ws(session, url)
            except aiohttp.WSServerHandshakeError as e:
                failed("handshakes", f"{e.status} {e.message}")
                continue
            except Exception as e:
                failed("handshakes", f"{type(e).__name__}: {e}")
                continue
            if ws is None:
                counts["handshakes_going_away"] += 1
            else:
                await ws.close()
                counts["handshakes_ok"] += 1


async def held_client(url: str, opened: asyncio.Event, remaining: list[int]) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await open_ws(session, url)
        if ws is None:
            raise RuntimeError("a gateway said going away before the test stopped one")
        remaining[0] -= 1
        if not remaining[0]:
            opened.set()
        while True:
            receiving = asyncio.ensure_future(ws.receive())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait([receiving, stop], return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                receiving.cancel()
                await ws.close()
                return
            stop.cancel()
            message = receiving.result()
            if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                continue
            closed_at = time.monotonic()
            close = {"code": ws.close_code, "type": message.type.name}
            try:
                ws = await open_ws(session, url)
                if ws is None:
                    raise RuntimeError("reconnected to a gateway going away")
                close["reconnected"] = True
            except Exception as e:
                close["reconnected"] = False
                close["error"] = f"{type(e).__name__}: {e}"
                held_closes.append(close)
                return
            close["reconnect_seconds"] = round(time.monotonic() - closed_at, 3)
            held_closes.append(close)


async def main(base: str, http: int, held: int) -> None:
    ws_url = base.replace("http://", "ws://") + "/v1/chat/ws"
    opened, remaining = asyncio.Event(), [held]
    tasks = [asyncio.ensure_future(held_client(ws_url, opened, remaining)) for _ in range(held)]
    await asyncio.wait_for(opened.wait(), 30)
    tasks += [asyncio.ensure_future(http_client(base)) for _ in range(http)]
    tasks.append(asyncio.ensure_future(handshake_client(ws_url)))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    print("READY", flush=True)
    await stopping.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({**counts, "failures": failures, "held_closes": held_closes}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("--http", type=int, default=3)
    parser.add_argument("--held", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.base, args.http, args.held))
