"""
Processes the end-to-end tests run (``twistd wsgateway``, peer scripts,
clients), their output read line by line in a thread so that a test can wait
for a line with a guard. Every test kills its processes in a ``finally``.
"""

from __future__ import annotations

import json
import os
import queue
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Callable

TWISTD = Path(sys.executable).with_name("twistd")
#: Only against a hung process; none of these is a speed expectation.
GUARD = 60


def child_env() -> dict[str, str]:
    """This environment, unbuffered, without ``PYTHONPATH``: a child finds only the installed package."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    return env


def free_port() -> int:
    """A port the kernel has just handed out on loopback (for a process that must be told its port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lines:
    """The lines of one output stream, read in a thread; waiting for one is bounded by ``GUARD``."""

    def __init__(self, stream: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._ended = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self._queue.put(line)
        self._queue.put(None)

    def next(self, timeout: float = GUARD) -> str | None:
        """The next line, or None at the end of the output."""
        if self._ended:
            return None
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no new output in {timeout} s:\n{self.text()}") from None
        if line is None:
            self._ended = True
            return None
        self.seen.append(line)
        return line

    def wait_for_line(self, predicate: Callable[[str], object], what: str = "the awaited line") -> str:
        """The next line for which ``predicate`` is true."""
        while True:
            line = self.next()
            if line is None:
                raise AssertionError(f"output ended before {what}:\n{self.text()}")
            if predicate(line):
                return line

    def wait_for(self, pattern: re.Pattern[str] | str) -> re.Match[str]:
        """The match of the next line in which ``pattern`` is found."""
        pattern = re.compile(pattern)
        return pattern.search(self.wait_for_line(pattern.search, repr(pattern.pattern)))  # type: ignore[return-value]

    def wait_for_json(self, predicate: Callable[[dict], object]) -> dict:
        """The next JSON line for which ``predicate`` is true."""
        return json.loads(self.wait_for_line(lambda line: predicate(json.loads(line)), "the awaited event"))

    def rest(self) -> str:
        """Everything, once the process has exited (and every process that shared its output)."""
        self._thread.join(GUARD)
        while not self._ended:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._ended = True
            else:
                self.seen.append(line)
        return self.text()

    def text(self) -> str:
        return "".join(self.seen)


class Process:
    """
    A subprocess whose output is read by :class:`Lines`: ``out`` (stdout,
    with stderr unless ``stderr_apart``, then in ``err``). ``stdin`` stays
    open for :meth:`command` (clients that exit at the end of their input).
    """

    def __init__(
        self,
        args: list[str],
        cwd: Path | None = None,
        *,
        stderr_apart: bool = False,
        open_files: tuple[int, int] | None = None,
    ) -> None:
        def limit() -> None:
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

        self.process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if stderr_apart else subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            env=child_env(),
            cwd=cwd,
            preexec_fn=limit if open_files is not None else None,
        )
        self.out = Lines(self.process.stdout)
        self.err = Lines(self.process.stderr) if stderr_apart else None

    def wait_for(self, pattern: re.Pattern[str] | str) -> re.Match[str]:
        return self.out.wait_for(pattern)

    def text(self) -> str:
        return self.out.text()

    def command(self, line: str) -> dict:
        """Send one command to a client script; its JSON answer."""
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return json.loads(self.wait_for(r"^\{").string)

    def terminate(self) -> int:
        """SIGTERM, as a service manager stops it; its exit status once it is gone."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(GUARD)

    def stop(self) -> None:
        """Kill it if it still runs (its output streams are closed by their readers at their end)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(GUARD)
        self.process.stdin.close()


def python_script(tmp_path: Path, name: str, text: str, *args: str, stderr_apart: bool = False) -> Process:
    """A Python script written to ``tmp_path`` and run with this interpreter."""
    path = tmp_path / name
    path.write_text(text)
    return Process([sys.executable, str(path), *args], tmp_path, stderr_apart=stderr_apart)


def twistd_gateway(
    tmp_path: Path,
    config: str,
    *twistd_args: str,
    options: tuple[str, ...] = (),
    stderr_apart: bool = False,
    open_files: tuple[int, int] | None = None,
) -> Process:
    """``twistd -n --pidfile= [twistd_args] wsgateway --config [options]``, the config written to ``tmp_path``."""
    path = tmp_path / "gateway.cfg"
    path.write_text(config)
    return Process(
        [str(TWISTD), "-n", "--pidfile=", *twistd_args, "wsgateway", "--config", str(path), *options],
        tmp_path,
        stderr_apart=stderr_apart,
        open_files=open_files,
    )


def aiohttp_upstream(tmp_path: Path) -> tuple[Process, int]:
    """``tests/e2e/http_ws_upstream.py`` (aiohttp: HTTP answers and a WebSocket echo) and its port."""
    upstream = Process([sys.executable, str(Path(__file__).with_name("e2e") / "http_ws_upstream.py")], tmp_path)
    try:
        return upstream, int(upstream.wait_for(r"^PORT (\d+)").group(1))
    except BaseException:
        upstream.stop()
        raise
