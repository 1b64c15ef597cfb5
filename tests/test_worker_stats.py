"""Merging the workers' metric families: one answer for the whole gateway."""

from __future__ import annotations

import json
import os

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from twisted_gateway.worker_stats import WorkerStats, families_as_json, merge, retire, worker_file


def _families(requests: int, open_: int, up: int, bucket: int) -> list:
    counter = CounterMetricFamily("wsgateway_http_requests", "Requests.", labels=["route"])
    counter.add_metric(["chat"], requests)
    ws_open = GaugeMetricFamily("wsgateway_ws_open", "Open.", labels=["route"])
    ws_open.add_metric(["chat"], open_)
    upstream = GaugeMetricFamily("wsgateway_upstream_up", "Up.", labels=["route"])
    upstream.add_metric(["chat"], up)
    histogram = HistogramMetricFamily("wsgateway_http_duration_seconds", "Durations.", labels=["route"])
    histogram.add_metric(["chat"], [("0.1", bucket), ("+Inf", bucket)], sum_value=0.05 * bucket)
    return families_as_json([counter, ws_open, upstream, histogram])


def _samples(families) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_counters_histograms_and_ws_open_are_summed_other_gauges_labelled_by_worker():
    merged = _samples(merge([("0", _families(3, 2, 1, 4)), ("1", _families(5, 7, 0, 6))]))
    assert merged[("wsgateway_http_requests_total", (("route", "chat"),))] == 8
    assert merged[("wsgateway_ws_open", (("route", "chat"),))] == 9
    assert merged[("wsgateway_http_duration_seconds_bucket", (("le", "+Inf"), ("route", "chat")))] == 10
    assert merged[("wsgateway_http_duration_seconds_count", (("route", "chat"),))] == 10
    assert merged[("wsgateway_upstream_up", (("route", "chat"), ("worker", "0")))] == 1
    assert merged[("wsgateway_upstream_up", (("route", "chat"), ("worker", "1")))] == 0


class _Own:
    def __init__(self, requests: int) -> None:
        self.requests = requests

    def collect(self):
        counter = CounterMetricFamily("wsgateway_http_requests", "Requests.", labels=["route"])
        counter.add_metric(["chat"], self.requests)
        return iter([counter])


def test_a_worker_answers_with_its_live_counts_plus_its_peers_and_the_retired(tmp_path):
    """A retired worker's counters stay in the totals (they never go back), its gauges leave."""
    with open(tmp_path / "worker-1.json", "w") as f:
        json.dump({"worker": 1, "families": _families(5, 7, 1, 1)}, f)
    retire(str(tmp_path), 1)
    assert not os.path.exists(worker_file(str(tmp_path), 1))
    with open(tmp_path / "worker-2.json", "w") as f:
        json.dump({"worker": 1, "families": _families(0, 3, 1, 1)}, f)
    retire(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ["retired.json"]
    own = _Own(2)
    stats = WorkerStats(str(tmp_path), 0, 2, own, clock=None)
    text = generate_latest(stats.registry()).decode()
    assert 'wsgateway_http_requests_total{route="chat"} 7.0' in text
    assert "wsgateway_ws_open" not in text
    own.requests = 4
    assert 'wsgateway_http_requests_total{route="chat"} 9.0' in generate_latest(stats.registry()).decode()


def _total(stats: WorkerStats) -> float:
    return sum(s.value for f in stats.families() if f.name == "wsgateway_http_requests" for s in f.samples)


def test_totals_never_go_back_whichever_worker_answers(tmp_path):
    """
    A worker counts more after its last publication; a scrape it answers
    counts that, and a later scrape answered by its peer must not count less
    (Prometheus would read a counter reset).
    """
    from twisted.internet.task import Clock

    first_own, second_own = _Own(10), _Own(5)
    first = WorkerStats(str(tmp_path), 0, 2, first_own, Clock())
    second = WorkerStats(str(tmp_path), 1, 2, second_own, Clock())
    first.path, second.path = str(tmp_path / "worker-100.json"), str(tmp_path / "worker-101.json")
    first.publish()
    second.publish()
    first_own.requests += 7  # served since its last publication
    totals = [_total(first), _total(second), _total(first)]
    assert totals == [22, 22, 22]
    second_own.requests += 1
    assert [_total(second), _total(first)] == [23, 23]


def test_a_worker_retiring_during_a_scrape_is_counted_once(tmp_path):
    """Between retired.json naming a worker and its file's removal, a scrape counts it once."""
    published = {"worker": 1, "families": _families(5, 0, 1, 1)}
    with open(worker_file(str(tmp_path), 1), "w") as f:
        json.dump(published, f)
    retire(str(tmp_path), 1)
    with open(worker_file(str(tmp_path), 1), "w") as f:  # the file not yet removed
        json.dump(published, f)
    stats = WorkerStats(str(tmp_path), 0, 2, _Own(2), clock=None)
    stats.path = str(tmp_path / "worker-100.json")
    assert _total(stats) == 7
