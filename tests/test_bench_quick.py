"""
``make bench-quick``'s machinery, run with tiny amounts (``bench/run.py --smoke``):
every target (the seed's aiohttp design among them) is started, loaded and
stopped, and a missing nginx is a notice, not a failure. No timing is asserted here: speed lives in ``bench/``.
``make test`` runs one figure (a few seconds); every figure is ``make test-bench``'s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import process_alive

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "bench" / "run.py"
#: Only against a hung run; not a speed expectation.
GUARD = 300
FIGURES = {"1", "1-inflight", "2", "3", "3-auth", "3-paired", "4", "5", "6", "6-sat", "6-paired", "7", "7-b50"}


def _nginx_installed() -> bool:
    """The same search as ``bench/targets.py``: PATH, then /usr/sbin."""
    found = shutil.which("nginx")
    return bool(found) or os.access("/usr/sbin/nginx", os.X_OK)


def _smoke(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, str(RUN), "--smoke", "--out", str(out), *extra],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=GUARD,
    )
    report = out / "latest-smoke.json"
    assert report.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, json.loads(report.read_text())


def _assert_all_stopped(data: dict) -> None:
    for record in data["lifecycle"]:
        assert record["stopped"], record
        if record["pid"] is not None:
            assert record["returncode"] == 0, record
            assert not any(process_alive(pid) for pid in record["pids"]), record


@pytest.mark.bench  # every figure: tens of seconds, run by `make test-bench`
def test_smoke_run_starts_loads_and_stops_every_target(tmp_path):
    nginx = _nginx_installed()
    proc, data = _smoke(tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    expected = {"direct", "aiohttp", "gateway"} | ({"nginx"} if nginx else set())
    assert {record["target"] for record in data["lifecycle"]} == expected
    _assert_all_stopped(data)
    # Figures 4 and 5 restart each proxy: one start per proxy, plus two per memory figure.
    starts = [record["target"] for record in data["lifecycle"]]
    assert starts.count("gateway") == 3 and starts.count("aiohttp") == 3
    measured = {(s["figure"], s["target"]) for s in data["samples"]}
    assert {f for f, _ in measured} == FIGURES
    for target in expected:
        for figure in ("1", "1-inflight", "6", "6-sat"):
            assert (figure, target) in measured
    assert ("4", "gateway") in measured and ("5", "gateway") in measured
    assert data["errors"] == []
    if nginx:
        assert not any("nginx not found" in n for n in data["notices"])
    else:
        assert "NOTICE: nginx not found" in proc.stdout
    table = (tmp_path / "latest-smoke.md").read_text()
    assert "| figure |" in table and "gateway / nginx" in table and "gateway / aiohttp" in table


def test_missing_nginx_is_a_notice_and_the_other_targets_still_run(tmp_path):
    proc, data = _smoke(tmp_path, "--nginx", str(tmp_path / "no-nginx-here"), "--only", "1")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "NOTICE: nginx not found" in proc.stdout
    assert any("nginx not found" in n for n in data["notices"])
    targets = {"direct", "aiohttp", "gateway"}
    assert {record["target"] for record in data["lifecycle"]} == targets
    _assert_all_stopped(data)
    assert {(s["figure"], s["target"]) for s in data["samples"]} == {
        (figure, target) for figure in ("1", "1-inflight") for target in targets
    }


def _bench_report() -> Any:
    """bench/report.py, imported from its file (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    assert spec is not None and spec.loader is not None
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


def test_a_profile_counts_the_gateway_reactor_waiting_in_epoll_as_idle():
    """The gateway's reactor polls in ``_compat._do_poll``: a sample that ends there waits, it does not work."""
    report = _bench_report()
    loop = "MainThread;<module> (twistd:6);ReactorBase.mainLoop (twisted/internet/base.py:697)"
    raw = (
        f"{loop};_do_poll (twisted_gateway/_compat.py:190) 30\n"
        f"{loop};_do_poll (twisted_gateway/_compat.py:202);write_now (twisted_gateway/_compat.py:267) 10\n"
    )
    spots = report.collapsed_hot_spots(raw)
    assert (spots["samples"], spots["idle_samples"]) == (10, 30)
    assert spots["self"] == [("write_now (twisted_gateway/_compat.py)", 100.0)]
    assert [key for key, _ in spots["inclusive"]] == ["write_now (twisted_gateway/_compat.py)"]


def test_paired_differences_are_summed_up_by_their_median_its_interval_and_quartiles():
    """The paired auth figure: the median of the differences, a seeded bootstrap interval around it, the IQR."""
    report = _bench_report()
    differences = [0.01 * i for i in range(1, 10)]
    found = report.paired_summary(differences)
    assert found["median"] == 0.05 and found["n"] == 9
    assert (round(found["q1"], 3), round(found["q3"], 3)) == (0.025, 0.075)
    assert found["ci_low"] <= found["median"] <= found["ci_high"]
    assert 0.01 <= found["ci_low"] < found["ci_high"] <= 0.09
    assert report.paired_summary(differences) == found  # seeded: the same interval every time
    assert report.paired_summary([]) is None
    assert report.fmt_summary(found, 3).startswith("0.050 (95% CI ")
