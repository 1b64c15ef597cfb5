"""
An upstream for end-to-end tests: ``GET /v1/api/...`` answers 200 with a small
JSON body, ``/v1/chat/ws`` echoes WebSocket messages. Prints ``PORT n``.
"""

import asyncio

from aiohttp import WSMsgType, web


async def ping(request: web.Request) -> web.Response:
    return web.json_response({"pong": request.path})


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(autoping=True)
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            await ws.send_str(message.data)
    return ws


async def main() -> None:
    app = web.Application()
    app.router.add_get("/v1/chat/ws", echo)
    app.router.add_get("/v1/api/{tail:.*}", ping)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print("PORT", runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
