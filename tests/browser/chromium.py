"""Debian's headless Chromium, run as a subprocess without blocking the reactor."""

from __future__ import annotations

import shutil

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

#: Chromium's own flags for a container: no sandbox (root), no GPU, no first-run noise.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars")


def chromium() -> str:
    """The browser's path (``.ci/run`` installs Debian's ``chromium``)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("chromium is not installed: apt-get install chromium")
    return path


async def dump_dom(url: str, budget_ms: int = 5000) -> str:
    """The page's DOM once its scripts have run for ``budget_ms`` of virtual time."""
    out, err, code = await getProcessOutputAndValue(
        chromium(), (*FLAGS, f"--virtual-time-budget={budget_ms}", "--dump-dom", url), reactor=reactor
    )
    assert code == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def screenshot(url: str, path: str, size: str = "1100,640", budget_ms: int = 5000) -> None:
    """A PNG of the page at ``url`` once its scripts have run."""
    out, err, code = await getProcessOutputAndValue(
        chromium(),
        (*FLAGS, f"--virtual-time-budget={budget_ms}", f"--window-size={size}", f"--screenshot={path}", url),
        reactor=reactor,
    )
    assert code == 0, err.decode(errors="replace")[-2000:]
