"""Run the whole benchmark: our service beside the floor, the Express server and FastAPI, one core each.

    python3 bench/run.py                                   # everything, ~10 minutes
    python3 bench/run.py --quick                           # a ~3.5-minute smoke run
    python3 bench/run.py --subjects flask --scenarios S1,S2
    python3 bench/run.py --targets                         # print the targets table and stop

It installs the peers' dependencies itself (bench/.venv-peers from bench/requirements.txt,
`npm ci` in bench/peers/express) and needs the repository's .venv (the README's quickstart).
Every subject runs on core 1 (`taskset -c 1`); the fake upstream, the load generator and this
script on core 0. Each measured run gets a fresh upstream and a fresh subject, a few warm-up
streams, then the load; CPU and RSS are read from /proc for the subject's whole process tree.

The file reads in three parts: each scenario (how it runs, how its table reads), then the two
tables that drive everything, SCENARIOS and TARGETS, then `main`. A full run writes
bench/results.md; a filtered or --quick run writes bench/results/last.md (or --out). Logs and the
raw figures of every run go to bench/results/ (not committed).
"""

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness import (
    BENCH,
    DIRECT,
    FLOOR,
    HARNESS_CORE,
    LOGS,
    ROOT,
    SUBJECT_NAMES,
    WARMUP,
    Options,
    Peaks,
    children,
    ensure_deps,
    fd_cap,
    first_event,
    held_connections,
    loadavg,
    machine,
    measured,
    raise_fd_limit,
    rss_kb,
    run_load,
    spread,
    stalled_clients,
    start_nginx,
    start_service,
    start_subject,
    start_upstream,
    stop_upstream,
    stream_ends,
    tree,
    tree_cpu,
    tree_rss_kb,
    versions,
    wait_port,
    warm_up,
)

P99_LIMIT_MS = 1000.0  # S2: a subject fails a level past this p99 added latency
# S5 runs every subject with these (the peers ignore them): stalled streams are let go within seconds
STALL_SETTINGS = {"CHAT_SEND_TIMEOUT": "5", "CHAT_HEARTBEAT_SECONDS": "1"}


# --- report helpers -----------------------------------------------------------------------------


def fmt(value, digits=0):
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def ratio(value, base):
    if value is None or not base:
        return "–"
    return f"{value / base:.2f}×"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def value_of(runs, subject, key, concurrency=None):
    """One subject's figure in these runs (at this C), or None."""
    for run in runs:
        if run["subject"] == subject and (concurrency is None or run.get("concurrency") == concurrency):
            return run.get(key)
    return None


def failed(result, p99_limit=None):
    """Why a run failed (errors, unfinished streams, latency), or None."""
    reasons = []
    if result["error_count"]:
        reasons.append("errors " + ",".join(f"{k}={v}" for k, v in result["errors"].items()))
    if result["unfinished"]:
        reasons.append(f"unfinished {result['unfinished']}")
    p99 = result["latency_ms"]["p99"]
    if p99_limit is not None and p99 is not None and p99 > p99_limit:
        reasons.append(f"p99 {p99:.0f} ms > {p99_limit:.0f} ms")
    return "; ".join(reasons) or None


def say(result, extra=""):
    lat = result["latency_ms"]
    print(
        f"  {result['subject']:9} C={result['concurrency']:<6} events/s={result['events_per_s']:9.0f} "
        f"cpu/event={fmt(result.get('cpu_us_per_event'), 1)}us p50={fmt(lat['p50'], 2)}ms p99={fmt(lat['p99'], 2)}ms "
        f"err={result['error_count']} unfinished={result['unfinished']} harness={result['harness_core_pct']:.0f}% "
        f"foreign@core0/1={result['foreign_core0_pct']:.0f}/{result['foreign_core1_pct']:.0f}% {extra}",
        flush=True,
    )


# --- S1: upstream flat out ----------------------------------------------------------------------


def run_s1(subjects, p, options):
    runs = []
    for subject in subjects:
        result = measured(options, subject, "S1", {"tokens": p["tokens"]}, p["c"], ramp=0.2, timeout=180)
        result["failed"] = failed(result)
        say(result)
        runs.append(result)
    return runs


def report_s1(runs):
    express, floor = (value_of(runs, name, "events_per_s") for name in ("express", FLOOR))
    rows = []
    for r in runs:
        lat = r["latency_ms"]
        rows.append(
            [
                r["subject"],
                fmt(r["events_per_s"]),
                ratio(r["events_per_s"], express),
                ratio(r["events_per_s"], floor),
                f"{r['completed']}/{r['concurrency']}",
                r["error_count"],
                fmt(r["cpu_s"], 2),
                fmt(r["cpu_us_per_event"], 1),
                fmt(r["rss_peak_kb"] / 1024, 1),
                fmt(lat["p50"], 1),
                fmt(lat["p99"], 1),
                fmt(r["harness_core_pct"]),
                f"{r['foreign_core0_pct']:.0f} / {r['foreign_core1_pct']:.0f}",
            ]
        )
    header = ["subject", "events/s", "× Express", "× floor", "completed", "errors", "CPU s", "CPU µs/event"]
    header += ["peak RSS MB", "added p50 ms", "added p99 ms", "harness core %", "foreign load core 0 / 1 %"]
    return table(header, rows)


# --- S2: 50 tokens/s per stream -----------------------------------------------------------------


def run_s2(subjects, p, options):
    runs = []
    seconds = p["tokens"] * 0.02
    for subject in subjects:
        for c in p["levels"]:
            ramp = 2.0
            upstream_args = {"tokens": p["tokens"], "interval": 0.02}
            result = measured(options, subject, f"S2-{c}", upstream_args, c, ramp=ramp, timeout=ramp + seconds + 20)
            result["failed"] = failed(result, P99_LIMIT_MS)
            say(result, result["failed"] or "")
            runs.append(result)
            if result["failed"]:
                break  # stop where the subject fails
    return runs


def report_s2(runs):
    rows = []
    for r in runs:
        lat, ttfe, gap = r["latency_ms"], r["ttfe_ms"], r["gap_ms"]
        express, floor = (value_of(runs, name, "cpu_us_per_event", r["concurrency"]) for name in ("express", FLOOR))
        rows.append(
            [
                r["subject"],
                r["concurrency"],
                fmt(r["events_per_s"]),
                fmt(r["cpu_us_per_event"], 1),
                ratio(r["cpu_us_per_event"], express),
                ratio(r["cpu_us_per_event"], floor),
                fmt(r["subject_core_pct"]),
                fmt(lat["p50"], 2),
                fmt(lat["p99"], 2),
                fmt(lat["max"], 1),
                fmt(ttfe["p50"], 1),
                fmt(ttfe["p99"], 1),
                fmt(gap["p99"], 1),
                r["error_count"],
                r["unfinished"],
                fmt(r["rss_peak_kb"] / 1024, 1),
                fmt(r["harness_core_pct"]),
                f"{r['foreign_core0_pct']:.0f} / {r['foreign_core1_pct']:.0f}",
                r["failed"] or "ok",
            ]
        )
    header = ["subject", "C", "events/s", "CPU µs/event", "× Express", "× floor", "subject core %", "added p50 ms"]
    header += ["added p99 ms", "added max ms", "TTFE p50 ms", "TTFE p99 ms", "gap p99 ms", "errors", "unfinished"]
    header += ["peak RSS MB", "harness core %", "foreign load core 0 / 1 %", "verdict"]
    return table(header, rows)


# --- S3: idle streams ---------------------------------------------------------------------------


def run_s3(subjects, p, options):
    runs = []
    levels = [min(c, fd_cap()) for c in p["levels"]]
    if levels != p["levels"]:
        print(f"  the hard fd limit caps one process at {fd_cap()} streams (2 fds each): C = {levels}", flush=True)
    for subject in subjects:
        for c in levels:
            ramp = max(1.0, c / 1000)
            timeout = ramp + 30
            upstream_args = {"tokens": 2, "hold": timeout + 60}  # one token, then silence past the run
            result = measured(options, subject, f"S3-{c}", upstream_args, c, ramp=ramp, timeout=timeout, hold_open=1.5)
            held = result["held_open"] or 0
            if result["rss_open_kb"] and held == c:  # short of C, the waiting requests blur the figure
                result["kb_per_stream"] = (result["rss_open_kb"] - result["rss_idle_kb"]) / held
            else:
                result["kb_per_stream"] = None
            result["failed"] = failed(result) if held == c else f"only {held} of {c} streams open"
            say(result, f"open={held} KB/stream={fmt(result['kb_per_stream'], 1)} {result['failed'] or ''}")
            runs.append(result)
            if result["failed"]:
                break
    return runs


def report_s3(runs):
    rows = []
    for r in runs:
        express, floor = (value_of(runs, name, "kb_per_stream", r["concurrency"]) for name in ("express", FLOOR))
        rows.append(
            [
                r["subject"],
                r["concurrency"],
                r["held_open"],
                fmt(r["rss_idle_kb"] / 1024, 1),
                fmt(r["rss_open_kb"] / 1024 if r["rss_open_kb"] else None, 1),
                fmt(r["kb_per_stream"], 1),
                ratio(r["kb_per_stream"], express),
                ratio(r["kb_per_stream"], floor),
                fmt(r["ready_after_s"], 1),
                fmt(r["ttfe_ms"]["p99"], 0),
                r["error_count"],
                r["failed"] or "ok",
            ]
        )
    header = ["subject", "C", "open", "RSS idle MB", "RSS open MB", "KB/stream", "× Express", "× floor"]
    header += ["all open after s"]
    header += ["TTFE p99 ms", "errors", "verdict"]
    return table(header, rows)


# --- S4: cold start -----------------------------------------------------------------------------


def run_s4(subjects, p, options):
    reps = p["reps"]
    runs = []
    for subject in subjects:
        if subject == DIRECT:
            continue
        listen, ttfe, total, second = [], [], [], []
        for rep in range(reps):
            upstream = start_upstream(f"S4-{rep}", tokens=5, warmup=0)
            proc = start_subject(subject, f"S4-{rep}", upstream.port, wait=False)
            try:
                listening = wait_port(proc.port, proc.process, interval=0.002)
                first = first_event(proc.port)
                again = first_event(proc.port)
                second.append(again * 1000 if again is not None else float("nan"))
                listen.append((listening - proc.started) * 1000)
                ttfe.append(first * 1000 if first is not None else float("nan"))
                total.append((listening - proc.started) * 1000 + ttfe[-1])
            finally:
                proc.stop()
                stop_upstream(upstream)
        result = {
            "subject": subject,
            "reps": reps,
            "listen_ms": statistics.median(listen),
            "ttfe_ms": statistics.median(ttfe),
            "start_to_event_ms": statistics.median(total),
            "second_ms": statistics.median(second),
            "ttfe_all_ms": ttfe,
        }
        print(
            f"  {subject:9} start->listening {result['listen_ms']:.0f} ms, first request's first event "
            f"{result['ttfe_ms']:.1f} ms (median of {reps}: {', '.join(f'{t:.0f}' for t in ttfe)})",
            flush=True,
        )
        runs.append(result)
    return runs


def report_s4(runs):
    base = value_of(runs, "express", "ttfe_ms")
    rows = [
        [
            r["subject"],
            r["reps"],
            fmt(r["listen_ms"]),
            fmt(r["ttfe_ms"], 1),
            ratio(r["ttfe_ms"], base),
            fmt(r["start_to_event_ms"]),
            ", ".join(fmt(t) for t in r["ttfe_all_ms"]),
            fmt(r["second_ms"], 1),
        ]
        for r in runs
    ]
    header = ["subject", "reps", "start → port open ms", "first request → first event ms", "× Express"]
    header += ["start → first event ms", "each rep ms", "second request → first event ms"]
    return table(header, rows)


# --- S5: clients that never read -----------------------------------------------------------------


def run_s5(subjects, p, options):
    """Clients that send a request and never read, against an upstream as fast as it can: who lets go, when."""
    runs = []
    for subject in subjects:
        if subject == DIRECT:
            continue
        upstream = start_upstream("S5", tokens=p["tokens"])
        proc = start_subject(subject, "S5", upstream.port, concurrency=p["clients"], settings=p["settings"])
        clients = []
        try:
            warm_up(proc, subject, "S5")
            time.sleep(0.3)
            rss_before = tree_rss_kb(proc.pid)
            cpu_before = tree_cpu(proc.pid)
            log_offset = proc.log_path.stat().st_size
            started = time.monotonic()
            clients = stalled_clients(proc.port, p["clients"])
            watched = watch_stalled(proc, upstream, clients, started, p["bound"], rss_before)
            watched.update(rss_before_kb=rss_before, duration_s=time.monotonic() - started)
            watched.update(rss_end_kb=tree_rss_kb(proc.pid), cpu_s=tree_cpu(proc.pid) - cpu_before)
            watched["log_ends"] = stream_ends(proc.log_path, log_offset) if subject.startswith("flask") else None
        finally:
            for sock in clients:
                sock.close()
            proc.stop()
            time.sleep(0.2)
            stop_upstream(upstream)
        result = stall_figures(subject, p, **watched)
        say_s5(result)
        runs.append(result)
    return runs


def watch_stalled(proc, upstream, clients, started, bound, rss_before):
    """Every 100 ms, which of the subject's client and upstream connections are still open, and its RSS."""
    # client port -> "not yet accepted", "held", or seconds from the start to when the subject closed it
    let_go = dict.fromkeys((c.getsockname()[1] for c in clients), "not yet accepted")
    upstream_closed = {}  # the subject's port of each upstream connection -> "held" or when it closed it
    queued = {}  # client port -> (bytes in the subject's send queue, when that last changed): when it filled
    peak = rss_before
    while (now := time.monotonic() - started) < bound:
        peak = max(peak, tree_rss_kb(proc.pid))
        held, held_upstream = held_connections(proc.pid, proc.port, upstream.port)
        for port, size in held.items():
            if port in let_go and queued.get(port, (None,))[0] != size:
                queued[port] = (size, now)
        for states, ports in ((let_go, held), (upstream_closed, held_upstream)):
            for port in ports:
                states[port] = "held"
            for port, state in states.items():
                if state == "held" and port not in ports:  # seen before, gone now: the subject closed it
                    states[port] = now
        gone = [state for state in let_go.values() if not isinstance(state, str)]
        if len(gone) == len(let_go) and now - max(gone) >= 1.0:  # all let go, and a second for the rest
            break
        time.sleep(0.1)
    return {"let_go": let_go, "upstream_closed": upstream_closed, "queued": queued, "rss_peak_kb": peak}


def stall_figures(subject, p, let_go, upstream_closed, queued, **measured_here):
    """S5's figures of one subject from what watch_stalled saw."""
    released = sorted(state for state in let_go.values() if not isinstance(state, str))
    # from when the subject's send queue to the client stopped growing (its write blocked) to when it let go
    after_stall = sorted(state - queued[port][1] for port, state in let_go.items() if not isinstance(state, str))
    stalled = sorted(when for _, when in queued.values())
    closed = sorted(state for state in upstream_closed.values() if not isinstance(state, str))
    accepted = sum(state != "not yet accepted" for state in let_go.values())
    result = {"subject": subject, "clients": p["clients"], "tokens": p["tokens"], "bound_s": p["bound"]}
    result.update(measured_here)
    result.update(
        accepted=accepted,
        kb_per_stream=(result["rss_peak_kb"] - result["rss_before_kb"]) / max(1, accepted),
        let_go=len(released),
        let_go_s=spread(released),
        stalled_s=spread(stalled),
        let_go_after_stall_s=spread(after_stall),
        held=sum(state == "held" for state in let_go.values()),
        upstream_closed=len(closed),
        upstream_closed_s=spread(closed),
        upstream_open_at_end=len(upstream_closed) - len(closed),
    )
    return result


def say_s5(result):
    go, hold, ends = result["let_go_s"], result["let_go_after_stall_s"], result["log_ends"]
    print(
        f"  {result['subject']:9} accepted {result['accepted']}, RSS {result['rss_before_kb'] / 1024:.1f} -> "
        f"peak {result['rss_peak_kb'] / 1024:.1f} MB ({result['kb_per_stream']:.0f} KB/stream), "
        f"CPU {result['cpu_s']:.1f} s, let go {result['let_go']}/{result['clients']}"
        + (f" after {go['min']:.1f}/{go['median']:.1f}/{go['max']:.1f} s" if go else "")
        + (f" ({hold['min']:.1f}/{hold['median']:.1f}/{hold['max']:.1f} s after their queue filled)" if hold else "")
        + f", held {result['held']}, upstream closed {result['upstream_closed']} "
        f"(open {result['upstream_open_at_end']})" + (f", log {ends}" if ends is not None else ""),
        flush=True,
    )


def report_s5(runs):
    def seconds(spread):
        return f"{spread['min']:.1f} / {spread['median']:.1f} / {spread['max']:.1f}" if spread else "–"

    rows = []
    for r in runs:
        ends = r["log_ends"]
        rows.append(
            [
                r["subject"],
                f"{r['accepted']}/{r['clients']}",
                fmt(r["rss_before_kb"] / 1024, 1),
                fmt(r["rss_peak_kb"] / 1024, 1),
                fmt(r["rss_end_kb"] / 1024, 1),
                fmt(r["kb_per_stream"]),
                fmt(r["cpu_s"], 1),
                seconds(r["stalled_s"]),
                r["let_go"],
                seconds(r["let_go_s"]),
                seconds(r["let_go_after_stall_s"]),
                r["held"],
                r["upstream_closed"],
                seconds(r["upstream_closed_s"]),
                r["upstream_open_at_end"],
                ", ".join(f"{k} × {v}" for k, v in sorted(ends.items())) if ends else ("none" if ends == {} else "–"),
                fmt(r["duration_s"], 1),
            ]
        )
    header = ["subject", "accepted", "RSS before MB", "RSS peak MB", "RSS at the end MB", "KB/stream", "CPU s"]
    header += ["send queue full after s", "clients let go", "let go after s", "let go s after the queue filled"]
    header += ["clients held at the end"]
    header += ["upstream connections closed", "closed after s (min / median / max)", "upstream connections still open"]
    header += ["log lines (ours)", "ran s"]
    return table(header, rows)


# --- S6: short replies, as many as one core takes ------------------------------------------------


def run_s6(subjects, p, options):
    """A closed loop of short replies: C requests always in flight, each replaced when it ends, for p["seconds"]."""
    runs = []
    for subject in subjects:
        seconds, upstream_args = p["seconds"], {"tokens": p["tokens"]}
        result = measured(options, subject, "S6", upstream_args, p["c"], 0.2, seconds + 30, duration=seconds)
        result["failed"] = failed(result)
        done = result["completed"]
        result["cpu_us_per_request"] = result["cpu_s"] / done * 1e6 if done and result["cpu_s"] is not None else None
        say(result, f"requests/s={result['requests_per_s']:.0f} cpu/request={fmt(result['cpu_us_per_request'])}us")
        runs.append(result)
    return runs


def report_s6(runs):
    express, floor = (value_of(runs, name, "requests_per_s") for name in ("express", FLOOR))
    rows = []
    for r in runs:
        ttfe = r["ttfe_ms"]
        rows.append(
            [
                r["subject"],
                fmt(r["requests_per_s"]),
                ratio(r["requests_per_s"], express),
                ratio(r["requests_per_s"], floor),
                fmt(r["cpu_us_per_request"]),
                fmt(r["cpu_us_per_event"], 1),
                fmt(r["subject_core_pct"]),
                f"{r['completed']:,}/{r['requests']:,}",
                r["error_count"],
                fmt(ttfe["p50"], 1),
                fmt(ttfe["p99"], 1),
                fmt(r["rss_peak_kb"] / 1024, 1),
                fmt(r["harness_core_pct"]),
                f"{r['foreign_core0_pct']:.0f} / {r['foreign_core1_pct']:.0f}",
            ]
        )
    header = ["subject", "requests/s", "× Express", "× floor", "CPU µs/request", "CPU µs/event", "subject core %"]
    header += ["completed", "errors", "TTFE p50 ms", "TTFE p99 ms", "peak RSS MB", "harness core %"]
    header += ["foreign load core 0 / 1 %"]
    return table(header, rows)


# --- S7: the mission's scale, through nginx ------------------------------------------------------


def run_s7(subjects, p, options):
    """Many streams through the shipped nginx.conf to the shipped gunicorn.conf.py, all on the whole machine."""
    if "flask" not in subjects:
        return []
    warm = 4 * WARMUP  # a few for each worker: least_conn spreads them
    upstream = start_upstream("S7", int(p["rate"] * p["seconds"]), interval=1 / p["rate"], warmup=warm, core=None)
    service = nginx = None
    try:
        service = start_service("S7", upstream.port, p["settings"])
        nginx = start_nginx("S7", service.port, p["nginx"])
        run_load(nginx.port, warm, "S7-warmup", ramp=0, timeout=30, core=None, sources=warm)
        time.sleep(1.0)
        workers, nginxes = children(service.pid), tree(nginx.pid)
        idle = {pid: rss_kb(pid) for pid in workers + nginxes}
        parts = {"service": service, "nginx": nginx, "upstream": upstream}
        cpu_before = {name: tree_cpu(proc.pid) for name, proc in parts.items()}
        log_offset = service.log_path.stat().st_size
        peaks = Peaks(workers + nginxes)
        peaks.start()
        timeout = p["ramp"] + p["seconds"] + 60
        result = run_load(nginx.port, p["streams"], "S7", p["ramp"], timeout, core=None, sources=p["streams"])
        peak = peaks.stop()
        cpu = {name: tree_cpu(proc.pid) - cpu_before[name] for name, proc in parts.items()}
        result["log_ends"] = stream_ends(service.log_path, log_offset)
    finally:
        for proc in (nginx, service):
            if proc is not None:
                proc.stop()
        stop_upstream(upstream)
    result.update(subject="flask", settings=p["settings"], nginx_changes=p["nginx"], streams=p["streams"])
    result.update(nginx_log=nginx_complaints(nginx.error_log), loadgen_cpu=result["loadgen_cpu_s"], cpu_s=cpu)
    result["workers"] = [{"rss_idle_kb": idle[pid], "rss_peak_kb": peak[pid]} for pid in workers]
    result["nginx_rss_idle_kb"] = sum(idle[pid] for pid in nginxes)
    result["nginx_rss_peak_kb"] = sum(peak[pid] for pid in nginxes)
    result["failed"] = failed(result)
    say_s7(result)
    return [result]


def nginx_complaints(path):
    """nginx's error log, its lines counted by what they say (times, pids and addresses left out)."""
    said = {}
    for line in path.read_text(errors="replace").splitlines() if path.exists() else ():
        words = line.split(" ", 3)[-1].split(", client:")[0]  # past the date, time and level
        key = re.sub(r"\d+#\d+: (\*\d+ )?", "", words)[:160]
        said[key] = said.get(key, 0) + 1
    return dict(sorted(said.items(), key=lambda kv: -kv[1])[:5])


def say_s7(r):
    lat, ttfe = r["latency_ms"], r["ttfe_ms"]
    workers = ", ".join(f"{w['rss_idle_kb'] / 1024:.0f} -> {w['rss_peak_kb'] / 1024:.0f}" for w in r["workers"])
    print(
        f"  completed {r['completed']:,}/{r['streams']:,}, errors {r['errors']}, unfinished {r['unfinished']}, "
        f"added p50/p99 {fmt(lat['p50'], 1)}/{fmt(lat['p99'], 1)} ms, TTFE p50/p99 {fmt(ttfe['p50'])}/"
        f"{fmt(ttfe['p99'])} ms, workers' RSS MB {workers}, nginx {r['nginx_rss_idle_kb'] / 1024:.0f} -> "
        f"{r['nginx_rss_peak_kb'] / 1024:.0f} MB, CPU s {r['cpu_s']}, log {r['log_ends']}, nginx said {r['nginx_log']}",
        flush=True,
    )


def report_s7(runs):
    rows = []
    for r in runs:
        lat, ttfe = r["latency_ms"], r["ttfe_ms"]
        worker_mb = " / ".join(f"{w['rss_idle_kb'] / 1024:.0f} → {w['rss_peak_kb'] / 1024:.0f}" for w in r["workers"])
        per_stream = [(w["rss_peak_kb"] - w["rss_idle_kb"]) for w in r["workers"]]
        cpu = r["cpu_s"]
        rows.append(
            [
                f"{r['completed']:,}/{r['streams']:,}",
                ", ".join(f"{k}={v}" for k, v in r["errors"].items()) or "none",
                r["unfinished"],
                f"{fmt(lat['p50'], 1)} / {fmt(lat['p99'], 1)} / {fmt(lat['max'])}",
                f"{fmt(ttfe['p50'])} / {fmt(ttfe['p99'])}",
                worker_mb,
                fmt(sum(per_stream) / max(1, r["streams"]), 1),
                f"{r['nginx_rss_idle_kb'] / 1024:.0f} → {r['nginx_rss_peak_kb'] / 1024:.0f}",
                f"{cpu['service']:.0f} / {cpu['nginx']:.0f} / {cpu['upstream']:.0f} / {r['loadgen_cpu']:.0f}",
                ", ".join(f"{k} × {v}" for k, v in sorted(r["log_ends"].items())) or "none",
            ]
        )
    header = ["completed", "errors", "unfinished", "added p50 / p99 / max ms", "TTFE p50 / p99 ms"]
    header += ["RSS per worker MB (idle → peak)", "KB per stream (workers)", "nginx RSS MB (idle → peak)"]
    header += ["CPU s: service / nginx / upstream / load", "log lines"]
    text = table(header, rows)
    for r in runs:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "none"
        changes = "; ".join(f"`{old}` → `{new}`" for old, new in r["nginx_changes"]) or "none"
        text += f"\n\nBeyond what the README's deploy section sets: settings {settings}; nginx.conf {changes}."
        if r["nginx_log"]:
            text += " nginx's error log: " + "; ".join(f"{k} × {v}" for k, v in r["nginx_log"].items()) + "."
    return text


# --- S8: resume -----------------------------------------------------------------------------------


def run_s8(subjects, p, options):
    """Cut streams mid-reply, then resume every one by Last-Event-ID: how soon, how complete, what kept ones cost."""
    runs = []
    for subject in subjects:
        if not subject.startswith("flask"):
            continue  # the peers and the floor have no resume
        upstream_args = {"tokens": p["tokens"], "interval": 1 / p["rate"]}
        timeout = p["ramp"] + p["tokens"] / p["rate"] + 30
        # A resumed reader is a stream of its own while its generation still holds a slot: room for both.
        both = 2 * p["streams"]
        flags = {"cut_after": p["cut_after"], "pause": p["pause"]}
        flags["settings"] = {"CHAT_MAX_STREAMS": str(both + 50), "GUNICORN_WORKER_CONNECTIONS": str(both + 100)}
        result = measured(options, subject, "S8", upstream_args, p["streams"], p["ramp"], timeout, **flags)
        resumed = result.get("resumed") or {}
        result["kb_per_kept_stream"] = (
            (result["rss_open_kb"] - result["rss_idle_kb"]) / resumed["cut"]
            if resumed.get("cut") and result["rss_open_kb"]
            else None
        )
        result["expected_events"] = p["streams"] * p["tokens"]
        result["failed"] = failed(result) or failed_resume(resumed, p["streams"])
        say(result, f"cut={resumed.get('cut')} resumed={resumed.get('completed')} {result['failed'] or ''}")
        runs.append(result)
    return runs


def failed_resume(resumed, streams):
    if not resumed:
        return "nothing resumed"
    reasons = [f"{k}={v}" for k, v in resumed["errors"].items()]
    if resumed["completed"] < streams:
        reasons.append(f"{resumed['completed']} of {streams} resumed to the end")
    return "; ".join(reasons) or None


def report_s8(runs):
    rows = []
    for r in runs:
        resumed = r.get("resumed") or {"ttfe_ms": {}, "errors": {}}
        ttfe = resumed["ttfe_ms"]
        rows.append(
            [
                r["subject"],
                resumed.get("cut", "–"),
                resumed.get("completed", "–"),
                ", ".join(f"{k}={v}" for k, v in resumed["errors"].items()) or "none",
                fmt(ttfe.get("p50"), 1),
                fmt(ttfe.get("p99"), 1),
                fmt(ttfe.get("max"), 1),
                f"{r['events'] + resumed.get('events', 0):,} of {r['expected_events']:,}",
                fmt(r["rss_idle_kb"] / 1024, 1),
                fmt(r["rss_open_kb"] / 1024 if r["rss_open_kb"] else None, 1),
                fmt(r["kb_per_kept_stream"], 1),
                fmt(r["cpu_s"], 1),
                f"{r['foreign_core0_pct']:.0f} / {r['foreign_core1_pct']:.0f}",
                r["failed"] or "ok",
            ]
        )
    header = ["subject", "cut", "resumed to [DONE]", "resume errors", "first resumed event p50 ms", "p99 ms", "max ms"]
    header += ["content events, before + after the cut", "RSS idle MB", "RSS with the streams kept MB"]
    header += ["KB per kept stream", "CPU s", "foreign load core 0 / 1 %", "verdict"]
    return table(header, rows)


# --- the scenarios: one entry each ------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One scenario: its title (formatted with its parameters), its full and --quick parameters, how it
    runs (subjects, parameters, Options) -> runs, and how its table reads (runs) -> Markdown."""

    title: str
    full: dict
    quick: dict
    run: Callable
    report: Callable

    def params(self, options):
        return self.quick if options.quick else self.full


# S5, the same in both: 10,000 tokens are 2.1 MB from the upstream and 430 KB of events per stream, several
# times what the client's side holds; the scenario stops by itself after `bound` seconds.
# S7, on this machine's 2 cores (2 workers): room for 5,000 streams per worker, and nginx's for 2 x 5,000
# connections per nginx worker (the shipped 4096 hold ~2,000 streams each).
S7_SETTINGS = {"GUNICORN_WORKER_CONNECTIONS": "6000", "CHAT_MAX_STREAMS": "5900"}
S7_NGINX = [("worker_connections 4096;", "worker_connections 16384;")]
S5_PARAMS = {"clients": 100, "tokens": 10_000, "bound": 20.0, "settings": STALL_SETTINGS}
SCENARIOS = {
    "S1": Scenario(
        "S1: {c} streams × {tokens} tokens, upstream as fast as it can: relayed events/s",
        full={"c": 50, "tokens": 2000},
        quick={"c": 50, "tokens": 500},
        run=run_s1,
        report=report_s1,
    ),
    "S2": Scenario(
        "S2: 50 tokens/s per stream ({tokens} tokens), C = {levels}: CPU per event and added latency",
        full={"levels": [100, 300, 600], "tokens": 500},
        quick={"levels": [100, 300], "tokens": 150},
        run=run_s2,
        report=report_s2,
    ),
    "S3": Scenario(
        "S3: idle streams (one token, then silence), C = {levels}: memory per open stream",
        full={"levels": [1000, 3000, 10000]},
        quick={"levels": [1000]},
        run=run_s3,
        report=report_s3,
    ),
    "S4": Scenario(
        "S4: cold start: the first request after a fresh start ({reps} repetitions, median)",
        full={"reps": 5},
        quick={"reps": 3},
        run=run_s4,
        report=report_s4,
    ),
    "S5": Scenario(
        "S5: {clients} clients that never read, upstream as fast as it can ({tokens} tokens): memory, who lets go",
        full=S5_PARAMS,
        quick=S5_PARAMS,
        run=run_s5,
        report=report_s5,
    ),
    "S6": Scenario(
        "S6: short replies ({tokens} tokens, upstream as fast as it can), {c} in flight for {seconds} s: requests/s",
        full={"c": 50, "tokens": 20, "seconds": 10},
        quick={"c": 50, "tokens": 20, "seconds": 5},
        run=run_s6,
        report=report_s6,
    ),
    # Through nginx, so every stream gets its own client address (limit_conn: 10 per address). What it
    # needs beyond the README's deploy section is listed here and printed under its table. 250 new
    # streams a second: what two cores start while they relay (S6); faster, gunicorn's accept queue
    # (backlog 2048) fills, and the kernel drops SYNs that come back 1, 3, 7 s later.
    "S7": Scenario(
        "S7: {streams} streams ({rate} tokens/s, {seconds} s each, ramped over {ramp} s) through nginx.conf "
        "to gunicorn.conf.py, on the whole machine",
        full={"streams": 10_000, "rate": 5, "seconds": 60, "ramp": 40, "settings": S7_SETTINGS, "nginx": S7_NGINX},
        quick={"streams": 2_000, "rate": 5, "seconds": 20, "ramp": 8, "settings": S7_SETTINGS, "nginx": S7_NGINX},
        run=run_s7,
        report=report_s7,
    ),
    # Issue 17's resume: each stream is cut after cut_after events, and resumed pause s later. 10 tokens/s:
    # 1,000 generations going on with no reader at 50 tokens/s would be S2 at C=1,000, past what one core
    # relays, and the figure would be that overload's, not the resume's.
    "S8": Scenario(
        "S8: resume: {streams} streams ({tokens} tokens at {rate}/s) cut after {cut_after} events, "
        "resumed {pause} s later by Last-Event-ID",
        full={"streams": 1000, "tokens": 200, "rate": 10, "ramp": 2, "cut_after": 20, "pause": 1.0},
        quick={"streams": 300, "tokens": 100, "rate": 10, "ramp": 1, "cut_after": 10, "pause": 1.0},
        run=run_s8,
        report=report_s8,
    ),
}


# --- the targets: one entry each ----------------------------------------------------------------


def ours(raw, scenario, subject="flask"):
    """The runs of one subject (ours by default) in one scenario of this run."""
    return [r for r in raw.get(scenario, []) if r["subject"] == subject]


def cpu_at(raw, subject, c):
    return value_of(raw.get("S2", []), subject, "cpu_us_per_event", c)


def s1_versus_express(raw, times):
    s1, s1_express = ours(raw, "S1"), ours(raw, "S1", "express")
    if not (s1 and s1_express):
        return None
    mine, theirs = s1[0]["events_per_s"], s1_express[0]["events_per_s"]
    return f"{mine:,.0f} vs {theirs:,.0f} ({mine / theirs:.2f}×)", mine >= times * theirs


def s2_versus_floor(raw, times, at):
    near = [r for r in ours(raw, "S2") if r["concurrency"] in at and cpu_at(raw, FLOOR, r["concurrency"])]
    if not near:
        return None
    cpu = ", ".join(
        f"{r['cpu_us_per_event']:.1f} vs {cpu_at(raw, FLOOR, r['concurrency']):.1f} µs "
        f"({r['cpu_us_per_event'] / cpu_at(raw, FLOOR, r['concurrency']):.2f}×) at C={r['concurrency']}"
        for r in near
    )
    return cpu, all(r["cpu_us_per_event"] <= times * cpu_at(raw, FLOOR, r["concurrency"]) for r in near)


def s2_versus_express(raw):
    versus = [r for r in ours(raw, "S2") if cpu_at(raw, "express", r["concurrency"])]
    if not versus:
        return None
    cpu = ", ".join(
        f"{r['cpu_us_per_event']:.1f} vs {cpu_at(raw, 'express', r['concurrency']):.1f} µs at C={r['concurrency']}"
        for r in versus
    )
    return cpu, all(r["cpu_us_per_event"] <= cpu_at(raw, "express", r["concurrency"]) for r in versus)


def s2_p99(raw, ms, upto):
    s2 = ours(raw, "S2")
    within = [r for r in s2 if r["concurrency"] <= upto]
    if not within:
        return None
    p99 = ", ".join(f"{r['latency_ms']['p99']:.1f} ms at C={r['concurrency']}" for r in s2)
    return p99, all(not r["failed"] and r["latency_ms"]["p99"] < ms for r in within)


def s3_per_stream(raw, kb):
    s3 = ours(raw, "S3")
    if not s3:
        return None
    text = ", ".join(f"{fmt(r['kb_per_stream'], 1)} at C={r['concurrency']}" for r in s3)
    return text, all(r["kb_per_stream"] and r["kb_per_stream"] <= kb for r in s3)


def s3_streams(raw, streams):
    s3 = ours(raw, "S3")
    if not s3:
        return None
    top = max(s3, key=lambda r: r["concurrency"])
    if top["held_open"] == top["concurrency"] < streams:
        return f"{top['held_open']:,} of {top['concurrency']:,} open", "met, up to this machine's fd limit"
    return f"{top['held_open']:,} of {top['concurrency']:,} open", top["held_open"] >= streams


def s4_first_event(raw, ms):
    s4 = ours(raw, "S4")
    if not s4:
        return None
    r = s4[0]
    text = f"{fmt(r['ttfe_ms'], 1)} ms after the port opens ({fmt(r['start_to_event_ms'])} ms after the start)"
    return text, r["ttfe_ms"] <= ms


def s5_memory(raw, kb):
    s5 = ours(raw, "S5")
    if not s5:
        return None
    r = s5[0]
    return f"{fmt(r['kb_per_stream'])} KB per stream (RSS peak − before, over {r['accepted']} streams)", (
        r["kb_per_stream"] <= kb
    )


def s5_let_go(raw, seconds):
    s5 = ours(raw, "S5")
    if not s5:
        return None
    r = s5[0]
    go, hold = r["let_go_s"], r["let_go_after_stall_s"]
    text = f"{r['let_go']} of {r['clients']} let go"
    if go:
        text += f", {hold['max']:.1f} s at most after their send queue filled (the last {go['max']:.1f} s in)"
    if r["let_go"] < r["clients"]:
        text += f"; {r['clients'] - r['let_go']} still held after {r['duration_s']:.0f} s"
    return text, r["let_go"] == r["clients"] and hold["max"] <= seconds


@dataclass(frozen=True)
class Target:
    """One target of the performance budget: its words (formatted with its limits), its limits, and how
    this run's figures are held against them: measure(raw, **limits) -> (measured, verdict) or None
    when the run did not measure it (verdict: True for met, False for a gap, or its own words)."""

    text: str
    limits: dict
    measure: Callable

    def row(self, raw):
        measured_here = self.measure(raw, **self.limits)
        if measured_here is None:
            return None
        figures, verdict = measured_here
        if isinstance(verdict, bool):
            verdict = "met" if verdict else "gap"
        return [self.text.format(**self.limits), figures, verdict]


def s6_versus_express(raw):
    s6, s6_express = ours(raw, "S6"), ours(raw, "S6", "express")
    if not (s6 and s6_express):
        return None
    mine, theirs = s6[0]["requests_per_s"], s6_express[0]["requests_per_s"]
    return f"{mine:,.0f} vs {theirs:,.0f} requests/s ({mine / theirs:.2f}×)", mine >= theirs


def s7_scale(raw, streams, ms):
    s7 = ours(raw, "S7")
    if not s7:
        return None
    r = s7[0]
    p99 = r["latency_ms"]["p99"]
    text = f"{r['completed']:,} of {r['streams']:,} complete, {r['error_count']} errors, p99 added {fmt(p99, 1)} ms"
    return text, r["streams"] >= streams and r["completed"] == r["streams"] and p99 is not None and p99 < ms


STALLED_FOR = float(STALL_SETTINGS["CHAT_SEND_TIMEOUT"]) + float(STALL_SETTINGS["CHAT_HEARTBEAT_SECONDS"])
TARGETS = [
    Target("S1 events/s ≥ {times}× Express's, same run", {"times": 1.75}, s1_versus_express),
    Target(
        "S2 CPU per event ≤ {times}× the floor's at C={at[0]} and C={at[1]}",
        {"times": 1.3, "at": (100, 300)},
        s2_versus_floor,
    ),
    Target("S2 CPU per event ≤ Express's at every C", {}, s2_versus_express),
    Target("S2 p99 added latency < {ms} ms up to C={upto}", {"ms": 20, "upto": 600}, s2_p99),
    Target("S3 ≤ {kb} KB per idle open stream", {"kb": 40}, s3_per_stream),
    Target("S3 {streams:,} idle streams in one worker", {"streams": 10_000}, s3_streams),
    Target("S4 first event of the first request after a start ≤ {ms} ms", {"ms": 100}, s4_first_event),
    Target("S5 stalled clients: memory bounded, ≤ {kb} KB per stream", {"kb": 256}, s5_memory),
    Target(
        "S5 every stalled stream let go within CHAT_SEND_TIMEOUT + one heartbeat ({seconds:g} s here)",
        {"seconds": STALLED_FOR},
        s5_let_go,
    ),
    Target("S6 requests/s ≥ Express's (20-token replies)", {}, s6_versus_express),
    Target(
        "S7 all {streams:,} streams complete through nginx, p99 added < {ms} ms",
        {"streams": 10_000, "ms": 100},
        s7_scale,
    ),
]
TARGETS_HEADER = ["target (per gevent worker, i.e. per core)", "measured", "verdict"]


def report_targets(raw):
    """Each target of the performance budget beside what this run measured."""
    return table(TARGETS_HEADER, [row for target in TARGETS if (row := target.row(raw))])


def targets_table():
    """The targets alone, as bench/README.md shows them (`--targets`)."""
    return table(["target (per gevent worker, i.e. per core)"], [[t.text.format(**t.limits)] for t in TARGETS])


# --- main ---------------------------------------------------------------------------------------


def parse_options(argv):
    """The command line: (Options, subjects, scenario names, --out, the command as typed)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~3.5-minute smoke run")
    parser.add_argument("--subjects", default=",".join([DIRECT, *SUBJECT_NAMES]), help="comma-separated")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    parser.add_argument("--out", help="the Markdown report (default: see the module docstring)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the least disturbed is shown")
    parser.add_argument("--profile", action="store_true", help="py-spy the Python subjects (skews their figures)")
    parser.add_argument("--targets", action="store_true", help="print the targets table and stop")
    args = parser.parse_args(argv)
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    known = {DIRECT, *SUBJECT_NAMES}
    unknown = {s for s in subjects if s not in known and not s.startswith("flask@")} | set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    options = Options(quick=args.quick, repeat=max(1, args.repeat), profile=args.profile)
    everything = set(subjects) >= set(SUBJECT_NAMES) and set(scenarios) == set(SCENARIOS)
    complete = everything and not args.quick and not args.profile
    out = Path(args.out) if args.out else (BENCH / "results.md" if complete else LOGS / "last.md")
    command = "python3 bench/run.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    return args, options, subjects, scenarios, out, command


def main(argv=None):
    args, options, subjects, scenarios, out, command = parse_options(argv)
    if args.targets:
        print(targets_table())
        return
    os.sched_setaffinity(0, {int(HARNESS_CORE)})  # this script and the harness: core 0
    LOGS.mkdir(exist_ok=True)
    ensure_deps()
    fds = raise_fd_limit()
    print(f"+ {command}  (fd limit {fds}; load average {' '.join(loadavg())})", flush=True)

    started, sections, raw = time.time(), [], {}
    for name in scenarios:
        scenario = SCENARIOS[name]
        params = scenario.params(options)
        title = scenario.title.format(**params)
        before = loadavg()
        print(f"\n{title}", flush=True)
        raw[name] = runs = scenario.run(subjects, params, options)
        text = scenario.report(runs)
        print(text, flush=True)
        loads = f"Load average before / after: {' '.join(before)} / {' '.join(loadavg())}"
        sections.append(f"## {title}\n\n{loads}\n\n{text}")

    (LOGS / f"raw-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(raw, indent=1))
    if "flask" in subjects:
        sections.insert(0, f"## Targets: ours against the performance budget\n\n{report_targets(raw)}")
    report = report_header(command, options, time.time() - started) + "\n" + "\n\n".join(sections) + "\n"
    out.write_text(report)
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", flush=True)


def report_header(command, options, seconds):
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (
        f"# Benchmark results\n\n"
        f"Run {stamp}, {seconds:.0f} s, with:\n\n    {command}\n\n"
        f"Machine: {machine()}.\n\n{versions()}\n\n"
        "Each subject on core 1 (`taskset -c 1`), alone; the fake upstream and the load generator on core 0. "
        '"added" latency is receive time minus the upstream\'s send time of each token; TTFE is from the '
        "request's start to its first content event; CPU is utime + stime of the subject's process tree; "
        "\"foreign load core 0 / 1\" is CPU time on each core that was neither the harness's nor the subject's "
        "(other people's work on this shared machine: figures from a run with much of it are noisy); "
        '"upstream" is the load generator straight against the fake upstream: the harness\'s own ceiling; '
        '"floor" is bench/floor.py, a bare gevent relay doing the same per-event work with no gunicorn, Flask '
        "or SDK: the least Python + gevent can cost here. "
        f"Each row of S1-S3: the least disturbed of {options.repeat} run(s) "
        "(all of them in bench/results/raw-*.json).\n"
    )


if __name__ == "__main__":
    main()
