"""The chat page in a real headless Chromium (Debian's), driven by Playwright, against a live gunicorn.

Every assertion is on what a person sees: the text in the page, its notes, its controls.
Without Chromium or playwright these tests skip on a developer's machine and fail in CI.
"""

import json
import statistics
import time

import pytest

from live_servers import ROOT, unavailable

try:
    from playwright.sync_api import expect
except ImportError:
    unavailable("playwright is not installed (pip install -r requirements-dev.txt)")

PHONE = {"width": 390, "height": 844}
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture
def chat_page(page, gunicorn):
    page.goto(gunicorn.url + "/")
    return page


def say(page, text):
    """Type a message and press Enter, as a person does."""
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")


def reply(page):
    """The assistant's latest message."""
    return page.locator("#conversation .message.assistant").last


def reply_text(page):
    """The words of the latest reply."""
    return reply(page).locator(".text")


def reply_note(page):
    """The line under the latest reply: its usage, or why it stopped."""
    return reply(page).locator(".note")


# --- Streaming ---------------------------------------------------------------------------------


def test_first_words_show_while_the_upstream_is_still_sending(chat_page, upstream):
    tokens = [f"t{i} " for i in range(20)]
    upstream.reset(tokens=tokens, delay=0.1)
    say(chat_page, "Count")

    expect(reply_text(chat_page)).to_contain_text("t0")
    assert len(upstream.received[0].sent) < 10  # the upstream is a second or more from its last token
    expect(chat_page.get_by_label("Message")).to_be_disabled()
    expect(reply_text(chat_page)).to_have_text("".join(tokens), timeout=10_000)
    expect(chat_page.get_by_label("Message")).to_be_enabled()


def test_reply_is_exact_and_its_usage_shown(chat_page, upstream):
    tokens = ["Hel", "lo", ", wörld\n", "  indented", ' "quoted" \\ ', "응답", " 🙂", "\n\ntail"]
    upstream.reset(tokens=tokens)
    say(chat_page, "Hi")

    expect(reply_note(chat_page)).to_have_text("14 tokens: 9 prompt, 5 reply.")
    assert reply_text(chat_page).text_content() == "".join(tokens)
    # The reply is inside the polite live region screen readers follow.
    log = chat_page.get_by_role("log", name="Conversation")
    assert log.get_attribute("aria-live") == "polite"
    expect(log).to_contain_text("응답 🙂")


def test_the_conversation_is_sent_whole_and_enter_sends(chat_page, upstream):
    upstream.reset(tokens=["First ", "answer."])
    say(chat_page, "One")
    expect(reply_note(chat_page)).to_contain_text("tokens")

    upstream.script.tokens = ["Second."]
    box = chat_page.get_by_label("Message")
    box.type("Two")
    box.press("Shift+Enter")  # a new line, not a send
    box.type("lines")
    assert len(upstream.received) == 1
    box.press("Enter")
    expect(reply_text(chat_page)).to_have_text("Second.")

    assert upstream.received[1].body["messages"] == [
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Two\nlines"},
    ]


def test_stop_keeps_the_partial_reply_and_hangs_up_upstream(chat_page, upstream):
    tokens = [f"w{i} " for i in range(50)]
    upstream.reset(tokens=tokens, delay=0.1)
    say(chat_page, "Go on")
    expect(reply_text(chat_page)).to_contain_text("w3")

    chat_page.get_by_role("button", name="Stop").click()

    expect(reply_note(chat_page)).to_have_text("Stopped.")
    assert upstream.received[0].hung_up.wait(5), "the server did not close its upstream request"
    partial = reply_text(chat_page).text_content()
    assert partial.startswith("w0 w1 w2 w3 ") and partial != "".join(tokens)
    time.sleep(0.3)  # three more token intervals: nothing more may appear
    assert reply_text(chat_page).text_content() == partial
    expect(chat_page.get_by_label("Message")).to_be_enabled()
    expect(chat_page.get_by_role("button", name="Send")).to_be_visible()


def test_heartbeats_in_a_silence_are_not_shown(fast_gunicorn, page, upstream):
    """fast_gunicorn pings every 0.25 s: a 1 s silence before the first token brings ": ping" lines."""
    upstream.reset(tokens=["after ", "the silence"], hold=1.0)
    page.goto(fast_gunicorn.url + "/")
    say(page, "Hi")

    expect(reply_note(page)).to_contain_text("tokens")
    assert reply_text(page).text_content() == "after the silence"


@pytest.mark.parametrize(
    "script, message",
    [
        ({"cut_after": 2}, "The connection to the model was lost."),
        ({"error_after": 2}, "The model stopped with an error."),
    ],
    ids=["connection-cut", "error-chunk"],
)
def test_an_upstream_failure_mid_reply_is_shown(chat_page, upstream, script, message):
    upstream.reset(tokens=["tok0 ", "tok1 ", "tok2 "], **script)
    say(chat_page, "Hi")

    expect(reply_note(chat_page)).to_have_text(message)
    assert reply(chat_page).get_attribute("data-state") == "error"
    assert reply_text(chat_page).text_content() == "tok0 tok1 "  # what came before stays
    assert "internal upstream detail" not in chat_page.content()


def test_rate_limit_says_when_to_try_again(chat_page, upstream):
    upstream.reset(status=429, headers={"Retry-After": "7"})  # over CHAT_RETRY_MAX_WAIT: passed on at once
    say(chat_page, "Hi")

    expect(reply_note(chat_page)).to_have_text("The model is busy right now. Please try again in 7 seconds.")
    expect(chat_page.get_by_label("Message")).to_have_value("Hi")  # back in the box, ready to resend


def test_model_output_is_text_never_markup(chat_page, upstream):
    tokens = ["<img src=x onerror=window.__xss=1>", " <b>bold</b>", " <script>window.__xss=2</script>"]
    upstream.reset(tokens=tokens)
    say(chat_page, "Hi")

    expect(reply_text(chat_page)).to_have_text("".join(tokens))
    assert chat_page.locator("#conversation img, #conversation b, #conversation script").count() == 0
    assert chat_page.evaluate("window.__xss") is None


# --- Errors before the stream, as the service (or a proxy in front of it) answers them ----------
#
# page.route answers in place of the server: each status as the page must word it, without
# arranging the server state that produces it.


@pytest.mark.parametrize(
    "status, code, server_says, retry_after, shown",
    [
        (503, "too_many_streams", "x", "3", "too many conversations right now. Please try again in 3 seconds."),
        (429, "rate_limited", "x", "1", "The model is busy right now. Please try again in 1 second."),
        (429, "rate_limited", "x", None, "The model is busy right now. Please try again shortly."),
        (504, "upstream_timeout", "The model stopped answering.", None, "The model stopped answering."),
        (413, "body_too_large", "x", None, "The conversation is too long to send."),
        (400, "upstream_rejected", "Context too long.", None, "The request was refused: Context too long."),
        (502, None, None, None, "The server answered with an error (HTTP 502)."),  # a proxy's own HTML page
    ],
)
def test_http_errors_are_shown_in_words(chat_page, status, code, server_says, retry_after, shown):
    if code:
        content, content_type = json.dumps({"error": {"message": server_says, "code": code}}), "application/json"
    else:
        content, content_type = "<html><body>Bad Gateway</body></html>", "text/html"
    headers = {"Retry-After": retry_after} if retry_after else {}
    chat_page.route(
        "**/api/chat",
        lambda route: route.fulfill(status=status, headers=headers, body=content, content_type=content_type),
    )
    say(chat_page, "Hi")

    expect(reply_note(chat_page)).to_contain_text(shown)
    assert reply(chat_page).get_attribute("data-state") == "error"


@pytest.fixture
def token_gunicorn(start_gunicorn):
    """gunicorn whose /api/chat wants `Authorization: Bearer s3cret` (CHAT_API_TOKEN)."""
    return start_gunicorn({"CHAT_API_TOKEN": "s3cret"}, name="token")


def test_a_token_is_asked_for_and_kept_when_the_server_wants_one(token_gunicorn, page, upstream):
    upstream.reset(tokens=["Welcome."])
    page.goto(token_gunicorn.url + "/")
    expect(page.get_by_label("Access token")).to_be_hidden()

    say(page, "Hi")
    expect(reply_note(page)).to_have_text("This chat needs an access token. Enter it below and send again.")
    page.get_by_label("Access token").fill("wrong")
    page.get_by_label("Message").press("Enter")  # the message came back to the box
    expect(reply_note(page)).to_have_text("The access token was not accepted. Check it below and send again.")
    page.get_by_label("Access token").fill("s3cret")
    page.get_by_label("Message").press("Enter")

    expect(reply_text(page)).to_have_text("Welcome.")
    assert len(upstream.received) == 1  # the refused tries never reached the model
    page.reload()  # kept for the tab's life
    expect(page.get_by_label("Access token")).to_have_value("s3cret")


# --- The stream parser on its own ---------------------------------------------------------------


def test_the_parser_survives_any_split_of_the_stream(page, gunicorn):
    """Feed readEvents() one byte per read: lines, \\r\\n pairs and UTF-8 characters all split."""
    page.goto(gunicorn.url + "/")
    stream = (
        ": ok\r\n\r\n"
        'data: {"content": "응답"}\r\n\r\n'
        ": ping\n"
        'data: {"content": "a\\nb"}\n\n'
        "data: [DONE]\n\n"
        "data: never ended"
    )
    events = page.evaluate(
        """async (text) => {
            const bytes = new TextEncoder().encode(text);
            const body = new ReadableStream({
                start(controller) {
                    for (const byte of bytes) controller.enqueue(new Uint8Array([byte]));
                    controller.close();
                },
            });
            const events = [];
            for await (const data of readEvents(body)) events.push(data);
            return events;
        }""",
        stream,
    )
    assert events == ['{"content": "응답"}', '{"content": "a\\nb"}', "[DONE]"]


# --- Mounted in another app ----------------------------------------------------------------------


@pytest.fixture
def host_app(start_gunicorn):
    """gunicorn serving tests/host_app.py: an existing app with the blueprint under /assistant."""
    return start_gunicorn(name="host", app="tests.host_app:host", ready_path="/assistant/healthz")


def test_the_page_works_under_a_url_prefix(host_app, page, upstream):
    upstream.reset(tokens=["Mounted ", "and ", "streaming."])
    page.goto(host_app.url + "/assistant")  # Flask redirects to /assistant/, so relative URLs resolve

    say(page, "Hi")

    expect(reply_text(page)).to_have_text("Mounted and streaming.")
    assert page.url == host_app.url + "/assistant/"
    assert upstream.received[0].path == "/v1/chat/completions"


# --- How it looks, and how fast it shows ----------------------------------------------------------


def test_screenshots_of_a_conversation_on_desktop_and_phone(chat_page, upstream):
    """Save test-artifacts/chat.png and chat-phone.png; at phone width nothing may scroll sideways."""
    upstream.reset(tokens=["Server-Sent Events ", "stream ", "the reply ", "token by token, ", "so it types itself."])
    say(chat_page, "How does this page show the reply?")
    expect(reply_note(chat_page)).to_contain_text("tokens")
    upstream.script.tokens = ["A long word does not widen the page: ", "x" * 120, "\nNew lines stay."]
    say(chat_page, "And a very long word?")
    expect(reply_note(chat_page)).to_contain_text("tokens")

    ARTIFACTS.mkdir(exist_ok=True)
    chat_page.screenshot(path=ARTIFACTS / "chat.png", full_page=True)
    chat_page.set_viewport_size(PHONE)
    chat_page.screenshot(path=ARTIFACTS / "chat-phone.png", full_page=True)

    assert chat_page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    expect(chat_page.get_by_label("Message")).to_be_in_viewport()
    expect(chat_page.get_by_role("button", name="Send")).to_be_in_viewport()


SHOWN = """() => {
    // Record when each change to the reply reaches the DOM, and the next frame after it (a paint
    // follows that frame). Wall-clock milliseconds, to compare with the test's time.time().
    window.shown = [];
    const now = () => performance.timeOrigin + performance.now();
    new MutationObserver(() => {
        const text = document.querySelector(".message.assistant .text")?.textContent ?? "";
        const entry = { text, dom: now(), frame: null };
        window.shown.push(entry);
        requestAnimationFrame(() => { entry.frame = now(); });
    }).observe(document.getElementById("conversation"), { subtree: true, childList: true, characterData: true });
}"""


def test_token_to_screen_delay(chat_page, upstream):
    """Measure upstream write -> text in the page; report it, assert only a coarse bound."""
    tokens = [f"m{i} " for i in range(40)]
    upstream.reset(tokens=tokens, delay=0.05)
    chat_page.evaluate(SHOWN)
    # Both sides use the system's wall clock: check they agree within one round trip to the page.
    before = time.time() * 1000
    page_now = chat_page.evaluate("performance.timeOrigin + performance.now()")
    after = time.time() * 1000
    assert before - 2 <= page_now <= after + 2, (before, page_now, after)
    wall_minus_monotonic = time.time() - time.monotonic()
    say(chat_page, "Hi")
    # Sleep, not poll, while it streams: the fake upstream notes each send time in a thread of this
    # process, which polling would slow down (the GIL), making the sends look later than they were.
    time.sleep(len(tokens) * 0.05 + 0.3)
    expect(reply_note(chat_page)).to_contain_text("tokens")

    shown = chat_page.evaluate("window.shown")
    sent = [(t + wall_minus_monotonic) * 1000 for t in upstream.received[0].sent]
    dom_delays, frame_delays = [], []
    for i, sent_at in enumerate(sent):
        complete = "".join(tokens[: i + 1])
        first = next(entry for entry in shown if entry["text"].startswith(complete))
        dom_delays.append(first["dom"] - sent_at)
        frame_delays.append(first["frame"] - sent_at)

    report = (
        f"token -> DOM: median {statistics.median(dom_delays):.1f} ms, max {max(dom_delays):.1f} ms, "
        f"min {min(dom_delays):.1f} ms; "
        f"token -> next frame: median {statistics.median(frame_delays):.1f} ms, max {max(frame_delays):.1f} ms "
        f"({len(sent)} tokens, 50 ms apart, upstream -> gunicorn -> Chromium on 127.0.0.1)"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "token-latency.txt").write_text(report + "\n")
    print(report)
    assert len(dom_delays) == len(tokens)
    # Never much below zero: the send time is noted just after the write, so it can trail it a little.
    assert min(dom_delays) > -5
    assert statistics.median(dom_delays) < 250  # coarse: shown as it streams, not batched
