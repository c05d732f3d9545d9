"""What a security review of the shipped service found, each against real processes: gunicorn's gevent
worker with the shipped gunicorn.conf.py, the fake upstream scripted to be hostile, the real nginx.conf,
and Chromium where a browser's own rules are the point.
"""

import http.client
import io
import json
import math
import re
import resource
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chat_client import post_chat
from live_servers import ROOT, Gunicorns, free_port, server_environment, wait_for
from nginx_server import Nginxes

HI = {"messages": [{"role": "user", "content": "Hi"}]}
# A key that does not look like one (no sk-), as many compatible servers issue: only the service's
# own knowledge of its key can hide it.
KEY = "gsk_9f8e7d6c5b4a39281f0e2d3c-LIVEKEY"


def request(server, method, path, body=None, headers=None, source="127.0.0.1"):
    """One plain request from `source`; return (status, headers, body). Headers keep repeated names."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10, source_address=(source, 0))
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    result = response.status, response.headers, response.read()
    connection.close()
    return result


@pytest.fixture(scope="module")
def keyed_gunicorn(fake_upstream_server, tmp_path_factory):
    """One worker with KEY as its upstream key, metrics on, and no retries (one upstream call per request)."""
    env = {"OPENAI_API_KEY": KEY, "CHAT_METRICS": "1", "CHAT_UPSTREAM_RETRIES": "0"}
    with Gunicorns(tmp_path_factory, fake_upstream_server.url) as gunicorns:
        yield gunicorns.start(env, name="keyed")


# --- Secrets: redacted first, then cut, whole or in pieces ----------------------------------------


def across(cut, prefix="Invalid key: "):
    """An upstream message in which a cut at `cut` characters falls just before KEY's last character."""
    return prefix + "x" * (cut - len(KEY) + 1 - len(prefix)) + KEY + " was refused."


ECHOES = {
    "across the client's cut": across(500),
    "across the log's cut": across(300),
    "its first half": f"Invalid key: {KEY[: len(KEY) // 2]}...",
    "all but its first characters": f"Invalid key: ...{KEY[5:]}",
}


def keeps_no_piece_of_the_key(text):
    """No piece of 8 characters or more from either end of KEY (any longer piece holds one of these)."""
    return KEY[:8] not in text and KEY[-8:] not in text


@pytest.mark.parametrize("echoed", ECHOES.values(), ids=ECHOES.keys())
def test_an_upstream_that_echoes_the_key_leaks_no_piece_of_it(keyed_gunicorn, upstream, echoed):
    """The upstream's 400 goes to the client (cut to 500 characters) and to the log (300): cut before it
    was redacted, a key across the cut went out less its last character."""
    upstream.reset(status=400, error_message=echoed)
    logged_before = len(keyed_gunicorn.log())
    reply = post_chat(keyed_gunicorn.url, HI)

    assert reply.status == 400
    message = json.loads(reply.raw)["error"]["message"]
    assert message.startswith("Invalid key: ")  # the user still learns what was wrong
    assert keeps_no_piece_of_the_key(message), message
    assert wait_for(lambda: "upstream refused: 400" in keyed_gunicorn.log()[logged_before:])
    assert keeps_no_piece_of_the_key(keyed_gunicorn.log()[logged_before:])


def test_an_error_inside_the_stream_that_echoes_the_key_leaks_no_piece_of_it(keyed_gunicorn, upstream):
    """The stream's error detail goes only to the log, cut to 300 characters there."""
    upstream.reset(odd_events=[{"error": {"message": across(300, prefix="stop failed: ")}}])
    logged_before = len(keyed_gunicorn.log())
    reply = post_chat(keyed_gunicorn.url, HI)

    assert reply.data[-1]["code"] == "upstream_error"
    assert wait_for(lambda: "stop failed: " in keyed_gunicorn.log()[logged_before:])
    assert keeps_no_piece_of_the_key(keyed_gunicorn.log()[logged_before:])


# --- Log lines: one line each, whatever the values in them -----------------------------------------

FORGED = "[2026-12-04 18:00:00 +0000] [4242] [INFO] stream forged00001 model=gpt-4o end=done"
QUOTED_BACK = f'Invalid stop: "x\n{FORGED}\r\n\x1b[1A"'  # what an upstream that quotes `stop` back says


@pytest.mark.parametrize(
    "script",
    [{"status": 400, "error_message": QUOTED_BACK}, {"odd_events": [{"error": {"message": QUOTED_BACK}}]}],
    ids=["refused", "inside the stream"],
)
def test_upstream_text_cannot_forge_a_log_line(keyed_gunicorn, upstream, script):
    upstream.reset(**script)
    logged_before = len(keyed_gunicorn.log())
    post_chat(keyed_gunicorn.url, HI)

    assert wait_for(lambda: "Invalid stop" in keyed_gunicorn.log()[logged_before:])
    log = keyed_gunicorn.log()[logged_before:]
    assert not [line for line in log.splitlines() if line.startswith(FORGED[:20])], log[-2000:]
    assert "\x1b" not in log
    assert f"\\n{FORGED}\\r\\n\\x1b[1A" in log  # escaped, and still there for the operator to read


# --- Metrics: labels from a fixed set ---------------------------------------------------------------


def ended_codes(server):
    """chat_streams_ended_total's samples of complete replies, from /metrics: {code: count}."""
    status, _, body = request(server, "GET", "/metrics")
    assert status == 200
    codes = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "chat_streams_ended_total" and sample.labels["outcome"] == "done":
                codes[sample.labels["code"]] = sample.value
    return codes


def test_finish_reasons_from_the_upstream_make_a_bounded_set_of_series(keyed_gunicorn, upstream):
    """30 made-up finish_reason values made 30 series, each kept by Prometheus for good: now one, "other"."""
    before = ended_codes(keyed_gunicorn)
    for i in range(30):
        upstream.reset(tokens=["a"], finish_reason=f"made-up-{i}")
        assert post_chat(keyed_gunicorn.url, HI).data[-1] == "[DONE]"
    upstream.reset(tokens=["a"], finish_reason="length")
    post_chat(keyed_gunicorn.url, HI)

    after = ended_codes(keyed_gunicorn)
    assert set(after) <= {"stop", "length", "tool_calls", "content_filter", "function_call", "other"}, after
    assert after["other"] - before.get("other", 0) == 30
    assert after["length"] - before.get("length", 0) == 1


# --- CORS: no origin that lets in more than it says ---------------------------------------------------


def start_gunicorn_and_fail(env):
    """Start gunicorn as production does with `env`; return its output once it has exited (it must)."""
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:create_app()"]
    command += ["-b", f"127.0.0.1:{free_port()}", "-w", "1"]
    done = subprocess.run(command, cwd=ROOT, env=server_environment(env), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, done.stdout + done.stderr
    return (done.stdout + done.stderr).splitlines()


@pytest.mark.parametrize(
    "origins, sentence",
    [
        ("null", "CHAT_CORS_ORIGINS must not list null: any site can send Origin: null."),
        ("https://app.example, null", "CHAT_CORS_ORIGINS must not list null: any site can send Origin: null."),
        (
            "*, https://app.example",
            "CHAT_CORS_ORIGINS must be * (every site, without credentials) or origins, not both.",
        ),
        (
            "https://app.example/",
            "CHAT_CORS_ORIGINS must list origins such as https://app.example, not 'https://app.example/'.",
        ),
    ],
    ids=["null", "null-among-others", "star-and-others", "a-path"],
)
def test_a_cors_origin_that_lets_in_more_or_never_matches_stops_the_service(origins, sentence):
    """null is the origin of every sandboxed iframe: listed, any site could call the chat from one."""
    assert sentence in start_gunicorn_and_fail({"CHAT_CORS_ORIGINS": origins})


@pytest.fixture
def open_cors_gunicorn(start_gunicorn):
    return start_gunicorn({"CHAT_CORS_ORIGINS": "*"}, name="cors-star")


def test_cors_star_lets_any_site_read_a_stream_without_credentials(open_cors_gunicorn, gunicorn, upstream, page):
    """A page of another origin (the session's gunicorn, another port) reads a reply in Chromium, whose
    CORS rules are the ones that count. `*` used to be taken literally, and match no origin."""
    upstream.reset(tokens=["Hel", "lo"])
    page.goto(f"{gunicorn.url}/api/models")  # any document of another origin will do
    text = page.evaluate(
        """async url => {
            const response = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                               body: JSON.stringify({messages: [{role: "user", content: "Hi"}]})});
            return await response.text();
        }""",
        f"{open_cors_gunicorn.url}/api/chat",
    )
    assert text.endswith("data: [DONE]\n\n")
    assert '"content": "Hel"' in text

    status, headers, _ = request(
        open_cors_gunicorn,
        "OPTIONS",
        "/api/chat",
        headers={"Origin": "https://any.example", "Access-Control-Request-Method": "POST"},
    )
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in headers


# --- Redirects built from the Host header -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api//models", "/chat-static//chat.js"])
def test_a_doubled_slash_is_a_404_not_a_redirect_to_the_host_header(gunicorn, path):
    """Werkzeug answered /api//models with a 308 to http://<the request's Host>/api/models."""
    status, headers, _ = request(gunicorn, "GET", path, headers={"Host": "evil.example"})

    assert status == 404
    assert "Location" not in headers


def test_a_doubled_slash_through_nginx_is_a_404_too(start_nginx, gunicorn):
    """nginx merges slashes to pick a location, but passes the URI on as it came."""
    server = start_nginx("nginx-slashes", [gunicorn])
    status, headers, _ = request(server, "GET", "/api//models", headers={"Host": "evil.example"})

    assert status == 404
    assert "Location" not in headers


# --- Headers on every response ------------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}
APP_RESPONSES = {  # id: (method, path, body, headers, status)
    "page": ("GET", "/", None, {}, 200),
    "static file": ("GET", "/chat-static/chat.js", None, {}, 200),
    "models": ("GET", "/api/models", None, {}, 200),
    "health": ("GET", "/healthz", None, {}, 200),
    "stream": ("POST", "/api/chat", json.dumps(HI), JSON, 200),
    "json error": ("POST", "/api/chat", "{", JSON, 400),
    "wrong method": ("GET", "/api/chat", None, {}, 405),
    "unknown path": ("GET", "/nothing-here", None, {}, 404),
}


def assert_hardened(headers):
    assert headers.get_all("X-Content-Type-Options") == ["nosniff"]
    assert headers.get_all("Referrer-Policy") == ["no-referrer"]


@pytest.mark.parametrize("method, path, body, headers, status", APP_RESPONSES.values(), ids=APP_RESPONSES.keys())
def test_every_app_response_forbids_sniffing_and_referrers(gunicorn, upstream, method, path, body, headers, status):
    got, response_headers, _ = request(gunicorn, method, path, body, headers)

    assert got == status
    assert_hardened(response_headers)


def half_request(server, data, source="127.0.0.1"):
    """Send raw bytes and read what nginx answers until it closes: (status, headers)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    response = http.client.HTTPResponse(FakeSocket(received))
    response.begin()
    return response.status, response.headers


class FakeSocket:
    """What http.client.HTTPResponse reads a response from: the bytes nginx sent."""

    def __init__(self, data):
        self.data = data

    def makefile(self, mode):
        return io.BytesIO(self.data)


NGINX_RESPONSES = {  # id: (method, path, body, headers, status, source)
    "page (nginx's)": ("GET", "/", None, {}, 200, "127.0.0.1"),
    "static file (nginx's)": ("GET", "/chat-static/chat.js", None, {}, 200, "127.0.0.1"),
    "missing static file": ("GET", "/chat-static/missing.js", None, {}, 404, "127.0.0.1"),
    "stream (the app's)": ("POST", "/api/chat", json.dumps(HI), JSON, 200, "127.0.0.1"),
    "app error": ("POST", "/api/chat", "{", JSON, 400, "127.0.0.1"),
    "body too large": ("POST", "/api/chat", "x" * 1_048_577, JSON, 413, "127.0.0.1"),
    "metrics from outside": ("GET", "/metrics", None, {}, 403, "127.0.0.2"),
    "health (proxied)": ("GET", "/healthz", None, {}, 200, "127.0.0.1"),
}


@pytest.fixture(scope="module")
def module_nginx(fake_upstream_server, tmp_path_factory):
    """The shipped nginx.conf in front of a gunicorn of this module, and one with no app behind it."""
    with Gunicorns(tmp_path_factory, fake_upstream_server.url) as gunicorns, Nginxes(tmp_path_factory) as nginxes:
        app = gunicorns.start(name="gunicorn-headers")
        yield nginxes.start("nginx-headers", [app]), nginxes.start("nginx-headers-no-app", [f"127.0.0.1:{free_port()}"])


@pytest.mark.parametrize(
    "method, path, body, headers, status, source", NGINX_RESPONSES.values(), ids=NGINX_RESPONSES.keys()
)
def test_every_nginx_response_forbids_sniffing_and_referrers(
    module_nginx, upstream, method, path, body, headers, status, source
):
    """One copy of each header, on the app's responses through nginx and on nginx's own pages alike."""
    got, response_headers, _ = request(module_nginx[0], method, path, body, headers, source)

    assert got == status
    assert_hardened(response_headers)


def test_nginx_own_error_pages_forbid_sniffing_and_referrers(module_nginx):
    """`always`: without it, add_header skips error statuses. No app behind it (503), a request nginx
    cannot parse (400)."""
    status, headers, _ = request(module_nginx[1], "POST", "/api/chat", json.dumps(HI), JSON)
    assert status == 503
    assert_hardened(headers)

    status, headers = half_request(module_nginx[0], b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400
    assert_hardened(headers)


# --- Diagnostic streams: bounded records, and only from a client that means it ------------------------

DIAGNOSTIC = b"POST /api/chat?diagnostic=stream&silence=0 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def hang_up_at_once(port):
    """Ask for a diagnostic stream and reset the connection at once: its record is written straight away."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(DIAGNOSTIC + b"Content-Length: 2\r\n\r\n{}")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset


def diagnostic_ends(server):
    return server.log().count("model=diagnostic end=")


def records(directory, prefix="diagnostic-"):
    """The record files in `directory` (not the ones being written: those are renamed over a record)."""
    return [path for path in directory.iterdir() if path.name.startswith(prefix) and path.suffix == ".json"]


def flood(server, until, seconds, pause=0.0):
    """Streams that hang up, one after another (`pause` seconds apart), until `until()` or `seconds` passed."""
    deadline, sent = time.monotonic() + seconds, 0
    while not until() and time.monotonic() < deadline:
        hang_up_at_once(server.port)
        sent += 1
        time.sleep(pause)
    return sent


def test_diagnostic_records_are_bounded_whatever_the_flood(start_gunicorn, tmp_path):
    """1,500 streams that hang up used to leave 1,500 record files (9,750 in 150 s, in the review)."""
    server = start_gunicorn({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}, name="diagnostic-flood")
    flood(server, until=lambda: diagnostic_ends(server) >= 1500, seconds=30)

    assert diagnostic_ends(server) >= 1500
    kept = records(tmp_path)
    size = sum(path.stat().st_size for path in kept)
    print(f"{diagnostic_ends(server)} diagnostic streams ended: {len(kept)} records kept, {size} bytes")
    assert len(kept) <= 1000
    assert size <= 8 * 1024 * 1024


def chat_seconds(server, count):
    """The median of `count` short chats, each timed from the request to [DONE] (one that fails: forever)."""
    times = []
    for _ in range(count):
        started = time.monotonic()
        try:
            done = post_chat(server.url, HI, timeout=10).data[-1] == "[DONE]"
        except OSError:
            done = False
        times.append(time.monotonic() - started if done else math.inf)
    return statistics.median(times)


def test_a_diagnostic_flood_leaves_chat_latency_alone(start_gunicorn, upstream, tmp_path):
    """The shared directory holds 20,000 files (what a flood left before records were bounded). Each
    stream's end used to scan them all, blocking the worker: no request may touch the directory. The
    flood goes at about the review's pace (65 a second), so that it does not just take the CPU."""
    server = start_gunicorn({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}, name="diagnostic-latency")
    for i in range(20_000):
        (tmp_path / f"diagnostic-left{i:05d}.json").touch()
    upstream.reset(tokens=["a", "b"])
    before = chat_seconds(server, 20)

    during = []
    measuring = threading.Thread(target=lambda: during.append(chat_seconds(server, 20)))
    measuring.start()
    flooded = flood(server, until=lambda: not measuring.is_alive(), seconds=60, pause=0.01)
    measuring.join()

    print(f"chat latency {before * 1000:.1f} ms before, {during[0] * 1000:.1f} ms during {flooded} diagnostic streams")
    assert during[0] < 2 * before + 0.05  # coarse: a scan per stream made it seconds
    assert len(records(tmp_path)) - 20_000 <= 1000


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_diagnostic_stream_needs_a_json_request(keyed_gunicorn, content_type):
    """What a form, or a fetch in no-cors mode, on another site can send without asking first: 415."""
    headers = {"Content-Type": content_type} if content_type else {}
    status, _, body = request(keyed_gunicorn, "POST", "/api/chat?diagnostic=stream&silence=0", "{}", headers)

    assert status == 415
    assert json.loads(body)["error"]["code"] == "unsupported_media_type"


def test_another_site_cannot_open_a_diagnostic_stream_through_its_visitors_browser(keyed_gunicorn, gunicorn, page):
    """A page of another origin POSTs as a form would (text/plain, no preflight) in Chromium: refused
    before any stream opens."""
    page.goto(f"{gunicorn.url}/api/models")  # the other site: any document of another origin
    opened = keyed_gunicorn.log().count("model=diagnostic")
    kind = page.evaluate(
        """url => fetch(url, {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                              body: "{}"}).then(response => response.type)""",
        f"{keyed_gunicorn.url}/api/chat?diagnostic=stream&silence=0",
    )

    assert kind == "opaque"  # the browser sent it, and shows the page nothing
    assert wait_for(lambda: 'diagnostic=stream&silence=0 HTTP/1.1" 415' in keyed_gunicorn.log())
    assert keyed_gunicorn.log().count("model=diagnostic") == opened


# --- Memory after floods --------------------------------------------------------------------------

TRICKLED = 900  # bodies per round, as in the review
TRICKLED_HEAD = b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2000\r\n\r\n"


def rss_mb(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024


def trickle_bodies(server, count):
    """Open `count` connections, each sending a body a byte at a time until the app cuts it; return the statuses."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 1000:  # this process holds every connection at once
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 4000), hard))
    waiting, statuses = [], []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(TRICKLED_HEAD + b'{"messages": [')
        sock.setblocking(False)
        waiting.append(sock)
    deadline = time.monotonic() + 30
    while waiting and time.monotonic() < deadline:
        time.sleep(0.5)
        for sock in list(waiting):
            try:
                answer = sock.recv(64)
            except BlockingIOError:  # no answer yet: one more byte
                try:
                    sock.send(b" ")
                except OSError:
                    pass
                continue
            except OSError:
                answer = b""
            statuses.append(answer[9:12].decode())
            waiting.remove(sock)
            sock.close()
    return statuses


@pytest.fixture
def trimming_gunicorn(start_gunicorn):
    """Bodies cut after 1 s (not 10), and the heap trimmed every half second (not every 60 s): rounds of seconds."""
    return start_gunicorn({"CHAT_BODY_TIMEOUT": "1", "GUNICORN_TRIM_SECONDS": "0.5"}, name="trimming")


def workers(server):
    """The pids of a gunicorn's workers: its master's children."""
    master = server.process.pid
    return Path(f"/proc/{master}/task/{master}/children").read_text().split()


def test_memory_levels_off_after_a_flood_of_cut_bodies(trimming_gunicorn):
    """Three rounds of 900 bodies trickled in, each cut with 408: RSS of the worker grew by 5-10 MB a
    round (glibc kept the freed heap; Python's objects did not grow). Trimmed, it stays where the
    first round left it."""
    [worker] = workers(trimming_gunicorn)
    after = []
    for _ in range(3):
        statuses = trickle_bodies(trimming_gunicorn, TRICKLED)
        assert statuses.count("408") >= TRICKLED - 10, statuses
        time.sleep(1.5)  # a trim or more
        after.append(rss_mb(worker))

    print("RSS after each round: " + ", ".join(f"{mb:.1f} MB" for mb in after))
    assert max(after[1:]) - after[0] < 4, after
