"""
``bench/ws_memory.py --quick`` end to end: a real ``twistd wsgateway``, a
16-MiB-class message each way, two slow readers and open/close churn, with the
script's own correctness checks (no byte lost, ``/healthz`` and the upstream
back to 0). No timing is asserted here: speed lives in ``bench/``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "ws_memory.py"
#: Only against a hung run; not a speed expectation.
GUARD = 300


def test_quick_memory_bench_loses_no_bytes_and_leaves_no_connection(tmp_path):
    out = tmp_path / "ws_memory.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=GUARD,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert json.loads(out.read_text())["ok"] is True
