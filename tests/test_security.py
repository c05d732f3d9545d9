"""Knobs for a public VM: a bearer token, a cap on streams per worker, CORS off unless allowed."""

import json

import pytest

from app import create_app
from chat_client import hang_up, open_chat, post_chat
from fake_upstream import API_KEY

HI = {"messages": [{"role": "user", "content": "Hi"}]}


def make_client(upstream, **config):
    base = {"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": API_KEY}
    return create_app({**base, **config}).test_client()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic czNjcmV0", "Bearer", "bearer s3cre"], ids=repr)
def test_token_required_when_configured(upstream, authorization):
    client = make_client(upstream, CHAT_API_TOKEN="s3cret")
    headers = {"Authorization": authorization} if authorization else {}
    response = client.post("/api/chat", json=HI, headers=headers)

    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert upstream.received == []


def test_right_token_streams(upstream):
    client = make_client(upstream, CHAT_API_TOKEN="s3cret")
    response = client.post("/api/chat", json=HI, headers={"Authorization": "Bearer s3cret"})
    assert response.status_code == 200
    assert response.get_data().endswith(b"data: [DONE]\n\n")


def test_no_token_configured_means_open(upstream):
    assert make_client(upstream).post("/api/chat", json=HI).status_code == 200


def test_cors_is_off_by_default(upstream):
    response = make_client(upstream).post("/api/chat", json=HI, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_cors_allows_only_listed_origins(upstream):
    client = make_client(upstream, CHAT_CORS_ORIGINS="https://app.example, https://other.example")

    preflight = client.options(
        "/api/chat",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]

    allowed = client.post("/api/chat", json=HI, headers={"Origin": "https://other.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://other.example"
    assert "Origin" in allowed.headers["Vary"]

    refused = client.post("/api/chat", json=HI, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in refused.headers
    assert "Origin" in refused.headers["Vary"]  # caches must not serve one origin's answer to another


@pytest.fixture
def capped_gunicorn(start_gunicorn):
    # Heartbeats every 0.25 s find the hung-up streams quickly.
    # CHAT_RESUME_SECONDS=0: a stream's slot comes back as soon as its reader leaves.
    settings = {"CHAT_MAX_STREAMS": "2", "CHAT_HEARTBEAT_SECONDS": "0.25", "CHAT_RESUME_SECONDS": "0"}
    return start_gunicorn(settings, name="capped")


def test_stream_cap_answers_503_instead_of_queueing(capped_gunicorn, upstream):
    upstream.reset(tokens=["a"], hold=2)
    first = open_chat(capped_gunicorn.url, HI)
    second = open_chat(capped_gunicorn.url, HI)

    refused = post_chat(capped_gunicorn.url, HI)
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "5"
    assert json.loads(refused.raw)["error"]["code"] == "too_many_streams"
    assert len(upstream.received) == 2

    for connection, response in (first, second):
        hang_up(connection, response)
    assert all(received.hung_up.wait(2) for received in upstream.received)
    upstream.reset(tokens=["again"])
    assert post_chat(capped_gunicorn.url, HI).text == "again"  # slots come back when streams end
