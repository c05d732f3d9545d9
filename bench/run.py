"""Run the whole benchmark: our service beside the floor, the Express server and FastAPI, one core each.

    python3 bench/run.py                                   # everything, ~10 minutes
    python3 bench/run.py --quick                           # a ~3.5-minute smoke run
    python3 bench/run.py --subjects flask --scenarios S1,S2

It installs the peers' dependencies itself (bench/.venv-peers from bench/requirements.txt,
`npm ci` in bench/peers/express) and needs the repository's .venv (the README's quickstart).
Every subject runs on core 1 (`taskset -c 1`); the fake upstream, the load generator and this
script on core 0. Each measured run gets a fresh upstream and a fresh subject, a few warm-up
streams, then the load; CPU and RSS are read from /proc for the subject's whole process tree.

A full run writes bench/results.md; a filtered or --quick run writes bench/results/last.md
(or --out). Logs and the raw figures of every run go to bench/results/ (not committed).
"""

import argparse
import hashlib
import json
import os
import platform
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV = BENCH / ".venv-peers"
PEERS_PY = VENV / "bin" / "python"
APP_PY = ROOT / ".venv" / "bin" / "python"
EXPRESS = BENCH / "peers" / "express"
LOGS = BENCH / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
HARNESS_CORE, SUBJECT_CORE = "0", "1"

SUBJECT_NAMES = ["floor", "express", "fastapi", "flask"]
DIRECT = "upstream"  # the load generator straight against the upstream: the harness's own ceiling
FLOOR = "floor"  # bench/floor.py: a bare gevent relay, the least Python + gevent can cost

# Scenario parameters: (full, quick).
S1 = {"full": {"c": 50, "tokens": 2000}, "quick": {"c": 50, "tokens": 500}}
S2 = {"full": {"levels": [100, 300, 600], "tokens": 500}, "quick": {"levels": [100, 300], "tokens": 150}}
S3 = {"full": {"levels": [1000, 3000, 10000]}, "quick": {"levels": [1000]}}
S4 = {"full": {"reps": 5}, "quick": {"reps": 3}}
# S5, the same in both: 10,000 tokens are 2.1 MB from the upstream and 430 KB of events per stream, several
# times what the client's side holds; the scenario stops by itself after `bound` seconds.
S5 = dict.fromkeys(("full", "quick"), {"clients": 100, "tokens": 10_000, "bound": 20.0})
# S5 runs every subject with these (the peers ignore them): stalled streams are let go within seconds
STALL_SETTINGS = {"CHAT_SEND_TIMEOUT": "5", "CHAT_HEARTBEAT_SECONDS": "1"}
P99_LIMIT_MS = 1000.0  # S2: a subject fails a level past this p99 added latency
WARMUP = 5  # short streams before each measured run (the upstream answers them at once)


# --- setup ------------------------------------------------------------------------------------


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_deps():
    """Make bench/.venv-peers and express's node_modules when missing or out of date."""
    if not APP_PY.exists():
        sys.exit(f"{APP_PY} is missing: run the README's quickstart install first.")
    requirements, stamp = BENCH / "requirements.txt", VENV / ".requirements.sha256"
    if not PEERS_PY.exists() or not stamp.exists() or stamp.read_text() != digest(requirements):
        print("+ making bench/.venv-peers", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(PEERS_PY), "-m", "pip", "install", "-q", "-r", str(requirements)], check=True)
        stamp.write_text(digest(requirements))
    lock, stamp = EXPRESS / "package-lock.json", EXPRESS / "node_modules" / ".lock.sha256"
    if not stamp.exists() or stamp.read_text() != digest(lock):
        print("+ npm ci in bench/peers/express", flush=True)
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=EXPRESS, check=True)
        stamp.write_text(digest(lock))


def raise_fd_limit():
    """2 descriptors per stream in a subject: raise the limit for every child (root may raise the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (1_048_576, 262_144, 65_536):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
            return want
        except (ValueError, OSError):
            continue
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --- processes --------------------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port, proc, timeout=30.0, interval=0.005):
    """Return the monotonic time the port first accepted a connection."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return time.monotonic()
        except OSError:
            time.sleep(interval)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def proc_stat(pid):
    """(ppid, cpu seconds) of one process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree(root):
    """The pids of root and all its descendants."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid, _ = proc_stat(name)
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, ()))
    return pids


def tree_cpu(root):
    total = 0.0
    for pid in tree(root):
        try:
            total += proc_stat(pid)[1]
        except (OSError, IndexError):
            pass
    return total


def tree_rss_kb(root):
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def core_busy():
    """Busy seconds per core since boot, from /proc/stat (to spot other load on our cores)."""
    busy = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                values = [int(v) for v in values]
                busy[name[3:]] = (sum(values[:8]) - values[3] - values[4]) / CLK_TCK  # minus idle, iowait
    return busy


class Proc:
    """A child process with its log file, stopped with its whole tree."""

    def __init__(self, name, command, cwd=ROOT, env=None, core=HARNESS_CORE, stdout=None):
        self.name = name
        self.log_path = LOGS / f"{name}.log"
        self.log = open(self.log_path, "ab")
        self.log.write(f"\n+ {shlex.join(command)}\n".encode())
        self.log.flush()
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            ["taskset", "-c", core, *command],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=stdout or self.log,
            stderr=self.log,
        )
        self.pid = self.process.pid

    def stop(self, sig=signal.SIGTERM, grace=3.0):
        pids = tree(self.pid) if self.process.poll() is None else []
        if pids:
            self.process.send_signal(sig)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()


def start_upstream(tag, tokens, interval=0.0, hold=0.0, warmup=WARMUP):
    port = free_port()
    command = [str(PEERS_PY), str(BENCH / "upstream.py"), "--port", str(port), "--tokens", str(tokens)]
    command += ["--interval", str(interval), "--hold", str(hold), "--warmup", str(warmup)]
    proc = Proc(f"upstream-{tag}", command, stdout=subprocess.PIPE)
    proc.port = port
    wait_port(port, proc.process)
    return proc


def stop_upstream(proc):
    """Stop the upstream and return its own figures (it prints them as JSON on SIGTERM)."""
    proc.process.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.stop(signal.SIGKILL)
        return {}
    proc.log.close()
    for line in out.decode().splitlines():
        if line.startswith("{"):
            return json.loads(line)["upstream"]
    return {}


def subject_command(name, port):
    if name == "express":
        return ["node", "server.js"], EXPRESS, {"PORT": str(port), "HOST": "127.0.0.1"}
    if name == "fastapi":
        command = [str(PEERS_PY), "-m", "uvicorn", "fastapi_app:app", "--app-dir", str(BENCH / "peers")]
        return command + ["--host", "127.0.0.1", "--port", str(port)], ROOT, {}
    if name == "flask":
        command = [str(APP_PY), "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:create_app()", "-w", "1"]
        return command + ["-b", f"127.0.0.1:{port}"], ROOT, {}
    if name == FLOOR:  # on our Python and gevent
        return [str(APP_PY), str(BENCH / "floor.py")], ROOT, {"PORT": str(port), "HOST": "127.0.0.1"}
    raise ValueError(name)


def start_subject(name, tag, upstream_port, concurrency=0, wait=True, settings=None):
    port = free_port()
    command, cwd, env = subject_command(name, port)
    env.update(
        {
            "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
            "OPENAI_API_KEY": "sk-bench",
            "CHAT_MODEL": "gpt-4",
            # gunicorn.conf.py reads it: room for every stream of the scenario, 1000 at least (its default)
            "GUNICORN_WORKER_CONNECTIONS": str(max(1000, concurrency + 100)),
            # app.py's cap on open streams per worker, kept below worker_connections as documented
            "CHAT_MAX_STREAMS": str(max(900, concurrency + 50)),
        }
    )
    env.update(settings or {})  # a scenario's own settings (S5)
    proc = Proc(f"{name}-{tag}", command, cwd=cwd, env=env, core=SUBJECT_CORE)
    proc.port = port
    if wait:
        proc.listening = wait_port(port, proc.process)
    return proc


def run_load(port, concurrency, tag, ramp, timeout, path="/api/chat", hold_open=None, on_ready=None):
    """Run bench/load.py on the harness core; return its figures. on_ready() runs at READY (idle mode)."""
    out = LOGS / f"load-{tag}.json"
    command = [str(PEERS_PY), str(BENCH / "load.py"), "--port", str(port), "--path", path]
    command += ["-c", str(concurrency), "--ramp", str(ramp), "--timeout", str(timeout), "--out", str(out)]
    if hold_open is not None:
        command += ["--hold-open", str(hold_open)]
    proc = Proc(f"load-{tag}", command, stdout=subprocess.PIPE)
    for line in proc.process.stdout:
        if line.startswith(b"READY") and on_ready:
            on_ready(int(line.split()[1]))
    proc.process.wait(timeout + 60)
    proc.log.close()
    return json.loads(out.read_text())


class Sampler(threading.Thread):
    """Peak RSS of a process tree, sampled every 100 ms."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, tree_rss_kb(self.pid))
            time.sleep(0.1)

    def stop(self):
        self.running = False
        self.join()
        self.peak = max(self.peak, tree_rss_kb(self.pid))
        return self.peak


# --- one measured run ---------------------------------------------------------------------------


REPEAT = 1  # --repeat: measure each run this many times, report the one with the least foreign load


def measured(*args, **kwargs):
    """measured_run, REPEAT times: the repetition least disturbed by other work on the machine is kept."""
    runs = [measured_run(*args, **kwargs) for _ in range(REPEAT)]
    best = min(runs, key=lambda r: max(0, r["foreign_core0_pct"]) + max(0, r["foreign_core1_pct"]))
    best["repeats"] = [
        {k: r[k] for k in ("events_per_s", "cpu_us_per_event", "foreign_core0_pct", "foreign_core1_pct")}
        | {"latency_p99_ms": r["latency_ms"]["p99"]}
        for r in runs
    ]
    return best


def measured_run(subject, tag, upstream_args, concurrency, ramp, timeout, hold_open=None):
    """Fresh upstream and subject, warm-up, then the load with CPU, RSS and noise figures."""
    upstream = start_upstream(tag, **upstream_args, warmup=0 if subject == DIRECT else WARMUP)
    proc = None
    try:
        if subject == DIRECT:
            port, path, pid = upstream.port, "/v1/chat/completions", upstream.pid
        else:
            proc = start_subject(subject, tag, upstream.port, concurrency)
            port, path, pid = proc.port, "/api/chat", proc.pid
            warm = run_load(port, WARMUP, f"{tag}-warmup", ramp=0, timeout=30)
            if warm["completed"] != WARMUP:
                print(f"  warm-up of {subject} incomplete: {warm['errors']}", flush=True)
        time.sleep(0.3)
        rss_idle = tree_rss_kb(pid)
        cpu0, up0, busy0 = tree_cpu(pid), tree_cpu(upstream.pid), core_busy()
        sampler = Sampler(pid)
        sampler.start()
        open_rss = []

        def on_ready(held):
            for _ in range(10):  # while the streams are held open
                open_rss.append(tree_rss_kb(pid))
                time.sleep(0.1)

        spy = start_profile(subject, tag, pid) if PROFILE else None
        started = time.monotonic()
        result = run_load(port, concurrency, tag, ramp, timeout, path=path, hold_open=hold_open, on_ready=on_ready)
        wall = time.monotonic() - started
        cpu1, up1, busy1 = tree_cpu(pid), tree_cpu(upstream.pid), core_busy()
        peak = sampler.stop()
        if spy is not None:
            stop_profile(spy)
    finally:
        if proc is not None:
            proc.stop()
            time.sleep(0.2)  # let the upstream see the subject's connections close
        figures = stop_upstream(upstream)
    cpu = cpu1 - cpu0
    harness_cpu = (up1 - up0) + result["loadgen_cpu_s"]
    result.update(
        subject=subject,
        wall_s=wall,
        cpu_s=cpu if subject != DIRECT else None,
        cpu_us_per_event=(cpu / result["events"] * 1e6) if result["events"] and subject != DIRECT else None,
        subject_core_pct=cpu / wall * 100 if subject != DIRECT else None,
        rss_idle_kb=rss_idle,
        rss_open_kb=max(open_rss) if open_rss else None,
        rss_peak_kb=peak,
        harness_core_pct=harness_cpu / wall * 100,
        # CPU on the subject's core that was not the subject's: other people's work on this machine
        foreign_core1_pct=((busy1[SUBJECT_CORE] - busy0[SUBJECT_CORE]) - (cpu if subject != DIRECT else 0))
        / wall
        * 100,
        foreign_core0_pct=((busy1[HARNESS_CORE] - busy0[HARNESS_CORE]) - harness_cpu) / wall * 100,
        upstream=figures,
    )
    return result


PROFILE = False  # --profile: py-spy samples the Python subjects during each measured run


def start_profile(subject, tag, pid):
    """Start py-spy on a Python subject's tree (on the harness core); None for the others."""
    if subject not in ("flask", "fastapi", FLOOR):
        return None
    out = LOGS / f"profile-{subject}-{tag}.raw"
    command = [str(VENV / "bin" / "py-spy"), "record", "-p", str(pid), "-s", "-f", "raw", "-o", str(out)]
    proc = Proc(f"py-spy-{subject}-{tag}", command + ["-r", "200", "--nonblocking", "--nolineno"])
    proc.out = out
    time.sleep(0.5)  # let it attach
    return proc


def stop_profile(spy, top=25):
    """Stop py-spy and write the functions where the subject's CPU went, by self and by total samples."""
    spy.process.send_signal(signal.SIGINT)
    try:
        spy.process.wait(15)
    except subprocess.TimeoutExpired:
        spy.stop(signal.SIGKILL)
        return
    spy.log.close()
    own, total, samples = {}, {}, 0
    for line in spy.out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames, n = stack.split(";"), int(count)
        samples += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + n
    lines = [f"{samples} samples of {spy.out.name}", "", "self %  function"]
    lines += [f"{n / samples * 100:6.1f}  {f}" for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    lines += ["", "total %  function"]
    lines += [f"{n / samples * 100:6.1f}  {f}" for f, n in sorted(total.items(), key=lambda kv: -kv[1])[:top]]
    summary = spy.out.with_suffix(".txt")
    summary.write_text("\n".join(lines) + "\n")
    print(f"  profile: {summary.relative_to(ROOT)}", flush=True)


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


# --- scenarios ----------------------------------------------------------------------------------


def say(result, extra=""):
    lat = result["latency_ms"]
    print(
        f"  {result['subject']:9} C={result['concurrency']:<6} events/s={result['events_per_s']:9.0f} "
        f"cpu/event={fmt(result.get('cpu_us_per_event'), 1)}us p50={fmt(lat['p50'], 2)}ms p99={fmt(lat['p99'], 2)}ms "
        f"err={result['error_count']} unfinished={result['unfinished']} harness={result['harness_core_pct']:.0f}% "
        f"foreign@core0/1={result['foreign_core0_pct']:.0f}/{result['foreign_core1_pct']:.0f}% {extra}",
        flush=True,
    )


def scenario_s1(subjects, mode):
    p = S1[mode]
    runs = []
    for subject in subjects:
        result = measured(subject, "S1", {"tokens": p["tokens"]}, p["c"], ramp=0.2, timeout=180)
        result["failed"] = failed(result)
        say(result)
        runs.append(result)
    return runs


def scenario_s2(subjects, mode):
    p = S2[mode]
    runs = []
    seconds = p["tokens"] * 0.02
    for subject in subjects:
        for c in p["levels"]:
            ramp = 2.0
            result = measured(
                subject, f"S2-{c}", {"tokens": p["tokens"], "interval": 0.02}, c, ramp=ramp, timeout=ramp + seconds + 20
            )
            result["failed"] = failed(result, P99_LIMIT_MS)
            say(result, result["failed"] or "")
            runs.append(result)
            if result["failed"]:
                break  # stop where the subject fails
    return runs


def fd_cap():
    """The most streams one subject process can hold: 2 descriptors each, under the hard limit, with headroom."""
    return (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 200) // 2


def scenario_s3(subjects, mode):
    p = S3[mode]
    runs = []
    levels = [min(c, fd_cap()) for c in p["levels"]]
    if levels != p["levels"]:
        print(f"  the hard fd limit caps one process at {fd_cap()} streams (2 fds each): C = {levels}", flush=True)
    for subject in subjects:
        for c in levels:
            ramp = max(1.0, c / 1000)
            timeout = ramp + 30
            upstream_args = {"tokens": 2, "hold": timeout + 60}  # one token, then silence past the run
            result = measured(subject, f"S3-{c}", upstream_args, c, ramp=ramp, timeout=timeout, hold_open=1.5)
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


def first_event(port, path="/api/chat", timeout=30.0):
    """Send one chat request; return seconds to its first content event (None on failure)."""
    body = b'{"messages":[{"role":"user","content":"hi"}]}'
    request = (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (path.encode(), len(body), body)
    )
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        seen = b""
        while chunk := sock.recv(65536):
            seen += chunk
            if b"t=" in seen:
                return time.monotonic() - started
    return None


def scenario_s4(subjects, mode):
    reps = S4[mode]["reps"]
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


def stalled_clients(port, n):
    """Open n connections that each send a chat request and then never read."""
    body = b'{"messages":[{"role":"user","content":"hi"}]}'
    request = (
        b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    )
    clients = []
    for _ in range(n):
        sock = socket.socket()
        # Both before connect, so the SYN carries them. A tiny receive window (the kernel doubles it to 8 KB),
        # and segments as on a real network: loopback's 64 KB ones make the kernel give the server's
        # socket a send buffer of about 4 MB whatever the client reads, which would hide the relay's own.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
        sock.connect(("127.0.0.1", port))
        sock.sendall(request % (len(body), body))
        clients.append(sock)
    return clients


def held_connections(pid, port, upstream_port):
    """The subject's connections: ({client port: bytes in its send queue}, {its own ports to the upstream})."""
    inodes = set()
    for child in tree(pid):
        try:
            fds = os.listdir(f"/proc/{child}/fd")
        except OSError:  # gone
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{child}/fd/{fd}")
            except OSError:  # closed while we looked
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    clients, upstream = {}, set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[9] not in inodes:
                    continue  # not the subject's, or closed by it (an orphan the kernel still flushes)
                local, remote = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
                if local == port and remote:  # not the listening socket
                    clients[remote] = int(fields[4].split(":")[0], 16)
                elif remote == upstream_port:
                    upstream.add(local)
    return clients, upstream


def stream_ends(log_path, offset):
    """Count the `end=...` of the service's per-stream log lines written after offset."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    ends = {}
    for word in text.split():
        if word.startswith("end="):
            ends[word[4:]] = ends.get(word[4:], 0) + 1
    return ends


def spread(values):
    """min / median / max of some seconds, or None."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else None


def scenario_s5(subjects, mode):
    """Clients that send a request and never read, against an upstream as fast as it can: who lets go, when."""
    p = S5[mode]
    runs = []
    for subject in subjects:
        if subject == DIRECT:
            continue
        upstream = start_upstream("S5", tokens=p["tokens"])
        proc = start_subject(subject, "S5", upstream.port, concurrency=p["clients"], settings=STALL_SETTINGS)
        clients = []
        try:
            warm = run_load(proc.port, WARMUP, "S5-warmup", ramp=0, timeout=30)
            if warm["completed"] != WARMUP:
                print(f"  warm-up of {subject} incomplete: {warm['errors']}", flush=True)
            time.sleep(0.3)
            rss_before = peak = tree_rss_kb(proc.pid)
            cpu_before = tree_cpu(proc.pid)
            log_offset = proc.log_path.stat().st_size
            started = time.monotonic()
            clients = stalled_clients(proc.port, p["clients"])
            # client port -> "not yet accepted", "held", or seconds from the start to when the subject closed it
            let_go = dict.fromkeys((c.getsockname()[1] for c in clients), "not yet accepted")
            upstream_closed = {}  # the subject's port of each upstream connection -> "held" or when it closed it
            queued = {}  # client port -> (bytes in the subject's send queue, when that last changed): when it filled
            while (now := time.monotonic() - started) < p["bound"]:
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
            duration = time.monotonic() - started
            rss_end, cpu = tree_rss_kb(proc.pid), tree_cpu(proc.pid) - cpu_before
            ends = stream_ends(proc.log_path, log_offset) if subject == "flask" else None
        finally:
            for sock in clients:
                sock.close()
            proc.stop()
            time.sleep(0.2)
            stop_upstream(upstream)
        released = sorted(state for state in let_go.values() if not isinstance(state, str))
        # from when the subject's send queue to the client stopped growing (its write blocked) to when it let go
        after_stall = sorted(state - queued[port][1] for port, state in let_go.items() if not isinstance(state, str))
        stalled = sorted(when for _, when in queued.values())
        closed = sorted(state for state in upstream_closed.values() if not isinstance(state, str))
        accepted = sum(state != "not yet accepted" for state in let_go.values())
        result = {
            "subject": subject,
            "clients": p["clients"],
            "tokens": p["tokens"],
            "bound_s": p["bound"],
            "duration_s": duration,
            "cpu_s": cpu,
            "rss_before_kb": rss_before,
            "rss_peak_kb": peak,
            "rss_end_kb": rss_end,
            "accepted": accepted,
            "kb_per_stream": (peak - rss_before) / max(1, accepted),
            "let_go": len(released),
            "let_go_s": spread(released),
            "stalled_s": spread(stalled),
            "let_go_after_stall_s": spread(after_stall),
            "held": sum(state == "held" for state in let_go.values()),
            "upstream_closed": len(closed),
            "upstream_closed_s": spread(closed),
            "upstream_open_at_end": len(upstream_closed) - len(closed),
            "log_ends": ends,
        }
        go, hold = result["let_go_s"], result["let_go_after_stall_s"]
        print(
            f"  {subject:9} accepted {accepted}, RSS {rss_before / 1024:.1f} -> peak {peak / 1024:.1f} MB "
            f"({result['kb_per_stream']:.0f} KB/stream), CPU {cpu:.1f} s, let go {len(released)}/{p['clients']}"
            + (f" after {go['min']:.1f}/{go['median']:.1f}/{go['max']:.1f} s" if go else "")
            + (
                f" ({hold['min']:.1f}/{hold['median']:.1f}/{hold['max']:.1f} s after their queue filled)"
                if hold
                else ""
            )
            + f", held {result['held']}, upstream closed {len(closed)} (open {result['upstream_open_at_end']})"
            + (f", log {ends}" if ends is not None else ""),
            flush=True,
        )
        runs.append(result)
    return runs


# --- report -------------------------------------------------------------------------------------


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


def report_targets(raw, subject="flask"):
    """Each target of the performance budget (bench/README.md) beside what this run measured."""

    def runs(scenario, name=subject):
        return [r for r in raw.get(scenario, []) if r["subject"] == name]

    def verdict(ok):
        return "met" if ok else "gap"

    def cpu_at(name, c):
        return value_of(raw.get("S2", []), name, "cpu_us_per_event", c)

    rows = []
    s1, s1_express = runs("S1"), runs("S1", "express")
    if s1 and s1_express:
        ours, theirs = s1[0]["events_per_s"], s1_express[0]["events_per_s"]
        rows.append(
            [
                "S1 events/s ≥ 1.75× Express's, same run",
                f"{ours:,.0f} vs {theirs:,.0f} ({ours / theirs:.2f}×)",
                verdict(ours >= 1.75 * theirs),
            ]
        )
    s2 = runs("S2")
    near = [r for r in s2 if r["concurrency"] in (100, 300) and cpu_at(FLOOR, r["concurrency"])]
    if near:
        cpu = ", ".join(
            f"{r['cpu_us_per_event']:.1f} vs {cpu_at(FLOOR, r['concurrency']):.1f} µs "
            f"({r['cpu_us_per_event'] / cpu_at(FLOOR, r['concurrency']):.2f}×) at C={r['concurrency']}"
            for r in near
        )
        ok = all(r["cpu_us_per_event"] <= 1.3 * cpu_at(FLOOR, r["concurrency"]) for r in near)
        rows.append(["S2 CPU per event ≤ 1.3× the floor's at C=100 and C=300", cpu, verdict(ok)])
    versus = [r for r in s2 if cpu_at("express", r["concurrency"])]
    if versus:
        cpu = ", ".join(
            f"{r['cpu_us_per_event']:.1f} vs {cpu_at('express', r['concurrency']):.1f} µs at C={r['concurrency']}"
            for r in versus
        )
        ok = all(r["cpu_us_per_event"] <= cpu_at("express", r["concurrency"]) for r in versus)
        rows.append(["S2 CPU per event ≤ Express's at every C", cpu, verdict(ok)])
    upto = [r for r in s2 if r["concurrency"] <= 400]
    if upto:
        p99 = ", ".join(f"{r['latency_ms']['p99']:.1f} ms at C={r['concurrency']}" for r in s2)
        ok = all(not r["failed"] and r["latency_ms"]["p99"] < 20 for r in upto)
        rows.append(["S2 p99 added latency < 20 ms up to C=400", p99, verdict(ok)])
    s3 = runs("S3")
    if s3:
        top = max(s3, key=lambda r: r["concurrency"])
        kb = ", ".join(f"{fmt(r['kb_per_stream'], 1)} at C={r['concurrency']}" for r in s3)
        rows.append(
            [
                "S3 ≤ 40 KB per idle open stream",
                kb,
                verdict(all(r["kb_per_stream"] and r["kb_per_stream"] <= 40 for r in s3)),
            ]
        )
        rows.append(
            [
                "S3 10,000 idle streams in one worker",
                f"{top['held_open']:,} of {top['concurrency']:,} open",
                "met, up to this machine's fd limit"
                if top["held_open"] == top["concurrency"] < 10_000
                else verdict(top["held_open"] >= 10_000),
            ]
        )
    s4 = runs("S4")
    if s4:
        r = s4[0]
        rows.append(
            [
                "S4 first event of the first request after a start ≤ 100 ms",
                f"{fmt(r['ttfe_ms'], 1)} ms after the port opens ({fmt(r['start_to_event_ms'])} ms after the start)",
                verdict(r["ttfe_ms"] <= 100),
            ]
        )
    s5 = runs("S5")
    if s5:
        r = s5[0]
        rows.append(
            [
                "S5 stalled clients: memory bounded, ≤ 256 KB per stream",
                f"{fmt(r['kb_per_stream'])} KB per stream (RSS peak − before, over {r['accepted']} streams)",
                verdict(r["kb_per_stream"] <= 256),
            ]
        )
        limit = float(STALL_SETTINGS["CHAT_SEND_TIMEOUT"]) + float(STALL_SETTINGS["CHAT_HEARTBEAT_SECONDS"])
        go, hold = r["let_go_s"], r["let_go_after_stall_s"]
        measured = f"{r['let_go']} of {r['clients']} let go"
        if go:
            measured += f", {hold['max']:.1f} s at most after their send queue filled (the last {go['max']:.1f} s in)"
        if r["let_go"] < r["clients"]:
            measured += f"; {r['clients'] - r['let_go']} still held after {r['duration_s']:.0f} s"
        rows.append(
            [
                f"S5 every stalled stream let go within CHAT_SEND_TIMEOUT + one heartbeat ({limit:g} s here)",
                measured,
                verdict(r["let_go"] == r["clients"] and hold["max"] <= limit),
            ]
        )
    return table(["target (per gevent worker, i.e. per core)", "measured", "verdict"], rows)


def versions():
    def pkgs(python, names):
        code = "import importlib.metadata as m,sys,json;print(json.dumps({n:m.version(n) for n in sys.argv[1:]}))"
        return json.loads(subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True).stdout)

    app = pkgs(APP_PY, ["flask", "gunicorn", "gevent", "openai", "werkzeug"])
    peers = pkgs(PEERS_PY, ["fastapi", "sse-starlette", "starlette", "uvicorn", "uvloop", "httptools", "openai"])
    npm = {
        name: json.loads((EXPRESS / "node_modules" / name / "package.json").read_text())["version"]
        for name in ("openai", "express")
    }

    def python_version(python):
        return subprocess.run([str(python), "-V"], capture_output=True, text=True).stdout.strip()

    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    return (
        f"- ours: {python_version(APP_PY)}, flask {app['flask']}, werkzeug {app['werkzeug']}, "
        f"gunicorn {app['gunicorn']}, gevent {app['gevent']}, openai (py) {app['openai']}\n"
        f"- floor: bench/floor.py on the same Python and gevent {app['gevent']}, nothing else\n"
        f"- FastAPI peer: {python_version(PEERS_PY)}, fastapi {peers['fastapi']}, "
        f"sse-starlette {peers['sse-starlette']}, starlette {peers['starlette']}, uvicorn {peers['uvicorn']} "
        f"(uvloop {peers['uvloop']}, httptools {peers['httptools']}), openai (py) {peers['openai']}\n"
        f"- Express peer: node {node}, express {npm['express']}, openai (npm) {npm['openai']} (a 4.x whose SSE "
        f"decoder does not hold back the last event of a read)\n"
        f"- harness: fake upstream and load generator on {python_version(PEERS_PY)} with uvloop {peers['uvloop']}"
    )


def machine():
    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"
    )
    mem = next(line.split(":", 1)[1].strip() for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return f"{os.cpu_count()} cores ({model}), {mem} memory, Linux {platform.release()}"


def loadavg():
    return open("/proc/loadavg").read().split()[:3]


# --- main ---------------------------------------------------------------------------------------

SCENARIOS = {"S1": scenario_s1, "S2": scenario_s2, "S3": scenario_s3, "S4": scenario_s4, "S5": scenario_s5}
TITLES = {
    "S1": "S1: {c} streams × {tokens} tokens, upstream as fast as it can: relayed events/s",
    "S2": "S2: 50 tokens/s per stream ({tokens} tokens), C = {levels}: CPU per event and added latency",
    "S3": "S3: idle streams (one token, then silence), C = {levels}: memory per open stream",
    "S4": "S4: cold start: the first request after a fresh start ({reps} repetitions, median)",
    "S5": "S5: {clients} clients that never read, upstream as fast as it can ({tokens} tokens): memory, who lets go",
}
REPORTS = {"S1": report_s1, "S2": report_s2, "S3": report_s3, "S4": report_s4, "S5": report_s5}
PARAMS = {"S1": S1, "S2": S2, "S3": S3, "S4": S4, "S5": S5}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~3.5-minute smoke run")
    parser.add_argument("--subjects", default=",".join([DIRECT, *SUBJECT_NAMES]), help="comma-separated")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    parser.add_argument("--out", help="the Markdown report (default: see the module docstring)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the least disturbed is shown")
    parser.add_argument("--profile", action="store_true", help="py-spy the Python subjects (skews their figures)")
    opts = parser.parse_args(argv)
    subjects = [s.strip() for s in opts.subjects.split(",") if s.strip()]
    scenarios = [s.strip().upper() for s in opts.scenarios.split(",") if s.strip()]
    unknown = set(subjects) - {DIRECT, *SUBJECT_NAMES} | set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    mode = "quick" if opts.quick else "full"
    global PROFILE, REPEAT
    PROFILE, REPEAT = opts.profile, max(1, opts.repeat)
    everything = set(subjects) >= set(SUBJECT_NAMES) and set(scenarios) == set(SCENARIOS)
    complete = everything and not opts.quick and not opts.profile
    out = Path(opts.out) if opts.out else (BENCH / "results.md" if complete else LOGS / "last.md")

    os.sched_setaffinity(0, {int(HARNESS_CORE)})  # this script and the harness: core 0
    LOGS.mkdir(exist_ok=True)
    ensure_deps()
    fds = raise_fd_limit()
    command = "python3 bench/run.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    print(f"+ {command}  (fd limit {fds}; load average {' '.join(loadavg())})", flush=True)

    started, sections, raw = time.time(), [], {}
    for name in scenarios:
        title = TITLES[name].format(**PARAMS[name][mode])
        before = loadavg()
        print(f"\n{title}", flush=True)
        runs = SCENARIOS[name](subjects, mode)
        raw[name] = runs
        text = REPORTS[name](runs)
        print(text, flush=True)
        loads = f"Load average before / after: {' '.join(before)} / {' '.join(loadavg())}"
        sections.append(f"## {title}\n\n{loads}\n\n{text}")

    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    (LOGS / f"raw-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(raw, indent=1))
    header = (
        f"# Benchmark results\n\n"
        f"Run {stamp}, {time.time() - started:.0f} s, with:\n\n    {command}\n\n"
        f"Machine: {machine()}.\n\n{versions()}\n\n"
        "Each subject on core 1 (`taskset -c 1`), alone; the fake upstream and the load generator on core 0. "
        '"added" latency is receive time minus the upstream\'s send time of each token; TTFE is from the '
        "request's start to its first content event; CPU is utime + stime of the subject's process tree; "
        "\"foreign load core 0 / 1\" is CPU time on each core that was neither the harness's nor the subject's "
        "(other people's work on this shared machine: figures from a run with much of it are noisy); "
        '"upstream" is the load generator straight against the fake upstream: the harness\'s own ceiling; '
        '"floor" is bench/floor.py, a bare gevent relay doing the same per-event work with no gunicorn, Flask '
        "or SDK: the least Python + gevent can cost here. "
        f"Each row of S1-S3: the least disturbed of {REPEAT} run(s) (all of them in bench/results/raw-*.json).\n"
    )
    if "flask" in subjects:
        sections.insert(0, f"## Targets: ours against the performance budget\n\n{report_targets(raw)}")
    report = header + "\n" + "\n\n".join(sections) + "\n"
    out.write_text(report)
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", flush=True)


if __name__ == "__main__":
    main()
