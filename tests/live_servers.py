"""Real processes listening on 127.0.0.1, and gunicorn started the way production starts it."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_upstream import API_KEY

ROOT = Path(__file__).resolve().parent.parent

FAST_LIFECYCLE = {  # short heartbeats and timeouts, so lifecycle tests take seconds
    "CHAT_RESUME_SECONDS": "0",  # a client that leaves ends its reply at once (the tests of what that costs)
    "CHAT_HEARTBEAT_SECONDS": "0.25",
    "CHAT_FIRST_TOKEN_TIMEOUT": "1.5",
    "CHAT_IDLE_TIMEOUT": "1.5",
    "CHAT_MAX_DURATION": "3",
}

# Settings a developer's shell may hold; no server under test inherits them.
SETTINGS = ("OPENAI_", "CHAT_", "GUNICORN_", "WEB_CONCURRENCY", "PROMETHEUS_MULTIPROC_DIR")


def server_environment(env=None, upstream_url=None):
    """This environment without the shell's settings, then the fake upstream (when given), then `env`."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith(SETTINGS)}
    if upstream_url:
        environment.update(OPENAI_BASE_URL=upstream_url, OPENAI_API_KEY=API_KEY)
    return {**environment, **(env or {})}


def wait_for(condition, timeout=5.0):
    """Poll `condition` until it is true or `timeout` seconds passed; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def healthz(server):
    """GET /healthz of a live app server, parsed: this worker's figures."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    connection.request("GET", "/healthz")
    return json.loads(connection.getresponse().read())


def stream_log_lines(server):
    """The app's one log line per stream, from a live server's log."""
    return [line for line in server.log().splitlines() if " stream " in line and " end=" in line]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unavailable(message):
    """A tool the tests drive is missing: skip on a developer's machine, fail in CI."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message, allow_module_level=True)


class LiveServer:
    """A real process listening on 127.0.0.1, started and awaited; its log is kept for failures.

    `env` is the whole environment of the process (None: this one's); `logs` are more files
    the process writes, shown with its output by `log()`.
    """

    def __init__(
        self, name, command, port, log_dir, env=None, ready_path="/healthz", stop_signal=signal.SIGTERM, logs=()
    ):
        self.name, self.port, self.stop_signal, self.logs = name, port, stop_signal, logs
        self.address = f"127.0.0.1:{port}"
        self.url = f"http://{self.address}"
        self.log_path = Path(log_dir) / f"{name}.log"
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log_file, stderr=subprocess.STDOUT)
        self.wait_ready(ready_path)

    def wait_ready(self, path, timeout=30):
        """Poll until GET `path` answers 200 (with `path` None: until the port accepts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if path is None:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                connection.request("GET", path)
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.02)
        log = self.log()
        self.stop()  # not ready: do not leave it running behind the failed test
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{log}")

    def log(self):
        self.log_file.flush()
        text = self.log_path.read_text(errors="replace")
        return text + "".join(Path(path).read_text(errors="replace") for path in self.logs if Path(path).exists())

    def ask_to_stop(self):
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)

    def stop(self, timeout=15):
        self.ask_to_stop()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log_file.close()


class Servers:
    """Starts live servers, each logging into a directory of its own, and stops them all on exit."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.started = []

    def run(self, name, command, port, log_dir=None, **options):
        server = LiveServer(name, command, port, log_dir or self.tmp_path_factory.mktemp(name), **options)
        self.started.append(server)
        return server

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for server in self.started:  # all at once, then wait for each
            server.ask_to_stop()
        for server in self.started:
            server.stop()


class Gunicorns(Servers):
    """gunicorn as production starts it (`-c gunicorn.conf.py`: gevent workers), one worker unless told, a free port."""

    def __init__(self, tmp_path_factory, upstream_url):
        super().__init__(tmp_path_factory)
        self.upstream_url = upstream_url

    def start(
        self, env=None, *, name="gunicorn", app="app:create_app()", upstream=True, ready_path="/healthz", workers=1
    ):
        """`env`: settings over an environment with none of the shell's; `upstream`: the fake upstream's
        URL and API_KEY come first (without them, the demo model answers)."""
        port = free_port()
        command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", app, "-b", f"127.0.0.1:{port}"]
        command += ["-w", str(workers)]
        environment = server_environment(env, self.upstream_url if upstream else None)
        # At the end, SIGQUIT: gunicorn's quick shutdown. Its graceful one (SIGTERM) is tested on its own.
        return self.run(name, command, port, env=environment, ready_path=ready_path, stop_signal=signal.SIGQUIT)
