"""Bad input gets a 4xx JSON error naming the problem, before any stream and without an upstream call."""

import json
import logging

import pytest

from app import create_app
from fake_upstream import API_KEY


@pytest.fixture
def client(upstream):
    app = create_app({"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": API_KEY, "CHAT_MODEL": "gpt-test"})
    return app.test_client()


def ok_body(**changes):
    return json.dumps({"messages": [{"role": "user", "content": "Hi"}], **changes}).encode()


MAX_BODY = 1_048_576

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
        ok_body(temperature=2),
        "application/json",
        400,
        "invalid_request",
        "Unknown field: temperature",
    ),
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
