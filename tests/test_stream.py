"""The stream itself, through a live gunicorn (gevent worker) and the real openai SDK."""

import http.client
import json
import subprocess
import threading
from pathlib import Path

from chat_client import post_chat
from fake_upstream import API_KEY

HI = {"messages": [{"role": "user", "content": "Hi"}]}


def test_exact_bytes_on_the_wire(gunicorn, upstream):
    upstream.reset(tokens=["Hel", "lo", ", wörld\n"])
    reply = post_chat(gunicorn.url, HI)

    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/event-stream"
    assert reply.headers["Cache-Control"] == "no-cache, no-transform"
    assert reply.headers["X-Accel-Buffering"] == "no"
    events = [
        b'data: {"content": "Hel"}\n\n',
        b'data: {"content": "lo"}\n\n',
        b'data: {"content": ", w\xc3\xb6rld\\n"}\n\n',
        b'data: {"content": "", "finish_reason": "stop", '
        b'"usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}}\n\n',
        b"data: [DONE]\n\n",
    ]
    # Each event's id names the stream and the log's position just after it (its id line included).
    stream_id, position, expected = reply.headers["X-Stream-Id"].encode(), 0, b": ok\nretry: 1000\n"
    for event in events:
        id_line = b"id: %s.%010d\n" % (stream_id, position + len(b"id: ") + len(stream_id) + 12 + len(event))
        position += len(id_line) + len(event)
        expected += id_line + event
    assert reply.raw == expected


def test_upstream_gets_the_request_the_sdk_way(gunicorn, upstream):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    post_chat(gunicorn.url, {"messages": messages, "model": "other"})

    [received] = upstream.received
    assert received.path == "/v1/chat/completions"
    assert received.headers["Authorization"] == f"Bearer {API_KEY}"
    assert received.body["model"] == "other"
    assert received.body["messages"] == messages
    assert received.body["stream"] is True
    assert received.body["stream_options"] == {"include_usage": True}


def test_upstream_connections_are_reused(gunicorn, upstream):
    """A new TCP (and, to OpenAI, TLS) connection per reply would add a handshake to every first token."""
    for _ in range(90):
        assert post_chat(gunicorn.url, HI).data[-1] == "[DONE]"
    ports = [received.client_port for received in upstream.received]
    warm_up, later = set(ports[:45]), set(ports[45:])
    print(f"\n90 replies one after another, over {len(set(ports))} upstream connections")
    assert later <= warm_up  # once the worker's connections are open, every reply goes over one of them


def test_usage_is_null_when_the_upstream_sends_none(gunicorn, upstream):
    upstream.reset(tokens=["a"], usage=None)
    reply = post_chat(gunicorn.url, HI)
    assert reply.data[-2] == {"content": "", "finish_reason": "stop", "usage": None}
    assert reply.data[-1] == "[DONE]"


def test_first_event_arrives_long_before_the_upstream_finishes(gunicorn, upstream):
    upstream.reset(tokens=[f"t{i} " for i in range(30)], delay=0.05)
    reply = post_chat(gunicorn.url, HI)

    assert reply.text == "".join(f"t{i} " for i in range(30))
    assert reply.first_time() < 0.3
    assert reply.arrivals[-1][0] - reply.started > 1.4
    # Tokens arrive one read at a time, not in a burst at the end.
    assert len([chunk for _, chunk in reply.arrivals if b'"content": "t' in chunk]) >= 25


def test_200_concurrent_streams_through_one_worker(gunicorn, upstream):
    upstream.reset(tokens=None, delay=0.02)  # echo: each stream's reply is its own message
    replies = {}

    def one(n):
        words = " ".join(f"s{n}w{i}" for i in range(20))
        replies[n] = (words + " ", post_chat(gunicorn.url, {"messages": [{"role": "user", "content": words}]}))

    threads = [threading.Thread(target=one, args=(n,)) for n in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(replies) == 200
    for expected, reply in replies.values():
        assert reply.status == 200
        assert reply.text == expected
        assert reply.data[-1] == "[DONE]"
    assert len(upstream.received) == 200


def test_demo_model_with_no_environment(demo_gunicorn):
    reply = post_chat(demo_gunicorn.url, {"messages": [{"role": "user", "content": "Is this thing on?"}]})

    assert reply.status == 200
    assert reply.text.startswith("Hello! I am the built-in demo model")
    assert '"Is this thing on?"' in reply.text
    assert len([d for d in reply.data if isinstance(d, dict) and d.get("content")]) > 20  # word by word
    assert reply.data[-2]["finish_reason"] == "stop"
    assert reply.data[-2]["usage"]["completion_tokens"] > 20
    assert reply.data[-1] == "[DONE]"
    assert "demo model" in demo_gunicorn.log()  # said once at start, with how to switch


def test_chunked_body_over_the_limit_is_413(gunicorn, upstream):
    """A body without Content-Length is cut off at the limit too, not read into memory whole."""
    connection = http.client.HTTPConnection("127.0.0.1", gunicorn.port, timeout=10)
    body = iter([b'{"messages": [{"role": "user", "content": "', b"x" * 1_100_000, b'"}]}'])
    connection.request(
        "POST", "/api/chat", body=body, headers={"Content-Type": "application/json"}, encode_chunked=True
    )
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "body_too_large"
    assert upstream.received == []


CLASSIC_CLIENT = Path(__file__).with_name("classic_client.mjs")


def test_a_classic_fetch_client_rebuilds_the_reply(node, gunicorn, upstream):
    """The classic fetch + ReadableStream reader of SSE tutorials, run in Node, gets the exact text."""
    tokens = ["Stream", "ing ", "응답", " with\nnew", "lines ", 'and "quotes"', "."]
    upstream.reset(tokens=tokens, delay=0.01)
    result = subprocess.run(
        [node, str(CLASSIC_CLIENT), gunicorn.url + "/api/chat"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == "".join(tokens)
