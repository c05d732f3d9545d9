"""The SSE clients front ends use, unchanged, against a live gunicorn: each must rebuild the reply exactly.

Native format: @microsoft/fetch-event-source and eventsource-parser (Node), httpx-sse (Python).
The AI SDK's UI message stream: the Chat that useChat makes, with DefaultChatTransport (Node).
The JavaScript clients are pinned in tests/package.json (`npm ci` in tests/); each script in
tests/clients/ prints what its client rebuilt as JSON.
"""

import json
import re
import select
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from live_servers import ROOT

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


class SplitReads:
    """A TCP proxy that passes the server's bytes on one at a time, each in its own segment.

    The client then reads every multi-byte character, and every line, in pieces: what any
    network may do to a stream, and what a client that decodes or splits per read gets wrong.
    """

    def __init__(self, port, pause=0.0005):
        self.port, self.pause = port, pause
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed by stop()
                return
            server = socket.create_connection(("127.0.0.1", self.port))
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self.pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self.pipe, args=(server, client, True), daemon=True).start()

    def pipe(self, source, target, split):
        """Copy until either side closes, then close both (HTTP clients never half-close)."""
        try:
            while data := source.recv(65536):
                if not split:
                    target.sendall(data)
                    continue
                for i in range(len(data)):
                    target.sendall(data[i : i + 1])
                    time.sleep(self.pause)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def stop(self):
        self.listener.close()


@pytest.fixture(scope="module")
def split_reads(gunicorn):
    """The live gunicorn, behind a proxy that splits every byte of its replies into its own read."""
    proxy = SplitReads(gunicorn.port)
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


def test_native_client_abort_closes_the_upstream(native, gunicorn, upstream):
    """Stopping the reply in the client hangs up on the model: no tokens are paid for after it."""
    upstream.reset(tokens=[f"w{i} " for i in range(100)], delay=0.05)
    with native.stopping(gunicorn.url + "/api/chat", HI) as result:
        assert result["reply"].startswith("w0 ")
        [received] = upstream.received
        assert received.hung_up.wait(5), "the upstream was not closed after the client stopped"
        assert len(received.sent) < 100


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


def test_ai_sdk_chat_stop_closes_the_upstream(js_clients, gunicorn, upstream):
    """useChat's stop() hangs up on the model: no tokens are paid for after it."""
    upstream.reset(tokens=[f"w{i} " for i in range(100)], delay=0.05)
    config = {"url": gunicorn.url + "/api/ui-chat", "turns": [{"text": "Hi"}], "stopAfter": 1}
    with stopping_script(js_clients, "ai_sdk_chat.mjs", config) as chat:
        assert chat["status"] == "ready"
        assert chat["messages"][-1]["parts"][0]["text"].startswith("w0 ")
        [received] = upstream.received
        assert received.hung_up.wait(5), "the upstream was not closed after the chat stopped"
        assert len(received.sent) < 100


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
