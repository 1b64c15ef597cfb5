"""
The soak's verdict: what the clients saw and what the gateway says, checked
against the rules. Pure functions over the run's record (plain dicts and
lists, as saved in the JSON report), so a fabricated record tests them.

A run fails unless: no healthy instance was ejected for a client's fault and
a killed one is back within ``fail_timeout`` + ``health_interval`` of its
restart; every WebSocket ended with the close code the rules give and nothing
hung; nothing leaked (pairs, handshakes, requests in flight, descriptors,
timers, memory over the last half); the metrics agree with the clients; the
gateway's log holds no traceback.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable

#: Log text that means an error nobody handled.
BAD_LOG_TEXT = ("Unhandled Error", "Traceback", "Unhandled error in Deferred")
#: What a client may see when the instance it used was killed under it.
KILLED_UNDER_IT = {1014, 1006, "dropped", "refused:502", "refused:504"}
#: HTTP kinds of the steady load: 200 and an intact body, unless an instance was killed.
STEADY_HTTP = {"get", "post", "rooms"}
#: What the gateway's 502 says when a POST met a kept-alive connection the upstream closed.
KEEPALIVE_CLOSE = "closed its kept-alive connection as the request was sent"
#: Slack for the harness's sampling of the gateway (seconds): a measuring step, not a margin.
SAMPLE_STEP = 0.5
#: Descriptors may differ from the baseline by this much.
FD_SLACK = 5
#: Largest RSS growth over the last half of the storm.
RSS_GROWTH_LIMIT = 2 * 1024 * 1024


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _windows(record: dict[str, Any], route: str | None = None) -> list[tuple[float, float]]:
    """When an instance (of ``route``) was out because it was killed: kill .. back in service."""
    spans = []
    for kill in record["kills"]:
        if route is not None and kill["route"] != route:
            continue
        end = kill.get("back_at") or kill.get("restarted_at") or record["storm"]["end"]
        spans.append((kill["killed_at"] - 1.0, end + 2.0))
    return spans


def _overlaps(start: float, end: float | None, spans: Iterable[tuple[float, float]]) -> bool:
    end = start if end is None else end
    return any(start <= b and end >= a for a, b in spans)


def check_ejections(record: dict[str, Any]) -> Check:
    """Every ejection names an upstream fault the schedule injected on that instance, at that time."""
    cfg = record["config"]
    wrong = []
    for e in record["ejections"]:
        name, at = e["instance"], e["time"]
        killed = any(
            k["target"] == name and k["killed_at"] - 1.0 <= at <= (k.get("restarted_at") or at) + 2.0
            for k in record["kills"]
        )
        causes = set(e.get("causes") or ["health_check"])
        slow = any(
            s["at"] - 1.0 <= at <= s["at"] + cfg["request_timeout"] + 3.0 for s in record["slow_answers"]
        ) and causes <= {"no_head_timeout"} and name.startswith("echo")
        # an echo told to stop reading cannot answer pings either: a late pong is its doing
        deaf = causes <= {"keepalive_timeout"} and name.startswith("echo") and any(
            o["kind"] == "slow_reader_upstream" and o["started"] <= at <= (o["ended"] or at) + 1.0
            for o in record["tally"]["ws_outcomes"]
        )
        if not (killed or slow or deaf):
            wrong.append(f"{name} at +{at - record['storm']['start']:.1f}s ({', '.join(sorted(causes))})")
    n = len(record["ejections"])
    if wrong:
        return Check("no instance ejected for a client's fault", False, f"{len(wrong)} of {n}: " + "; ".join(wrong[:8]))
    return Check("no instance ejected for a client's fault", True, f"{n} ejections, each during an injected upstream fault")


def check_recovery(record: dict[str, Any]) -> Check:
    cfg = record["config"]
    limit = cfg["fail_timeout"] + cfg["health_interval"]
    lines, ok = [], True
    for k in record["kills"]:
        if k.get("back_at") is None or k.get("restarted_at") is None:
            ok = False
            lines.append(f"{k['target']}: never back in service")
            continue
        took = k["back_at"] - k["restarted_at"]
        ok &= took <= limit + SAMPLE_STEP
        lines.append(f"{k['target']} {took:.1f}s")
    if not record["kills"]:
        return Check("killed upstreams back in service", False, "no upstream was killed")
    return Check(
        "killed upstreams back in service",
        ok,
        f"within {limit:g}s of restart (fail_timeout + health_interval): " + ", ".join(lines),
    )


def check_close_codes(record: dict[str, Any]) -> Check:
    """Each WebSocket ended as the rules say (a kill of its route's instance allows 1014 and the like)."""
    wrong: Counter = Counter()
    by_code: Counter = Counter()
    for o in record["tally"]["ws_outcomes"]:
        got = o["got"]
        by_code[str(got)] += 1
        if got in o["expected"]:
            continue
        if isinstance(got, str) and got.startswith("hung"):
            continue  # counted by check_hangs
        if got in KILLED_UNDER_IT and _overlaps(o["started"], o["ended"], _windows(record, o["route"])):
            continue
        wrong[(o["kind"], str(o["expected"]), str(got))] += 1
    n = len(record["tally"]["ws_outcomes"])
    codes = ", ".join(f"{code} x{count}" for code, count in sorted(by_code.items()))
    if wrong:
        shown = "; ".join(f"{kind}: expected {exp}, got {got} x{c}" for (kind, exp, got), c in wrong.most_common(8))
        return Check("close codes as the rules say", False, f"{sum(wrong.values())} of {n} wrong: {shown}")
    return Check("close codes as the rules say", True, f"{n} WebSockets: {codes}")


def check_hangs(record: dict[str, Any]) -> Check:
    hung = []
    for o in record["tally"]["ws_outcomes"]:
        if o["got"] is None or (isinstance(o["got"], str) and o["got"].startswith(("hung", "error"))):
            hung.append(f"{o['kind']}: {o['got']} {o['detail'][-300:]}".strip())
        elif o.get("within") is not None and o["ended"] - o["started"] > o["within"]:
            hung.append(f"{o['kind']}: ended after {o['ended'] - o['started']:.1f}s (limit {o['within']:g}s)")
    hung += [f"HTTP {h['kind']}: no answer" for h in record["tally"]["http_outcomes"] if h["detail"] == "hung"]
    left = record["tasks_left"]
    if left:
        hung.append(f"{left} client tasks still running at the end")
    if hung:
        return Check("nothing hangs past its timeout", False, f"{len(hung)}: " + "; ".join(hung[:6]))
    return Check("nothing hangs past its timeout", True, "every connection ended within its limit")


def check_http(record: dict[str, Any]) -> Check:
    """
    Steady requests: 200 and intact bodies, except around a kill of their
    route's instance, and a POST that met the upstream's idle close of a
    kept-alive connection (a 502 saying so: it may have arrived, it is not sent twice).
    """
    wrong: Counter = Counter()
    raced = 0
    for h in record["tally"]["http_outcomes"]:
        killed = _overlaps(h["started"], h["ended"], _windows(record, h["route"]))
        if h["kind"] == "post" and h["status"] == 502 and KEEPALIVE_CLOSE in h["detail"]:
            raced += 1
            continue
        if h["kind"] in STEADY_HTTP:
            good = h["ok"]
        elif h["kind"] == "upstream_reset":
            good = h["status"] == 200 and not h["ok"]  # the head came, the body was cut
        elif h["kind"] == "slow_answer":
            good = h["status"] == 504
        else:
            good = h["ok"]
        if not good and not killed:
            wrong[(h["kind"], h["status"], h["detail"])] += 1
    n = len(record["tally"]["http_outcomes"])
    also = f"; {raced} POSTs met a kept-alive connection's close (502)" if raced else ""
    if wrong:
        shown = "; ".join(f"{k}: {s} {d} x{c}" for (k, s, d), c in wrong.most_common(8))
        return Check("HTTP answers as the rules say", False, f"{sum(wrong.values())} of {n} wrong: {shown}{also}")
    return Check("HTTP answers as the rules say", True, f"{n} requests{also}")


def check_leaks(record: dict[str, Any]) -> list[Check]:
    base, end = record["baseline"], record["final"]
    checks = [
        Check(
            "no pair, handshake or request left",
            end["pairs"] == 0 and end["handshakes"] == 0 and end["handshakes_in_progress"] == 0
            and end["http_in_flight"] == 0,
            f"pairs {end['pairs']}, handshakes {end['handshakes']} (in progress {end['handshakes_in_progress']}),"
            f" HTTP in flight {end['http_in_flight']}",
        ),
        Check(
            "file descriptors back to the baseline",
            abs(end["fds"] - base["fds"]) <= FD_SLACK,
            f"{base['fds']} -> {end['fds']} (±{FD_SLACK})",
        ),
        Check(
            "timers back to the baseline",
            end["delayed_calls"] <= base["delayed_calls"],
            f"{base['delayed_calls']} -> {end['delayed_calls']} pending delayed calls",
        ),
    ]
    growth = record["rss"]["end"] - record["rss"]["mid"]
    checks.append(
        Check(
            "RSS growth over the last half under 2 MiB",
            growth < RSS_GROWTH_LIMIT,
            f"{record['rss']['mid'] / 2**20:.1f} MiB at mid-storm -> {record['rss']['end'] / 2**20:.1f} MiB"
            f" after it ({growth / 2**20:+.2f} MiB)",
        )
    )
    return checks


def check_metrics(record: dict[str, Any]) -> list[Check]:
    m, t = record["metrics"], record["tally"]
    accepted, closes, open_ = m["handshakes"].get("accepted", 0), m["closes"], m["open"]
    low, high = t["upgrades_accepted"], t["upgrades_accepted"] + t["upgrades_abandoned"]
    hs = Check(
        "handshakes: metrics agree with the clients",
        accepted == closes + open_ and low <= accepted <= high,
        f"accepted {accepted} = closes {closes} + open {open_}; clients saw {low} opens"
        f" and left {t['upgrades_abandoned']} upgrades unanswered",
    )
    client = Counter()
    for h in t["http_outcomes"]:
        if h["status"] is not None:
            client[f"{h['route']} {h['status']}"] += 1
    gateway = Counter(m["http"])
    short = {k: (client[k], gateway.get(k, 0)) for k in client if client[k] > gateway.get(k, 0)}
    extra = sum(gateway.values()) - sum(client.values())
    http = Check(
        "HTTP: metrics agree with the clients",
        not short and extra == t["http_abandoned"],
        f"{sum(gateway.values())} counted = {sum(client.values())} answered + {t['http_abandoned']} left"
        f" by their client (counted {extra}); by status "
        + ", ".join(f"{k} {gateway[k]}" for k in sorted(gateway))
        + (f"; fewer than the clients saw: {short}" if short else ""),
    )
    return [hs, http]


def check_log(record: dict[str, Any]) -> Check:
    bad = record["log_problems"]
    if bad:
        return Check("no traceback in the gateway's log", False, f"{len(bad)} lines, first: {bad[0][:300]}")
    return Check("no traceback in the gateway's log", True, f"{record['log_lines']} lines read")


def check_volume(record: dict[str, Any]) -> Check:
    want, got = record["minimums"], figures(record)
    short = [f"{k} {got[k]} < {v}" for k, v in want.items() if got[k] < v]
    return Check(
        "the storm was as big as asked",
        not short,
        "; ".join(short) if short else ", ".join(f"{k} {got[k]} (>= {v})" for k, v in want.items()),
    )


def figures(record: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a run."""
    opens = record["open_samples"] or [0]
    m = record["metrics"]
    return {
        "open_websockets_median": int(statistics.median(opens)),
        "open_websockets_max": max(opens),
        "messages": m["messages"],
        "handshakes": sum(m["handshakes"].values()),
        "http_requests": sum(m["http"].values()),
    }


def run_checks(record: dict[str, Any]) -> list[Check]:
    return [
        check_ejections(record),
        check_recovery(record),
        check_close_codes(record),
        check_hangs(record),
        check_http(record),
        *check_leaks(record),
        *check_metrics(record),
        check_log(record),
        check_volume(record),
    ]


def markdown(record: dict[str, Any], checks: list[Check]) -> str:
    f = figures(record)
    storm = record["storm"]
    lines = [
        f"# Soak run ({record['mode']}, seed {record['seed']}): {'PASS' if all(c.ok for c in checks) else 'FAIL'}",
        "",
        f"Storm {storm['end'] - storm['start']:.0f} s; {len(record['faults'])} faults injected"
        f" ({', '.join(f'{k} x{v}' for k, v in sorted(Counter(x['kind'] for x in record['faults']).items()))}).",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {k.replace('_', ' ')} | {v:,} |" for k, v in f.items()),
        f"| messages sent / received by the clients | {record['tally']['messages_sent']:,} /"
        f" {record['tally']['messages_received']:,} |",
        f"| upstream failures counted, by reason | {record['metrics']['failures'] or 'none'} |",
        "",
        *_memory_lines(record),
        *_probe_lines(record),
        "| check | result | detail |",
        "|---|---|---|",
        *(f"| {c.name} | {'ok' if c.ok else '**FAIL**'} | {c.detail.replace('|', '/')} |" for c in checks),
        "",
    ]
    return "\n".join(lines)


def _probe_lines(record: dict[str, Any]) -> list[str]:
    """With ``--probe-memory``: mid-storm against after the storm, by what holds the memory."""
    lines = record.get("memory_probe")
    if not lines:
        return []
    storm = record["storm"]
    mid_t = storm["start"] + (storm["end"] - storm["start"]) / 2
    mid = min(lines, key=lambda x: abs(x["t"] - mid_t))
    end = lines[-1]
    mib = 2**20
    rows = [("RSS", "rss", mib, "MiB"), ("RSS anonymous", "rss_anon", mib, "MiB"),
            ("RSS file-backed", "rss_file", mib, "MiB"),
            ("Python's arenas (1 MiB each)", "py_arenas", 1, ""),
            ("Python's allocated blocks, bytes", "py_allocated", mib, "MiB"),
            ("Python's arenas kept free, bytes", "py_available", mib, "MiB"),("malloc in use (all arenas + mmap)", "malloc_in_use", mib, "MiB"),
            ("malloc kept free", "malloc_free", mib, "MiB"), ("malloc arenas' size", "malloc_arena", mib, "MiB"),
            ("Python's allocated blocks", "py_blocks", 1, ""), ("threads", "threads", 1, "")]
    out = ["Memory probe (the gateway, mid-storm -> after the storm):", "",
           "| what | mid-storm | after | change |", "|---|---|---|---|"]
    for name, key, unit, suffix in rows:
        a, b = mid[key] / unit, end[key] / unit
        fmt = ".2f" if unit != 1 else ",.0f"
        out.append(f"| {name} | {a:{fmt}} {suffix} | {b:{fmt}} {suffix} | {b - a:+{fmt}} {suffix} |")
    typed = [x for x in lines if "types" in x]
    if len(typed) >= 2:
        t_mid = min(typed, key=lambda x: abs(x["t"] - mid_t))
        t_end = typed[-1]
        grown = sorted(((n, t_end["types"].get(n, 0) - t_mid["types"].get(n, 0)) for n in t_end["types"]),
                       key=lambda kv: -kv[1])[:8]
        out += ["", "Live objects by type, largest growth: "
                + ", ".join(f"{n} {d:+,} ({t_end['types'][n]:,})" for n, d in grown)]
    if "types_after_collect" in end:
        after = end["types_after_collect"]
        out += ["", f"After the storm, gc.collect() found {end['collected']:,} objects in unreachable cycles"
                f" (RSS {end['rss'] / mib:.2f} -> {end['rss_after_collect'] / mib:.2f} MiB); still live: "
                + ", ".join(f"{n} {after.get(n, 0):,}" for n, _ in grown)]
    return out + [""]


def _memory_lines(record: dict[str, Any]) -> list[str]:
    """With ``--trace-memory``: what Python held at mid-storm and at the end, and RSS after a trim."""
    memory = record.get("memory")
    if not memory or "error" in memory:
        return [f"Memory trace: {memory['error']}", ""] if memory else []
    mid, end = memory["mid"], memory["end"]
    mib = 2**20
    lines = [
        f"Memory trace (tracemalloc, the gateway, after gc): Python's live allocations {mid['traced'] / mib:.2f} MiB"
        f" at mid-storm, {end['traced'] / mib:.2f} MiB at its end ({(end['traced'] - mid['traced']) / mib:+.2f} MiB);"
        f" RSS {mid['rss'] / mib:.1f} -> {end['rss'] / mib:.1f} MiB,"
        f" {end.get('rss_after_trim', 0) / mib:.1f} MiB after malloc_trim(0).",
        "",
        "| largest growth, by line | bytes | now |",
        "|---|---|---|",
        *(f"| {where} | {diff:+,} | {size:,} |" for where, diff, size, _ in memory["top_growth"][:8]),
        "",
    ]
    return lines


def as_json(record: dict[str, Any], checks: list[Check]) -> dict[str, Any]:
    return {
        "ok": all(c.ok for c in checks),
        "figures": figures(record),
        "checks": [asdict(c) for c in checks],
        "record": record,
    }
