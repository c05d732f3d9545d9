"""How streams end: heartbeats, client disconnects, upstream failures, timeouts, shutdown, the log line.

Against a live gunicorn (gevent worker) with heartbeats every 0.25 s and timeouts of 1.5 to 3 s.
"""

import json
import os
import re
import resource
import signal
import socket
import time

import pytest

from chat_client import hang_up, open_chat, post_chat
from fake_upstream import API_KEY
from live_servers import FAST_LIFECYCLE, free_port, healthz, stream_log_lines, wait_for

HI = {"messages": [{"role": "user", "content": "Hi"}]}
FIRST_CONTENT = b'data: {"content"'


# --- Heartbeats -------------------------------------------------------------------------------


def test_stream_opens_with_a_comment_before_the_first_token(fast_gunicorn, upstream):
    upstream.reset(tokens=["late"], hold=1.0)
    reply = post_chat(fast_gunicorn.url, HI)

    assert reply.raw.startswith(b": ok\n")
    assert reply.first_time(b": ok\n") < 0.5  # the headers and the comment did not wait for the token
    assert reply.first_time() > 0.9


def test_heartbeats_fill_the_silence_before_the_first_token(fast_gunicorn, upstream):
    upstream.reset(tokens=["a", "b"], hold=1.2)
    reply = post_chat(fast_gunicorn.url, HI)

    before_first_token = reply.raw.split(FIRST_CONTENT)[0]
    assert before_first_token.count(b": ping\n") >= 3
    assert reply.text == "ab"
    assert reply.data[-1] == "[DONE]"


def test_heartbeats_fill_a_silence_between_tokens(fast_gunicorn, upstream):
    upstream.reset(tokens=["a", "b", "c"], stall_at=1, stall=1.0)
    reply = post_chat(fast_gunicorn.url, HI)

    between = reply.raw.split(b'data: {"content": "a"}')[1].split(b'data: {"content": "b"}')[0]
    assert between.count(b": ping\n") >= 2
    assert reply.text == "abc"


# --- A client that leaves costs nothing ---------------------------------------------------------


def hang_up_and_time_the_upstream(connection, response, upstream, while_what):
    """Hang up; return the one upstream request and the seconds until its connection was closed too."""
    hang_up(connection, response)
    left = time.monotonic()
    [received] = upstream.received
    assert received.hung_up.wait(3), "the upstream never saw its connection closed"
    delay = received.hung_up_at - left
    print(f"\nhang-up to upstream close, {while_what}: {delay * 1000:.0f} ms")
    return received, delay


def test_client_gone_while_tokens_flow_closes_the_upstream(fast_gunicorn, upstream):
    upstream.reset(tokens=[f"t{i} " for i in range(200)], delay=0.02)
    connection, response = open_chat(fast_gunicorn.url, HI)
    while FIRST_CONTENT not in response.read1(65536):
        pass
    received, _ = hang_up_and_time_the_upstream(connection, response, upstream, "tokens flowing every 20 ms")
    assert len(received.sent) < 100  # far from the 200 tokens nobody would read
    assert wait_for(lambda: any("end=client_gone" in line for line in stream_log_lines(fast_gunicorn)))


@pytest.fixture
def one_second_heartbeat_gunicorn(start_gunicorn):
    return start_gunicorn({"CHAT_HEARTBEAT_SECONDS": "1", "CHAT_RESUME_SECONDS": "0"}, name="heartbeat1")


def test_client_gone_during_a_silence_closes_the_upstream_within_a_heartbeat(one_second_heartbeat_gunicorn, upstream):
    """A write after the client left still succeeds, so pings alone would take two intervals (2 s here)."""
    upstream.reset(tokens=["never sent"], hold=30)
    connection, response = open_chat(one_second_heartbeat_gunicorn.url, HI)
    assert response.read1(65536).startswith(b": ok")
    received, delay = hang_up_and_time_the_upstream(connection, response, upstream, "during a silence (heartbeat 1 s)")
    assert delay < 1.5
    assert received.sent == []


def test_300_early_hang_ups_leave_no_connections_or_greenlets(fast_gunicorn, upstream):
    upstream.reset(tokens=[f"t{i} " for i in range(100)], delay=0.02)
    assert wait_for(lambda: healthz(fast_gunicorn)["open_streams"] == 0)
    baseline_connections = upstream.open_connections()

    for _ in range(6):  # 6 waves of 50 concurrent streams, each leaving after its first token
        open_streams = [open_chat(fast_gunicorn.url, HI) for _ in range(50)]
        for connection, response in open_streams:
            while FIRST_CONTENT not in response.read1(65536):
                pass
            hang_up(connection, response)

    assert len(upstream.received) == 300
    assert wait_for(lambda: all(r.hung_up.is_set() for r in upstream.received), timeout=10)
    assert wait_for(lambda: healthz(fast_gunicorn)["open_streams"] == 0)
    assert wait_for(lambda: upstream.open_connections() <= baseline_connections)


# --- Refusals before the first byte become HTTP statuses -----------------------------------------

REFUSALS = [
    # upstream status, upstream headers, our status, our code, upstream requests (1 + retries)
    (429, {"Retry-After": "7"}, 429, "rate_limited", 1),  # a long wait is not retried: the client decides
    (400, {}, 400, "upstream_rejected", 1),
    (401, {}, 502, "upstream_auth", 1),
    (403, {}, 502, "upstream_auth", 1),
    (404, {}, 502, "model_not_found", 1),
    (500, {}, 502, "upstream_error", 2),  # retried once (CHAT_UPSTREAM_RETRIES=1), then given up
    (503, {}, 502, "upstream_error", 2),
]


@pytest.mark.parametrize("upstream_status, upstream_headers, status, code, attempts", REFUSALS)
def test_upstream_refusal_becomes_an_http_status(
    fast_gunicorn, upstream, upstream_status, upstream_headers, status, code, attempts
):
    upstream.reset(status=upstream_status, headers=upstream_headers, error_message=f"no ({API_KEY[:12]})")
    started = time.monotonic()
    reply = post_chat(fast_gunicorn.url, HI)

    assert reply.status == status
    assert reply.headers["Content-Type"] == "application/json"
    error = json.loads(reply.raw)["error"]
    assert error["code"] == code
    assert len(upstream.received) == attempts
    if status == 429:
        assert reply.headers["Retry-After"] == "7"
        assert time.monotonic() - started < 2  # not held for the Retry-After in silence
    if status == 400:
        assert error["message"].startswith("no (")  # the user learns why (e.g. context too long)
    else:
        assert API_KEY[:12] not in error["message"]


def test_upstream_that_cannot_be_reached_is_502(start_gunicorn):
    nobody = f"http://127.0.0.1:{free_port()}/v1"
    server = start_gunicorn({"OPENAI_BASE_URL": nobody, "CHAT_UPSTREAM_RETRIES": "0"}, name="unreachable")
    reply = post_chat(server.url, HI)

    assert reply.status == 502
    assert json.loads(reply.raw)["error"]["code"] == "upstream_unreachable"


def test_upstream_that_sends_no_headers_is_504(start_gunicorn, upstream):
    """With short timeouts and no retry (the refusals above test it): one wait for the headers."""
    settings = {"CHAT_FIRST_TOKEN_TIMEOUT": "0.5", "CHAT_IDLE_TIMEOUT": "0.5", "CHAT_UPSTREAM_RETRIES": "0"}
    server = start_gunicorn(settings, name="no-retry")
    upstream.reset(stall_headers=10)
    reply = post_chat(server.url, HI)

    assert reply.status == 504
    assert json.loads(reply.raw)["error"]["code"] == "upstream_timeout"
    assert upstream.received[0].hung_up.wait(2)
    assert len(upstream.received) == 1  # a request that timed out is never sent again: it may have been paid


# --- Failures after the first byte: one error event, no [DONE] ----------------------------------

FAILURES = [
    ({"cut_after": 3}, "upstream_cut"),  # a transport cut mid-body is a failure, never a success
    ({"error_after": 2}, "upstream_error"),  # an error chunk inside the stream
    ({"hold": 5}, "first_token_timeout"),
    ({"stall_at": 2, "stall": 5}, "idle_timeout"),
    ({"tokens": [f"t{i} " for i in range(100)], "delay": 0.1}, "max_duration"),
]


@pytest.mark.parametrize("script, code", FAILURES, ids=[code for _, code in FAILURES])
def test_failure_after_the_first_byte_is_one_error_event(fast_gunicorn, upstream, script, code):
    upstream.reset(**script)
    reply = post_chat(fast_gunicorn.url, HI)

    assert reply.status == 200
    errors = [d for d in reply.data if isinstance(d, dict) and "error" in d]
    assert errors == [{"content": "", "error": errors[0]["error"], "code": code}]
    assert reply.data[-1] == errors[0]  # the error ends the stream
    assert "[DONE]" not in reply.data
    assert "upstream" not in errors[0]["error"] and "Traceback" not in errors[0]["error"]
    assert upstream.received[0].finished.wait(2)  # the upstream's handler ended: sent all, or was hung up on
    if code.endswith(("timeout", "duration")):
        assert upstream.received[0].hung_up.wait(2), "a timed-out upstream must be closed"


def test_timeouts_fire_on_time(fast_gunicorn, upstream):
    upstream.reset(hold=5)
    reply = post_chat(fast_gunicorn.url, HI)
    elapsed = reply.arrivals[-1][0] - reply.started
    assert 1.4 < elapsed < 3.0  # CHAT_FIRST_TOKEN_TIMEOUT=1.5


# --- One log line per stream; the key never leaks --------------------------------------------------


def test_one_log_line_per_stream_says_how_it_ended(fast_gunicorn, upstream):
    before = len(stream_log_lines(fast_gunicorn))
    upstream.reset(tokens=["a", "b", "c"])
    reply = post_chat(fast_gunicorn.url, HI)
    stream_id = reply.headers["X-Request-Id"]

    assert wait_for(lambda: len(stream_log_lines(fast_gunicorn)) == before + 1)
    [line] = [line for line in stream_log_lines(fast_gunicorn) if stream_id in line]
    assert re.search(
        r"model=\S+ end=done ttfr=- ttft=[\d.]+s duration=[\d.]+s events=3 tokens=5 reasoning=0 reader=socket", line
    ), line


def test_nginx_request_id_is_the_stream_id(fast_gunicorn, upstream):
    upstream.reset(tokens=["a"])
    given = post_chat(fast_gunicorn.url, HI, headers={"X-Request-Id": "0123456789abcdef0123456789abcdef"})
    made_up = post_chat(fast_gunicorn.url, HI, headers={"X-Request-Id": "bad id\u00e9"})

    assert given.headers["X-Request-Id"] == "0123456789abcdef0123456789abcdef"
    assert re.fullmatch(r"[0-9a-f]{12}", made_up.headers["X-Request-Id"])
    assert wait_for(
        lambda: any("stream 0123456789abcdef0123456789abcdef " in line for line in stream_log_lines(fast_gunicorn))
    )


def test_the_api_key_never_reaches_a_log_or_a_client(fast_gunicorn, upstream):
    upstream.reset(status=401, error_message=f"Incorrect API key provided: {API_KEY}")
    reply = post_chat(fast_gunicorn.url, HI)
    upstream.reset(cut_after=1)
    cut = post_chat(fast_gunicorn.url, HI)

    assert API_KEY not in reply.raw.decode() and API_KEY[-10:] not in reply.raw.decode()
    assert API_KEY[-10:] not in cut.raw.decode()
    assert upstream.received[0].headers["Authorization"] == f"Bearer {API_KEY}"  # it was used, though
    cut_id = cut.headers["X-Request-Id"]
    assert wait_for(lambda: any(f"stream {cut_id} " in line for line in stream_log_lines(fast_gunicorn)))
    assert API_KEY[-10:] not in fast_gunicorn.log()


# --- Graceful shutdown -------------------------------------------------------------------------------


def start_doomed_gunicorn(start_gunicorn, graceful_timeout):
    """A gunicorn of the test's own to stop, whose streams would run for 30 s."""
    env = {**FAST_LIFECYCLE, "CHAT_FIRST_TOKEN_TIMEOUT": "30", "CHAT_IDLE_TIMEOUT": "30", "CHAT_MAX_DURATION": "30"}
    return start_gunicorn({**env, "GUNICORN_GRACEFUL_TIMEOUT": str(graceful_timeout)}, name="doomed")


def refuses_connections(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_lets_running_streams_finish_and_refuses_new_ones(start_gunicorn, upstream):
    doomed = start_doomed_gunicorn(start_gunicorn, graceful_timeout=10)  # ample for the 2 s stream
    tokens = [f"t{i} " for i in range(40)]
    upstream.reset(tokens=tokens, delay=0.05)
    connection, response = open_chat(doomed.url, HI)
    raw = response.read1(65536)
    while FIRST_CONTENT not in raw:
        raw += response.read1(65536)

    doomed.process.send_signal(signal.SIGTERM)
    assert wait_for(lambda: refuses_connections(doomed.port), timeout=3)
    while chunk := response.read1(65536):
        raw += chunk
    hang_up(connection, response)

    assert raw.endswith(b"data: [DONE]\n\n")
    assert raw.count(FIRST_CONTENT) == 40 + 1  # every token, then the end event
    assert doomed.process.wait(10) == 0
    assert any("end=done" in line for line in stream_log_lines(doomed))


def test_stream_outliving_graceful_timeout_ends_with_a_shutdown_error(start_gunicorn, upstream):
    """A worker told to stop (a reload sends SIGTERM to old workers) ends what is left after graceful_timeout,
    with an error event, so that a client can tell a restart from a complete reply."""
    doomed = start_doomed_gunicorn(start_gunicorn, graceful_timeout=1)
    upstream.reset(tokens=["a"], hold=60)
    worker_pid = int(re.search(r"Booting worker with pid: (\d+)", doomed.log()).group(1))
    connection, response = open_chat(doomed.url, HI)
    assert response.read1(65536).startswith(b": ok")

    os.kill(worker_pid, signal.SIGTERM)
    raw = b""
    while chunk := response.read1(65536):
        raw += chunk
    hang_up(connection, response)

    assert raw.endswith(b'"code": "server_shutdown"}\n\n')
    assert b"[DONE]" not in raw
    assert wait_for(lambda: any("end=shutdown" in line for line in stream_log_lines(doomed)))
    assert upstream.received[0].hung_up.wait(2)


@pytest.fixture
def room_for_descriptors():
    """Let this process open 2048 files for the test, whatever `ulimit -n` says (often 1024). Past
    the hard limit (`ulimit -n 1024` in bash sets it too) only CAP_SYS_RESOURCE may go: else skip."""
    limits = soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 2048:
        raised_hard = hard if hard == resource.RLIM_INFINITY else max(hard, 2048)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (2048, raised_hard))
        except (ValueError, OSError):
            pytest.skip(f"needs 2048 open files; the hard limit is {hard}, and raising it needs CAP_SYS_RESOURCE")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def test_a_closed_client_is_seen_past_descriptor_1024(room_for_descriptors):
    """select() refuses descriptors past 1024, which a worker with ~500 streams already uses."""
    from app import BrowserSocket

    filler = [socket.socket() for _ in range(1030)]
    ours, theirs = socket.socketpair()
    try:
        assert ours.fileno() > 1024
        client = BrowserSocket(ours, {"CHAT_SEND_TIMEOUT": 1.0})
        assert client.has_room()
        assert not client.has_left()
        theirs.close()
        assert client.has_left()
    finally:
        for sock in (*filler, ours):
            sock.close()
