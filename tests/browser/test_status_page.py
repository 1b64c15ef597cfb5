"""/status in headless Chromium: real traffic through a loopback gateway, one upstream down."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor

from tests.browser.chromium import dump_dom, screenshot
from tests.support import Upstream, listen, settle, start_gateway, ws_connect

#: Set to a directory (``make screenshots`` sets docs/) to keep the picture.
SCREENSHOTS = os.environ.get("WSGATEWAY_SCREENSHOTS")


async def _free_port() -> int:
    """A loopback port nothing listens on (a dead upstream instance)."""
    port = await listen(Upstream())
    number = port.getHost().port
    await port.stopListening()
    return number


@pytest_twisted.ensureDeferred
async def test_the_status_page_renders_routes_instances_and_traffic_in_chromium(tmp_path):
    upstream = Upstream()
    up_port = await listen(upstream)
    dead = await _free_port()
    live = up_port.getHost().port
    # An active check marks the dead instance down (passive health never ejects
    # a route's last healthy instance, so it would stay "up").
    gw = await start_gateway(
        f"""
[gateway]
ws_open_timeout = 5
[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:{live} http://127.0.0.1:{dead}
health_check = ws:/health
health_interval = 0.2
"""
    )
    gw.gateway.startService()
    clients = []
    try:
        down = gw.gateway.pools["chat"].instances[1]
        await settle(lambda: down.state == "down", "the dead instance marked down")
        for i in range(3):
            clients.append(await ws_connect(gw.url(f"/v1/chat/ws?room=ops{i}")))
        closing = await ws_connect(gw.url("/v1/chat/ws"))
        closing.sendClose(1000)
        await closing.closed
        await settle(lambda: len(gw.registry.pairs) == 3, "three pairs open")
        url = gw.url("/status", "http")
        dom = await dump_dom(url)
        assert 'data-loaded="true"' in dom
        section = re.search(r'<section data-route="chat">.*?</section>', dom, re.S).group(0)
        assert "1 of 2 upstreams up" in section
        assert f"http://127.0.0.1:{live}</td><td class=\"state up\">up</td>" in section
        assert f"http://127.0.0.1:{dead}</td><td class=\"state down\">down</td>" in section
        assert "<b>3</b>open WebSockets" in section
        assert "1000 ×1" in section
        assert "version" in dom and "open files" in dom
        target = Path(SCREENSHOTS or tmp_path) / "status.png"
        await screenshot(url, str(target))
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        for client in clients:
            client.sendClose(1000)
            await client.closed
        await gw.gateway.stopService()
        await gw.close()
        await up_port.stopListening()
