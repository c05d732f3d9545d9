"""The relay's public piece in a host's own view (tests/host_view_app.py), served by a real gunicorn."""

import pytest

from chat_client import post_chat
from fake_upstream import API_KEY
from live_servers import ROOT, stream_log_lines, wait_for


@pytest.fixture
def host_view(start_gunicorn):
    """gunicorn serving an app that registers no blueprint and calls relay_response in its own views."""
    return start_gunicorn(name="host-view", app="tests.host_view_app:host", ready_path="/")


def test_a_host_view_streams_the_demo_with_settings_of_its_own(host_view):
    """A mapping with one setting (a 0.2 s heartbeat) and no other: the demo streams, with pings in its pauses."""
    reply = post_chat(host_view.url, {"question": "Is this thing on?", "pace": 0.3}, path="/ask")

    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/event-stream"
    assert reply.headers["X-Accel-Buffering"] == "no"
    assert reply.raw.startswith(b": ok\n")
    assert reply.raw.count(b": ping\n") >= 10  # a 0.2 s heartbeat between words 0.3 s apart
    assert reply.text.startswith("Hello! I am the built-in demo model")
    assert '"Is this thing on?"' in reply.text
    assert reply.data[-2]["finish_reason"] == "stop"
    assert reply.data[-1] == "[DONE]"
    assert reply.first_time() < reply.arrivals[-1][0] - reply.started - 5  # the first word came long before the end
    assert wait_for(lambda: any("end=done" in line and "reader=demo" in line for line in stream_log_lines(host_view)))


def test_a_host_view_relays_its_own_sdk_stream(host_view, upstream):
    """The host's SDK client against the fake upstream, its chunks offered as an UpstreamStream: the same bytes."""
    upstream.reset(tokens=["Hel", "lo", ", wörld\n"])
    reply = post_chat(host_view.url, {"question": "Hi"}, path="/ask-model")

    assert reply.status == 200
    assert reply.raw == (
        b": ok\n"
        b'data: {"content": "Hel"}\n\n'
        b'data: {"content": "lo"}\n\n'
        b'data: {"content": ", w\xc3\xb6rld\\n"}\n\n'
        b'data: {"content": "", "finish_reason": "stop", "usage": null}\n\n'
        b"data: [DONE]\n\n"
    )
    assert upstream.received[0].body["messages"] == [{"role": "user", "content": "Hi"}]
    assert wait_for(lambda: any("reader=sdk-chunks" in line for line in stream_log_lines(host_view)))


def test_a_host_view_relays_upstreams_reader_with_heartbeats(host_view, upstream):
    """upstream.py's Upstream in a host's view: the reply read off the socket, pings in the model's silence."""
    upstream.reset(tokens=["Hel", "lo"], stall_at=1, stall=1.0)
    reply = post_chat(host_view.url, {"question": "Hi"}, path="/ask-fast")

    assert reply.status == 200
    assert reply.text == "Hello"
    assert reply.raw.count(b": ping\n") >= 3  # a 0.2 s heartbeat in a 1 s silence
    assert reply.data[-2]["usage"] == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
    assert upstream.received[0].body["stream_options"] == {"include_usage": True}
    assert wait_for(lambda: any("reader=socket" in line for line in stream_log_lines(host_view)))


def test_a_host_views_chat_log_is_redacted_without_the_blueprint(host_view, upstream):
    """The upstream's error quotes the key; the stream's error event is the service's sentence, and the log
    line that records what the upstream said hides the key, though no blueprint installed a filter."""
    upstream.reset(odd_events=[{"error": {"message": f"invalid key {API_KEY}", "type": "server_error"}}])
    reply = post_chat(host_view.url, {"question": "Hi"}, path="/ask-model")

    assert reply.data[-1] == {"content": "", "error": "The model stopped with an error.", "code": "upstream_error"}
    assert wait_for(lambda: "failed: upstream_error" in host_view.log())
    assert "invalid key [redacted]" in host_view.log()
    assert API_KEY not in host_view.log()


def test_the_readmes_own_view_streams_as_written():
    """The README's example of the relay in a view of one's own, run as it is written."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### The relay in a view of your own", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 12  # ten lines of code, and two blank ones
    namespace = {"__name__": "__main__"}  # as if it were the script being run
    exec(code, namespace)
    response = namespace["host"].test_client().post("/ask", json={"question": "Hi"})

    assert response.status_code == 200
    assert response.get_data().startswith(b": ok\n")
    assert response.get_data().endswith(b"data: [DONE]\n\n")


def test_the_relays_own_log_lines_hide_its_settings_secrets(host_view, upstream):
    """A secret that looks like no key (the settings' CHAT_API_TOKEN), echoed by the upstream mid-stream: the
    relay's line about it is logged after the request has gone, and still hides it, whole and in pieces."""
    from host_view_app import HOST_TOKEN

    echoed = {"error": {"message": f"who is {HOST_TOKEN}? or {HOST_TOKEN[:12]}", "type": "server_error"}}
    upstream.reset(tokens=["Hi"], odd_events=[echoed])
    reply = post_chat(host_view.url, {"question": "Hi"}, path="/ask-fast")

    assert reply.data[-1]["code"] == "upstream_error"
    assert wait_for(lambda: "failed: upstream_error" in host_view.log())
    assert "who is [redacted]? or [redacted]" in host_view.log()
    assert HOST_TOKEN[:12] not in host_view.log()
