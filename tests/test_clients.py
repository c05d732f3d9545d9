"""The SSE clients front ends use, unchanged, against a live gunicorn: each must rebuild the reply exactly.

Native format: @microsoft/fetch-event-source and eventsource-parser (Node), httpx-sse (Python).
The AI SDK's UI message stream: the Chat that useChat makes, with DefaultChatTransport (Node).
The JavaScript clients are pinned in tests/package.json (`npm ci` in tests/); each script in
tests/clients/ prints what its client rebuilt as JSON.
"""

import json
import re
import select
import shlex
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from live_servers import ROOT, Gunicorns, unavailable, wait_for
from tcp_proxy import TcpProxy

CLIENTS = Path(__file__).with_name("clients")
JS_SCRIPTS = {"fetch-event-source": "fetch_event_source.mjs", "eventsource-parser": "eventsource_parser.mjs"}
NATIVE_CLIENTS = [*JS_SCRIPTS, "httpx-sse"]

# Korean, emoji with a skin tone, a ZWJ sequence and a combining accent split across tokens, the
# line separators some splitters cut at, quotes, backslashes and newlines.
TOKENS = [
    "안녕",
    "하세요",
    "! 👋🏽",
    " 👩\u200d",
    "💻 e",
    "\u0301 ",
    "\u2028a\u2029b\u0085c",
    ' "q" \\ ',
    "new\nline\r\n",
    "끝.",
]
REASONING = ["생각", " 중… 🤔", "\n\u2028done"]
USAGE = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
HI = {"messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="module")
def no_resume_gunicorn(fake_upstream_server, tmp_path_factory):
    """gunicorn with CHAT_RESUME_SECONDS=0: a reader that leaves stops the reply at once, as before resuming."""
    with Gunicorns(tmp_path_factory, fake_upstream_server.url) as gunicorns:
        yield gunicorns.start({"CHAT_RESUME_SECONDS": "0"}, name="no-resume")


@pytest.fixture(scope="module")
def split_reads(gunicorn):
    """The live gunicorn, behind a proxy that splits every byte of its replies into its own read.

    The client then reads every multi-byte character, and every line, in pieces: what any
    network may do to a stream, and what a client that decodes or splits per read gets wrong.
    """
    proxy = TcpProxy(gunicorn.port, split=True)
    yield proxy
    proxy.stop()


# --- The clients ------------------------------------------------------------------------------


def read_with_httpx_sse(url, body, stop_after=None):
    """httpx-sse 0.4.3 as its README shows: connect_sse, then iter_sse; a break closes the response."""
    result = {"reply": "", "reasoning": "", "end": None, "error": None, "done": False}
    content_events = 0
    with httpx.Client(timeout=30) as client, connect_sse(client, "POST", url, json=body) as source:
        if source.response.is_error:
            source.response.read()
            result["error"] = source.response.json()["error"]["message"]
            return result
        for sse in source.iter_sse():
            if sse.data == "[DONE]":
                result["done"] = True
                continue
            event = sse.json()
            result["reply"] += event["content"]
            result["reasoning"] += event.get("reasoning", "")
            result["error"] = event.get("error", result["error"])
            if "finish_reason" in event:
                result["end"] = event
            content_events += bool(event["content"])
            if content_events == stop_after:
                break
    return result


def run_script(node, script, config, timeout=60):
    """Run one of tests/clients/ to its end and return what it printed."""
    result = subprocess.run(
        [node, str(CLIENTS / script), json.dumps(config)], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@contextmanager
def stopping_script(node, script, config, timeout=30):
    """Run a client that stops its reply; yield what it printed while its process is still alive."""
    process = subprocess.Popen(
        [node, str(CLIENTS / script), json.dumps(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        assert ready, f"{script} printed nothing in {timeout}s"
        line = process.stdout.readline()
        assert line, process.stderr.read()
        yield json.loads(line)
        assert process.poll() is None, "the client exited: its exit, not its abort, may have closed the stream"
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()


class NativeClient:
    """One client of the native format, by name: httpx-sse in this process, the others in Node."""

    def __init__(self, name, node):
        self.name, self.node = name, node

    def read(self, url, body):
        """Read a reply to its end; return what the client rebuilt."""
        if self.name == "httpx-sse":
            return read_with_httpx_sse(url, body)
        return run_script(self.node, JS_SCRIPTS[self.name], {"url": url, "body": body})

    @contextmanager
    def stopping(self, url, body):
        """Read one content event and stop; yield what the client rebuilt."""
        if self.name == "httpx-sse":
            yield read_with_httpx_sse(url, body, stop_after=1)
            return
        with stopping_script(self.node, JS_SCRIPTS[self.name], {"url": url, "body": body, "stopAfter": 1}) as result:
            yield result


@pytest.fixture(params=NATIVE_CLIENTS)
def native(request):
    """Each client of the native format in turn."""
    node = request.getfixturevalue("js_clients") if request.param in JS_SCRIPTS else None
    return NativeClient(request.param, node)


# --- The native format ------------------------------------------------------------------------


def test_native_client_rebuilds_the_reply_exactly(native, split_reads, upstream):
    """Content and reasoning come out exactly as the model sent them, though every read splits a character."""
    upstream.reset(tokens=TOKENS, reasoning=REASONING)
    result = native.read(split_reads.url + "/api/chat", HI)

    assert result == {
        **result,
        "reply": "".join(TOKENS),
        "reasoning": "".join(REASONING),
        "end": {"content": "", "finish_reason": "stop", "usage": USAGE},
        "error": None,
        "done": True,
    }
    assert len(upstream.received) == 1


def test_native_client_gets_the_error_event(native, gunicorn, upstream):
    """A stream that fails after it began ends with a sentence, the text so far intact, and no [DONE]."""
    upstream.reset(tokens=TOKENS, cut_after=3)
    result = native.read(gunicorn.url + "/api/chat", HI)

    assert result["reply"] == "".join(TOKENS[:3])
    assert result["error"] == "The connection to the model was lost."
    assert result["done"] is False
    assert len(upstream.received) == 1


def test_native_client_refused_before_the_stream_asks_once(native, gunicorn, upstream):
    """A refusal is an HTTP status the client shows in words; fetch-event-source must not send the chat again."""
    upstream.reset(status=429, headers={"Retry-After": "60"})
    result = native.read(gunicorn.url + "/api/chat", HI)

    assert result["error"] == "The model is busy. Please try again shortly."
    assert result["reply"] == ""
    if native.name == "fetch-event-source":
        time.sleep(1.5)  # its default onerror would send the chat again after 1 s
    assert len(upstream.received) == 1


def test_native_client_abort_closes_the_upstream(native, no_resume_gunicorn, upstream):
    """With CHAT_RESUME_SECONDS=0, a client that lets go of the reply hangs up on the model."""
    upstream.reset(tokens=[f"w{i} " for i in range(100)], delay=0.05)
    with native.stopping(no_resume_gunicorn.url + "/api/chat", HI) as result:
        assert result["reply"].startswith("w0 ")
        [received] = upstream.received
        assert received.hung_up.wait(5), "the upstream was not closed after the client stopped"
        assert len(received.sent) < 100


def test_fetch_event_source_stop_endpoint_closes_the_upstream(js_clients, gunicorn, upstream):
    """With resuming on (the default), closing the connection leaves the reply going for a reader
    that may come back; the README's stop posts to api/chat/<X-Stream-Id>/stop, which ends it."""
    upstream.reset(tokens=[f"w{i} " for i in range(100)], delay=0.05)
    config = {"url": gunicorn.url + "/api/chat", "body": HI, "stopAfter": 1, "stop": "endpoint"}
    with stopping_script(js_clients, "fetch_event_source.mjs", config) as result:
        assert result["reply"].startswith("w0 ")
        [received] = upstream.received
        assert received.hung_up.wait(5), "the upstream was not closed after the client stopped"
        assert len(received.sent) < 100


def test_fetch_event_source_resumes_after_the_tab_was_hidden(js_clients, gunicorn, upstream):
    """openWhenHidden: false closes the stream when the tab is hidden and, shown again, sends the same
    POST with Last-Event-ID: the service answers with the rest of the same reply, not a new one."""
    upstream.reset(tokens=TOKENS, delay=0.1)
    config = {"url": gunicorn.url + "/api/chat", "body": HI, "hideAfter": 3}
    result = run_script(js_clients, "fetch_event_source.mjs", config)

    assert result == {**result, "reply": "".join(TOKENS), "error": None, "done": True}
    assert (result["requests"], result["resumed"]) == (2, 1)
    assert len(upstream.received) == 1  # one generation, paid once


def test_the_articles_client_reads_the_reply_with_ids_and_retry_on_the_wire(node, gunicorn, upstream):
    """The article's client appends `content` of every `data:` line: the `id:` and `retry:` lines
    resuming adds pass it by (a proxy keeps what the server sent, to show they were there)."""
    tokens = ["Stream", "ing ", "응답", " with\nnew", "lines ", 'and "quotes"', "."]
    upstream.reset(tokens=tokens, delay=0.01)
    proxy = TcpProxy(gunicorn.port)
    try:
        result = subprocess.run(
            [node, str(ROOT / "tests" / "classic_client.mjs"), proxy.url + "/api/chat"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        proxy.stop()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == "".join(tokens)
    assert re.search(rb"\r?\nretry: \d+\r?\nid: \S+\r?\ndata: ", proxy.sent), bytes(proxy.sent[:500])
    assert len(re.findall(rb"\nid: ", proxy.sent)) >= len(tokens)


# --- The AI SDK: the Chat that useChat makes, with DefaultChatTransport -----------------------

PIXEL = (  # a 1x1 PNG
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="
)


def chat_with_ai_sdk(node, base_url, turns, **options):
    """Send each turn with Chat.sendMessage, as useChat's sendMessage does; return the chat's state."""
    return run_script(node, "ai_sdk_chat.mjs", {"url": base_url + "/api/ui-chat", "turns": turns, **options})


def test_ai_sdk_chat_rebuilds_the_reply_exactly(js_clients, split_reads, upstream):
    """Reasoning and text become the message's parts, exactly, though every read splits a character."""
    upstream.reset(tokens=TOKENS, reasoning=REASONING)
    chat = chat_with_ai_sdk(js_clients, split_reads.url, [{"text": "Hi"}])

    assert chat["status"] == "ready"
    assert chat["error"] is None
    user, assistant = chat["messages"]
    assert user["parts"] == [{"type": "text", "text": "Hi"}]
    assert assistant["role"] == "assistant"
    assert assistant["parts"] == [
        {"type": "reasoning", "id": "0", "text": "".join(REASONING), "state": "done"},
        {"type": "text", "text": "".join(TOKENS), "state": "done"},
    ]
    assert assistant["metadata"] == {"usage": USAGE}


def test_ai_sdk_chat_sends_the_conversation(js_clients, gunicorn, upstream):
    """The second turn carries the first reply back as text, its reasoning left out."""
    upstream.reset(tokens=["Hello", "!"], reasoning=["A greeting."])
    chat = chat_with_ai_sdk(js_clients, gunicorn.url, [{"text": "Hi"}, {"text": "How are you?"}])

    assert chat["status"] == "ready"
    assert [message["role"] for message in chat["messages"]] == ["user", "assistant", "user", "assistant"]
    first, second = upstream.received
    assert first.body["messages"] == [{"role": "user", "content": "Hi"}]
    assert second.body["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]


def test_ai_sdk_chat_sends_an_attached_image(js_clients, gunicorn, upstream):
    """sendMessage({text, files}) with an image: the upstream gets it as an image part, before the text."""
    image = {"type": "file", "mediaType": "image/png", "filename": "dot.png", "url": PIXEL}
    chat = chat_with_ai_sdk(js_clients, gunicorn.url, [{"text": "What is this?", "files": [image]}])

    assert chat["status"] == "ready"
    [received] = upstream.received
    assert received.body["messages"] == [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": PIXEL}}, {"type": "text", "text": "What is this?"}],
        }
    ]


def test_ai_sdk_chat_shows_the_error_event(js_clients, gunicorn, upstream):
    """A stream that fails after it began: the chat's error is the sentence, the text so far stays."""
    upstream.reset(tokens=TOKENS, cut_after=3)
    chat = chat_with_ai_sdk(js_clients, gunicorn.url, [{"text": "Hi"}])

    assert chat["status"] == "error"
    assert chat["error"] == "The connection to the model was lost."
    assert chat["errors"] == ["The connection to the model was lost."]  # onError, once
    assert chat["messages"][-1]["parts"] == [{"type": "text", "text": "".join(TOKENS[:3]), "state": "streaming"}]


@pytest.mark.parametrize(
    ("script", "options", "status", "sentence"),
    [
        ({"status": 429, "headers": {"Retry-After": "60"}}, {}, 429, "The model is busy. Please try again shortly."),
        ({}, {"body": {"model": "gpt-9"}}, 400, "Unknown model: gpt-9. Allowed: gpt-test, other."),
    ],
    ids=["upstream busy", "unknown model"],
)
def test_ai_sdk_chat_shows_a_refusal_as_a_sentence(js_clients, gunicorn, upstream, script, options, status, sentence):
    """useChat's error (and onError) gets the sentence itself: the SDK uses a refused request's body as is."""
    upstream.reset(**script)
    chat = chat_with_ai_sdk(js_clients, gunicorn.url, [{"text": "Hi"}], **options)

    assert chat["status"] == "error"
    assert chat["error"] == sentence
    assert len(upstream.received) == (1 if status == 429 else 0)


@pytest.mark.parametrize("stop", ["abort", "endpoint"])
def test_ai_sdk_chat_stop_closes_the_upstream(js_clients, gunicorn, no_resume_gunicorn, upstream, stop):
    """useChat's stop() only aborts the fetch: that hangs up on the model with CHAT_RESUME_SECONDS=0.
    With resuming on (the default), the README's stop also posts to the stop endpoint, which does."""
    upstream.reset(tokens=[f"w{i} " for i in range(100)], delay=0.05)
    server = gunicorn if stop == "endpoint" else no_resume_gunicorn
    config = {"url": server.url + "/api/ui-chat", "turns": [{"text": "Hi"}], "stopAfter": 1, "stop": stop}
    with stopping_script(js_clients, "ai_sdk_chat.mjs", config) as chat:
        assert chat["status"] == "ready"
        assert chat["messages"][-1]["parts"][0]["text"].startswith("w0 ")
        [received] = upstream.received
        assert received.hung_up.wait(5), "the upstream was not closed after the chat stopped"
        assert len(received.sent) < 100


def test_ai_sdk_chat_with_resume_rebuilds_a_reply_after_a_cut(js_clients, gunicorn, upstream):
    """A cut mid-reply, then a new Chat with the same id and the question, as useChat({ resume: true })
    makes after a reload: resumeStream() (GET api/ui-chat/<id>/stream) replays the reply, whole."""
    upstream.reset(tokens=TOKENS, delay=0.1)
    proxy = TcpProxy(gunicorn.port)
    config = {"url": proxy.url + "/api/ui-chat", "turns": [{"text": "Hi"}], "resume": True, "id": "chat-17"}
    process = subprocess.Popen(
        [js_clients, str(CLIENTS / "ai_sdk_chat.mjs"), json.dumps(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: upstream.received and len(upstream.received[0].sent) >= 4, timeout=10)
        proxy.cut()
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        proxy.stop()
    assert process.returncode == 0, stderr
    chat = json.loads(stdout)

    assert chat["cut"]["status"] == "error"
    cut_text = chat["cut"]["messages"][-1]["parts"][0]["text"]
    assert cut_text and "".join(TOKENS).startswith(cut_text) and cut_text != "".join(TOKENS)
    assert chat["status"] == "ready"
    user, assistant = chat["messages"]
    assert user["parts"] == [{"type": "text", "text": "Hi"}]
    assert assistant["parts"] == [{"type": "text", "text": "".join(TOKENS), "state": "done"}]
    assert len(upstream.received) == 1


# --- The README's snippets, as written ---------------------------------------------------------


def readme_snippet(containing):
    """Return the README's JavaScript block that contains `containing`."""
    blocks = re.findall(r"```js\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    [block] = [block for block in blocks if containing in block]
    return block


def run_snippet(node, code, url):
    """Run a README snippet against `url` as an ES module; return the `reply` it rebuilt."""
    program = code.replace("'/api/chat'", json.dumps(url)) + "\nprocess.stdout.write(JSON.stringify(reply));\n"
    # cwd: Node resolves the snippet's imports from tests/node_modules, as for the scripts beside it
    result = subprocess.run(
        [node, "--input-type=module", "-e", program], cwd=CLIENTS, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_readmes_fetch_snippet_with_the_pages_read_events(js_clients, split_reads, upstream):
    """The README's plain-fetch snippet, with readEvents() copied from static/chat.js as it says."""
    page = (ROOT / "static" / "chat.js").read_text()
    read_events = re.search(r"^async function\* readEvents\(body\) \{\n.*?^\}\n", page, re.M | re.S)
    assert read_events, "static/chat.js has no readEvents(body)"
    upstream.reset(tokens=TOKENS, reasoning=REASONING)
    snippet = read_events.group(0) + readme_snippet("readEvents(response.body)")

    assert run_snippet(js_clients, snippet, split_reads.url + "/api/chat") == "".join(TOKENS)


def test_the_readmes_fetch_event_source_snippet(js_clients, split_reads, upstream):
    """The README's fetch-event-source snippet as written, after the plain-fetch one's first two lines.

    Node has no window or document, which fetchEventSource calls whatever its options: two stand-ins.
    """
    upstream.reset(tokens=TOKENS, reasoning=REASONING)
    prelude = "globalThis.window = globalThis;\nglobalThis.document = new EventTarget();\n"
    prelude += "const controller = new AbortController();\nlet reply = '';\n"
    snippet = prelude + readme_snippet("fetchEventSource(")

    assert run_snippet(js_clients, snippet, split_reads.url + "/api/chat") == "".join(TOKENS)


def test_the_readmes_cookie_keeping_fetch_is_the_one_the_node_clients_use():
    """The README's fetchKeepingCookies for Node is tests/clients/keep_cookies.mjs's, which the tests run."""
    used = (CLIENTS / "keep_cookies.mjs").read_text()
    function = re.search(r"^export (async function fetchKeepingCookies.*?^\}\n)", used, re.M | re.S)
    assert function, "keep_cookies.mjs has no fetchKeepingCookies"
    assert "let cookie = '';\n" + function.group(1) == readme_snippet("fetchKeepingCookies")


def readme_commands(containing, url):
    """The README's shell block that contains `containing`, one command a line, pointed at `url`."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    [block] = [block for block in blocks if containing in block]
    lines = block.replace("\\\n", " ").replace("http://127.0.0.1:8000", url).splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def test_the_readmes_curl_commands_resume_and_stop_with_the_cookie_jar(gunicorn, upstream, tmp_path):
    """Start a reply with curl, cut it, get the rest with Last-Event-ID and the jar's cookie, stop it."""
    if shutil.which("curl") is None:
        unavailable("curl is not installed (.ci/run installs it)")
    start, rest, stop = readme_commands("-c jar", gunicorn.url)
    tokens = [f"t{i} " for i in range(20)]
    upstream.reset(tokens=tokens, delay=0.1)

    first = subprocess.run(shlex.split(start), cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert first.returncode == 28, first.stderr  # curl's "operation timed out": the --max-time cut
    head, body = first.stdout.split("\n\n", 1)  # text mode: \r\n reads as \n
    [stream_id] = re.findall(r"(?im)^x-stream-id: (\S+)", head)
    events = [dict(line.split(": ", 1) for line in block.splitlines() if ": " in line) for block in body.split("\n\n")]
    events = events[:-1]  # what follows the last blank line is an event cut in half: not shown, as in any client
    shown = "".join(json.loads(event["data"])["content"] for event in events)
    event_id = events[-1]["id"]
    assert 0 < len(shown) < len("".join(tokens))

    def filled(command):
        return shlex.split(command.replace("<event id>", event_id).replace("<stream id>", stream_id))

    resumed = subprocess.run(filled(rest), cwd=tmp_path, capture_output=True, text=True, timeout=30)
    data = [line[6:] for line in resumed.stdout.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert shown + "".join(json.loads(event)["content"] for event in data[:-1]) == "".join(tokens)
    stopped = subprocess.run(filled(stop) + ["-s", "-w", "%{http_code}"], cwd=tmp_path, capture_output=True, text=True)
    assert stopped.stdout == "204"  # a finished reply: stopping it again is no error
    assert len(upstream.received) == 1
