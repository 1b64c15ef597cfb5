"""
The demo chat page in headless Chromium against a real ``twistd wsgateway``:
two pages and a wscat in one room, a gateway restart under the pages, an
expired token recovered with a fresh one. The pages are driven by
``demo_driver.mjs`` (playwright-core on Debian's chromium).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import jwt

from tests.browser.chromium import chromium
from tests.e2e.test_twistd import _wscat_path
from tests.processes import GUARD, Process, free_port, twistd_gateway


REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".tools" / "node_modules"
SECRET = "browser-demo-secret-0123456789abcdef0123"
ROOM = "demo"
SCREENSHOTS = os.environ.get("WSGATEWAY_SCREENSHOTS")


def _token(sub: str, ttl: float) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl)}, SECRET, algorithm="HS256")


def _config(port: int, chat_port: int) -> str:
    return f"""
[gateway]
listen = tcp:{port}:interface=127.0.0.1
drain_timeout = 5

[auth]
algorithms = HS256
secret = {SECRET}
query_param = token
leeway = 0

[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:{chat_port}

[demo]
chat_service = tcp:{chat_port}:interface=127.0.0.1
"""


class _Driver(Process):
    """The page driver: one command, one JSON answer (an error fails the test)."""

    def __init__(self, tmp_path: Path) -> None:
        node = shutil.which("node")
        os.environ.setdefault("CHROMIUM", chromium())
        os.environ["WSGATEWAY_TOOLS"] = str(TOOLS)
        super().__init__([node, str(REPO / "tests" / "browser" / "demo_driver.mjs")], tmp_path)
        self.wait_for(r'^\{"ready"')

    def __call__(self, *words: str) -> dict:
        answer = self.command(" ".join(words))
        assert answer.pop("ok"), (words, answer)
        return answer


def _start(tmp_path: Path, config: str) -> Process:
    gateway = twistd_gateway(tmp_path, config)
    gateway.wait_for(r"\bwsgateway listening on ")
    return gateway


def _stop(gateway: Process) -> None:
    assert gateway.terminate() == 0
    gateway.stop()


def test_two_pages_and_wscat_chat_survive_a_restart_and_recover_an_expired_token(tmp_path):
    port, chat_port = free_port(), free_port()
    config = _config(port, chat_port)
    page = f"http://127.0.0.1:{port}/v1/chat/?room={ROOM}&token="
    gateway = _start(tmp_path, config)
    driver = _Driver(tmp_path)
    wscat = None
    try:
        driver("open", "alice", page + _token("alice", 3600))
        driver("open", "bob", page + _token("bob", 3600))
        driver("wait_state", "alice", "open")
        driver("wait_state", "bob", "open")
        wscat = Process(
            [_wscat_path(), "--no-color", "-c",
             f"ws://127.0.0.1:{port}/v1/chat/ws?room={ROOM}&token={_token('carol', 3600)}", "-w", "-1"],
            tmp_path,
        )
        driver("wait_members", "alice", "3")

        # Everyone in the room hears everyone, with sender and time; your own are told apart.
        driver("send", "alice", "hello from alice")
        bob = driver("wait_text", "bob", "hello from alice")
        assert bob["messages"][-1]["meta"].startswith("alice · ")
        assert bob["messages"][-1]["mine"] is False
        assert driver("wait_text", "alice", "hello from alice")["messages"][-1]["mine"] is True
        assert json.loads(wscat.wait_for(r"\{.*hello from alice.*\}").group(0))["from"] == "alice"
        wscat.process.stdin.write("hello from wscat\n")
        wscat.process.stdin.flush()
        assert driver("wait_text", "alice", "hello from wscat")["messages"][-1]["meta"].startswith("carol · ")
        driver("wait_text", "bob", "hello from wscat")

        # The gateway stops (1001 to every page) and comes back on the same port.
        _stop(gateway)
        driver("wait_state", "alice", "reconnecting")
        driver("send", "alice", "sent while the gateway was down")
        gateway = _start(tmp_path, config)
        back = [driver("wait_state", name, "open")["ms"] for name in ("alice", "bob")]
        # The room keeps no history: the sender's own copy proves the queued message went out.
        alice = driver("wait_text", "alice", "sent while the gateway was down")
        assert [m["text"] for m in alice["messages"]].count("sent while the gateway was down") == 1
        assert alice["messages"][-1]["mine"] is True
        assert any(n.startswith("connection closed (1001)") for n in driver("view", "bob")["notices"])
        driver("send", "bob", "bob is back")
        driver("wait_text", "alice", "bob is back")
        print(f"pages open again {back} ms after the gateway listened again")

        # A token that expires: the notice, a fresh token pasted, open again.
        driver("open", "dave", page + _token("dave", 3))
        driver("wait_state", "dave", "open")
        driver("wait_state", "dave", "expired")
        assert driver("view", "dave")["expired"] is True
        if SCREENSHOTS:
            driver("screenshot", "dave", str(Path(SCREENSHOTS) / "demo-expired.png"))
        driver("token", "dave", _token("dave", 3600))
        driver("wait_state", "dave", "open")
        driver("send", "dave", "dave is back")
        driver("wait_text", "alice", "dave is back")
        if SCREENSHOTS:
            driver("screenshot", "alice", str(Path(SCREENSHOTS) / "demo.png"))
    finally:
        if wscat is not None:
            wscat.stop()
        driver.process.stdin.close()  # the driver closes its browser and exits
        driver.process.wait(GUARD)
        driver.stop()
        if gateway.process.poll() is None:
            _stop(gateway)
