"""
Turning a benchmark run's raw measurements into the table people read.

Pure functions over plain data: the medians and ranges of repeated samples,
the ratios of the gateway to nginx, to the seed's aiohttp design and to the
direct floor, the verdicts against the bars the issues set, the machine's noise (CPU steal from /proc/stat, load
average) and, for ``--profile``, the hot spots of py-spy's collapsed stacks.
"""

from __future__ import annotations

import collections
import random
import re
import statistics
from typing import Any, Iterable, Mapping, Sequence

#: The order of the columns of the main table.
TARGETS = ("direct", "nginx", "aiohttp", "gateway")


# -- /proc/stat -----------------------------------------------------------------


def _cpu_fields(lines: Sequence[str]) -> dict[str, list[int]]:
    fields = {}
    for line in lines:
        name, *values = line.split()
        fields[name] = [int(v) for v in values]
    return fields


def kernel_cpu_delta(before: Sequence[str], after: Sequence[str]) -> dict[str, dict[str, float]]:
    """
    Per CPU (``cpu`` is all of them): the share of time busy and stolen by the
    hypervisor between two readings of /proc/stat's ``cpu`` lines.
    """
    a, b = _cpu_fields(before), _cpu_fields(after)
    out = {}
    for name in b:
        if name not in a:
            continue
        d = [y - x for x, y in zip(a[name], b[name])]
        d += [0] * (8 - len(d))
        total = sum(d[:8]) or 1  # user nice system idle iowait irq softirq steal
        idle = d[3] + d[4]
        out[name] = {
            "busy": round((total - idle - d[7]) / total, 4),
            "steal": round(d[7] / total, 4),
            "seconds": round(total / 100.0, 3),
        }
    return out


# -- statistics -------------------------------------------------------------------


def summary(samples: Iterable[float | None]) -> dict[str, Any] | None:
    """Median, min, max and the samples themselves; None without samples."""
    values = [v for v in samples if v is not None]
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "samples": values,
    }


def paired_summary(differences: Sequence[float], resamples: int = 2000) -> dict[str, Any] | None:
    """
    The median of paired differences, with a 95 % bootstrap interval of that
    median (percentiles of the medians of ``resamples`` resamples, seeded: the
    same differences give the same interval) and the interquartile range.
    """
    if not differences:
        return None
    draw = random.Random(0).choices
    n = len(differences)
    medians = sorted(statistics.median(draw(differences, k=n)) for _ in range(resamples))
    q1, _, q3 = statistics.quantiles(differences, n=4) if n > 1 else (differences[0],) * 3
    return {
        "median": statistics.median(differences),
        "ci_low": medians[int(0.025 * resamples)],
        "ci_high": medians[int(0.975 * resamples) - 1],
        "q1": q1,
        "q3": q3,
        "n": n,
    }


def ratio(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> float | None:
    if not a or not b or not b["median"]:
        return None
    return a["median"] / b["median"]


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def fmt_summary(s: Mapping[str, Any] | None, digits: int = 2) -> str:
    if not s:
        return "—"
    if "ci_low" in s:  # a paired_summary
        return (
            f"{fmt(s['median'], digits)} (95% CI {fmt(s['ci_low'], digits)}–{fmt(s['ci_high'], digits)};"
            f" IQR {fmt(s['q1'], digits)}–{fmt(s['q3'], digits)}; {s['n']} pairs)"
        )
    if s["n"] == 1:
        return fmt(s["median"], digits)
    return f"{fmt(s['median'], digits)} ({fmt(s['min'], digits)}–{fmt(s['max'], digits)})"


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}x"


# -- the tables -------------------------------------------------------------------


#: A bar's kind: the value it reads, how it is shown, and whether it is a floor.
_BARS = {
    "ratio_nginx": ("vs_nginx", "{limit}x nginx", False),
    "ratio_aiohttp": ("vs_aiohttp", "{limit}x aiohttp", False),
    "min_ratio_aiohttp": ("vs_aiohttp", "{limit}x aiohttp", True),
}


def _one_verdict(row: Mapping[str, Any], kind: str, limit: float) -> str:
    if kind in _BARS:
        field, shown, floor = _BARS[kind]
        value = row.get(field)
        shown = shown.format(limit=limit)
    else:
        s = row["cells"].get("gateway")
        value = s["median"] if s else None
        shown, floor = f"{limit} {row['unit']}", False
    shown = (">= " if floor else "<= ") + shown
    if value is None:
        return f"{shown}: not measured"
    held = value >= limit if floor else value <= limit
    return f"{shown}: {'PASS' if held else 'FAIL'}"


def verdict(row: Mapping[str, Any]) -> str:
    """The row's bars (one ``(kind, limit)`` or a list of them), each PASS, FAIL or not measured."""
    bar = row.get("bar")
    if not bar:
        return ""
    bars = [bar] if isinstance(bar, tuple) else list(bar)
    return "; ".join(_one_verdict(row, kind, limit) for kind, limit in bars)


def main_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown table: one row per figure, median (min–max) per target, ratios, bars."""
    head = (
        "| figure | unit | " + " | ".join(TARGETS)
        + " | gateway / nginx | gateway / aiohttp | gateway / direct | bar |"
    )
    lines = [head, "|" + "---|" * (len(TARGETS) + 6)]
    for row in rows:
        cells = [fmt_summary(row["cells"].get(t), row.get("digits", 2)) for t in TARGETS]
        ratios = (fmt_ratio(row.get(k)) for k in ("vs_nginx", "vs_aiohttp", "vs_direct"))
        lines.append(
            f"| {row['title']} | {row['unit']} | "
            + " | ".join(cells)
            + " | " + " | ".join(ratios) + f" | {verdict(row)} |"
        )
    return "\n".join(lines)


def complete_row(row: dict[str, Any]) -> dict[str, Any]:
    """Fill in a row's ratios from its cells (the gateway's over nginx's, aiohttp's, direct's)."""
    cells = row["cells"]
    for target in ("nginx", "aiohttp", "direct"):
        row[f"vs_{target}"] = ratio(cells.get("gateway"), cells.get(target))
    row["verdict"] = verdict(row)
    return row


# -- py-spy ----------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame_key(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (package/file.py)``, without the line."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for anchor in ("site-packages/", "lib/python3", "/work/main/"):
        if anchor in path:
            path = path.split(anchor, 1)[1]
            break
    if path.startswith(".") and "/" in path:
        path = path.split("/", 1)[1]
    return f"{m.group('func')} ({path})"


def _module(frame_key: str) -> str:
    path = frame_key.rsplit("(", 1)[-1].rstrip(")")
    parts = path.split("/")
    if parts[0] in ("twisted_gateway", "autobahn", "twisted", "txaio", "treq", "zope", "jwt"):
        return "/".join(parts[:3]) if parts[0] == "twisted" else "/".join(parts[:2])
    return parts[0] if len(parts) > 1 else path


#: Innermost frames that mean waiting, not working: the reactor in epoll_wait
#: (Twisted's doPoll, or the gateway's own ``_compat._do_poll`` that replaces it),
#: an idle thread-pool worker (py-spy cannot always tell these from running).
IDLE_LEAVES = (
    "EPollReactor.doPoll (twisted/internet/epollreactor.py)",
    "_do_poll (twisted_gateway/_compat.py)",
    "Condition.wait (threading.py)",
)
#: Frames every sample shares (twistd's start-up and the reactor loop): left out
#: of the inclusive list, where they would only ever read ~100%.
_FRAMEWORK = (
    "twisted/application/", "twisted/scripts/", "(twistd)", "ReactorBase.", "EPollReactor.doPoll",
    "_do_poll (twisted_gateway/_compat.py)",
)


def collapsed_hot_spots(text: str, top: int = 25) -> dict[str, Any]:
    """
    Self and inclusive shares per function, and self shares per module, from
    py-spy's ``--format raw`` output (``frame;frame;... count`` per line).
    Shares are of busy samples: those ending in the reactor's wait are idle.
    """
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    modules: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_key(f) for f in stack.split(";") if f.strip()]
        # py-spy puts the thread/process name first; drop frames without a file.
        frames = [f for f in frames if "(" in f]
        if not frames:
            continue
        if frames[-1] in IDLE_LEAVES:
            idle += n
            continue
        total += n
        self_counts[frames[-1]] += n
        modules[_module(frames[-1])] += n
        for key in set(frames):
            if not any(marker in key for marker in _FRAMEWORK):
                incl_counts[key] += n

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / total, 1)) for k, v in counter.most_common(top)]

    return {
        "samples": total,
        "idle_samples": idle,
        "self": share(self_counts) if total else [],
        "inclusive": share(incl_counts) if total else [],
        "modules": share(modules) if total else [],
    }


def hot_spots_text(title: str, spots: Mapping[str, Any]) -> str:
    lines = [
        f"# {title}: {spots['samples']} busy samples ({spots['idle_samples']} idle ones, waiting in"
        " epoll or in an idle worker thread, left out)",
        "",
    ]
    for heading, key in (("self time by module", "modules"), ("self time", "self"),
                         ("inclusive time", "inclusive")):
        lines.append(f"## {heading}")
        lines += [f"{pct:5.1f}%  {name}" for name, pct in spots[key]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    # python bench/report.py PROFILE.raw [TOP]: the hot spots of a py-spy raw profile.
    with open(sys.argv[1], errors="replace") as f:
        found = collapsed_hot_spots(f.read(), int(sys.argv[2]) if len(sys.argv) > 2 else 25)
    print(hot_spots_text(sys.argv[1], found))
