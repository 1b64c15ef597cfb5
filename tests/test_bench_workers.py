"""
``bench/workers.py --smoke``: its machinery with tiny amounts (two gateways
loaded in turn, the spread counted with ``ss``, a SIGHUP under a steady load),
and every process it started gone. No figure is asserted here: they live in
``bench/`` and docs/performance.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "workers.py"
#: Only against a hung run; not a speed expectation.
GUARD = 300


@pytest.mark.bench  # half a minute: run by `make test-bench`
def test_smoke_run_measures_every_part_and_leaves_no_process(tmp_path):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=GUARD,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads((tmp_path / "latest-workers-smoke.json").read_text())
    assert data["errors"] == []
    summary = data["summary"]
    assert set(summary["cpu"]) == {"handshake", "ws-rate", "http-rate", "http-sat"}
    assert all(row["workers=1"] and row["workers=2"] for row in summary["cpu"].values())
    assert [sum(split) for split in summary["spread"]] == [40]
    assert {workers: [r["failed"] for r in runs] for workers, runs in summary["restart"].items()} == {"2": [0], "1": [0]}
    leftover = subprocess.run(["pgrep", "-f", data["workdir"]], capture_output=True, text=True).stdout
    assert leftover == ""
