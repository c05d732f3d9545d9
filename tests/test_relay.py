"""The relay's edges: clients that stop reading, upstreams that misbehave, the fast path and its fallback.

Against a live gunicorn (gevent worker), and the development server where it differs.
"""

import sys
import threading
import time

import pytest

from chat_client import FLOOD, hang_up, open_chat, post_chat, stalled_client
from live_servers import (
    FAST_LIFECYCLE,
    Gunicorns,
    Servers,
    free_port,
    healthz,
    server_environment,
    stream_log_lines,
    wait_for,
)

HI = {"messages": [{"role": "user", "content": "Hi"}]}
SEND_TIMEOUT = 1.0  # CHAT_SEND_TIMEOUT of the servers below
HEARTBEAT = float(FAST_LIFECYCLE["CHAT_HEARTBEAT_SECONDS"])


def worker_rss_kb(server):
    """The resident memory of gunicorn's one worker (the master's child), from /proc."""
    [child] = open(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read().split()
    status = open(f"/proc/{child}/status").read()
    return int(status.split("VmRSS:")[1].split()[0])


@pytest.fixture(scope="module")
def relay_gunicorn(fake_upstream_server, tmp_path_factory):
    """gunicorn with a one-second send timeout and fast heartbeats, for this module."""
    env = {**FAST_LIFECYCLE, "CHAT_MAX_DURATION": "30", "CHAT_SEND_TIMEOUT": str(SEND_TIMEOUT)}
    with Gunicorns(tmp_path_factory, fake_upstream_server.url) as gunicorns:
        yield gunicorns.start(env, name="relay")


# --- A client that stops reading is let go ---------------------------------------------------------


def test_a_client_that_stops_reading_is_let_go_and_its_upstream_closed(relay_gunicorn, upstream):
    upstream.reset(tokens=FLOOD)
    before = len(stream_log_lines(relay_gunicorn))
    client = stalled_client(relay_gunicorn.port)
    started = time.monotonic()
    try:
        [received] = wait_for(lambda: upstream.received, 5) and upstream.received
        assert received.hung_up.wait(SEND_TIMEOUT + HEARTBEAT + 3), "the upstream of a stalled client stayed open"
        let_go = received.hung_up_at - started
        assert let_go < SEND_TIMEOUT + HEARTBEAT + 2
        assert wait_for(lambda: len(stream_log_lines(relay_gunicorn)) > before)
        line = stream_log_lines(relay_gunicorn)[-1]
        relayed = int(line.split(" events=")[1].split()[0])
        print(f"\nstalled client let go after {let_go:.2f} s; {relayed} of {len(FLOOD)} tokens relayed")
        assert "end=client_stalled" in line
        assert relayed < len(FLOOD) / 10  # the relay stopped reading what nobody takes
        assert wait_for(lambda: healthz(relay_gunicorn)["open_streams"] == 0)
    finally:
        client.close()


def test_stalled_clients_do_not_grow_the_worker(relay_gunicorn, upstream):
    """Each stalled stream buffers a bounded amount: today's limit is one upstream read and a partial line."""
    upstream.reset(tokens=FLOOD)
    post_chat(relay_gunicorn.url, HI, until=b'"content"')  # warm the worker up before measuring
    baseline = worker_rss_kb(relay_gunicorn)
    clients = [stalled_client(relay_gunicorn.port) for _ in range(20)]
    try:
        assert wait_for(lambda: len(upstream.received) == 21, 5)
        time.sleep(SEND_TIMEOUT / 2)  # every buffer on the way is full by now; nobody has been let go yet
        grown = worker_rss_kb(relay_gunicorn) - baseline
        print(f"\n20 stalled streams: worker RSS grew {grown} KB ({grown / 20:.0f} KB per stream)")
        assert grown < 20 * 256
        assert wait_for(lambda: all(r.hung_up.is_set() for r in upstream.received[1:]), SEND_TIMEOUT + 5)
    finally:
        for client in clients:
            client.close()


def test_deadlines_hold_while_a_write_is_blocked(start_gunicorn, upstream):
    """With a send timeout far away, the stream's total duration still ends a stalled stream on time."""
    server = start_gunicorn({**FAST_LIFECYCLE, "CHAT_MAX_DURATION": "1", "CHAT_SEND_TIMEOUT": "60"}, name="blocked")
    upstream.reset(tokens=FLOOD)
    client = stalled_client(server.port)
    started = time.monotonic()
    assert wait_for(lambda: upstream.received, 5)
    assert upstream.received[0].hung_up.wait(4)
    assert upstream.received[0].hung_up_at - started < 3
    assert wait_for(lambda: any("end=client_stalled" in line for line in stream_log_lines(server)))
    client.close()


# --- Upstreams that misbehave ----------------------------------------------------------------------


def test_done_finishes_the_reply_even_if_the_upstream_holds_its_body_open(relay_gunicorn, upstream):
    upstream.reset(tokens=["a", "b"], hold_open=10)
    reply = post_chat(relay_gunicorn.url, HI)

    assert reply.data[-1] == "[DONE]"
    assert reply.text == "ab"
    assert reply.arrivals[-1][0] - reply.started < 2  # not the 10 s the body stayed open
    assert upstream.received[0].hung_up.wait(2), "a connection whose body has not ended is closed, not pooled"


def test_a_huge_upstream_line_ends_the_stream_and_blocks_no_one(relay_gunicorn, upstream):
    upstream.reset(tokens=["a", "b"], huge_line=20_000_000)
    other = {}

    def meanwhile():
        time.sleep(0.2)
        other["reply"] = post_chat(relay_gunicorn.url, HI)  # the same worker, the same (echoing) script

    thread = threading.Thread(target=meanwhile)
    thread.start()
    reply = post_chat(relay_gunicorn.url, HI)
    thread.join(10)

    assert reply.data[-1] == {"content": "", "error": reply.data[-1]["error"], "code": "upstream_malformed"}
    assert upstream.received[0].hung_up.wait(2)
    second = other["reply"]
    assert second.status == 200
    assert second.first_time(b": ok") < 0.5  # the worker's event loop stayed free


def test_a_body_with_a_content_length_takes_the_plain_path(relay_gunicorn, upstream):
    upstream.reset(tokens=["Hel", "lo", " 응답"], content_length=True)
    reply = post_chat(relay_gunicorn.url, HI)

    assert reply.text == "Hello 응답"
    assert reply.data[-1] == "[DONE]"
    assert wait_for(lambda: "reader=httpx" in stream_log_lines(relay_gunicorn)[-1])


def test_chunked_bodies_take_the_fast_path(relay_gunicorn, upstream):
    """The fast path reaches below httpx; when a new httpx2 or httpcore2 hides the socket, this fails."""
    upstream.reset(tokens=["a", "b"])
    reply = post_chat(relay_gunicorn.url, HI)

    assert reply.text == "ab"
    [line] = [line for line in stream_log_lines(relay_gunicorn) if reply.headers["X-Request-Id"] in line]
    assert "reader=socket" in line


# --- Reasoning models --------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_streams_and_counts_as_output_for_the_first_token_timeout(relay_gunicorn, upstream, field):
    """Thinking for longer than CHAT_FIRST_TOKEN_TIMEOUT (1.5 s here) is not a timeout: it is output."""
    thoughts = [f"step {i}. " for i in range(12)]
    upstream.reset(reasoning=thoughts, reasoning_field=field, tokens=["The answer."], delay=0.2)
    reply = post_chat(relay_gunicorn.url, HI)

    reasoning = [d for d in reply.data if isinstance(d, dict) and "reasoning" in d]
    assert reasoning == [{"content": "", "reasoning": thought} for thought in thoughts]
    assert reply.text == "The answer."
    assert reply.data[-1] == "[DONE]"
    [line] = [line for line in stream_log_lines(relay_gunicorn) if reply.headers["X-Request-Id"] in line]
    assert "end=done" in line and "ttfr=0." in line and "ttft=2." in line


# --- The development server ------------------------------------------------------------------------


@pytest.fixture
def dev_server(fake_upstream_server, tmp_path_factory):
    """`flask --app app run`: threads, no gevent."""
    settings = {**FAST_LIFECYCLE, "CHAT_HEARTBEAT_SECONDS": "0.5", "CHAT_SEND_TIMEOUT": str(SEND_TIMEOUT)}
    env = server_environment({**settings, "CHAT_MAX_DURATION": "30"}, fake_upstream_server.url)
    port = free_port()
    command = [sys.executable, "-m", "flask", "--app", "app", "run", "--port", str(port)]
    with Servers(tmp_path_factory) as servers:
        yield servers.run("flask", command, port, env=env)


def test_dev_server_closes_the_upstream_within_a_heartbeat_of_a_hang_up(dev_server, upstream):
    upstream.reset(tokens=["never sent"], hold=30)
    connection, response = open_chat(dev_server.url, HI)
    assert response.read1(65536).startswith(b": ok")
    hang_up(connection, response)
    left = time.monotonic()

    assert wait_for(lambda: upstream.received, 5)
    assert upstream.received[0].hung_up.wait(3)
    assert upstream.received[0].hung_up_at - left < 0.5 + 0.5  # one heartbeat, and a margin


def test_dev_server_lets_a_stalled_client_go(dev_server, upstream):
    upstream.reset(tokens=FLOOD)
    client = stalled_client(dev_server.port)
    try:
        assert wait_for(lambda: upstream.received, 5)
        assert upstream.received[0].hung_up.wait(SEND_TIMEOUT + 4)
        assert wait_for(lambda: any("end=client_stalled" in line for line in stream_log_lines(dev_server)))
    finally:
        client.close()
