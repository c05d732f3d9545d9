"""Resuming a stream: a reply is a log, the first response only its first reader.

Against a live gunicorn with two gevent workers sharing the logs' directory (gunicorn.conf.py), the
fake upstream, and nginx where the path through it is the point. A reader leaves by hanging up
mid-reply and comes back with the last event id it has; it must get exactly the rest.
"""

import http.client
import json
import os
import re
import signal
import time

import pytest

from chat_client import Reply, hang_up, open_chat, post_chat
from live_servers import Gunicorns, stream_log_lines, wait_for

HI = {"messages": [{"role": "user", "content": "Hi"}]}
UNREAD_SECONDS = 1.5  # CHAT_RESUME_SECONDS of the servers below
SETTINGS = {
    "CHAT_HEARTBEAT_SECONDS": "0.25",
    "CHAT_RESUME_SECONDS": str(UNREAD_SECONDS),
    "CHAT_RESUME_MAX_BYTES": "16384",
    "CHAT_MAX_DURATION": "20",
    "CHAT_CORS_ORIGINS": "https://app.example",
}


@pytest.fixture(scope="module")
def two_workers(fake_upstream_server, tmp_path_factory):
    """gunicorn as shipped, with two workers: a reader that comes back may land on either."""
    with Gunicorns(tmp_path_factory, fake_upstream_server.url) as gunicorns:
        yield gunicorns.start(SETTINGS, name="resume", workers=2)


def tokens(count):
    return [f"t{i} " for i in range(count)]


def cookie_of(response_headers):
    """The owner cookie the POST set, as a Cookie header sends it back."""
    return response_headers["Set-Cookie"].split(";")[0]


def events_of(raw):
    """The data events of a response, as the log holds them: its comments and its `retry:` line left out."""
    return b"".join(line for line in raw.splitlines(keepends=True) if not line.startswith((b":", b"retry:")))


def last_event_id(raw):
    return re.findall(rb"^id: (\S+)$", raw, re.M)[-1].decode()


def cut_mid_reply(server, events=5, body=HI):
    """Start a reply, read `events` data events, hang up; return (stream id, cookie, bytes read, last event id)."""
    connection, response = open_chat(server.url, body)
    raw = b""
    while raw.count(b"\ndata: ") < events:
        raw += response.read1(65536)
    hang_up(connection, response)
    complete = events_of(raw[: raw.rindex(b"\n\n") + 2])  # the events read in full; the rest comes again
    headers = dict(response.getheaders())
    return headers["X-Stream-Id"], cookie_of(headers), complete, last_event_id(complete)


def get(server, path, headers=None):
    return post_chat(server.url, None, headers=headers, path=path, method="GET")


def whole_log(server, stream_id, cookie):
    """The stream's whole log, read from its start once it has ended."""
    reply = get(server, f"/api/chat/{stream_id}", {"Cookie": cookie})
    assert reply.status == 200, reply.raw
    assert reply.raw.endswith(b"data: [DONE]\n\n")
    return events_of(reply.raw)


# --- A reader that comes back gets exactly the rest -------------------------------------------------

WAYS_BACK = {
    "GET with Last-Event-ID": lambda sid, last: ("GET", f"/api/chat/{sid}", {"Last-Event-ID": last}),
    "GET with ?after=": lambda sid, last: ("GET", f"/api/chat/{sid}?after={last}", {}),
    "POST /api/chat with Last-Event-ID": lambda sid, last: ("POST", "/api/chat", {"Last-Event-ID": last}),
}


@pytest.mark.parametrize("way", WAYS_BACK)
def test_a_cut_reply_resumes_with_exactly_the_rest(two_workers, upstream, way):
    upstream.reset(tokens=tokens(30), delay=0.03)
    stream_id, cookie, before, last = cut_mid_reply(two_workers)
    method, path, headers = WAYS_BACK[way](stream_id, last)
    rest = post_chat(two_workers.url, HI, headers={**headers, "Cookie": cookie}, path=path, method=method)

    assert rest.status == 200
    assert rest.headers["X-Stream-Id"] == stream_id
    assert rest.raw.startswith(b": ok\nretry: 1000\nid: ")  # retry: in the first event's block, once
    assert rest.raw.count(b"retry:") == 1
    assert before + events_of(rest.raw) == whole_log(two_workers, stream_id, cookie)  # byte for byte
    assert "".join(d["content"] for d in rest.data if isinstance(d, dict)).startswith("t5 ")
    assert rest.data[-1] == "[DONE]"
    assert len(upstream.received) == 1  # one generation, paid once


def test_every_data_event_has_an_id_and_no_comment_has_one(two_workers, upstream):
    upstream.reset(tokens=tokens(3), reasoning=["hm"])
    reply = post_chat(two_workers.url, HI)
    blocks = reply.raw.split(b"\n\n")[:-1]

    assert reply.raw.startswith(b": ok\nretry: 1000\nid: ")
    for block in blocks:
        lines = [line for line in block.split(b"\n") if not line.startswith((b":", b"retry:"))]
        assert [line[:4] for line in lines] == [b"id: ", b"data"], block
    stream_id = reply.headers["X-Stream-Id"]
    positions = [int(i.rsplit(b".", 1)[1]) for i in re.findall(rb"^id: (\S+)$", reply.raw, re.M)]
    assert all(i.startswith(stream_id.encode()) for i in re.findall(rb"^id: (\S+)$", reply.raw, re.M))
    assert positions == sorted(set(positions))
    assert reply.data[-1] == "[DONE]"


def test_a_finished_reply_is_read_again_from_its_start(two_workers, upstream):
    upstream.reset(tokens=tokens(8))
    reply = post_chat(two_workers.url, HI)
    again = get(two_workers, f"/api/chat/{reply.headers['X-Stream-Id']}", {"Cookie": cookie_of(reply.headers)})

    assert again.status == 200
    assert events_of(again.raw) == events_of(reply.raw)
    assert again.text == "".join(tokens(8))
    assert len(upstream.received) == 1


def test_resuming_at_the_end_of_a_finished_reply_sends_nothing_more(two_workers, upstream):
    upstream.reset(tokens=tokens(3))
    reply = post_chat(two_workers.url, HI)
    headers = {"Cookie": cookie_of(reply.headers), "Last-Event-ID": last_event_id(reply.raw)}
    again = get(two_workers, f"/api/chat/{reply.headers['X-Stream-Id']}", headers)

    assert (again.status, again.raw) == (200, b": ok\n")


# --- Across the workers of one VM ---------------------------------------------------------------------


class WorkerConnection:
    """A keep-alive connection to gunicorn, and the pid of the worker that accepted it (from the access log)."""

    def __init__(self, server, n):
        self.connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        probe = f"probe-{os.getpid()}-{time.monotonic_ns()}-{n}"
        self.connection.request("GET", "/healthz", headers={"X-Request-Id": probe})
        self.connection.getresponse().read()
        assert wait_for(lambda: f"rid={probe} " in server.log())
        [line] = [line for line in server.log().splitlines() if f"rid={probe} " in line]
        self.pid = int(re.search(r"\] \[(\d+)\] ", line).group(1))

    def request(self, method, path, headers, body=None):
        self.connection.request(method, path, body=body, headers=headers)
        return self.connection.getresponse()


def connection_to_another_worker(server, pid, other=True):
    """Open connections until one lands on a worker other than `pid` (or on it); close the others.

    A fresh server answers once its first worker is up: the other may take seconds more to boot.
    """
    tried, deadline = [], time.monotonic() + 20
    while time.monotonic() < deadline:
        connection = WorkerConnection(server, len(tried))
        if (connection.pid != pid) == other:
            for unused in tried:
                unused.connection.close()
            return connection
        tried.append(connection)
        if len(tried) % 10 == 0:
            time.sleep(0.2)
    pytest.fail(f"{len(tried)} connections in 20 s all landed on {'one worker' if other else 'the other worker'}")


def test_a_reply_cut_on_one_worker_resumes_live_on_the_other(two_workers, upstream):
    upstream.reset(tokens=tokens(150), delay=0.03)
    producer = WorkerConnection(two_workers, 0)
    response = producer.request("POST", "/api/chat", {"Content-Type": "application/json"}, json.dumps(HI))
    raw = b""
    while raw.count(b"\ndata: ") < 5:
        raw += response.read1(65536)
    producer.connection.close()
    response.close()
    headers = dict(response.getheaders())
    stream_id, cookie = headers["X-Stream-Id"], cookie_of(headers)
    before = events_of(raw[: raw.rindex(b"\n\n") + 2])

    other = connection_to_another_worker(two_workers, producer.pid)
    asked = time.monotonic()
    rest = other.request("GET", f"/api/chat/{stream_id}", {"Cookie": cookie, "Last-Event-ID": last_event_id(before)})
    body = rest.read1(65536)
    first_event = time.monotonic() - asked
    live = not upstream.received[0].finished.is_set()  # the first resumed event came while the model still wrote
    arrived = {}  # token number: when it reached this reader
    while chunk := rest.read1(65536):
        body += chunk
        arrived.update((int(n), time.monotonic()) for n in re.findall(rb'"content": "t(\d+) "', chunk))
    sent = upstream.received[0].sent
    delays = sorted(arrived[n] - sent[n] for n in arrived if n >= 40)  # read live, well after the replay
    median, most = delays[len(delays) // 2], delays[-1]
    print(f"\nthe other worker: first resumed event after {first_event * 1000:.1f} ms, live events after")
    print(f"the model sent them: {median * 1000:.1f} ms (median), {most * 1000:.1f} ms at most")

    assert rest.status == 200
    assert live
    assert median < 0.06  # rung by the producer's worker, not found by a slow look
    assert before + events_of(body) == whole_log(two_workers, stream_id, cookie)
    assert body.endswith(b"data: [DONE]\n\n")
    assert len(upstream.received) == 1


def test_a_reader_in_another_worker_waits_out_a_long_silence(two_workers, upstream):
    """The producer beats at each heartbeat of a silence: its readers elsewhere do not take it for dead."""
    upstream.reset(tokens=tokens(3), hold=4.0)  # longer than a reader waits without a beat (3 heartbeats + 2 s)
    producer = WorkerConnection(two_workers, 0)
    response = producer.request("POST", "/api/chat", {"Content-Type": "application/json"}, json.dumps(HI))
    response.read1(65536)
    headers = dict(response.getheaders())
    other = connection_to_another_worker(two_workers, producer.pid)
    resumed = other.request("GET", f"/api/chat/{headers['X-Stream-Id']}", {"Cookie": cookie_of(headers)})
    body = resumed.read()
    response.read()
    producer.connection.close()

    assert b"stream_lost" not in body
    assert body.endswith(b"data: [DONE]\n\n")


# --- Stop, and a reader that never comes back ----------------------------------------------------------


STOPS = {  # the upstream's script, and how many data events arrive before the stop
    "while tokens flow": ({"tokens": tokens(200), "delay": 0.05}, 3),
    "while the model is silent": ({"tokens": tokens(5), "stall_at": 2, "stall": 20}, 2),
}


@pytest.mark.parametrize("worker", ["the producer's worker", "another worker"])
@pytest.mark.parametrize("when", STOPS)
def test_stop_closes_the_upstream_at_once_and_every_reader_sees_the_end(two_workers, upstream, when, worker):
    script, events = STOPS[when]
    upstream.reset(**script)
    producer = WorkerConnection(two_workers, 0)
    response = producer.request("POST", "/api/chat", {"Content-Type": "application/json"}, json.dumps(HI))
    raw = response.read1(65536)
    while raw.count(b"\ndata: ") < events:
        raw += response.read1(65536)
    headers = dict(response.getheaders())
    stream_id, cookie = headers["X-Stream-Id"], cookie_of(headers)
    stopper = connection_to_another_worker(two_workers, producer.pid, other=worker == "another worker")

    asked = time.monotonic()
    stopped = stopper.request("POST", f"/api/chat/{stream_id}/stop", {"Cookie": cookie})
    stopped_body = stopped.read()
    [received] = upstream.received
    assert received.hung_up.wait(2), "the upstream was not closed"
    print(f"\nstop ({when}, {worker}) to upstream closed: {(received.hung_up_at - asked) * 1000:.0f} ms")
    while chunk := response.read1(65536):
        raw += chunk
    producer.connection.close()
    again = stopper.request("POST", f"/api/chat/{stream_id}/stop", {"Cookie": cookie})
    again.read()

    assert stopped.status == 204 and stopped_body == b""
    assert received.hung_up_at - asked < 1.0
    assert len(received.sent) < 100
    end = [d for d in Reply(200, {}, raw, [], 0).data if isinstance(d, dict)][-1]
    assert end["finish_reason"] == "stop"
    assert raw.endswith(b"data: [DONE]\n\n")
    assert events_of(raw) == whole_log(two_workers, stream_id, cookie)  # the log ends the same way
    assert again.status == 204  # idempotent


def test_a_stop_from_another_worker_in_a_long_silence_closes_the_upstream_at_once(start_gunicorn, upstream):
    """With the shipped heartbeat (15 s, here 10 s) the relay would notice a flag only at its next wake-up:
    the stop closes the upstream under it instead, from whichever worker it is asked of."""
    server = start_gunicorn({**SETTINGS, "CHAT_HEARTBEAT_SECONDS": "10"}, name="stop-silent", workers=2)
    upstream.reset(tokens=tokens(5), stall_at=2, stall=30)
    producer = WorkerConnection(server, 0)
    response = producer.request("POST", "/api/chat", {"Content-Type": "application/json"}, json.dumps(HI))
    raw = response.read1(65536)
    while raw.count(b"\ndata: ") < 2:
        raw += response.read1(65536)
    headers = dict(response.getheaders())
    stopper = connection_to_another_worker(server, producer.pid)
    asked = time.monotonic()
    stopper.request("POST", f"/api/chat/{headers['X-Stream-Id']}/stop", {"Cookie": cookie_of(headers)}).read()
    [received] = upstream.received

    assert received.hung_up.wait(2), "the stop waited for the relay's next heartbeat"
    while chunk := response.read1(65536):
        raw += chunk
    producer.connection.close()
    assert received.hung_up_at - asked < 1.0
    assert b'"finish_reason": "stop"' in raw and raw.endswith(b"data: [DONE]\n\n")


def test_stop_of_an_unknown_stream_is_404(two_workers, upstream):
    reply = post_chat(two_workers.url, None, path="/api/chat/AAAAAAAAAAAAAAAAAAAAAAAA/stop")
    assert reply.status == 404
    assert json.loads(reply.raw)["error"]["code"] == "stream_not_found"


def test_a_reply_nobody_comes_back_for_is_stopped_after_resume_seconds(two_workers, upstream):
    upstream.reset(tokens=tokens(200), delay=0.05)  # 10 s of reply
    stream_id, cookie, before, last = cut_mid_reply(two_workers, events=2)
    left = time.monotonic()
    [received] = upstream.received
    assert not received.hung_up.wait(UNREAD_SECONDS * 0.6)  # it goes on without a reader
    assert received.hung_up.wait(UNREAD_SECONDS + 2), "the unread reply was never stopped"
    unread_for = received.hung_up_at - left
    print(f"\nunread reply stopped after {unread_for:.2f} s (CHAT_RESUME_SECONDS={UNREAD_SECONDS})")
    rest = get(two_workers, f"/api/chat/{stream_id}", {"Cookie": cookie, "Last-Event-ID": last})

    assert UNREAD_SECONDS * 0.9 < unread_for < UNREAD_SECONDS + 1
    assert len(received.sent) > 2 + 10  # the model was read on meanwhile
    assert rest.status == 200
    assert rest.data[-1] == {"content": "", "error": rest.data[-1]["error"], "code": "abandoned"}


def test_a_reader_that_comes_back_keeps_the_reply_going(two_workers, upstream):
    upstream.reset(tokens=tokens(80), delay=0.05)  # 4 s of reply: longer than CHAT_RESUME_SECONDS
    stream_id, cookie, before, last = cut_mid_reply(two_workers, events=2)
    time.sleep(UNREAD_SECONDS / 2)
    rest = get(two_workers, f"/api/chat/{stream_id}", {"Cookie": cookie, "Last-Event-ID": last})

    assert rest.data[-1] == "[DONE]"
    assert before + events_of(rest.raw) == whole_log(two_workers, stream_id, cookie)
    assert "".join(d["content"] for d in rest.data if isinstance(d, dict)).endswith("t79 ")


# --- Refusals: the same 404 for unknown, expired and not yours; 409 for what is no longer kept -----------


def finished_stream(server, upstream):
    upstream.reset(tokens=tokens(3))
    reply = post_chat(server.url, HI)
    return reply.headers["X-Stream-Id"], cookie_of(reply.headers), last_event_id(reply.raw)


NOT_YOURS = {
    "unknown stream": lambda sid, cookie: ("AAAAAAAAAAAAAAAAAAAAAAAA", cookie, None),
    "no cookie": lambda sid, cookie: (sid, None, None),
    "another browser's cookie": lambda sid, cookie: (sid, "chat_owner=" + "B" * 32, None),
    "a cookie that is no owner's": lambda sid, cookie: (sid, "chat_owner=x", None),
    "another stream's event id": lambda sid, cookie: (sid, cookie, "AAAAAAAAAAAAAAAAAAAAAAAA.0000000066"),
    "a malformed event id": lambda sid, cookie: (sid, cookie, "not-an-id"),
}


@pytest.mark.parametrize("case", NOT_YOURS)
def test_a_stream_not_found_or_not_yours_is_the_same_404(two_workers, upstream, case):
    stream_id, cookie = finished_stream(two_workers, upstream)[:2]
    asked_id, asked_cookie, last = NOT_YOURS[case](stream_id, cookie)
    headers = {"Cookie": asked_cookie} if asked_cookie else {}
    if last:
        headers["Last-Event-ID"] = last
    reply = get(two_workers, f"/api/chat/{asked_id}", headers)
    stop = post_chat(two_workers.url, None, headers=headers, path=f"/api/chat/{asked_id}/stop")

    assert reply.status == 404
    assert json.loads(reply.raw) == {
        "error": {"code": "stream_not_found", "message": "No such stream: it is unknown, expired, or not yours."}
    }
    assert stop.status == (204 if case in ("another stream's event id", "a malformed event id") else 404)


def test_a_post_with_a_last_event_id_never_starts_a_generation(two_workers, upstream):
    upstream.reset(tokens=tokens(3))
    reply = post_chat(two_workers.url, HI, headers={"Last-Event-ID": "AAAAAAAAAAAAAAAAAAAAAAAA.0000000066"})

    assert reply.status == 404
    assert upstream.received == []


def test_a_cursor_older_than_what_is_kept_is_409(two_workers, upstream):
    upstream.reset(tokens=[f"{i:04d} " + "x" * 100 for i in range(150)])  # ~25 KB of log, 16 KB kept
    reply = post_chat(two_workers.url, HI)
    stream_id, cookie = reply.headers["X-Stream-Id"], cookie_of(reply.headers)
    ids = re.findall(rb"^id: (\S+)$", reply.raw, re.M)
    early = get(two_workers, f"/api/chat/{stream_id}", {"Cookie": cookie, "Last-Event-ID": ids[3].decode()})
    start = get(two_workers, f"/api/chat/{stream_id}", {"Cookie": cookie})
    late = get(two_workers, f"/api/chat/{stream_id}", {"Cookie": cookie, "Last-Event-ID": ids[-10].decode()})

    assert reply.data[-1] == "[DONE]"  # the stream itself went on live, whole
    assert early.status == start.status == 409
    assert json.loads(early.raw)["error"]["code"] == "resume_unavailable"
    assert late.status == 200
    assert events_of(reply.raw).endswith(events_of(late.raw))
    assert late.data[-1] == "[DONE]"


def test_a_stream_has_at_most_its_readers(start_gunicorn, upstream):
    server = start_gunicorn({**SETTINGS, "CHAT_RESUME_READERS": "2"}, name="readers")
    upstream.reset(tokens=tokens(100), delay=0.05)
    connection, response = open_chat(server.url, HI)
    response.read1(65536)
    headers = dict(response.getheaders())
    path, cookie = f"/api/chat/{headers['X-Stream-Id']}", cookie_of(headers)
    readers = [open_chat(server.url, None, headers={"Cookie": cookie}, path=path, method="GET") for _ in range(3)]

    assert [r.status for _, r in readers] == [200, 200, 429]
    assert json.loads(readers[2][1].read())["error"]["code"] == "too_many_readers"
    for c, r in [*readers, (connection, response)]:
        hang_up(c, r)


# --- Settings that turn it down, and a producer that dies ----------------------------------------------


def test_with_resume_seconds_0_a_reader_that_leaves_ends_the_reply_at_once(start_gunicorn, upstream):
    server = start_gunicorn({**SETTINGS, "CHAT_RESUME_SECONDS": "0"}, name="resume0")
    upstream.reset(tokens=tokens(200), delay=0.05)
    stream_id, cookie, before, last = cut_mid_reply(server, events=2)
    [received] = upstream.received
    assert received.hung_up.wait(1.0)
    rest = get(server, f"/api/chat/{stream_id}", {"Cookie": cookie, "Last-Event-ID": last})

    assert rest.data[-1]["code"] == "abandoned"  # what was made is still kept, with how it ended
    assert wait_for(lambda: any("end=client_gone" in line for line in stream_log_lines(server)))


def test_a_reader_of_a_killed_producer_ends_with_stream_lost(start_gunicorn, upstream):
    server = start_gunicorn(SETTINGS, name="killed", workers=2)
    upstream.reset(tokens=tokens(400), delay=0.05)
    producer = WorkerConnection(server, 0)
    response = producer.request("POST", "/api/chat", {"Content-Type": "application/json"}, json.dumps(HI))
    raw = response.read1(65536)
    headers = dict(response.getheaders())
    stream_id, cookie = headers["X-Stream-Id"], cookie_of(headers)
    reader = connection_to_another_worker(server, producer.pid)
    resumed = reader.request("GET", f"/api/chat/{stream_id}", {"Cookie": cookie})
    body = resumed.read1(65536)

    os.kill(producer.pid, signal.SIGKILL)
    killed = time.monotonic()
    while chunk := resumed.read1(65536):
        body += chunk
    noticed = time.monotonic() - killed
    print(f"\nproducer killed: its reader told after {noticed * 1000:.0f} ms")

    assert body.endswith(b'"code": "stream_lost"}\n\n')
    assert b"[DONE]" not in body
    assert raw.startswith(b": ok\n")
    assert noticed < 2


def test_a_cut_reply_resumes_through_nginx(two_workers, start_nginx, upstream):
    nginx = start_nginx("resume-nginx", [two_workers])
    upstream.reset(tokens=tokens(150), delay=0.03)
    stream_id, cookie, before, last = cut_mid_reply(nginx)
    connection, response = open_chat(
        nginx.url, None, headers={"Cookie": cookie, "Last-Event-ID": last}, path=f"/api/chat/{stream_id}", method="GET"
    )
    body = response.read1(65536)
    live = not upstream.received[0].finished.is_set()  # streamed through nginx, not held back until the end
    while chunk := response.read1(65536):
        body += chunk
    hang_up(connection, response)
    stop = post_chat(nginx.url, None, headers={"Cookie": cookie}, path=f"/api/chat/{stream_id}/stop")

    assert response.status == 200
    assert live
    assert before + events_of(body) == whole_log(nginx, stream_id, cookie)
    assert len(upstream.received) == 1
    assert stop.status == 204


def test_a_worker_that_stops_ends_its_unread_replies_cleanly(start_gunicorn, upstream):
    """SIGTERM: the worker waits graceful_timeout for a reply nobody reads, as for any stream, then ends it."""
    server = start_gunicorn({**SETTINGS, "CHAT_RESUME_SECONDS": "30", "GUNICORN_GRACEFUL_TIMEOUT": "1"}, name="stops")
    upstream.reset(tokens=tokens(400), delay=0.05)
    worker_pid = int(re.search(r"Booting worker with pid: (\d+)", server.log()).group(1))
    stream_id, cookie, before, last = cut_mid_reply(server, events=2)

    os.kill(worker_pid, signal.SIGTERM)
    [received] = upstream.received
    assert received.hung_up.wait(5), "the unread reply's upstream was never closed"
    assert wait_for(lambda: any("end=shutdown" in line for line in stream_log_lines(server)), 5)
    assert wait_for(lambda: server.log().count("Booting worker") == 2, 10)  # the master started another
    rest = get(server, f"/api/chat/{stream_id}", {"Cookie": cookie, "Last-Event-ID": last})

    assert rest.status == 200
    assert rest.data[-1]["code"] == "server_shutdown"  # the log says how it ended, to the next worker too
    assert b"[DONE]" not in rest.raw


# --- The AI SDK's chats: GET .../stream replays a chat's latest stream, stop, a new message supersedes ---


def ui_body(chat_id, said="Hi"):
    return {"id": chat_id, "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": said}]}]}


def test_the_ai_sdk_resume_replays_the_chat_from_its_start_then_follows(two_workers, upstream):
    upstream.reset(tokens=tokens(50), delay=0.04)  # its log stays under the 16 KB kept: from the start is kept
    connection, response = open_chat(two_workers.url, ui_body("chat-a"), path="/api/ui-chat")
    raw = b""
    while raw.count(b"text-delta") < 3:
        raw += response.read1(65536)
    hang_up(connection, response)
    cookie = cookie_of(dict(response.getheaders()))
    resumed = get(two_workers, "/api/ui-chat/chat-a/stream", {"Cookie": cookie})
    again = get(two_workers, "/api/ui-chat/chat-a/stream", {"Cookie": cookie})

    assert resumed.status == 200
    assert resumed.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert events_of(resumed.raw).startswith(events_of(raw[: raw.rindex(b"\n\n") + 2]))  # from the start
    assert resumed.data[0] == {"type": "start"}
    assert resumed.data[-2]["type"] == "finish" and resumed.data[-1] == "[DONE]"
    assert "".join(d.get("delta", "") for d in resumed.data if isinstance(d, dict)) == "".join(tokens(50))
    assert events_of(again.raw) == events_of(resumed.raw)  # finished: read again, whole
    assert len(upstream.received) == 1


@pytest.mark.parametrize("who", ["a chat with no stream", "another browser", "no cookie"])
def test_the_ai_sdk_resume_of_no_stream_is_204(two_workers, upstream, who):
    upstream.reset(tokens=tokens(2))
    reply = post_chat(two_workers.url, ui_body("chat-b"), path="/api/ui-chat")
    cookie = {"a chat with no stream": cookie_of(reply.headers), "another browser": "chat_owner=" + "C" * 32}.get(who)
    chat = "chat-none" if who == "a chat with no stream" else "chat-b"
    resumed = get(two_workers, f"/api/ui-chat/{chat}/stream", {"Cookie": cookie} if cookie else {})

    assert (resumed.status, resumed.raw) == (204, b"")


def test_the_ai_sdk_stop_closes_the_upstream_at_once(two_workers, upstream):
    upstream.reset(tokens=tokens(200), delay=0.05)
    connection, response = open_chat(two_workers.url, ui_body("chat-c"), path="/api/ui-chat")
    raw = response.read1(65536)
    cookie = cookie_of(dict(response.getheaders()))
    stop = post_chat(two_workers.url, None, headers={"Cookie": cookie}, path="/api/ui-chat/chat-c/stop")
    [received] = upstream.received
    assert received.hung_up.wait(2)
    while chunk := response.read1(65536):
        raw += chunk
    hang_up(connection, response)
    unknown = post_chat(two_workers.url, None, headers={"Cookie": cookie}, path="/api/ui-chat/chat-none/stop")

    assert stop.status == 204
    assert b'"finishReason": "stop"' in raw and raw.endswith(b"data: [DONE]\n\n")
    assert unknown.status == 404


def test_a_new_message_in_the_chat_supersedes_its_previous_stream(two_workers, upstream):
    upstream.reset(tokens=tokens(200), delay=0.05)
    connection, response = open_chat(two_workers.url, ui_body("chat-d", "first"), path="/api/ui-chat")
    response.read1(65536)
    cookie = cookie_of(dict(response.getheaders()))
    hang_up(connection, response)  # the first reply goes on, unread (CHAT_RESUME_SECONDS)
    [first_upstream] = upstream.received
    upstream.reset(tokens=tokens(3))  # a new script for the next request; the first keeps its own
    second = post_chat(two_workers.url, ui_body("chat-d", "second"), headers={"Cookie": cookie}, path="/api/ui-chat")
    assert first_upstream.hung_up.wait(2), "the superseded stream's upstream is still open"
    resumed = get(two_workers, "/api/ui-chat/chat-d/stream", {"Cookie": cookie})

    assert second.data[-1] == "[DONE]"
    assert events_of(resumed.raw) == events_of(second.raw)  # the chat's stream is now the second one


# --- With CHAT_API_TOKEN, the token binds; cross-origin clients -------------------------------------------

TOKEN = "resume-test-token-0123456789"


def test_with_a_token_resuming_needs_the_token_and_no_cookie_is_set(start_gunicorn, upstream):
    server = start_gunicorn({**SETTINGS, "CHAT_API_TOKEN": TOKEN}, name="token")
    upstream.reset(tokens=tokens(4))
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    reply = post_chat(server.url, HI, headers=bearer)
    path = f"/api/chat/{reply.headers['X-Stream-Id']}"
    with_token = get(server, path, bearer)
    without = get(server, path)
    wrong = get(server, path, {"Authorization": "Bearer not-the-token"})
    stop_without = post_chat(server.url, None, path=f"{path}/stop")

    assert "Set-Cookie" not in reply.headers
    assert with_token.status == 200 and events_of(with_token.raw) == events_of(reply.raw)
    assert without.status == wrong.status == stop_without.status == 401  # as every other request without it


def test_a_listed_origin_may_resume_with_its_cookie(two_workers, upstream):
    origin = {"Origin": "https://app.example"}
    preflight = http.client.HTTPConnection("127.0.0.1", two_workers.port, timeout=10)
    preflight.request(
        "OPTIONS",
        "/api/chat/AAAAAAAAAAAAAAAAAAAAAAAA",
        headers={**origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "last-event-id"},
    )
    answer = preflight.getresponse()
    answer.read()
    upstream.reset(tokens=tokens(2))
    reply = post_chat(two_workers.url, HI, headers=origin)
    resumed = get(
        two_workers, f"/api/chat/{reply.headers['X-Stream-Id']}", {**origin, "Cookie": cookie_of(reply.headers)}
    )

    assert answer.status == 200
    assert answer.getheader("Access-Control-Allow-Origin") == "https://app.example"
    assert "GET" in answer.getheader("Access-Control-Allow-Methods")
    assert "Last-Event-ID" in answer.getheader("Access-Control-Allow-Headers")
    assert answer.getheader("Access-Control-Allow-Credentials") == "true"
    for response in (reply, resumed):
        assert "X-Stream-Id" in response.headers["Access-Control-Expose-Headers"]
    assert resumed.status == 200
