"""
One answer for a gateway of several workers: ``/metrics``, ``/healthz`` and
``/readyz`` speak for all of them, whichever worker a scrape reaches.

Each worker publishes its own metric families (what its
:class:`~twisted_gateway.metrics.GatewayCollector` yields) to a file of its
own in a directory the supervisor creates, every :data:`PUBLISH_INTERVAL` s
when they changed and once more when it stops; the supervisor publishes its
own (worker restarts, workers ready). A scrape merges the answering worker's
live families (published as it answers) with every other file through prometheus_client's own
``Metric`` objects: counters and histograms are summed; so are the gauges of
:data:`SUMMED_GAUGES`; any other gauge keeps one series per worker (a
``worker`` label). When a worker ends, the supervisor keeps its counters
(``retired.json``, totals never go back) and drops its gauges.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator, TypedDict, cast

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted_gateway.periodic import Periodic

from twisted_gateway._bases import Service

#: Seconds between a worker's publications (a peer's scrape lags by at most this).
PUBLISH_INTERVAL = 0.5
#: Gauges whose per-worker values add up to a meaningful whole.
SUMMED_GAUGES = frozenset(
    {
        "wsgateway_ws_open",
        "wsgateway_http_in_flight",
        "wsgateway_upstream_open_connections",
        "wsgateway_ws_handshakes_in_progress",
        "wsgateway_workers",
        "wsgateway_workers_ready",
    }
)
#: A metric family as plain data (name, type, help, samples), as JSON carries it
#: from the process that wrote it to the one that reads it.
FamilyJSON = dict[str, Any]

SUPERVISOR_FILE = "supervisor.json"
#: The counters of every worker that ended, summed.
RETIRED_FILE = "retired.json"


def families_as_json(families: Iterable[Metric]) -> list[FamilyJSON]:
    """Metric families as plain data (name, type, help, samples)."""
    return [
        {
            "name": family.name,
            "type": family.type,
            "help": family.documentation,
            "samples": [[s.name, s.labels, s.value] for s in family.samples],
        }
        for family in families
    ]


def merge(sources: Iterable[tuple[str, list[FamilyJSON]]]) -> list[Metric]:
    """
    One family per name from each source's families (``(worker, families)``):
    samples with the same name and labels are summed, except in gauges outside
    :data:`SUMMED_GAUGES`, which gain a ``worker`` label instead.
    """
    merged: dict[str, tuple[FamilyJSON, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for worker, families in sources:
        for family in families:
            head, samples = merged.setdefault(family["name"], (family, {}))
            per_worker = family["type"] == "gauge" and family["name"] not in SUMMED_GAUGES
            for name, labels, value in family["samples"]:
                if per_worker:
                    labels = {**labels, "worker": worker}
                key = (name, tuple(sorted(labels.items())))
                samples[key] = samples.get(key, 0.0) + value
    out = []
    for head, samples in merged.values():
        metric = Metric(head["name"], head["help"], head["type"])
        for (name, labels), value in samples.items():
            metric.add_sample(name, dict(labels), value)
        out.append(metric)
    return out


def write_atomically(path: str, data: object) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half of one."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(temporary, path)


class Published(TypedDict, total=False):
    """A file of the directory: a worker's, ``retired.json`` or the supervisor's."""

    worker: int | str
    families: list[FamilyJSON]
    #: retired.json: the workers' files already in its totals
    absorbed: list[str]
    #: the supervisor's: workers configured and ready
    workers: int
    ready: int


def read_json(path: str) -> Published | None:
    try:
        with open(path) as f:
            return cast(Published, json.load(f))
    except (OSError, ValueError):
        return None  # gone (a retired worker) or being replaced: the next scrape has it


def worker_file(directory: str, pid: int) -> str:
    return os.path.join(directory, f"worker-{pid}.json")


def retire(directory: str, pid: int) -> None:
    """
    A worker ended: its counters and histograms join ``retired.json`` (one
    file however many workers came and went), its gauges go (the supervisor's job).
    """
    path = worker_file(directory, pid)
    data = read_json(path)
    if data is not None:
        ended = [f for f in data["families"] if f["type"] != "gauge"]
        before = read_json(os.path.join(directory, RETIRED_FILE)) or {"families": []}
        merged = merge([("retired", before["families"]), ("retired", ended)])
        # Until the worker's file is gone, a scrape must not count it twice:
        # the files named here are in the totals already.
        absorbed = [name for name in before.get("absorbed", []) if os.path.exists(os.path.join(directory, name))]
        absorbed.append(os.path.basename(path))
        retired = {"worker": "retired", "families": families_as_json(merged), "absorbed": absorbed}
        write_atomically(os.path.join(directory, RETIRED_FILE), retired)
    try:
        os.unlink(path)
    except OSError:
        pass


class WorkerStats(Service):
    """
    A worker's view of the whole gateway: publishes its own families and
    merges everyone's at a scrape (:meth:`registry`).
    """

    def __init__(self, directory: str, worker: int, workers: int, own: Collector, clock: IReactorTime) -> None:
        self.directory, self.worker, self.workers = directory, worker, workers
        self.own = own
        self.path = worker_file(directory, os.getpid())
        self._published: list[FamilyJSON] | None = None
        self._loop = Periodic(clock, PUBLISH_INTERVAL, self.publish, now=True)

    def startService(self) -> None:
        super().startService()
        self._loop.start()

    def stopService(self) -> Deferred[None] | None:
        self._loop.stop()
        self.publish()
        return super().stopService()

    def publish(self, families: list[FamilyJSON] | None = None) -> None:
        if families is None:
            families = families_as_json(self.own.collect())
        if families != self._published:  # compared as data: serialised once, when written
            try:
                write_atomically(self.path, {"worker": self.worker, "families": families})
            except OSError:
                return  # the supervisor removed the directory: it is stopping
            self._published = families

    def _peers(self) -> Iterator[tuple[str, list[FamilyJSON]]]:
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            names = []
        # Workers' files first, retired.json last: a worker retiring between
        # the two reads is then counted once (in retired.json, which names it).
        peers = {}
        for name in names:
            path = os.path.join(self.directory, name)
            if name.endswith(".json") and name != RETIRED_FILE and path != self.path:
                data = read_json(path)
                if data is not None:
                    peers[name] = (str(data.get("worker", "")), data["families"])
        retired = read_json(os.path.join(self.directory, RETIRED_FILE))
        if retired is not None:
            for name in retired.get("absorbed", []):
                peers.pop(name, None)
            peers[RETIRED_FILE] = ("retired", retired["families"])
        yield from peers.values()

    def families(self) -> list[Metric]:
        """
        Every worker's families merged, this one's live. What this worker
        answers is published first, so a later scrape answered by another
        worker never reads less of it: totals never go back between scrapes.
        """
        own = families_as_json(self.own.collect())
        self.publish(own)
        return merge([(str(self.worker), own), *self._peers()])

    def registry(self) -> CollectorRegistry:
        """A registry answering for every worker (for ``/metrics``)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(self))
        return registry

    def supervisor_state(self) -> Published:
        return read_json(os.path.join(self.directory, SUPERVISOR_FILE)) or {}

    def ready_workers(self) -> int:
        return int(self.supervisor_state().get("ready", 0))

    def websockets(self) -> int:
        """Open WebSockets across the workers."""
        for family in self.families():
            if family.name == "wsgateway_ws_open":
                return int(sum(s.value for s in family.samples))
        return 0


class _Merged(Collector):
    def __init__(self, stats: WorkerStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        return iter(self.stats.families())
