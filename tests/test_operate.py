"""Operating it: Prometheus metrics summed over two gunicorn workers, and `flask --app app doctor`
run through the real nginx, as shipped and broken in the ways it must catch.

The doctor runs as its users run it (a subprocess, the real CLI) with its silence scaled down to
3 s, against gunicorns whose heartbeat is scaled down to match.
"""

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chat_client import open_chat, post_chat
from live_servers import ROOT, Gunicorns, free_port, server_environment, wait_for
from nginx_server import with_directive

HI = {"messages": [{"role": "user", "content": "Hi"}]}
TOKEN = "doctor-test-token-0123"
CHECKS = [
    "not buffered",
    "not compressed",
    "SSE headers",
    "silence of 3 s",
    "heartbeat",
    "HTTP/2",
    "client abort",
    "TLS",
]


# --- The doctor ---------------------------------------------------------------------------------


class Diagnosis:
    """The doctor's output, by check: {name: (PASS or FAIL, the rest of its lines)}."""

    def __init__(self, result):
        self.returncode, self.output = result.returncode, result.stdout + result.stderr
        self.checks = {}
        for match in re.finditer(r"^(PASS|FAIL)  (.{16}) (.*(?:\n {23}.*)*)", result.stdout, re.M):
            self.checks[match.group(2).strip()] = (match.group(1), match.group(3))

    def verdicts(self):
        return {name: verdict for name, (verdict, _) in self.checks.items()}

    def failed(self):
        return sorted(name for name, (verdict, _) in self.checks.items() if verdict == "FAIL")


def doctor(url, *options, token=TOKEN):
    """Run `flask --app app doctor URL --silence 3` as a user does, with the deployment's token."""
    command = [sys.executable, "-m", "flask", "--app", "app", "doctor", url, "--silence", "3", *options]
    environment = server_environment({"CHAT_API_TOKEN": token})
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=90)
    diagnosis = Diagnosis(result)
    print(diagnosis.output)
    assert list(diagnosis.checks) == CHECKS, diagnosis.output
    assert "Traceback" not in diagnosis.output
    return diagnosis


def with_heartbeat(seconds):
    return {"CHAT_HEARTBEAT_SECONDS": str(seconds), "CHAT_API_TOKEN": TOKEN}


@pytest.fixture(scope="module")
def gunicorns(fake_upstream_server, tmp_path_factory):
    """This module's gunicorns, stopped when it ends."""
    with Gunicorns(tmp_path_factory, fake_upstream_server.url) as gunicorns:
        yield gunicorns


@pytest.fixture(scope="module")
def doctor_gunicorn(gunicorns):
    """Two workers, heartbeats every second, a token: what the doctor is pointed at through nginx."""
    return gunicorns.start(with_heartbeat(1), name="gunicorn-doctor", workers=2)


@pytest.fixture(scope="module")
def slow_heartbeat_gunicorn(gunicorns):
    """Heartbeats every 2.5 s: longer than the 2 s read timeout of the broken nginx below."""
    return gunicorns.start(with_heartbeat(2.5), name="gunicorn-slow-heartbeat")


def with_tls(port, cert, key):
    """What the README's TLS step adds to the server block: certbot's `listen 443 ssl`, its certificate,
    and `http2` on the listen line. Here on a second port, beside the plain one nginx's readiness uses."""
    tls = f"listen 127.0.0.1:{port} ssl http2;\n        ssl_certificate {cert};\n        ssl_certificate_key {key};"
    return with_directive("server_name _;", f"{tls}\n        server_name _;")


BUFFERED_AND_GZIPPED = [  # nginx's defaults in the location, and gzip for text/event-stream
    with_directive("gzip_types text/css", "gzip_types text/event-stream text/css"),
    with_directive(
        "location ~ ^/api/(ui-)?chat(/|$) {",
        "location ~ ^/api/(ui-)?chat(/|$) {\n proxy_ignore_headers X-Accel-Buffering;",
    ),
    with_directive("proxy_buffering off;", "proxy_buffering on;"),
    with_directive("            gzip off;", "            gzip on;"),
]
SHORT_READ_TIMEOUT = with_directive("proxy_read_timeout 300s;", "proxy_read_timeout 2s;")
ABORT_IGNORED = with_directive("proxy_ignore_client_abort off;", "proxy_ignore_client_abort on;")


def test_doctor_passes_the_shipped_config_with_tls_and_http2(doctor_gunicorn, certificate, upstream, start_nginx):
    """Every check passes through nginx.conf as deployed (TLS and http2 added as the README says), with
    two workers: the abort check's report is answered by whichever worker, from the shared directory."""
    port = free_port()
    start_nginx("nginx-doctor-tls", [doctor_gunicorn], [with_tls(port, *certificate)])
    diagnosis = doctor(f"https://127.0.0.1:{port}/", "--cafile", str(certificate[0]))

    assert diagnosis.failed() == [], diagnosis.output
    assert diagnosis.returncode == 0
    assert "ALPN h2" in diagnosis.checks["HTTP/2"][1]
    assert "end=client_gone" in diagnosis.checks["client abort"][1]
    assert upstream.received == []  # no model was called
    diagnostic_lines = [line for line in doctor_gunicorn.log().splitlines() if "model=diagnostic" in line]
    assert any("end=client_gone" in line for line in diagnostic_lines)


AUTHORIZATION_LOGGED = with_directive(
    'up=$upstream_addr "$http_user_agent"\';', 'up=$upstream_addr "$http_user_agent" auth="$http_authorization"\';'
)


@pytest.mark.parametrize("insecure", [False, True], ids=["by-default", "with-insecure"])
def test_doctor_never_sends_the_token_to_a_server_it_could_not_verify(
    doctor_gunicorn, certificate, start_nginx, insecure
):
    """A certificate the doctor cannot verify (no --cafile): it used to shake hands again unchecked, then
    send the token to whoever answered. nginx's access log, told to show Authorization, says what came."""
    port = free_port()
    server = start_nginx(
        "nginx-doctor-untrusted", [doctor_gunicorn], [with_tls(port, *certificate), AUTHORIZATION_LOGGED]
    )
    diagnosis = doctor(f"https://127.0.0.1:{port}/", *(["--insecure"] if insecure else []))
    access_log = (server.log_path.parent / "access.log").read_text()

    assert diagnosis.verdicts()["TLS"] == "FAIL"
    assert "certificate not trusted" in diagnosis.checks["TLS"][1]
    if insecure:  # asked for: sent, with a warning first
        assert "WARNING: the certificate is not trusted" in diagnosis.output
        assert f'auth="Bearer {TOKEN}"' in access_log
        assert diagnosis.verdicts()["not buffered"] == "PASS"
    else:
        assert 'auth="-"' in access_log  # the requests came, without it
        assert TOKEN not in access_log
        assert "the token is not sent" in diagnosis.output
        assert "the token was not sent: the certificate is not trusted" in diagnosis.checks["not buffered"][1]
        assert diagnosis.returncode == 1


def test_doctor_without_the_token_is_refused(doctor_gunicorn):
    """The diagnostic stream wants the chat's token; the doctor says so for every stream check."""
    diagnosis = doctor(doctor_gunicorn.url, token="wrong")

    assert diagnosis.returncode == 1
    assert diagnosis.verdicts()["not buffered"] == "FAIL"
    assert "HTTP 401" in diagnosis.checks["not buffered"][1]
    assert "HTTP 401" in diagnosis.checks["client abort"][1]


def test_doctor_finds_buffering_and_gzip(doctor_gunicorn, start_nginx):
    diagnosis = doctor(start_nginx("nginx-doctor-buffered", [doctor_gunicorn], BUFFERED_AND_GZIPPED).url)

    assert diagnosis.verdicts()["not buffered"] == "FAIL"
    assert "proxy_buffering off" in diagnosis.checks["not buffered"][1]
    assert diagnosis.verdicts()["not compressed"] == "FAIL"
    assert "Content-Encoding: gzip" in diagnosis.checks["not compressed"][1]
    assert diagnosis.verdicts()["SSE headers"] == "PASS"
    assert "held back" in diagnosis.checks["client abort"][1]
    assert "proxy_buffering off" in diagnosis.checks["client abort"][1]
    assert diagnosis.returncode == 1


@pytest.mark.parametrize(
    "app_server, verdict",
    [("slow_heartbeat_gunicorn", "FAIL"), ("doctor_gunicorn", "PASS")],
    ids=["heartbeat-above-the-timeout", "heartbeat-below-the-timeout"],
)
def test_doctor_finds_a_read_timeout_shorter_than_the_silence(app_server, verdict, request, start_nginx):
    """proxy_read_timeout 2s and a silence of 3 s: cut when the app pings every 2.5 s; held when it
    pings every second (the check asks what a real stream needs, not the bare timeout)."""
    app = request.getfixturevalue(app_server)
    diagnosis = doctor(start_nginx("nginx-doctor-short", [app], [SHORT_READ_TIMEOUT]).url)

    assert diagnosis.verdicts()["silence of 3 s"] == verdict
    assert diagnosis.verdicts()["heartbeat"] == verdict
    if verdict == "FAIL":
        assert "proxy_read_timeout" in diagnosis.checks["silence of 3 s"][1]
        assert "after the last bytes" in diagnosis.checks["silence of 3 s"][1]
    assert diagnosis.verdicts()["not buffered"] == "PASS"


def test_doctor_finds_proxy_ignore_client_abort(doctor_gunicorn, start_nginx):
    diagnosis = doctor(start_nginx("nginx-doctor-abort-ignored", [doctor_gunicorn], [ABORT_IGNORED]).url)

    assert diagnosis.verdicts()["client abort"] == "FAIL"
    assert "proxy_ignore_client_abort off" in diagnosis.checks["client abort"][1]
    assert diagnosis.verdicts()["not buffered"] == "PASS"
    assert diagnosis.verdicts()["silence of 3 s"] == "PASS"


# --- The diagnostic stream's bounds ---------------------------------------------------------------


@pytest.fixture(scope="module")
def one_worker(gunicorns):
    """One worker (the bound on diagnostic streams is per worker), heartbeats every second, a token."""
    return gunicorns.start(with_heartbeat(1), name="gunicorn-diagnostic")


def post(server, path, token=TOKEN):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("POST", path, b"{}", {"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    response = connection.getresponse()
    return connection, response


@pytest.mark.parametrize(
    "path, token, status, code",
    [
        ("/api/chat?diagnostic=stream", "wrong", 401, "unauthorized"),
        ("/api/chat?diagnostic=stream&silence=601", TOKEN, 400, "invalid_request"),
        ("/api/chat?diagnostic=stream&silence=-1", TOKEN, 400, "invalid_request"),
        ("/api/chat?diagnostic=stream&silence=soon", TOKEN, 400, "invalid_request"),
        ("/api/chat?diagnostic=other", TOKEN, 400, "invalid_request"),
        ("/api/chat?diagnostic=report&id=0123456789ab", TOKEN, 404, "not_found"),
        ("/api/chat?diagnostic=report&id=../../../etc/passwd", TOKEN, 404, "not_found"),
    ],
)
def test_diagnostic_refusals_are_json_errors(one_worker, upstream, path, token, status, code):
    connection, response = post(one_worker, path, token)
    body = response.read()
    connection.close()

    assert response.status == status
    assert response.headers["Content-Type"] == "application/json"
    assert f'"code":"{code}"' in body.decode().replace(" ", "")
    assert upstream.received == []


def stream_id(response):
    """The id a diagnostic stream gives in its first event (after the `: ok` line)."""
    response.readline()
    return json.loads(json.loads(response.readline()[len(b"data: ") :])["content"])["id"]


def has_ended(server, stream_id):
    """Whether the app has recorded how the diagnostic stream `stream_id` ended (its slot is free by then)."""
    connection, response = post(server, f"/api/chat?diagnostic=report&id={stream_id}")
    response.read()
    connection.close()
    return response.status == 200


def test_diagnostic_streams_are_bounded_per_worker(one_worker):
    """Four open at once per worker; the fifth is told to come back, and gets in once one has ended."""
    streams = [post(one_worker, "/api/chat?diagnostic=stream&silence=30") for _ in range(4)]
    assert [response.status for _, response in streams] == [200] * 4
    opened = [stream_id(response) for _, response in streams]

    connection, response = post(one_worker, "/api/chat?diagnostic=stream&silence=30")
    assert response.status == 503
    assert response.headers["Retry-After"] == "10"
    assert b'"too_many_streams"' in response.read()
    connection.close()

    for connection, response in streams:
        response.close()
        connection.close()

    def fifth_gets_in():  # the app notices each hang-up at its next heartbeat (1 s)
        connection, response = post(one_worker, "/api/chat?diagnostic=stream&silence=0")
        if response.status == 200:
            opened.append(stream_id(response))
        connection.close()
        return response.status == 200

    assert wait_for(fifth_gets_in, timeout=5)
    # Leave the worker as it was: every stream opened here has ended, and given its slot back.
    assert wait_for(lambda: all(has_ended(one_worker, opened_id) for opened_id in opened), timeout=10)


def test_diagnostic_stream_follows_its_script_and_ends(one_worker, upstream):
    """Content events whose text is a line of JSON: what follows, 20 ticks, the silence with the relay's
    pings in it, one last event, the native end. No model is called."""
    connection, response = post(one_worker, "/api/chat?diagnostic=stream&silence=1.5")
    body = response.read().decode()
    connection.close()

    assert response.status == 200
    assert body.startswith(": ok\n")
    lines = [line for line in body.split("\n") if line]
    script = [json.loads(json.loads(line[6:])["content"]) for line in lines[1:-2] if line.startswith("data: ")]
    assert script[0]["heartbeat"] == 1 and script[0]["silence"] == 1.5 and script[0]["id"]
    assert script[1:] == [{"tick": i} for i in range(1, 21)] + [{"after_silence": 1.5}]
    silence = lines[lines.index('data: {"content": "{\\"tick\\": 20}\\n"}') + 1 : -3]
    assert silence == [": ping"]  # the relay's heartbeat (1 s) in the 1.5 s silence
    assert lines[-2:] == ['data: {"content": "", "finish_reason": "stop", "usage": null}', "data: [DONE]"]
    assert upstream.received == []


# --- Metrics --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_gunicorn(gunicorns):
    """Two workers with CHAT_METRICS on, and no retries (one refusal per request)."""
    return gunicorns.start({"CHAT_METRICS": "1", "CHAT_UPSTREAM_RETRIES": "0"}, name="gunicorn-metrics", workers=2)


def scrape(server, source="127.0.0.1"):
    """GET /metrics on a new connection (so either worker may answer): {(name, labels): value}."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10, source_address=(source, 0))
    connection.request("GET", "/metrics")
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    assert response.status == 200, text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def sample(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def streams_per_worker(server):
    """How many chat streams each worker logged, by pid (gunicorn's log lines carry it)."""
    counts = {}
    for pid in re.findall(r"\[(\d+)\] \[INFO\] stream \S+ model=(?!diagnostic)", server.log()):
        counts[pid] = counts.get(pid, 0) + 1
    return counts


def send_at_once(url, count, body=HI):
    replies, threads = [], [threading.Thread(target=lambda: replies.append(post_chat(url, body))) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return replies


def test_metrics_add_up_across_two_workers(metrics_gunicorn, upstream):
    """Streams, errors and refusals served by both workers; every scrape, whichever worker answers,
    shows the totals of both (counted from what this test sends, over what the server had already)."""
    before, logged = scrape(metrics_gunicorn), streams_per_worker(metrics_gunicorn)
    upstream.reset(tokens=[f"t{i} " for i in range(5)], delay=0.02)
    sent = 0
    while sent < 96 and not all(
        streams_per_worker(metrics_gunicorn).get(pid, 0) > logged.get(pid, 0) for pid in workers(metrics_gunicorn)
    ):
        assert [reply.data[-1] for reply in send_at_once(metrics_gunicorn.url, 12)] == ["[DONE]"] * 12
        sent += 12
        wait_for(lambda sent=sent: sum(streams_per_worker(metrics_gunicorn).values()) >= sum(logged.values()) + sent)
    served = {pid: count - logged.get(pid, 0) for pid, count in streams_per_worker(metrics_gunicorn).items()}
    assert len([count for count in served.values() if count > 0]) == 2, f"every stream went to one worker: {served}"

    upstream.reset(tokens=["a"], reasoning=["hmm "])
    assert [reply.data[-1] for reply in send_at_once(metrics_gunicorn.url, 4)] == ["[DONE]"] * 4
    upstream.reset(tokens=[f"t{i} " for i in range(5)], cut_after=2)
    assert post_chat(metrics_gunicorn.url, HI).data[-1]["code"] == "upstream_cut"
    upstream.reset(status=429)
    assert [reply.status for reply in send_at_once(metrics_gunicorn.url, 2)] == [429, 429]
    assert [reply.status for reply in send_at_once(metrics_gunicorn.url, 3, {"messages": []})] == [400] * 3

    done = sent + 4
    added = {
        ("chat_streams_ended_total", (("api", "chat"), ("code", "stop"), ("outcome", "done"))): done,
        ("chat_streams_ended_total", (("api", "chat"), ("code", "upstream_cut"), ("outcome", "error"))): 1,
        ("chat_time_to_first_content_seconds_count", ()): done + 1,
        ("chat_time_to_first_reasoning_seconds_count", ()): 4,
        ("chat_stream_duration_seconds_count", ()): done + 1,
        ("chat_tokens_total", (("direction", "in"),)): 9 * done,  # the fake upstream's usage: 9 in, 5 out
        ("chat_tokens_total", (("direction", "out"),)): 5 * done + 2,  # the cut stream: its 2 deltas
        ("chat_upstream_refusals_total", (("code", "rate_limited"), ("status", "429"))): 2,
        ("chat_request_errors_total", (("code", "rate_limited"), ("status", "429"))): 2,
        ("chat_request_errors_total", (("code", "invalid_request"), ("status", "400"))): 3,
        ("chat_streams_open", ()): 0,
    }
    expected = {key: before.get(key, 0.0) + value for key, value in added.items()}

    def scraped():
        samples = scrape(metrics_gunicorn)
        return {key: samples.get(key, 0.0) for key in expected}

    assert wait_for(lambda: scraped() == expected), f"{scraped()} != {expected}"
    print(f"streams per worker: {served}")
    assert [scraped() for _ in range(6)] == [expected] * 6


def workers(server):
    """The pids of a gunicorn's workers: its master's children."""
    master = server.process.pid
    return Path(f"/proc/{master}/task/{master}/children").read_text().split()


def socket_count(pid):
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("socket:"))


def test_open_streams_add_up_and_a_killed_worker_drops_out(metrics_gunicorn, upstream):
    """chat_streams_open counts both workers' open streams; SIGKILL one worker and gunicorn.conf.py's
    child_exit drops its share (else its streams would count as open for ever)."""
    upstream.reset(tokens=["late"], hold=6.0)
    ended = []

    def hold_stream():
        connection, response = open_chat(metrics_gunicorn.url, HI)
        try:
            response.read()
        except (OSError, http.client.HTTPException):
            pass
        ended.append(time.monotonic())
        connection.close()

    threads = [threading.Thread(target=hold_stream) for _ in range(8)]
    for thread in threads:
        thread.start()
    assert wait_for(lambda: len(upstream.received) == 8)
    assert wait_for(lambda: sample(scrape(metrics_gunicorn), "chat_streams_open") == 8)

    busiest = max(workers(metrics_gunicorn), key=socket_count)
    os.kill(int(busiest), signal.SIGKILL)
    assert wait_for(lambda: len(ended) > 0, timeout=3)
    time.sleep(0.5)  # every stream of the killed worker has been cut by now
    cut = len(ended)

    assert cut > 0
    assert wait_for(lambda: sample(scrape(metrics_gunicorn), "chat_streams_open") == 8 - cut, timeout=3)
    for thread in threads:
        thread.join(15)
    assert wait_for(lambda: sample(scrape(metrics_gunicorn), "chat_streams_open") == 0)


def test_metrics_are_off_by_default(gunicorn):
    connection = http.client.HTTPConnection("127.0.0.1", gunicorn.port, timeout=10)
    connection.request("GET", "/metrics")
    response = connection.getresponse()

    assert response.status == 404
    assert b"CHAT_METRICS" in response.read()


IMPORTS_WHEN_STREAMING = """
import sys
import app

flask_app = app.create_app({"CHAT_DEMO_WORD_SECONDS": 0.0})
client = flask_app.test_client()
assert b"data: [DONE]" in client.post("/api/chat", json={"messages": [{"role": "user", "content": "Hi"}]}).data
assert client.post("/api/chat", json={"messages": []}).status_code == 400
metrics = client.get("/metrics")
print(metrics.status_code, any(name.startswith("prometheus_client") for name in sys.modules))
print(metrics.get_data(as_text=True))
"""


@pytest.mark.parametrize("setting, status, imported", [(None, 404, False), ("0", 404, False), ("1", 200, True)])
def test_with_metrics_off_prometheus_client_is_never_imported(setting, status, imported):
    """A stream and an error with CHAT_METRICS unset or 0 load nothing of prometheus_client; set to 1,
    the same process counts them (one process, no multiprocess directory: its own figures)."""
    environment = server_environment({"CHAT_METRICS": setting} if setting else {})
    command = [sys.executable, "-c", IMPORTS_WHEN_STREAMING]
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    first, _, rest = result.stdout.partition("\n")
    assert first == f"{status} {imported}"
    if imported:
        assert 'chat_streams_ended_total{api="demo",code="stop",outcome="done"} 1.0' in rest  # the demo model
        assert 'chat_request_errors_total{code="invalid_request",status="400"} 1.0' in rest


def test_nginx_lets_only_this_machine_read_metrics(metrics_gunicorn, start_nginx):
    """From 127.0.0.1 through nginx: the figures; from 127.0.0.2 (another address, as anyone outside
    is): 403, while the rest of the app still answers it."""
    server = start_nginx("nginx-metrics", [metrics_gunicorn])
    assert "chat_streams_open" in {name for name, _ in scrape(server)}
    statuses = {}
    for path in ("/metrics", "/healthz"):
        outside = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10, source_address=("127.0.0.2", 0))
        outside.request("GET", path)
        statuses[path] = outside.getresponse().status
        outside.close()

    assert statuses == {"/metrics": 403, "/healthz": 200}
