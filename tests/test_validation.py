"""Bad input gets a 4xx JSON error naming the problem, before any stream and without an upstream call."""

import base64
import contextlib
import http.client
import json
import logging
import select
import socket
import time
from multiprocessing.pool import ThreadPool

import pytest

from app import create_app
from chat_client import post_chat
from fake_upstream import API_KEY


@pytest.fixture
def client(upstream):
    app = create_app({"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": API_KEY, "CHAT_MODEL": "gpt-test"})
    return app.test_client()


def ok_body(**changes):
    return json.dumps({"messages": [{"role": "user", "content": "Hi"}], **changes}).encode()


def with_message(**fields):
    """A body whose one message has these fields (on top of a user's "Hi")."""
    return ok_body(messages=[{"role": "user", "content": "Hi", **fields}])


def image(data=b"\x89PNG\r\n\x1a\n" + bytes(24), media_type="image/png", **fields):
    """An image part holding `data` in a data: URL."""
    url = f"data:{media_type};base64,{base64.b64encode(data).decode()}"
    return {"type": "image_url", "image_url": {"url": url, **fields}}


MAX_BODY = 1_048_576
MAX_IMAGE = 700_000

# (parameter, a value it refuses); the 400 names the parameter.
BAD_PARAMETERS = [
    ("temperature", 2.01),
    ("temperature", -0.1),
    ("temperature", True),
    ("temperature", "1"),
    ("temperature", None),
    ("top_p", 0),
    ("top_p", 1.5),
    ("max_tokens", 0),
    ("max_tokens", 1.5),
    ("max_tokens", False),
    ("stop", ["a", "b", "c", "d", "e"]),
    ("stop", [1]),
    ("stop", {"s": "x"}),
    ("stop", "\ud800"),
    ("seed", 1.0),
    ("seed", 2**64),
    ("seed", True),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -3),
    ("frequency_penalty", [0]),
    ("reasoning_effort", "extreme"),
    ("reasoning_effort", ["low"]),
]

# (id, message fields, words the message must contain): content parts, images, names, roles.
BAD_MESSAGES = [
    ("role unhashable", {"role": []}, "messages[0].role"),
    ("role an object", {"role": {"a": 1}}, "messages[0].role"),
    ("lone surrogate in content", {"content": "Hi \ud800"}, "messages[0].content"),
    ("name an object", {"name": {"a": 1}}, "messages[0].name"),
    ("lone surrogate in name", {"name": "\udfff"}, "messages[0].name"),
    ("content empty list", {"content": []}, "messages[0].content"),
    ("content a list of strings", {"content": ["Hi"]}, "messages[0].content[0]"),
    ("text part without text", {"content": [{"type": "text"}]}, "messages[0].content[0]"),
    ("text part not a string", {"content": [{"type": "text", "text": 5}]}, "messages[0].content[0]"),
    ("surrogate in a text part", {"content": [{"type": "text", "text": "\ud800"}]}, "messages[0].content[0]"),
    ("unknown part type", {"content": [{"type": "audio", "audio": "x"}]}, "messages[0].content[0]"),
    ("extra field in a part", {"content": [{"type": "text", "text": "Hi", "x": 1}]}, "messages[0].content[0]"),
    ("image url not a data url", {"content": [image() | {"image_url": {"url": "https://x.test/a.png"}}]}, "data:"),
    ("image of another type", {"content": [image(media_type="image/svg+xml")]}, "data:"),
    ("image not base64", {"content": [image() | {"image_url": {"url": "data:image/png;base64,!!!!"}}]}, "data:"),
    ("image bad padding", {"content": [image() | {"image_url": {"url": "data:image/png;base64,iVBORw0"}}]}, "base64"),
    ("image not what it says", {"content": [image(b"GIF89a" + bytes(20))]}, "not a png image"),
    ("image too large", {"content": [image(b"\x89PNG\r\n\x1a\n" + bytes(MAX_IMAGE))]}, "at most 700000 bytes"),
    ("image bad detail", {"content": [image(detail="huge")]}, "detail"),
    ("image unknown field", {"content": [image(alt="x")]}, "messages[0].content[0]"),
    ("image from the assistant", {"role": "assistant", "content": [image()]}, "user messages only"),
    ("too many images", {"content": [image()] * 5}, "at most 4"),
]

CASES = [
    # (id, method, body bytes, content type, status, code, words the message must contain)
    ("malformed json", "POST", b'{"messages": [', "application/json", 400, "invalid_request", "not valid JSON"),
    (
        "not utf-8",
        "POST",
        '{"messages": "é"}'.encode("utf-16"),
        "application/json",
        400,
        "invalid_request",
        "not UTF-8",
    ),
    (
        "latin-1",
        "POST",
        '{"messages": [{"role": "user", "content": "café"}]}'.encode("latin-1"),
        "application/json",
        400,
        "invalid_request",
        "not UTF-8",
    ),
    (
        "deep nesting",
        "POST",
        b"[" * 100_000 + b"]" * 100_000,
        "application/json",
        400,
        "invalid_request",
        "nested too deeply",
    ),
    ("wrong content type", "POST", ok_body(), "text/plain", 415, "unsupported_media_type", "application/json"),
    (
        "form post",
        "POST",
        b"messages=hi",
        "application/x-www-form-urlencoded",
        415,
        "unsupported_media_type",
        "application/json",
    ),
    (
        "too large",
        "POST",
        b'{"messages": "' + b"x" * MAX_BODY + b'"}',
        "application/json",
        413,
        "body_too_large",
        "larger than",
    ),
    ("not an object", "POST", b"[1, 2]", "application/json", 400, "invalid_request", "JSON object"),
    ("messages missing", "POST", b"{}", "application/json", 400, "invalid_request", "messages"),
    ("messages empty", "POST", b'{"messages": []}', "application/json", 400, "invalid_request", "messages"),
    ("messages not a list", "POST", b'{"messages": "Hi"}', "application/json", 400, "invalid_request", "messages"),
    (
        "message not an object",
        "POST",
        b'{"messages": ["Hi"]}',
        "application/json",
        400,
        "invalid_request",
        "messages[0]",
    ),
    (
        "unknown role",
        "POST",
        b'{"messages": [{"role": "wizard", "content": "Hi"}]}',
        "application/json",
        400,
        "invalid_request",
        "messages[0].role",
    ),
    (
        "role missing",
        "POST",
        b'{"messages": [{"content": "Hi"}]}',
        "application/json",
        400,
        "invalid_request",
        "messages[0].role",
    ),
    (
        "content not a string",
        "POST",
        b'{"messages": [{"role": "user", "content": 42}]}',
        "application/json",
        400,
        "invalid_request",
        "messages[0].content",
    ),
    (
        "content missing",
        "POST",
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "user"}]}',
        "application/json",
        400,
        "invalid_request",
        "messages[1].content",
    ),
    (
        "unknown message field",
        "POST",
        b'{"messages": [{"role": "user", "content": "Hi", "x": 1}]}',
        "application/json",
        400,
        "invalid_request",
        "unknown field: x",
    ),
    (
        "too many messages",
        "POST",
        json.dumps({"messages": [{"role": "user", "content": "Hi"}] * 201}).encode(),
        "application/json",
        400,
        "too_many_messages",
        "more than 200",
    ),
    (
        "unknown model",
        "POST",
        ok_body(model="gpt-nope"),
        "application/json",
        400,
        "invalid_request",
        "Unknown model: gpt-nope",
    ),
    (
        "model not a string",
        "POST",
        ok_body(model=["gpt-test"]),
        "application/json",
        400,
        "invalid_request",
        "Unknown model",
    ),
    (
        "unknown top-level field",
        "POST",
        ok_body(logit_bias={"1": 2}),
        "application/json",
        400,
        "invalid_request",
        "Unknown field: logit_bias",
    ),
    *[
        (f"{name}={value!r}", "POST", ok_body(**{name: value}), "application/json", 400, "invalid_request", name)
        for name, value in BAD_PARAMETERS
    ],
    *[
        (case, "POST", with_message(**fields), "application/json", 400, "invalid_request", words)
        for case, fields, words in BAD_MESSAGES
    ],
    ("GET", "GET", b"", None, 405, "method_not_allowed", "POST"),
    ("PUT", "PUT", ok_body(), "application/json", 405, "method_not_allowed", "POST"),
    ("DELETE", "DELETE", b"", None, 405, "method_not_allowed", "POST"),
]


@pytest.mark.parametrize(
    "method, body, content_type, status, code, words", [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_bad_request_gets_json_error_and_no_upstream_call(
    client, upstream, caplog, method, body, content_type, status, code, words
):
    headers = {"Content-Type": content_type} if content_type else {}
    with caplog.at_level(logging.INFO):
        response = client.open("/api/chat", method=method, data=body, headers=headers)

    assert response.status_code == status
    assert response.content_type == "application/json"
    error = response.get_json()["error"]
    assert error["code"] == code
    assert words.lower() in error["message"].lower()
    assert upstream.received == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_wrong_method_names_the_allowed_one(client):
    assert client.get("/api/chat").headers["Allow"] == "POST"


def test_valid_request_streams_from_the_upstream(client, upstream):
    """The control case for the table above: the same client and body shape do reach the upstream."""
    response = client.post("/api/chat", data=ok_body(), headers={"Content-Type": "application/json"})
    assert response.status_code == 200
    assert response.get_data().endswith(b"data: [DONE]\n\n")
    assert len(upstream.received) == 1


def test_healthz(client, upstream):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ok"
    assert response.get_json()["open_streams"] == 0
    assert upstream.received == []


def post(client, body):
    return client.post("/api/chat", data=body, headers={"Content-Type": "application/json"})


def sent_max_tokens(sent):
    """The reply's token limit as the upstream got it, in whichever field the dialect uses."""
    return sent.get("max_tokens", sent.get("max_completion_tokens"))


def test_parameters_reach_the_upstream_as_named(client, upstream):
    params = {
        "temperature": 0.7,
        "top_p": 1,
        "max_tokens": 50,
        "stop": ["\n\n", "END"],
        "seed": -(2**63),
        "presence_penalty": -2,
        "frequency_penalty": 1.5,
        "reasoning_effort": "low",
    }
    response = post(client, ok_body(**params))

    assert response.status_code == 200
    assert response.get_data().endswith(b"data: [DONE]\n\n")
    sent = upstream.received[0].body
    assert {name: sent.get(name) for name in params if name != "max_tokens"} == {
        name: value for name, value in params.items() if name != "max_tokens"
    }
    assert sent_max_tokens(sent) == 50


@pytest.mark.parametrize("asked, sent", [(None, 64), (1, 1), (64, 64), (65, 64), (10**30, 64)])
def test_reply_length_is_always_capped_by_the_server(upstream, asked, sent):
    """CHAT_MAX_OUTPUT_TOKENS is sent when a request names no max_tokens, and holds a larger one down."""
    app = create_app({"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": API_KEY, "CHAT_MAX_OUTPUT_TOKENS": 64})
    response = post(app.test_client(), ok_body() if asked is None else ok_body(max_tokens=asked))

    assert response.status_code == 200
    assert sent_max_tokens(upstream.received[0].body) == sent


def test_image_parts_reach_the_upstream_unchanged(client, upstream):
    content = [
        {"type": "text", "text": "What is this?"},
        image(detail="low"),
        image(b"\xff\xd8\xff" + bytes(9), "image/jpeg"),
    ]
    messages = [{"role": "user", "content": content}]
    response = post(client, json.dumps({"messages": messages}).encode())

    assert response.status_code == 200
    assert upstream.received[0].body["messages"] == messages


def test_unicode_that_is_valid_reaches_the_upstream(client, upstream):
    """Astral characters arrive escaped as surrogate pairs, which are fine; only a lone one is refused."""
    response = post(client, b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00 \\u2028", "name": "\\u00e9"}]}')

    assert response.status_code == 200
    assert upstream.received[0].body["messages"] == [{"role": "user", "content": "\U0001f600 \u2028", "name": "é"}]


def test_demo_model_reads_the_text_of_content_parts():
    app = create_app({"OPENAI_API_KEY": "", "OPENAI_BASE_URL": "", "CHAT_DEMO_WORD_SECONDS": 0.001})
    content = [{"type": "text", "text": "look at"}, image(), {"type": "text", "text": "this"}]
    response = post(app.test_client(), json.dumps({"messages": [{"role": "user", "content": content}]}).encode())

    assert response.status_code == 200
    text = "".join(event["content"] for event in parse_events(response.get_data()))
    assert 'You said: "look at this"' in text


def parse_events(raw):
    return [json.loads(line[6:]) for line in raw.decode().split("\n") if line.startswith("data: {")]


def complete(response):
    """Tell whether `response` holds a whole HTTP response with a Content-Length."""
    head, _, body = response.partition(b"\r\n\r\n")
    length = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    return bool(length) and len(body) >= int(length[0].split(b":")[1])


def test_a_body_that_trickles_in_is_cut_and_frees_the_worker(upstream, start_gunicorn):
    """Bodies sent a byte at a time get a 408 after CHAT_BODY_TIMEOUT, so they cannot starve the worker.

    The worker takes 8 connections; 8 tricklers fill them, and a real request waits behind them
    until they are cut.
    """
    server = start_gunicorn({"CHAT_BODY_TIMEOUT": "1", "GUNICORN_WORKER_CONNECTIONS": "8"}, name="trickle")
    try:
        started = time.monotonic()
        tricklers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
        for sock in tricklers:
            sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            sock.sendall(b"Content-Length: 1000\r\n\r\n{")
        waiting = ThreadPool(1).apply_async(post_chat, (server.url, {"messages": [{"role": "user", "content": "Hi"}]}))
        answers = {sock: b"" for sock in tricklers}
        while time.monotonic() - started < 5 and not all(map(complete, answers.values())):
            readable, _, _ = select.select(tricklers, [], [], 0.2)
            for sock in tricklers:
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # the server closed: it answered
                    if sock in readable and not complete(answers[sock]):
                        answers[sock] += sock.recv(65536)
                    elif not answers[sock]:
                        sock.sendall(b" ")  # a byte every 0.2 s, until the server answers
        cut_after = time.monotonic() - started
        reply = waiting.get(timeout=10)
    finally:
        for sock in tricklers:
            sock.close()

    for answer in answers.values():
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
        assert json.loads(body)["error"]["code"] == "body_timeout"
    assert cut_after < 2.5
    assert reply.status == 200 and reply.raw.endswith(b"data: [DONE]\n\n")
    assert len(upstream.received) == 1  # the real request's, none of the tricklers'


def body_of(size):
    """A valid chat body of exactly `size` bytes (the user's message is padded with x)."""
    body = ok_body()
    return body.replace(b'"Hi"', b'"Hi' + b"x" * (size - len(body)) + b'"')


@pytest.fixture(scope="module")
def small_body_gunicorn(fake_upstream_server, tmp_path_factory):
    """gunicorn with a body limit of 100 bytes."""
    from live_servers import Gunicorns

    with Gunicorns(tmp_path_factory, fake_upstream_server.url) as gunicorns:
        yield gunicorns.start({"CHAT_MODEL": "gpt-test", "CHAT_MAX_BODY_BYTES": "100"}, name="small-body")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("size, status", [(99, 200), (100, 200), (101, 413)])
def test_the_body_limit_is_the_largest_body_accepted(small_body_gunicorn, upstream, chunked, size, status):
    """CHAT_MAX_BODY_BYTES=100: a body of 100 bytes streams, one of 101 is refused, however it is framed."""
    body = body_of(size)
    assert len(body) == size
    connection = http.client.HTTPConnection("127.0.0.1", small_body_gunicorn.port, timeout=10)
    headers = {"Content-Type": "application/json"}
    connection.request("POST", "/api/chat", iter([body]) if chunked else body, headers, encode_chunked=chunked)
    response = connection.getresponse()
    answer = response.read()

    assert response.status == status
    if status == 200:
        assert answer.endswith(b"data: [DONE]\n\n")
        assert len(upstream.received) == 1
    else:
        assert json.loads(answer)["error"] == {
            "message": "The body is larger than 100 bytes.",
            "code": "body_too_large",
        }
        assert upstream.received == []
