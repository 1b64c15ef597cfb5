"""A real twistd gateway in front of an aiohttp upstream, with the tokens identity providers issue."""

from __future__ import annotations

import http.client
import json
import time

import jwt
from websockets.sync.client import connect as ws_connect

from tests.e2e.test_operations_e2e import LISTENING, _gateway, _http_config
from tests.processes import GUARD, Process, aiohttp_upstream


SECRET = "e2e-idp-secret-0123456789abcdef0123456789"
#: A display name of 1,700 CJK characters, in a token of UTF-8 JSON as Node
#: providers write it (about 7 KB): ASCII-escaped JSON would make an
#: X-Auth-Claims of about 13.6 KB, past aiohttp's 8,190-byte header limit.
NAME = "山田太郎" * 425


class _Utf8JSON(json.JSONEncoder):
    def __init__(self, **options) -> None:
        super().__init__(**{**options, "ensure_ascii": False})


def _config(upstream_port: int) -> str:
    return _http_config(upstream_port, "") + f"[auth]\nalgorithms = HS256\nsecret = {SECRET}\naudience = chat\n"


def test_a_large_token_with_a_cjk_name_reaches_an_aiohttp_upstream(tmp_path):
    """
    A 7 KB token with a long CJK name: its X-Auth-Claims, UTF-8 JSON, fits
    aiohttp's header limit on HTTP and on the WebSocket handshake.
    """
    claims = {"sub": "alice", "aud": "chat", "name": NAME, "exp": int(time.time()) + 3600}
    token = jwt.encode(claims, SECRET, algorithm="HS256", json_encoder=_Utf8JSON)
    assert 6 * 1024 < len(token) < 8190 - len("Authorization: Bearer ")
    processes: list[Process] = []
    try:
        upstream, upstream_port = aiohttp_upstream(tmp_path)
        processes.append(upstream)
        gateway = _gateway(tmp_path, _config(upstream_port))
        processes.append(gateway)
        port = int(gateway.out.wait_for(LISTENING).group(1))

        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD)
        connection.request("GET", "/v1/api/me", headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, b'{"pong": "/v1/api/me"}')
        connection.close()

        headers = {"Authorization": f"Bearer {token}"}
        with ws_connect(f"ws://127.0.0.1:{port}/v1/chat/ws", additional_headers=headers,
                        open_timeout=GUARD, max_size=None) as ws:
            ws.send("こんにちは")
            assert ws.recv(timeout=GUARD) == "こんにちは"
    finally:
        for process in reversed(processes):
            process.stop()
