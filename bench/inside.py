"""Look inside one gunicorn worker of ours: what a stream keeps, what a worker is made of, what a request costs.

    python3 bench/inside.py memory --streams 1000   # tracemalloc on idle streams: what each keeps, by part
    python3 bench/inside.py start                   # a worker's RSS at start: by import, the SDK clients
    python3 bench/inside.py sdk --requests 400      # the SDK's request: create() against lower-level calls

Figures for issue 22's profile, printed as Markdown (and kept in bench/results/inside-*.md). Run
under `flock /tmp/cpu-heavy.lock`; the worker runs on core 1 as in run.py, tracemalloc slows it
(memory figures only). `memory` runs gunicorn with bench/inside_conf.py (gunicorn.conf.py plus a
hook that snapshots the worker on request).
"""

import argparse
import json
import linecache
import subprocess
import sys
import time
import tracemalloc

from harness import (
    APP_PY,
    BENCH,
    LOGS,
    ROOT,
    SUBJECT_CORE,
    Proc,
    free_port,
    loadavg,
    raise_fd_limit,
    rss_kb,
    run_load,
    start_upstream,
    stop_upstream,
    wait_port,
)

OURS = ("app.py", "upstream.py", "protocols.py", "operate.py", "resume.py")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# --- memory: what an idle stream keeps --------------------------------------------------------------


def ask(directory, name, timeout=600):
    """Have the worker snapshot itself (bench/inside_conf.py); return its JSON and its tracemalloc snapshot."""
    (directory / f"{name}.want").touch()
    deadline = time.monotonic() + timeout
    while (directory / f"{name}.want").exists():
        if time.monotonic() > deadline:
            sys.exit(f"the worker did not answer {name} in {timeout} s")
        time.sleep(0.2)
    return json.loads((directory / f"{name}.json").read_text()), tracemalloc.Snapshot.load(
        str(directory / f"{name}.snapshot")
    )


def where(frames):
    """The allocation's place: its most recent frame, and the most recent one in our own modules."""
    last = frames[-1]
    own = next((f for f in reversed(frames) if f.filename.endswith(OURS)), None)
    return short(last), short(own) if own else "–"


PARTS = [  # a path fragment -> the part of the stack it belongs to
    ("/openai/", "the SDK (openai)"),
    ("/httpx2/", "the SDK's HTTP client (httpx2, httpcore2, h11)"),
    ("/httpcore2/", "the SDK's HTTP client (httpx2, httpcore2, h11)"),
    ("/h11/", "the SDK's HTTP client (httpx2, httpcore2, h11)"),
    ("/gunicorn/", "gunicorn (the connection, its request, environ)"),
    ("/werkzeug/", "Flask and werkzeug (request, response)"),
    ("/flask/", "Flask and werkzeug (request, response)"),
    ("/gevent/", "gevent (greenlet, its saved stack, sockets, watchers)"),
]


def part(frames):
    """Which part of the stack allocated this: the most recent frame that is not the standard library's."""
    for frame in reversed(frames):
        if frame.filename.endswith(OURS):
            return "ours (" + frame.filename.rsplit("/", 1)[-1] + ")"
        for fragment, name in PARTS:
            if fragment in frame.filename:
                return name
    return "the standard library alone"


def short(frame):
    path = frame.filename
    name = path.split("site-packages/")[-1] if "site-packages/" in path else path.rsplit("/", 1)[-1]
    code = linecache.getline(frame.filename, frame.lineno).strip()[:70].replace("|", "\\|")
    return f"{name}:{frame.lineno} `{code}`"


def memory(opts):
    directory = LOGS / "inside"
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        old.unlink()
    upstream = start_upstream("inside", tokens=2, hold=600)  # one token, then silence
    port = free_port()
    env = {"OPENAI_BASE_URL": f"http://127.0.0.1:{upstream.port}/v1", "OPENAI_API_KEY": "sk-bench"}
    env |= {"CHAT_MODEL": "gpt-4", "INSIDE_DIR": str(directory), "INSIDE_FRAMES": str(opts.frames)}
    env |= {"GUNICORN_WORKER_CONNECTIONS": str(opts.streams + 100), "CHAT_MAX_STREAMS": str(opts.streams + 50)}
    env["GUNICORN_TIMEOUT"] = "900"  # a snapshot blocks the worker for seconds: no heartbeat meanwhile
    env["CHAT_HEARTBEAT_SECONDS"] = "2"  # so that the warm round's streams, closed by the client, are gone soon
    env["CHAT_RESUME_SECONDS"] = "0"  # and their generations with them, not kept for a reader to come back
    command = [str(APP_PY), "-m", "gunicorn", "-c", str(BENCH / "inside_conf.py"), "app:create_app()", "-w", "1"]
    proc = Proc("inside-memory", command + ["-b", f"127.0.0.1:{port}"], env=env, core=SUBJECT_CORE)
    looks = {}
    try:
        wait_port(port, proc.process)
        run_load(port, 5, "inside-warmup", ramp=0, timeout=30)
        # A first round of idle streams, closed again: whatever the SDK and Flask build once, lazily,
        # is built then, and the figures below are what each stream costs, not the first one.
        warm = min(opts.streams, 200)
        run_load(port, warm, "inside-warm-round", max(1.0, warm / 500), 60, hold_open=0.5)
        time.sleep(5.0)  # two heartbeats: the relay has seen every one of them gone
        looks["idle"] = ask(directory, "idle")

        def on_ready(held):
            looks["held"] = held
            looks["open"] = ask(directory, "open")

        ramp = max(1.0, opts.streams / 500)
        run_load(port, opts.streams, "inside", ramp, ramp + 200, hold_open=opts.hold, on_ready=on_ready)
    finally:
        proc.stop()
        stop_upstream(upstream)
    return memory_report(looks, opts)


def memory_report(looks, opts):
    (idle, idle_snap), (open_, open_snap), held = looks["idle"], looks["open"], looks["held"]
    per = 1 / max(1, held)
    rss = {k: (open_["status_kb"][k] - idle["status_kb"][k]) * 1024 * per for k in open_["status_kb"]}
    traced = (open_["traced"] - idle["traced"]) * per
    imported = sorted(set(open_["modules"]) - set(idle["modules"]))
    lines = [f"{held} idle streams held open (one token, then silence); per stream:", ""]
    if imported:
        lines += [f"(Imported meanwhile, so counted in: {len(imported)} modules, e.g. {', '.join(imported[:8])}.)", ""]
    lines += [
        f"- traced by tracemalloc (Python's allocator: objects, buffers, the greenlets' saved stacks): "
        f"{traced / 1024:.1f} KB; RSS grew {rss['VmRSS'] / 1024:.1f} KB, but that includes tracemalloc's own "
        "record of each block (S3 gives the RSS of a stream without it)."
    ]
    new_stacks = sorted(open_["greenlet_stacks"])[-held:] if held else []
    if new_stacks:
        lines.append(
            f"- greenlets: {len(open_['greenlet_stacks'])} open vs {len(idle['greenlet_stacks'])} idle; the "
            f"{held} largest saved stacks: median {new_stacks[len(new_stacks) // 2] / 1024:.1f} KB, "
            f"mean {sum(new_stacks) / len(new_stacks) / 1024:.1f} KB, max {new_stacks[-1] / 1024:.1f} KB "
            "(a greenlet's C stack, copied to the heap when it switches out: inside the traced figure)"
        )
    by_place, by_ours, by_part = {}, {}, {}
    for stat in open_snap.compare_to(idle_snap, "traceback"):
        last, own = where(stat.traceback)
        by_part[part(stat.traceback)] = by_part.get(part(stat.traceback), 0) + stat.size_diff
        if stat.size_diff <= 0:
            continue
        by_place[last] = by_place.get(last, 0) + stat.size_diff
        by_ours[own] = by_ours.get(own, 0) + stat.size_diff
    top = lambda d: sorted(d.items(), key=lambda kv: -kv[1])[: opts.top]  # noqa: E731
    lines += ["", "What a stream keeps, by the part of the stack that allocated it (net bytes):", ""]
    lines.append(table(["bytes per stream", "part"], [[f"{v * per:,.0f}", k] for k, v in top(by_part)]))
    lines += ["", "Where the traced bytes of a stream were allocated (the most recent frame):", ""]
    lines.append(table(["bytes per stream", "allocated at"], [[f"{v * per:,.0f}", k] for k, v in top(by_place)]))
    lines += ["", "The same bytes by the most recent frame in our own modules (– : none on the stack):", ""]
    lines.append(table(["bytes per stream", "our line"], [[f"{v * per:,.0f}", k] for k, v in top(by_ours)]))
    kinds = {k: (n - idle["types"].get(k, 0)) * per for k, n in open_["types"].items()}
    rows = [[f"{n:.2f}", k] for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[: opts.top] if n > 0]
    lines += ["", "Objects the garbage collector tracks, per stream, by type:", "", table(["per stream", "type"], rows)]
    return "\n".join(lines)


# --- start: what a worker is made of ----------------------------------------------------------------

START = r"""
import json, sys, tracemalloc
trace = sys.argv[1] == "trace"  # tracemalloc's own records inflate RSS: one run for RSS, one for the attribution
if trace:
    tracemalloc.start(1)
def rss():
    f = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith(("VmRSS", "RssAnon", "RssFile")))
    return {k: int(v.split()[0]) for k, v in f.items()}
stages = [("python", rss(), trace and tracemalloc.take_snapshot())]
def stage(name):
    stages.append((name, rss(), trace and tracemalloc.take_snapshot()))
from gevent import monkey; monkey.patch_all(); stage("gevent, patched")
import flask; stage("flask")
import openai, httpx2; stage("openai, httpx2")
import app; stage("app.py and its siblings")
made = app.create_app(); stage("create_app(): the SDK clients, the blueprint")
client = made.test_client()
client.get("/healthz"); stage("a first request (Flask's lazy parts)")
out = []
for (_, before, old), (name, after, new) in zip(stages, stages[1:]):
    packages = {}
    for s in new.compare_to(old, "filename") if trace else ():
        path = s.traceback[0].filename
        pkg = path.split("site-packages/")[1].split("/")[0] if "site-packages/" in path else (
            "stdlib" if "/lib/python3" in path or path.startswith("<frozen") else path.rsplit("/", 1)[-1])
        packages[pkg] = packages.get(pkg, 0) + s.size_diff
    out.append({"stage": name, "rss": after, "rss_diff": {k: after[k] - before[k] for k in after},
                "packages": sorted(packages.items(), key=lambda kv: -kv[1])[:6]})
print(json.dumps(out))
"""


def start(opts):
    upstream = start_upstream("inside-start", tokens=2)
    env = {"OPENAI_BASE_URL": f"http://127.0.0.1:{upstream.port}/v1", "OPENAI_API_KEY": "sk-bench"}
    runs = {}
    try:
        for mode in ("rss", "trace"):
            done = subprocess.run(
                [str(APP_PY), "-c", START, mode],
                cwd=ROOT,
                env={"PATH": "/usr/bin:/bin", **env},
                capture_output=True,
                text=True,
            )
            if done.returncode:
                sys.exit(done.stderr)
            runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        worker = gunicorn_at_rest(upstream.port)
    finally:
        stop_upstream(upstream)
    rows = []
    for s, traced in zip(runs["rss"], runs["trace"], strict=True):
        packages = ", ".join(f"{name} {size / 1024:,.1f}" for name, size in traced["packages"] if size > 0)
        d = s["rss_diff"]
        rows.append(
            [s["stage"], f"{s['rss']['VmRSS'] / 1024:.1f}", f"{d['VmRSS'] / 1024:+.1f}"]
            + [f"{d['RssAnon'] / 1024:+.1f}", f"{d['RssFile'] / 1024:+.1f}", packages]
        )
    header = ["stage (one process, in order)", "RSS MB", "Δ RSS MB", "Δ anonymous MB", "Δ file-backed MB"]
    header += ["Python allocations by package, KB (tracemalloc, a second run; stdlib: importlib's code objects too)"]
    text = table(header, rows)
    return text + "\n\n" + worker


def gunicorn_at_rest(upstream_port):
    """RSS of gunicorn's master and its one worker, as bench/run.py starts ours, after one request."""
    port = free_port()
    env = {"OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1", "OPENAI_API_KEY": "sk-bench"}
    command = [str(APP_PY), "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:create_app()", "-w", "1"]
    proc = Proc("inside-start", command + ["-b", f"127.0.0.1:{port}"], env=env | {"CHAT_MODEL": "gpt-4"})
    try:
        wait_port(port, proc.process)
        run_load(port, 1, "inside-start", ramp=0, timeout=30)
        time.sleep(0.5)
        from harness import children

        worker = children(proc.pid)[0]
        status = {}
        for line in open(f"/proc/{worker}/status"):
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                status[key] = int(value.split()[0]) / 1024
        master = rss_kb(proc.pid) / 1024
    finally:
        proc.stop()
    parts = ", ".join(f"{k} {v:.1f} MB" for k, v in status.items())
    return f"gunicorn at rest after one request: master {master:.1f} MB, worker {parts}."


# --- sdk: what the SDK's request costs -------------------------------------------------------------

SDK = r"""
import cProfile, json, pstats, sys, time, io
from gevent import monkey; monkey.patch_all()
import httpx2, openai
port, n = int(sys.argv[1]), int(sys.argv[2])
client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-bench", max_retries=0)
body = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "max_tokens": 4096, "stream_options": {"include_usage": True}}
def create():
    with client.chat.completions.with_streaming_response.create(**body) as r:
        for _ in r.http_response.iter_raw(): pass
def post():
    r = client.post("/chat/completions", body=body, cast_to=httpx2.Response, stream=True)
    for _ in r.iter_raw(): pass
    r.close()
def raw():
    with client._client.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                               headers={"Authorization": "Bearer sk-bench"}) as r:
        for _ in r.iter_raw(): pass
out = {}
for name, call in (("create", create), ("post", post), ("httpx", raw)):
    for _ in range(20): call()
    cpu = time.process_time()
    for _ in range(n): call()
    out[name] = (time.process_time() - cpu) / n * 1e6
prof = cProfile.Profile()
prof.enable()
for _ in range(n): create()
prof.disable()
stats = pstats.Stats(prof)
total = stats.total_tt
rows = []
for (path, line, func), (cc, nc, tt, ct, callers) in stats.stats.items():
    if func in ("transform", "_transform_recursive", "maybe_transform", "_build_request", "_process_response",
                "send", "__enter__", "_send_request", "model_copy", "_prepare_options", "__exit__", "close"):
        rows.append((func, path.split("site-packages/")[-1] + f":{line}", ct / n * 1e6))
out["profile"] = sorted(rows, key=lambda r: -r[2])[:12]
out["profiled_us"] = total / n * 1e6
print(json.dumps(out))
"""


def sdk(opts):
    upstream = start_upstream("inside-sdk", tokens=20)
    try:
        command = ["taskset", "-c", SUBJECT_CORE, str(APP_PY), "-c", SDK, str(upstream.port), str(opts.requests)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    finally:
        stop_upstream(upstream)
    if done.returncode:
        sys.exit(done.stderr)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    lines = [f"CPU per request (open, read 20 tokens raw, close; {opts.requests} requests, one at a time):", ""]
    lines.append(
        table(
            ["call", "CPU µs per request"],
            [
                ["`client.chat.completions.with_streaming_response.create(**body)` (today)", f"{out['create']:,.0f}"],
                [
                    "`client.post('/chat/completions', body=..., cast_to=httpx2.Response, stream=True)`",
                    f"{out['post']:,.0f}",
                ],
                ["the SDK's own httpx2 client, `client.stream(...)` (no SDK layer at all)", f"{out['httpx']:,.0f}"],
            ],
        )
    )
    lines += ["", f"Inside create() (cProfile, {out['profiled_us']:,.0f} µs per request while profiled):", ""]
    lines.append(
        table(
            ["function", "where", "µs per request (cumulative)"], [[f, w, f"{us:,.0f}"] for f, w, us in out["profile"]]
        )
    )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    mem = sub.add_parser("memory")
    mem.add_argument("--streams", type=int, default=1000)
    mem.add_argument("--hold", type=float, default=30.0, help="seconds the streams stay open")
    mem.add_argument("--frames", type=int, default=12, help="tracemalloc's frames per allocation")
    mem.add_argument("--top", type=int, default=15)
    sub.add_parser("start")
    s = sub.add_parser("sdk")
    s.add_argument("--requests", type=int, default=400)
    opts = parser.parse_args(argv)
    LOGS.mkdir(exist_ok=True)
    raise_fd_limit()
    before = " ".join(loadavg())
    text = {"memory": memory, "start": start, "sdk": sdk}[opts.what](opts)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    head = f"`bench/inside.py {opts.what}` at {git.stdout.strip()}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    report = f"{head}; load average before / after: {before} / {' '.join(loadavg())}\n\n{text}\n"
    (LOGS / f"inside-{opts.what}.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
