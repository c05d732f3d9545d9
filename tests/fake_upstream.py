"""A fake OpenAI-compatible upstream on 127.0.0.1, scripted per test.

It speaks the wire, not the SDK: chunked `text/event-stream` in OpenAI's chunk format, recording
what it received and when its client hung up.
"""

import json
import select
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_KEY = "sk-test-0123456789abcdef-SECRET"  # the key the servers under test are given; tests assert it never leaks


@dataclass
class Script:
    """What the fake upstream does with the next requests."""

    tokens: list | None = field(default_factory=lambda: [f"tok{i} " for i in range(5)])  # None: echo
    delay: float = 0.0  # seconds before each token
    hold: float = 0.0  # seconds of silence after the headers, before the first token
    stall_headers: float = 0.0  # seconds before even the status line
    stall_at: int | None = None  # before this token, a silence of `stall` seconds
    stall: float = 0.0
    status: int = 200  # anything else: answer with this status and an OpenAI error body
    headers: dict = field(default_factory=dict)  # extra response headers (e.g. Retry-After)
    error_message: str = "upstream says no"
    cut_after: int | None = None  # drop the connection after this many tokens, mid-body
    error_after: int | None = None  # send an in-stream error chunk after this many tokens
    finish_reason: str = "stop"
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14})
    reasoning: list = field(default_factory=list)  # thinking deltas, sent before the tokens
    reasoning_field: str = "reasoning_content"  # or "reasoning" (vLLM, Ollama)
    hold_open: float = 0.0  # seconds the body stays open after [DONE], before its last chunk
    huge_line: int = 0  # after the first token, this many bytes of one line that never ends
    content_length: bool = False  # the whole body at the end, with a Content-Length instead of chunks
    reject_stream_options: bool = False  # a 400 naming stream_options when a request has it (old Azure, Ollama)
    odd_events: list = field(default_factory=list)  # JSON values sent as data lines before the tokens, as they are
    raw_events: list = field(default_factory=list)  # bytes sent in a chunk each before the tokens, as they are
    raw_framing: bytes = b""  # after the first token: these bytes, outside any chunk, then silence until hung up
    # The Responses API (POST /v1/responses) only:
    summary_parts: list = field(default_factory=list)  # reasoning summary parts, each a list of deltas
    reasoning_text: list = field(default_factory=list)  # reasoning_text deltas (vLLM's thinking itself)
    ending: str = "completed"  # or "incomplete", "failed", "error" (an error event after the first token)
    incomplete_reason: str = "max_output_tokens"
    refusal: list = field(default_factory=list)  # refusal deltas, sent instead of the tokens
    tool_call: bool = False  # a function_call output item, which a service that asks for no tools never expects
    gateway_done: bool = False  # a [DONE] after response.completed, as some gateways add
    reject_reasoning: str = ""  # "summary": a 400 for reasoning.summary (an unverified organization); "effort"
    byte_by_byte: bool = False  # every byte of the event stream in an HTTP chunk of its own


@dataclass
class Received:
    """One request the fake upstream received, and how it ended."""

    path: str
    client_port: int  # the same port on two requests: the connection was reused
    headers: object  # an email.message.Message: case-insensitive lookups
    body: dict
    hung_up: threading.Event = field(default_factory=threading.Event)  # the client closed first
    hung_up_at: float | None = None
    finished: threading.Event = field(default_factory=threading.Event)  # the handler returned
    sent: list = field(default_factory=list)  # monotonic time each token was written


class ClientLeft(Exception):
    """The service hung up on the fake upstream (as upstream.ClientLeft is the browser hanging up on the service)."""


class FakeUpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        received = Received(self.path, self.client_address[1], self.headers, body)  # headers: case-insensitive
        server.received.append(received)
        script = server.script
        try:
            self.wait(script.stall_headers)
            if script.reject_stream_options and "stream_options" in body:
                message = "Unrecognized request argument supplied: stream_options"
                self.send_json_error(Script(status=400, error_message=message))
            elif script.status != 200:
                self.send_json_error(script)
            elif self.path.endswith("/responses"):
                if refused := refused_reasoning(script, body):
                    self.send_json_error(Script(status=400, error_message=refused[0]), refused[1])
                else:
                    self.send_responses_stream(script, received)
            else:
                self.send_stream(script, received)
        except ClientLeft:
            received.hung_up_at = time.monotonic()
            received.hung_up.set()
            self.close_connection = True
        finally:
            received.finished.set()

    def send_json_error(self, script, fields=None):
        error = {"message": script.error_message, "type": "x", "code": None, **(fields or {})}
        payload = json.dumps({"error": error}).encode()
        self.send_response(script.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in script.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def send_stream(self, script, received):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.body = [] if script.content_length else None  # send_chunk keeps what it is given, for the end
        if self.body is None:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
        model = received.body.get("model", "x")
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model}
        self.wait(script.hold)
        self.send_event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for thought in script.reasoning:
            self.wait(script.delay)
            delta = {script.reasoning_field: thought}
            self.send_event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            received.sent.append(time.monotonic())
        tokens = script.tokens
        if tokens is None:  # echo the last message word by word, so concurrent replies differ
            tokens = [word + " " for word in received.body["messages"][-1]["content"].split()]
        for odd in script.odd_events:
            self.send_chunk(b"data: " + json.dumps(odd).encode() + b"\n\n")
        for raw in script.raw_events:
            self.send_chunk(raw)
        for i, token in enumerate(tokens):
            if i == script.cut_after:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # no terminating chunk: a transport cut
                return
            if i == script.error_after:
                self.send_event({"error": {"message": "internal upstream detail", "type": "server_error"}})
                self.end_chunks()
                return
            self.wait(script.stall if i == script.stall_at else script.delay)
            self.send_event({**base, "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]})
            received.sent.append(time.monotonic())
            if i == 0 and script.huge_line:
                for _ in range(0, script.huge_line, 65536):
                    self.send_chunk(b"data: " + b"x" * 65536)
            if i == 0 and script.raw_framing:
                self.wfile.write(script.raw_framing)
                self.wfile.flush()
                self.wait(30)  # the relay must end the stream and hang up; this is the test's limit
                return
        self.send_event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": script.finish_reason}]})
        if (received.body.get("stream_options") or {}).get("include_usage"):
            self.send_event({**base, "choices": [], "usage": script.usage})
        self.send_chunk(b"data: [DONE]\n\n")
        self.wait(script.hold_open)
        self.end_chunks()

    def send_responses_stream(self, script, received):
        """The Responses API's stream: `event:` and `data:` lines, as openai.types.responses defines them."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.body = None
        self.wait(script.hold)
        for event in responses_events(script, received.body):
            if event["type"].endswith(".delta"):
                self.wait(script.delay)
                received.sent.append(time.monotonic())
            data = b"event: %s\ndata: %s\n\n" % (event["type"].encode(), json.dumps(event).encode())
            for piece in [data[i : i + 1] for i in range(len(data))] if script.byte_by_byte else [data]:
                self.send_chunk(piece)
        if script.gateway_done:
            self.send_chunk(b"data: [DONE]\n\n")
        self.end_chunks()

    def wait(self, seconds):
        """Sleep, but notice at once if the client closes the connection meanwhile."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.connection], [], [], left)
            if readable and self.client_closed():
                raise ClientLeft
        if self.client_closed():
            raise ClientLeft

    def client_closed(self):
        """True when the client sent FIN (EOF) or RST (a close with unread data in its buffer)."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        try:
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def send_event(self, payload):
        self.send_chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def send_chunk(self, data):
        if self.body is not None:
            self.body.append(data)
            return
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError:
            raise ClientLeft from None

    def end_chunks(self):
        if self.body is not None:
            self.send_header("Content-Length", str(sum(map(len, self.body))))
            self.end_headers()
            self.wfile.write(b"".join(self.body))
            return
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            raise ClientLeft from None


def refused_reasoning(script, body):
    """The 400 (message, fields) OpenAI gives for a reasoning object it will not take, or None."""
    reasoning = body.get("reasoning") or {}
    if script.reject_reasoning == "summary" and "summary" in reasoning:
        message = "Your organization must be verified to generate reasoning summaries."
        return message, {"type": "invalid_request_error", "param": "reasoning.summary", "code": "unsupported_value"}
    if script.reject_reasoning == "effort" and reasoning:
        message = "Unsupported parameter: 'reasoning.effort' is not supported with this model."
        return message, {"type": "invalid_request_error", "param": "reasoning.effort", "code": "unsupported_parameter"}
    return None


def responses_events(script, body):
    """Yield the events of one Responses stream for `script`, each a dict of an openai.types.responses type.

    tests/test_reading.py checks every one against the SDK's own types (ResponseStreamEvent).
    """
    numbers = iter(range(1_000_000))
    response = {
        "id": "resp_fake",
        "object": "response",
        "created_at": 1_760_000_000,
        "model": body.get("model", "x"),
        "status": "in_progress",
        "output": [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "temperature": 1.0,
        "top_p": 1.0,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "metadata": {},
        "usage": None,
    }

    def event(kind, **fields):
        return {"type": kind, "sequence_number": next(numbers), **fields}

    yield event("response.created", response=response)
    yield event("response.in_progress", response=response)
    output = []
    if script.summary_parts or script.reasoning_text:
        item = {"id": "rs_1", "type": "reasoning", "summary": [], "status": "in_progress"}
        yield event("response.output_item.added", output_index=0, item=item)
        for index, part in enumerate(script.summary_parts):
            where = {"item_id": "rs_1", "output_index": 0, "summary_index": index}
            yield event("response.reasoning_summary_part.added", **where, part={"type": "summary_text", "text": ""})
            for delta in part:
                yield event("response.reasoning_summary_text.delta", **where, delta=delta)
            text = "".join(part)
            yield event("response.reasoning_summary_text.done", **where, text=text)
            yield event("response.reasoning_summary_part.done", **where, part={"type": "summary_text", "text": text})
            item["summary"].append({"type": "summary_text", "text": text})
        for delta in script.reasoning_text:
            yield event("response.reasoning_text.delta", item_id="rs_1", output_index=0, content_index=0, delta=delta)
        item = {**item, "status": "completed"}
        yield event("response.output_item.done", output_index=0, item=item)
        output.append(item)
    index = len(output)
    if script.tool_call:
        call = {"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "f", "arguments": ""}
        yield event("response.output_item.added", output_index=index, item=call)
    message = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    yield event("response.output_item.added", output_index=index, item=message)
    where = {"item_id": "msg_1", "output_index": index, "content_index": 0}
    if script.refusal:
        yield event("response.content_part.added", **where, part={"type": "refusal", "refusal": ""})
        for delta in script.refusal:
            yield event("response.refusal.delta", **where, delta=delta)
        yield event("response.refusal.done", **where, refusal="".join(script.refusal))
        part = {"type": "refusal", "refusal": "".join(script.refusal)}
        yield event("response.content_part.done", **where, part=part)
        message = {**message, "status": "completed", "content": [part]}
        yield event("response.output_item.done", output_index=index, item=message)
        yield event("response.completed", response={**response, "status": "completed", "output": [*output, message]})
        return
    yield event("response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []})
    tokens = script.tokens
    if tokens is None:  # echo the last message word by word
        tokens = [word + " " for word in str(body["input"][-1]["content"]).split()]
    for i, token in enumerate(tokens):
        if i == 1 and script.ending == "error":
            yield event("error", code="server_error", message="internal upstream detail", param=None)
            return
        yield event("response.output_text.delta", **where, delta=token, logprobs=[])
    text = "".join(tokens)
    part = {"type": "output_text", "text": text, "annotations": []}
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part=part)
    message = {**message, "status": "completed", "content": [part]}
    yield event("response.output_item.done", output_index=index, item=message)
    usage = {
        "input_tokens": 9,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 3},
        "total_tokens": 14,
    }
    final = {**response, "output": [*output, message], "usage": usage}
    if script.ending == "incomplete":
        final = {**final, "status": "incomplete", "incomplete_details": {"reason": script.incomplete_reason}}
        yield event("response.incomplete", response=final)
    elif script.ending == "failed":
        error = {"code": "server_error", "message": "internal upstream detail"}
        yield event("response.failed", response={**final, "status": "failed", "error": error, "usage": None})
    else:
        yield event("response.completed", response={**final, "status": "completed"})


class FakeUpstream(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeUpstreamHandler)
        self.script = Script()
        self.received = []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request, client_address):
        if not isinstance(sys.exception(), ConnectionError):  # a pooled connection dropped by its owner
            super().handle_error(request, client_address)

    def reset(self, **script):
        self.script = Script(**script)
        self.received = []

    def open_connections(self):
        """Count the TCP connections currently established to this server (from /proc, Linux)."""
        port = f"{self.server_address[1]:04X}"
        count = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as lines:
                next(lines)
                for line in lines:
                    local, state = line.split()[1], line.split()[3]
                    if local.endswith(":" + port) and state == "01":  # 01: ESTABLISHED
                        count += 1
        return count


@contextmanager
def running_fake_upstream():
    """A FakeUpstream serving from a thread of this process until the block ends."""
    server = FakeUpstream()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
