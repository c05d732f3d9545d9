"""Upstreams as they are: dialects, reasoning, retries and their waits, failures that say what happened.

Against a live gunicorn (gevent worker) and the fake upstream, scripted per test.
"""

import json
import socket
import time
from email.utils import formatdate

import pytest

from app import DEFAULTS, create_app
from chat_client import post_chat
from fake_upstream import API_KEY
from live_servers import FAST_LIFECYCLE, Gunicorns, healthz, wait_for
from upstream import DemoStream, Upstream

HI = {"messages": [{"role": "user", "content": "Hi"}]}


def log_lines(server, words):
    return [line for line in server.log().splitlines() if words in line]


@pytest.fixture(scope="module")
def dialect_gunicorn(fake_upstream_server, tmp_path_factory):
    """A server for a local model that thinks: extra fields, hidden reasoning, a retry allowed."""
    env = {
        **FAST_LIFECYCLE,
        "CHAT_MODEL": "qwen3",
        "CHAT_EXTRA_BODY": '{"chat_template_kwargs": {"enable_thinking": true}}',
        "CHAT_REASONING": "hide",
        "CHAT_UPSTREAM_RETRIES": "1",
        "CHAT_RETRY_MAX_WAIT": "5",
    }
    with Gunicorns(tmp_path_factory, fake_upstream_server.url) as gunicorns:
        yield gunicorns.start(env, name="dialect")


# --- Dialects ----------------------------------------------------------------------------------------


def test_extra_body_reaches_the_upstream(dialect_gunicorn, upstream):
    post_chat(dialect_gunicorn.url, HI)
    assert upstream.received[0].body["chat_template_kwargs"] == {"enable_thinking": True}


def test_hidden_reasoning_is_not_sent_but_keeps_the_stream_alive(dialect_gunicorn, upstream):
    """Thinking for 2.4 s under a 1.5 s first-token timeout: hidden, but still counted as output."""
    upstream.reset(reasoning=[f"step {i} " for i in range(12)], tokens=["Four."], delay=0.2)
    reply = post_chat(dialect_gunicorn.url, HI)

    assert reply.text == "Four."
    assert reply.data[-1] == "[DONE]"
    assert not [d for d in reply.data if isinstance(d, dict) and "reasoning" in d]
    assert b": ping" in reply.raw  # the silence towards the client was filled
    [line] = [line for line in log_lines(dialect_gunicorn, reply.headers["X-Request-Id"]) if " end=" in line]
    assert "end=done" in line and "reasoning=12" in line


def test_a_server_that_refuses_stream_options_is_asked_again_without_them(start_gunicorn, upstream):
    server = start_gunicorn({"CHAT_STREAM_USAGE": "auto"}, name="old-ollama")
    upstream.reset(reject_stream_options=True, tokens=["ok"])
    first = post_chat(server.url, HI)
    second = post_chat(server.url, HI)

    assert first.text == second.text == "ok"
    assert first.data[-2]["usage"] is None  # the server gives none without stream_options
    assert ["stream_options" in r.body for r in upstream.received] == [True, False, False]  # remembered


# --- Upstream, on its own: what a host's view needs ---------------------------------------------------


def read_all(stream):
    deltas = []
    while not stream.finished:
        deltas += stream.read(1.0)
    stream.close()
    return "".join(text for _, text in deltas)


def test_an_upstream_opens_with_nothing_but_a_model_and_messages(upstream):
    """No parameters and no client check: the reply is still capped at CHAT_MAX_OUTPUT_TOKENS."""
    upstream.reset(tokens=["just ", "this"])
    config = {**DEFAULTS, "OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": API_KEY}
    stream = Upstream(config).open("gpt-test", HI["messages"])

    assert read_all(stream) == "just this"
    assert (stream.finish_reason, stream.reader, stream.api) == ("stop", "socket", "chat")
    assert upstream.received[0].body["max_tokens"] == DEFAULTS["CHAT_MAX_OUTPUT_TOKENS"]


def test_with_no_key_and_no_server_the_upstream_is_the_demo():
    stream = Upstream({**DEFAULTS, "CHAT_DEMO_WORD_SECONDS": 0}).open("any", HI["messages"], {"temperature": 1})
    assert isinstance(stream, DemoStream)
    assert read_all(stream).startswith("Hello! I am the built-in demo model")


# --- Retries and what they wait for --------------------------------------------------------------------

RETRY_AFTERS = [  # headers of a 429, what the client is told to wait, requests sent
    ({"Retry-After": "7"}, "7", 1),  # longer than CHAT_RETRY_MAX_WAIT (5): back to the client at once
    ({"Retry-After": "a minute from now"}, None, 1),  # an HTTP date, made when the test runs
    ({"retry-after-ms": "9000"}, "9", 1),
    ({"retry-after-ms": "200"}, "1", 2),  # short: waited out and sent again, once
    ({"Retry-After": "inf"}, "", 2),  # nonsense: no Retry-After of ours, and the usual short wait
]


@pytest.mark.parametrize("headers, told, requests", RETRY_AFTERS, ids=["seconds", "date", "ms", "short-ms", "inf"])
def test_retry_after_in_every_form_is_held_to_the_limit(dialect_gunicorn, upstream, headers, told, requests):
    if headers.get("Retry-After") == "a minute from now":
        headers = {"Retry-After": formatdate(time.time() + 60, usegmt=True)}
    upstream.reset(status=429, headers=headers)
    started = time.monotonic()
    reply = post_chat(dialect_gunicorn.url, HI)
    took = time.monotonic() - started

    assert reply.status == 429
    assert len(upstream.received) == requests
    assert took < 2  # never held for a long Retry-After with nothing sent
    if told is None:
        assert 55 <= int(reply.headers["Retry-After"]) <= 61  # seconds, not the date
    elif not told:
        assert "Retry-After" not in reply.headers
    else:
        assert reply.headers["Retry-After"] == told


def test_a_request_that_timed_out_is_not_sent_again(dialect_gunicorn, upstream):
    upstream.reset(stall_headers=10)
    reply = post_chat(dialect_gunicorn.url, HI)

    assert reply.status == 504
    assert len(upstream.received) == 1  # CHAT_UPSTREAM_RETRIES=1 notwithstanding: the prompt may have been paid


def test_a_client_that_leaves_before_the_headers_closes_the_upstream_request(dialect_gunicorn, upstream):
    upstream.reset(stall_headers=30)
    client = socket.create_connection(("127.0.0.1", dialect_gunicorn.port))
    payload = json.dumps(HI).encode()
    client.sendall(
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    assert wait_for(lambda: upstream.received, 5)
    client.close()
    left = time.monotonic()

    assert upstream.received[0].hung_up.wait(3)
    heartbeat = float(FAST_LIFECYCLE["CHAT_HEARTBEAT_SECONDS"])
    assert upstream.received[0].hung_up_at - left < heartbeat + 0.5
    assert len(upstream.received) == 1
    assert wait_for(lambda: log_lines(dialect_gunicorn, "client_gone"))


# --- Failures that say what happened, and never leak ------------------------------------------------


def test_an_unknown_model_upstream_is_named(dialect_gunicorn, upstream):
    upstream.reset(status=404, error_message="The model `qwen3` does not exist.")
    reply = post_chat(dialect_gunicorn.url, HI)

    assert reply.status == 502
    error = json.loads(reply.raw)["error"]
    assert error["code"] == "model_not_found"
    assert "qwen3" in error["message"]
    assert wait_for(lambda: log_lines(dialect_gunicorn, "does not exist"))  # the upstream's own words, in the log


def test_a_400_that_quotes_the_key_is_passed_on_redacted(dialect_gunicorn, upstream):
    echoed = f"Invalid header: Authorization: Bearer {API_KEY}; also sk-proj-abcdef123456 is wrong"
    upstream.reset(status=400, error_message=echoed)
    reply = post_chat(dialect_gunicorn.url, HI)

    assert reply.status == 400
    message = json.loads(reply.raw)["error"]["message"]
    assert message.startswith("Invalid header")  # the user still learns what was wrong
    assert API_KEY not in message and "sk-proj" not in message and API_KEY[3:15] not in message
    assert wait_for(lambda: log_lines(dialect_gunicorn, "Invalid header"))
    assert API_KEY not in dialect_gunicorn.log() and "sk-proj-abcdef" not in dialect_gunicorn.log()


@pytest.mark.parametrize(
    "said, code, shown",
    [
        ("litellm.BadRequestError: OpenAIException - temperature is too high", "upstream_rejected", "temperature is"),
        ("This model's maximum context length is 8192 tokens.", "context_too_long", "too long for the model"),
        ('Expected {"type": "text"} at messages.0, got {0}', "upstream_rejected", 'Expected {"type"'),
    ],
    ids=["litellm-prefix", "context", "braces"],
)
def test_a_400_says_what_the_model_said_plainly(dialect_gunicorn, upstream, said, code, shown):
    upstream.reset(status=400, error_message=said)
    reply = post_chat(dialect_gunicorn.url, HI)

    error = json.loads(reply.raw)["error"]
    assert (reply.status, error["code"]) == (400, code)
    assert error["message"].startswith(shown) or shown in error["message"]
    assert "litellm" not in error["message"] and "OpenAIException" not in error["message"]


def test_an_error_inside_the_stream_is_logged_with_what_the_upstream_said(dialect_gunicorn, upstream):
    upstream.reset(error_after=1)
    reply = post_chat(dialect_gunicorn.url, HI)

    assert reply.data[-1]["code"] == "upstream_error"
    assert "internal upstream detail" not in reply.raw.decode()  # not for the user
    assert wait_for(lambda: log_lines(dialect_gunicorn, "internal upstream detail"))  # for the operator


@pytest.mark.parametrize(
    "setting, field",
    [("auto", "max_tokens"), ("max_completion_tokens", "max_completion_tokens"), ("max_tokens", "max_tokens")],
)
def test_the_reply_cap_goes_in_the_field_the_upstream_honours(upstream, setting, field):
    """auto: max_tokens for a compatible server (OPENAI_BASE_URL set), which every one of them honours."""
    config = {"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": API_KEY, "CHAT_MAX_OUTPUT_TOKENS": 77}
    app = create_app({**config, "CHAT_MAX_TOKENS_FIELD": setting})
    assert app.test_client().post("/api/chat", json=HI).get_data().endswith(b"data: [DONE]\n\n")

    [received] = upstream.received
    assert received.body[field] == 77
    [other] = {"max_tokens", "max_completion_tokens"} - {field}
    assert other not in received.body


ODD_EVENTS = [  # fields of the wrong type, as a careless server might send them: each is ignored
    [1, 2],
    "text",
    {"choices": "none"},
    {"choices": [None, 3, {"delta": "text"}, {"delta": {"content": 5, "reasoning": ["x"]}}]},
    {"choices": [{"delta": {"content": None, "reasoning_content": {"a": 1}}, "finish_reason": 7}]},
    {"usage": "lots"},
    {"usage": [1]},
]


def test_fields_of_the_wrong_type_from_the_upstream_are_ignored(dialect_gunicorn, upstream):
    upstream.reset(odd_events=ODD_EVENTS, tokens=["still ", "here"], usage="many")
    reply = post_chat(dialect_gunicorn.url, HI)

    assert reply.text == "still here"
    assert reply.data[-1] == "[DONE]"
    assert reply.data[-2]["usage"] is None  # "many" is not a usage object
    assert "Traceback" not in dialect_gunicorn.log()


# --- Hostile upstreams: what they send ends their stream, and never the worker ----------------------


@pytest.fixture(scope="module")
def hostile_gunicorn(fake_upstream_server, tmp_path_factory):
    """One worker, so that a frozen event loop would also freeze its /healthz."""
    with Gunicorns(tmp_path_factory, fake_upstream_server.url) as gunicorns:
        yield gunicorns.start(FAST_LIFECYCLE, name="hostile")


BAD_SIZE_LINES = [b"-6", b"-ff", b" -6", b"+6", b"0x6", b"6_0", b"6 ", b"", b"g", b"1" * 17, b"6\x00", b"6\n"]


@pytest.mark.parametrize("size_line", BAD_SIZE_LINES, ids=lambda line: repr(line)[2:-1])
def test_a_malformed_chunk_size_ends_the_stream_and_never_the_worker(hostile_gunicorn, upstream, size_line):
    """RFC 9112 allows 1+ hex digits and extensions; a size like -6 used to loop the decoder for good."""
    upstream.reset(tokens=["a", "b"], raw_framing=size_line + b"\r\nhello\r\n")
    reply = post_chat(hostile_gunicorn.url, HI, timeout=5)

    assert reply.text == "a"
    assert reply.data[-1] == {"content": "", "error": reply.data[-1]["error"], "code": "upstream_malformed"}
    assert upstream.received[0].hung_up.wait(2)
    assert healthz(hostile_gunicorn) == {"status": "ok", "open_streams": 0}


def test_a_deeply_nested_json_line_is_malformed_not_our_bug(hostile_gunicorn, upstream):
    """json.loads raises RecursionError, not ValueError, on [[[[...]]]]: it is still the upstream's fault."""
    nested = b"[" * 100_000 + b"]" * 100_000  # under the 256 KB line cap
    upstream.reset(tokens=["a"], raw_events=[b"data: " + nested + b"\n\n"])
    reply = post_chat(hostile_gunicorn.url, HI, timeout=5)

    assert reply.data[-1]["code"] == "upstream_malformed"
    assert wait_for(lambda: log_lines(hostile_gunicorn, "upstream_malformed"))
    assert "Traceback" not in hostile_gunicorn.log()
    assert "relay_error" not in hostile_gunicorn.log()
