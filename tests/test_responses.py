"""CHAT_UPSTREAM_API=responses: OpenAI's Responses API as the upstream, through a live gunicorn and the real SDK.

The fake upstream speaks the Responses wire as openai.types.responses defines it (tests/test_reading.py
checks its events against those types); the service's own wire and page stay as they are.
"""

import json
import re
import time
from urllib.request import urlopen

import pytest

from app import DEFAULTS
from browser import fresh_page
from chat_client import hang_up, open_chat, post_chat
from live_servers import FAST_LIFECYCLE, Gunicorns, healthz, stream_log_lines, wait_for
from upstream import Upstream

try:
    from playwright.sync_api import expect
except ImportError:
    expect = None

HI = {"messages": [{"role": "user", "content": "Hi"}]}
USAGE = {
    "prompt_tokens": 9,
    "completion_tokens": 5,
    "total_tokens": 14,
    "completion_tokens_details": {"reasoning_tokens": 3},
}
PNG = (  # one pixel
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHggJ/PchI7wAAAABJRU5ErkJggg=="
)


@pytest.fixture(scope="module")
def responses_gunicorn(fake_upstream_server, tmp_path_factory):
    env = {
        **FAST_LIFECYCLE,
        "CHAT_UPSTREAM_API": "responses",
        "CHAT_MODEL": "gpt-test",
        "CHAT_MODELS": "gpt-test,gpt-mini,gpt-unverified",
        "CHAT_EXTRA_BODY": '{"service_tier": "flex"}',
        "CHAT_MAX_OUTPUT_TOKENS": "500",
        "CHAT_METRICS": "1",
    }
    with Gunicorns(tmp_path_factory, fake_upstream_server.url) as gunicorns:
        yield gunicorns.start(env, name="responses")


def events(reply):
    return [d for d in reply.data if isinstance(d, dict)]


def line_of(server, reply):
    [line] = [line for line in stream_log_lines(server) if reply.headers["X-Request-Id"] in line]
    return line


# --- The request, mapped ------------------------------------------------------------------------------


def test_the_request_is_mapped_onto_the_responses_api(responses_gunicorn, upstream):
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": PNG}}],
        },
        {"role": "assistant", "content": "A pixel."},
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "And now?", "name": "ana"},
    ]
    body = {"messages": messages, "max_tokens": 9000, "temperature": 0.5, "top_p": 0.9, "reasoning_effort": "low"}
    reply = post_chat(responses_gunicorn.url, body)
    assert reply.data[-1] == "[DONE]"

    [received] = upstream.received
    assert received.path == "/v1/responses"
    assert received.body == {
        "model": "gpt-test",
        "instructions": "Be brief.",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": PNG, "detail": "auto"},
                ],
            },
            {"role": "assistant", "content": "A pixel."},
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "And now?"},
        ],
        "stream": True,
        "store": False,  # OpenAI's default is true: a relay must not store conversations by accident
        "max_output_tokens": 500,  # held to CHAT_MAX_OUTPUT_TOKENS
        "temperature": 0.5,
        "top_p": 0.9,
        "reasoning": {"effort": "low", "summary": "auto"},
        "service_tier": "flex",  # CHAT_EXTRA_BODY
    }


@pytest.mark.parametrize(
    "name, value", [("stop", "\n"), ("seed", 7), ("presence_penalty", 0.5), ("frequency_penalty", -1)]
)
def test_a_parameter_the_responses_api_lacks_is_a_400_naming_it(responses_gunicorn, upstream, name, value):
    reply = post_chat(responses_gunicorn.url, {**HI, name: value})

    assert reply.status == 400
    error = json.loads(reply.raw)["error"]
    assert error["code"] == "unsupported_parameter"
    assert error["message"].startswith(f"{name} is not available")
    assert upstream.received == []
    assert healthz(responses_gunicorn)["open_streams"] == 0  # its slot was given back


@pytest.mark.parametrize(
    "model, refused, second, third",
    [
        ("gpt-unverified", "summary", {"effort": "high"}, {"effort": "high"}),  # unverified organization
        ("gpt-mini", "effort", None, None),  # a model that does not reason (gpt-4o-mini)
    ],
)
def test_a_refused_reasoning_is_dropped_once_and_remembered(
    responses_gunicorn, upstream, model, refused, second, third
):
    upstream.reset(reject_reasoning=refused, summary_parts=[["never"]], tokens=["Fine."])
    body = {**HI, "model": model, "reasoning_effort": "high"}
    first = post_chat(responses_gunicorn.url, body)
    again = post_chat(responses_gunicorn.url, body)

    assert first.text == again.text == "Fine."
    sent = [received.body.get("reasoning") for received in upstream.received]
    assert sent == [{"effort": "high", "summary": "auto"}, second, third]  # the third: asked right the first time
    assert wait_for(lambda: f"upstream refuses reasoning.{refused} for {model}" in responses_gunicorn.log())


@pytest.mark.parametrize("status, code", [(429, "rate_limited"), (401, "upstream_auth"), (404, "model_not_found")])
def test_a_refusal_before_the_stream_is_an_http_status_as_with_chat(responses_gunicorn, upstream, status, code):
    upstream.reset(status=status, error_message="no")
    reply = post_chat(responses_gunicorn.url, HI)

    assert (reply.status, json.loads(reply.raw)["error"]["code"]) == (429 if status == 429 else 502, code)


@pytest.mark.parametrize(
    "settings, effort, reasoning, store",
    [
        ({"CHAT_REASONING_SUMMARY": "off"}, None, None, False),
        ({"CHAT_REASONING_SUMMARY": "off"}, "low", {"effort": "low"}, False),
        ({"CHAT_REASONING_SUMMARY": "detailed", "CHAT_RESPONSES_STORE": "1"}, None, {"summary": "detailed"}, True),
    ],
)
def test_the_settings_decide_reasoning_and_store(settings, effort, reasoning, store):
    config = {**DEFAULTS, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "CHAT_UPSTREAM_API": "responses", **settings}
    params = {"reasoning_effort": effort} if effort else {}
    body = Upstream(config).responses_body("m", HI["messages"], params, 100)
    assert (body.get("reasoning"), body["store"]) == (reasoning, store)


# --- The stream, mapped -------------------------------------------------------------------------------


def test_summaries_content_and_usage_arrive_as_our_events(responses_gunicorn, upstream):
    upstream.reset(summary_parts=[["First ", "thought."], ["Second."]], tokens=["Hel", "lo"])
    reply = post_chat(responses_gunicorn.url, HI)

    assert reply.data == [
        {"content": "", "reasoning": "First "},
        {"content": "", "reasoning": "thought."},
        {"content": "", "reasoning": "\n\nSecond."},  # a new summary part: a paragraph of its own
        {"content": "Hel"},
        {"content": "lo"},
        {"content": "", "finish_reason": "stop", "usage": USAGE},
        "[DONE]",
    ]
    line = line_of(responses_gunicorn, reply)
    assert "reader=socket" in line  # the fast path's tripwire, for this dialect too
    assert "api=responses" in line
    assert "tokens=5 reasoning=3" in line
    metrics = urlopen(responses_gunicorn.url + "/metrics").read().decode()
    assert re.search(r'chat_streams_ended_total\{api="responses",code="stop",outcome="done"\} [1-9]', metrics)


def test_vllms_reasoning_text_is_reasoning_and_a_refusal_is_shown(responses_gunicorn, upstream):
    upstream.reset(reasoning_text=["step ", "one"], tokens=["ok"])
    reply = post_chat(responses_gunicorn.url, HI)
    assert [e["reasoning"] for e in events(reply) if "reasoning" in e] == ["step ", "one"]
    assert reply.text == "ok"

    upstream.reset(refusal=["I can't ", "help with that."])
    reply = post_chat(responses_gunicorn.url, HI)
    assert reply.text == "I can't help with that."  # as content: the user sees why
    assert reply.data[-2] == {"content": "", "finish_reason": "stop", "usage": None}


def test_every_byte_in_a_read_of_its_own_still_reads_whole(responses_gunicorn, upstream):
    upstream.reset(summary_parts=[["Mmm."]], tokens=["Hel", "lo ", "응답"], byte_by_byte=True)
    reply = post_chat(responses_gunicorn.url, HI)

    assert reply.text == "Hello 응답"
    assert [e["reasoning"] for e in events(reply) if "reasoning" in e] == ["Mmm."]
    assert reply.data[-1] == "[DONE]"
    assert "reader=socket" in line_of(responses_gunicorn, reply)


@pytest.mark.parametrize(
    "reason, finish_reason",
    [("max_output_tokens", "length"), ("content_filter", "content_filter"), ("steered", "other")],
)
def test_an_incomplete_response_ends_with_its_reason(responses_gunicorn, upstream, reason, finish_reason):
    upstream.reset(tokens=["Part"], ending="incomplete", incomplete_reason=reason)
    reply = post_chat(responses_gunicorn.url, HI)

    assert reply.text == "Part"
    assert reply.data[-2] == {"content": "", "finish_reason": finish_reason, "usage": USAGE}
    assert reply.data[-1] == "[DONE]"


@pytest.mark.parametrize(
    "script, code",
    [
        ({"ending": "failed"}, "upstream_error"),
        ({"ending": "error"}, "upstream_error"),
        ({"tool_call": True}, "unsupported_output"),
    ],
    ids=["failed", "error-event", "tool-call"],
)
def test_a_failure_in_the_stream_is_an_error_event_of_ours(responses_gunicorn, upstream, script, code):
    upstream.reset(tokens=["a", "b"], **script)
    reply = post_chat(responses_gunicorn.url, HI)

    assert reply.data[-1]["code"] == code
    assert reply.data[-1]["error"] in (
        "The model stopped with an error.",
        "The model answered with something this service cannot show.",
    )
    assert "internal upstream detail" not in reply.raw.decode()  # the upstream's words: for the log only
    if code == "upstream_error":
        assert wait_for(lambda: "internal upstream detail" in responses_gunicorn.log())
    assert "Traceback" not in responses_gunicorn.log()


def test_a_gateways_done_after_completed_ends_the_reply_too(responses_gunicorn, upstream):
    upstream.reset(tokens=["ok"], gateway_done=True)
    reply = post_chat(responses_gunicorn.url, HI)
    assert reply.text == "ok" and reply.data[-1] == "[DONE]"


def test_a_client_that_leaves_closes_the_upstream(responses_gunicorn, upstream):
    upstream.reset(tokens=["never sent"], hold=30)
    connection, response = open_chat(responses_gunicorn.url, HI)
    assert response.read1(65536).startswith(b": ok")
    hang_up(connection, response)
    left = time.monotonic()

    assert wait_for(lambda: upstream.received, 5)
    assert upstream.received[0].hung_up.wait(3)
    assert upstream.received[0].hung_up_at - left < float(FAST_LIFECYCLE["CHAT_HEARTBEAT_SECONDS"]) * 2 + 0.5


def test_the_ai_sdk_protocol_gets_the_reasoning_parts(responses_gunicorn, upstream):
    upstream.reset(summary_parts=[["Hm."]], tokens=["Yes."])
    body = {"messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "Hi"}]}]}
    reply = post_chat(responses_gunicorn.url, body, path="/api/ui-chat")

    kinds = [d["type"] for d in reply.data if isinstance(d, dict)]
    assert "reasoning-delta" in kinds and "text-delta" in kinds
    assert [d["delta"] for d in reply.data if isinstance(d, dict) and d["type"] == "reasoning-delta"] == ["Hm."]
    assert reply.data[-1] == "[DONE]"


# --- The page -----------------------------------------------------------------------------------------


def test_the_page_shows_the_reasoning_summaries(browser, responses_gunicorn, upstream):
    if expect is None:
        pytest.skip("playwright is not installed")
    upstream.reset(summary_parts=[["Weighing ", "it."], ["Then deciding."]], tokens=["The answer."], delay=0.05)
    with fresh_page(browser) as page:
        page.goto(responses_gunicorn.url + "/")
        page.get_by_label("Message").fill("Question")
        page.get_by_label("Message").press("Enter")

        item = page.locator("#conversation .message.assistant").last
        expect(item.locator(".text")).to_have_text("The answer.")
        block = item.locator("details.thinking")
        expect(block.locator("summary")).to_have_text(re.compile(r"^Thought for \d+ seconds?$"))
        block.locator("summary").click()
        assert block.locator("p").inner_text() == "Weighing it.\n\nThen deciding."  # a blank line between parts
