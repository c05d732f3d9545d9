"""Resuming across VMs: two gunicorn instances (two "VMs") sharing one real redis-server.

A stream started on one is read on the other; a producer that dies leaves its readers a
`stream_lost`; Redis going away never breaks a chat, it only makes streams unresumable.
"""

import json
import os
import re
import signal
import time

import pytest
from test_resume import HI, cookie_of, events_of, last_event_id, tokens

from chat_client import hang_up, open_chat, post_chat
from live_servers import stream_log_lines, wait_for

SETTINGS = {"CHAT_HEARTBEAT_SECONDS": "0.25", "CHAT_RESUME_SECONDS": "5", "CHAT_MAX_DURATION": "30"}


@pytest.fixture
def two_vms(start_gunicorn, start_redis):
    """Two gunicorns that share nothing but a redis-server: one worker each, logs in Redis."""
    redis = start_redis()
    env = {**SETTINGS, "CHAT_RESUME_REDIS_URL": redis.redis_url, "CHAT_METRICS": "1"}
    return start_gunicorn(env, name="vm-a"), start_gunicorn(env, name="vm-b"), redis


def start_and_cut(server, events=5):
    connection, response = open_chat(server.url, HI)
    raw = b""
    while raw.count(b"\ndata: ") < events:
        raw += response.read1(65536)
    hang_up(connection, response)
    headers = dict(response.getheaders())
    complete = events_of(raw[: raw.rindex(b"\n\n") + 2])
    return headers["X-Stream-Id"], cookie_of(headers), complete


def test_a_stream_started_on_one_vm_resumes_live_on_the_other(two_vms, upstream):
    vm_a, vm_b, _ = two_vms
    upstream.reset(tokens=tokens(150), delay=0.03)
    stream_id, cookie, before = start_and_cut(vm_a)
    asked = time.monotonic()
    connection, response = open_chat(
        vm_b.url,
        None,
        headers={"Cookie": cookie, "Last-Event-ID": last_event_id(before)},
        path=f"/api/chat/{stream_id}",
        method="GET",
    )
    body = response.read1(65536)
    first_event = time.monotonic() - asked
    live = not upstream.received[0].finished.is_set()
    arrived = {}  # token number: when it reached this reader
    while chunk := response.read1(65536):
        body += chunk
        arrived.update((int(n), time.monotonic()) for n in re.findall(rb'"content": "t(\d+) "', chunk))
    hang_up(connection, response)
    delays = sorted(arrived[n] - upstream.received[0].sent[n] for n in arrived if n >= 40)  # read live
    whole = post_chat(vm_b.url, None, headers={"Cookie": cookie}, path=f"/api/chat/{stream_id}", method="GET")
    median, most = delays[len(delays) // 2], delays[-1]
    print(f"\nresumed on the other VM (Redis): first event after {first_event * 1000:.1f} ms, live events")
    print(f"after the model sent them: {median * 1000:.1f} ms (median), {most * 1000:.1f} ms at most")

    assert response.status == 200
    assert live
    assert median < 0.06  # XREAD BLOCK wakes on the XADD: no polling
    assert before + events_of(body) == events_of(whole.raw)
    assert whole.raw.endswith(b"data: [DONE]\n\n")
    assert len(upstream.received) == 1


def test_a_stop_asked_of_the_other_vm_closes_the_upstream_at_once(two_vms, upstream):
    vm_a, vm_b, _ = two_vms
    upstream.reset(tokens=tokens(400), delay=0.05)
    connection, response = open_chat(vm_a.url, HI)
    raw = response.read1(65536)
    while raw.count(b"\ndata: ") < 2:
        raw += response.read1(65536)
    headers = dict(response.getheaders())
    asked = time.monotonic()
    stop = post_chat(
        vm_b.url, None, headers={"Cookie": cookie_of(headers)}, path=f"/api/chat/{headers['X-Stream-Id']}/stop"
    )
    [received] = upstream.received
    assert received.hung_up.wait(2)
    while chunk := response.read1(65536):
        raw += chunk
    hang_up(connection, response)

    assert stop.status == 204
    assert received.hung_up_at - asked < 1.0
    assert b'"finish_reason": "stop"' in raw and raw.endswith(b"data: [DONE]\n\n")


def test_a_reader_of_a_killed_producer_ends_with_stream_lost(two_vms, upstream):
    vm_a, vm_b, _ = two_vms
    upstream.reset(tokens=tokens(400), delay=0.05)
    connection, response = open_chat(vm_a.url, HI)
    response.read1(65536)
    headers = dict(response.getheaders())
    reader, resumed = open_chat(
        vm_b.url, None, headers={"Cookie": cookie_of(headers)}, path=f"/api/chat/{headers['X-Stream-Id']}", method="GET"
    )
    body = resumed.read1(65536)
    worker_pid = int(re.search(r"Booting worker with pid: (\d+)", vm_a.log()).group(1))
    os.kill(worker_pid, signal.SIGKILL)
    killed = time.monotonic()
    while chunk := resumed.read1(65536):
        body += chunk
    noticed = time.monotonic() - killed
    hang_up(reader, resumed)
    hang_up(connection, response)
    print(f"\nproducer killed: its reader on the other VM told after {noticed:.2f} s")

    assert body.endswith(b'"code": "stream_lost"}\n\n')
    assert b"[DONE]" not in body
    assert noticed < 3 * 0.25 + 2 + 2  # the heartbeat's staleness, and a heartbeat to notice it


def test_redis_going_away_never_breaks_a_chat(two_vms, upstream):
    vm_a, _, redis = two_vms
    upstream.reset(tokens=tokens(40), delay=0.03)
    connection, response = open_chat(vm_a.url, HI)
    raw = response.read1(65536)
    redis.process.send_signal(signal.SIGKILL)
    redis.process.wait()
    while chunk := response.read1(65536):
        raw += chunk
    hang_up(connection, response)
    upstream.reset(tokens=tokens(3))
    later = post_chat(vm_a.url, HI)
    metrics = post_chat(vm_a.url, None, path="/metrics", method="GET").raw.decode()

    assert response.getheader("X-Stream-Id")
    assert raw.endswith(b"data: [DONE]\n\n")  # the stream that was running finished, live
    assert "".join(tokens(40)) in "".join(
        json.loads(line[6:]).get("content", "") for line in raw.decode().splitlines() if line.startswith("data: {")
    )
    assert later.data[-1] == "[DONE]" and later.text == "".join(tokens(3))  # a new chat goes out, unresumable
    assert "X-Stream-Id" not in later.headers and b"\nid: " not in later.raw
    assert vm_a.log().count("Redis unavailable") == 1  # one warning
    assert re.search(r"^chat_streams_unresumable_total 1\.0$", metrics, re.M), metrics
    assert wait_for(lambda: any("end=done" in line for line in stream_log_lines(vm_a)))


# --- The same refusals and routes as on one VM (tests/test_resume.py), with the log in Redis ---------------


@pytest.fixture
def one_vm_on_redis(start_gunicorn, start_redis):
    redis = start_redis()
    env = {**SETTINGS, "CHAT_RESUME_REDIS_URL": redis.redis_url, "CHAT_RESUME_MAX_BYTES": "8192"}
    env["CHAT_RESUME_READERS"] = "2"
    return start_gunicorn(env, name="vm-redis")


def get(server, path, headers=None):
    return post_chat(server.url, None, headers=headers, path=path, method="GET")


def test_redis_keeps_the_last_bytes_and_refuses_older_cursors_with_409(one_vm_on_redis, upstream):
    upstream.reset(tokens=[f"{i:04d} " + "x" * 100 for i in range(150)])  # ~25 KB of log, 8 KB kept
    reply = post_chat(one_vm_on_redis.url, HI)
    path, cookie = f"/api/chat/{reply.headers['X-Stream-Id']}", cookie_of(reply.headers)
    ids = re.findall(rb"^id: (\S+)$", reply.raw, re.M)
    early = get(one_vm_on_redis, path, {"Cookie": cookie, "Last-Event-ID": ids[3].decode()})
    late = get(one_vm_on_redis, path, {"Cookie": cookie, "Last-Event-ID": ids[-10].decode()})
    mid_event = get(one_vm_on_redis, path, {"Cookie": cookie, "Last-Event-ID": ids[-10].decode()[:-1] + "1"})

    assert early.status == mid_event.status == 409
    assert json.loads(early.raw)["error"]["code"] == "resume_unavailable"
    assert late.status == 200 and events_of(reply.raw).endswith(events_of(late.raw))
    assert late.data[-1] == "[DONE]"


def test_redis_streams_are_their_owners_only(one_vm_on_redis, upstream):
    upstream.reset(tokens=tokens(3))
    reply = post_chat(one_vm_on_redis.url, HI)
    path, cookie = f"/api/chat/{reply.headers['X-Stream-Id']}", cookie_of(reply.headers)
    whole = get(one_vm_on_redis, path, {"Cookie": cookie})
    others = [get(one_vm_on_redis, path, headers) for headers in ({}, {"Cookie": "chat_owner=" + "D" * 32})]
    unknown = get(one_vm_on_redis, "/api/chat/AAAAAAAAAAAAAAAAAAAAAAAA", {"Cookie": cookie})
    stop = post_chat(one_vm_on_redis.url, None, headers={"Cookie": cookie}, path=f"{path}/stop")

    assert events_of(whole.raw) == events_of(reply.raw)
    assert [r.status for r in (*others, unknown)] == [404, 404, 404]
    assert stop.status == 204  # finished: stopped already


def test_redis_counts_a_streams_readers(one_vm_on_redis, upstream):
    upstream.reset(tokens=tokens(100), delay=0.05)
    connection, response = open_chat(one_vm_on_redis.url, HI)
    response.read1(65536)
    headers = dict(response.getheaders())
    path, cookie = f"/api/chat/{headers['X-Stream-Id']}", cookie_of(headers)
    readers = [
        open_chat(one_vm_on_redis.url, None, headers={"Cookie": cookie}, path=path, method="GET") for _ in range(3)
    ]

    assert [r.status for _, r in readers] == [200, 200, 429]
    for c, r in [*readers, (connection, response)]:
        hang_up(c, r)


def test_the_ai_sdk_resume_and_supersede_with_redis(one_vm_on_redis, upstream):
    body = {"id": "chat-r", "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "Hi"}]}]}
    upstream.reset(tokens=tokens(200), delay=0.05)
    connection, response = open_chat(one_vm_on_redis.url, body, path="/api/ui-chat")
    response.read1(65536)
    cookie = cookie_of(dict(response.getheaders()))
    hang_up(connection, response)
    [first_upstream] = upstream.received
    upstream.reset(tokens=tokens(3))  # a new script for the next request; the first keeps its own
    second = post_chat(one_vm_on_redis.url, body, headers={"Cookie": cookie}, path="/api/ui-chat")
    assert first_upstream.hung_up.wait(2), "the superseded stream's upstream is still open"
    resumed = get(one_vm_on_redis, "/api/ui-chat/chat-r/stream", {"Cookie": cookie})
    none = get(one_vm_on_redis, "/api/ui-chat/chat-none/stream", {"Cookie": cookie})

    assert events_of(resumed.raw) == events_of(second.raw)
    assert (none.status, none.raw) == (204, b"")
