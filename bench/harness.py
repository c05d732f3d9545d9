"""The benchmark's machinery: the processes it starts, pinned to their cores, and what it reads of them.

bench/run.py's scenarios are made of these pieces: a fresh fake upstream and subject per measured
run (`measured`), the load generator, CPU and RSS of a process tree from /proc, the sockets a
subject holds, py-spy, and the facts about the machine that head every report. Nothing here
knows a scenario or a target.
"""

import hashlib
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
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
    return sum(rss_kb(pid) for pid in tree(root))


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
        self.log_path = LOGS / f"{name.replace('/', '_')}.log"
        self.log = open(self.log_path, "ab")
        self.log.write(f"\n+ {shlex.join(command)}\n".encode())
        self.log.flush()
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            ["taskset", "-c", core, *command] if core else command,  # core None: wherever the kernel likes
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


def start_upstream(tag, tokens, interval=0.0, hold=0.0, warmup=WARMUP, core=HARNESS_CORE):
    port = free_port()
    command = [str(PEERS_PY), str(BENCH / "upstream.py"), "--port", str(port), "--tokens", str(tokens)]
    command += ["--interval", str(interval), "--hold", str(hold), "--warmup", str(warmup)]
    proc = Proc(f"upstream-{tag}", command, stdout=subprocess.PIPE, core=core)
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
    if name == "flask" or name.startswith("flask@"):  # flask@REV: ours as it was at that commit
        command = [str(APP_PY), "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:create_app()", "-w", "1"]
        return command + ["-b", f"127.0.0.1:{port}"], checkout(name[6:]) if "@" in name else ROOT, {}
    if name == FLOOR:  # on our Python and gevent
        return [str(APP_PY), str(BENCH / "floor.py")], ROOT, {"PORT": str(port), "HOST": "127.0.0.1"}
    raise ValueError(name)


def checkout(rev):
    """The repository's files at `rev` (git archive), in bench/results/rev-<sha>/: made once per commit."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True)
    if sha.returncode:
        sys.exit(f"flask@{rev}: no such commit")
    path = LOGS / f"rev-{sha.stdout.decode().strip()[:12]}"
    if not path.exists():
        path.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(path)], input=archive.stdout, check=True)
    return path


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


def run_load(port, concurrency, tag, ramp, timeout, path="/api/chat", on_ready=None, core=HARNESS_CORE, **flags):
    """Run bench/load.py on the harness core; return its figures.

    `flags` are load.py's own (hold_open=1.5 is --hold-open 1.5); on_ready(n) runs when it says READY
    (idle streams all open) or CUT (streams all cut, before they are resumed).
    """
    out = LOGS / f"load-{tag}.json"
    command = [str(PEERS_PY), str(BENCH / "load.py"), "--port", str(port), "--path", path]
    command += ["-c", str(concurrency), "--ramp", str(ramp), "--timeout", str(timeout), "--out", str(out)]
    for flag, value in flags.items():
        if value is not None:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    proc = Proc(f"load-{tag}", command, stdout=subprocess.PIPE, core=core)
    for line in proc.process.stdout:
        if line.startswith((b"READY", b"CUT")) and on_ready:
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


# --- the whole service: the shipped nginx.conf in front of the shipped gunicorn.conf.py (S7) ----------


NGINX = "/usr/sbin/nginx"


def start_service(tag, upstream_port, settings):
    """gunicorn with gunicorn.conf.py as shipped (a worker per core), on no core in particular."""
    port = free_port()
    env = {"OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1", "OPENAI_API_KEY": "sk-bench"}
    env |= {"CHAT_MODEL": "gpt-4", "GUNICORN_BIND": f"127.0.0.1:{port}", **settings}
    command = [str(APP_PY), "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:create_app()"]
    proc = Proc(f"service-{tag}", command, env=env, core=None)
    proc.port = port
    wait_port(port, proc.process)
    return proc


def start_nginx(tag, app_port, replace=()):
    """nginx.conf as shipped, but for its address, its paths and `replace` ((old, new) pairs), in the foreground."""
    directory = LOGS / f"nginx-{tag}"
    shutil.rmtree(directory, ignore_errors=True)  # its logs are this run's alone
    directory.mkdir()
    port = free_port()
    text = (ROOT / "nginx.conf").read_text()
    temp_paths = "".join(f"\n    {kind}_temp_path {directory}/{kind};" for kind in ("client_body", "proxy"))
    pairs = [
        ("server 127.0.0.1:8000 ", f"server 127.0.0.1:{app_port} "),
        ("listen 80;", f"listen 127.0.0.1:{port};"),
        ("/srv/chat/static", str(ROOT / "static")),
        ("/var/log/nginx/", f"{directory}/"),
        ("/run/nginx.pid", f"{directory}/nginx.pid"),
        ("user www-data;", "user root;" if os.geteuid() == 0 else ""),
        ("\nhttp {", "\nhttp {" + temp_paths),
        *replace,
    ]
    for old, new in pairs:
        if old not in text:
            sys.exit(f"nginx.conf no longer contains {old!r}: bench/harness.py's start_nginx needs updating")
        text = text.replace(old, new)
    conf = directory / "nginx.conf"
    conf.write_text(text)
    command = [NGINX, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf), "-g", "daemon off;"]
    proc = Proc(f"nginx-{tag}", command, core=None)
    proc.port, proc.error_log = port, directory / "error.log"
    wait_port(port, proc.process)
    return proc


def children(pid):
    """The direct children of a process (gunicorn's workers, nginx's)."""
    return [p for p in tree(pid) if p != pid and proc_stat(p)[0] == pid]


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


class Peaks(threading.Thread):
    """Peak RSS of each of some processes (and of a tree's sum), sampled every `every` seconds."""

    def __init__(self, pids, every=0.5):
        super().__init__(daemon=True)
        self.pids, self.every, self.running = pids, every, True
        self.peak = dict.fromkeys(pids, 0)

    def run(self):
        while self.running:
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], rss_kb(pid))
            time.sleep(self.every)

    def stop(self):
        self.running = False
        self.join()
        return self.peak


# --- one measured run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """One run's choices from the command line, handed to every scenario."""

    quick: bool = False  # --quick: the shorter parameters of each scenario
    repeat: int = 1  # --repeat: measure each run this many times, report the one with the least foreign load
    profile: bool = False  # --profile: py-spy samples the Python subjects during each measured run


def measured(options, *args, **kwargs):
    """measured_run, options.repeat times: the repetition least disturbed by other work on the machine is kept."""
    runs = [measured_run(*args, profile=options.profile, **kwargs) for _ in range(options.repeat)]
    best = min(runs, key=lambda r: max(0, r["foreign_core0_pct"]) + max(0, r["foreign_core1_pct"]))
    best["repeats"] = [
        {k: r[k] for k in ("events_per_s", "cpu_us_per_event", "foreign_core0_pct", "foreign_core1_pct")}
        | {"latency_p99_ms": r["latency_ms"]["p99"]}
        for r in runs
    ]
    return best


def measured_run(subject, tag, upstream_args, concurrency, ramp, timeout, profile=False, settings=None, **load_flags):
    """Fresh upstream and subject, warm-up, then the load with CPU, RSS and noise figures.

    `settings`: the subject's environment for this run; `load_flags`: load.py's (see run_load).
    """
    upstream = start_upstream(tag, **upstream_args, warmup=0 if subject == DIRECT else WARMUP)
    proc = None
    try:
        if subject == DIRECT:
            port, path, pid = upstream.port, "/v1/chat/completions", upstream.pid
        else:
            proc = start_subject(subject, tag, upstream.port, concurrency, settings=settings)
            port, path, pid = proc.port, "/api/chat", proc.pid
            warm_up(proc, subject, tag)
        time.sleep(0.3)
        rss_idle = tree_rss_kb(pid)
        before = tree_cpu(pid), tree_cpu(upstream.pid), core_busy()
        sampler = Sampler(pid)
        sampler.start()
        open_rss = []

        def on_ready(held):
            for _ in range(10):  # while the streams are held open
                open_rss.append(tree_rss_kb(pid))
                time.sleep(0.1)

        spy = start_profile(subject, tag, pid) if profile else None
        started = time.monotonic()
        result = run_load(port, concurrency, tag, ramp, timeout, path=path, on_ready=on_ready, **load_flags)
        wall = time.monotonic() - started
        after = tree_cpu(pid), tree_cpu(upstream.pid), core_busy()
        peak = sampler.stop()
        if spy is not None:
            stop_profile(spy)
    finally:
        if proc is not None:
            proc.stop()
            time.sleep(0.2)  # let the upstream see the subject's connections close
        upstream_figures = stop_upstream(upstream)
    result.update(subject=subject, wall_s=wall, rss_idle_kb=rss_idle, rss_peak_kb=peak, upstream=upstream_figures)
    result["rss_open_kb"] = max(open_rss) if open_rss else None
    result.update(cpu_figures(subject, result, wall, before, after))
    return result


def warm_up(proc, subject, tag):
    """A few short streams first, so that no measured figure pays for a cold worker."""
    warm = run_load(proc.port, WARMUP, f"{tag}-warmup", ramp=0, timeout=30)
    if warm["completed"] != WARMUP:
        print(f"  warm-up of {subject} incomplete: {warm['errors']}", flush=True)


def cpu_figures(subject, result, wall, before, after):
    """The subject's CPU, the harness's, and the foreign load on each core, from before/after readings."""
    (cpu0, up0, busy0), (cpu1, up1, busy1) = before, after
    cpu = cpu1 - cpu0
    harness_cpu = (up1 - up0) + result["loadgen_cpu_s"]
    ours = subject != DIRECT
    return {
        "cpu_s": cpu if ours else None,
        "cpu_us_per_event": (cpu / result["events"] * 1e6) if result["events"] and ours else None,
        "subject_core_pct": cpu / wall * 100 if ours else None,
        "harness_core_pct": harness_cpu / wall * 100,
        # CPU on the subject's core that was not the subject's: other people's work on this machine
        "foreign_core1_pct": ((busy1[SUBJECT_CORE] - busy0[SUBJECT_CORE]) - (cpu if ours else 0)) / wall * 100,
        "foreign_core0_pct": ((busy1[HARNESS_CORE] - busy0[HARNESS_CORE]) - harness_cpu) / wall * 100,
    }


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


# --- clients of our own ----------------------------------------------------------------------


def fd_cap():
    """The most streams one subject process can hold: 2 descriptors each, under the hard limit, with headroom."""
    return (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 200) // 2


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


# --- the machine -------------------------------------------------------------------------------


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
