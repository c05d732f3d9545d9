"""The model's side of a stream: one Upstream per worker, which sends the request and reads the reply.

    upstream = Upstream(config)                   # its SDK clients, or the demo model; made once per worker
    stream = upstream.open(model, messages)       # raises Unsupported, ClientLeft or an SDK error (refusal())
    stream.read(timeout)                          # [(kind, text), ...]: what came within `timeout` seconds

The openai SDK makes the request (auth, base URL, typed errors before the first byte), to the API that
CHAT_UPSTREAM_API names; Upstream.open sends it again only when nothing was paid for, and refusal()
maps every failure in one table. The reply's bytes are then read below the SDK, in small pieces that
each do one thing:

    SocketBody or HttpxBody   move the bytes: off the connection's socket (the fast path), or through httpx
    ChunkedDecoder            undoes HTTP/1.1 chunked framing, for the socket path
    LineSplitter              cuts the body into SSE lines, none longer than MAX_LINE_BYTES
    ChatChunks, ResponsesEvents   the two dialects: `data:` lines into deltas, a finish reason and usage

ModelStream puts them together. It and DemoStream (a ScriptedStream, as operate.py's diagnostic stream
is) meet the relay's `UpstreamStream` contract, written once in app.py; they add `api`, for the log.
A failure after the stream began is an UpstreamError.
"""

import collections
import contextlib
import contextvars
import json
import logging
import math
import re
import socket
import time
from email.utils import parsedate_to_datetime

import httpcore2  # the SDK's HTTP engine, under httpx2: its network-backend interface hands us the socket
import httpx2
import openai

log = logging.getLogger("chat")


class UpstreamError(Exception):
    """The upstream failed after the stream began: UpstreamError(sentence, error_code, detail="").

    The error event carries both: `error` the sentence, for the user, and `code` the error_code
    ("upstream_cut"), for programs. `detail` is what the upstream said, for the log only.
    """

    def __init__(self, message, error_code, detail=""):
        super().__init__(message)
        self.error_code, self.detail = error_code, detail


class StreamTimeout(UpstreamError):
    """The upstream was too slow; the stream ends with this error and a closed upstream."""


class ClientLeft(Exception):
    """The client went away while the upstream's headers were awaited: the request is abandoned."""


def malformed():
    return UpstreamError("The model sent a malformed reply.", "upstream_malformed")


def uses_demo(config):
    """Tell whether the built-in demo model answers: no key and no server to talk to."""
    return not config["OPENAI_API_KEY"] and not config["OPENAI_BASE_URL"]


# --- Sending the request: retries that never pay twice, failures in one table ------------------------


class Unsupported(ValueError):
    """A request parameter that the upstream's API does not have: the client gets a 400 naming it."""


class Upstream:
    """A worker's way to the model: its SDK clients (or the demo), and what it learned about the server.

    `config` holds the app's settings (app.py's DEFAULTS, filled in). Made once per worker, after the
    fork: the SDK clients hold connection pools. CHAT_UPSTREAM_API picks the API it speaks.
    """

    def __init__(self, config):
        self.config = config
        self.demo = uses_demo(config)
        self.dialect = ResponsesEvents if config["CHAT_UPSTREAM_API"] == "responses" else ChatChunks
        self.sdk_clients = [] if self.demo else make_openai_clients(config)
        self.turn = 0
        self.stream_usage = config["CHAT_STREAM_USAGE"] != "off"  # auto turns it off when a server refuses it
        self.reasoning_refused = {}  # model: "summary" or "reasoning", what a 400 refused (Responses)

    def open(self, model, messages, params=None, client_left=None):
        """Send the request and wait for the reply's head, so that a refusal can still be an HTTP status.

        `params` are a request's sampling parameters (max_tokens is held to CHAT_MAX_OUTPUT_TOKENS);
        `client_left()` tells whether the client has gone, asked every heartbeat while the head is awaited.
        Raises Unsupported, before anything is sent, for a parameter the API does not have.
        """
        params = dict(params or {})
        if unsupported := [name for name in params if name in self.dialect.lacks]:
            raise Unsupported(f"{unsupported[0]} is not available: the model is reached through its Responses API.")
        if self.demo:
            return DemoStream(messages, self.config["CHAT_DEMO_WORD_SECONDS"])
        cap = min(params.pop("max_tokens", math.inf), self.config["CHAT_MAX_OUTPUT_TOKENS"])
        if self.dialect is ResponsesEvents:
            body = self.responses_body(model, messages, params, cap)
        else:
            body = {"model": model, "messages": messages, "stream": True, **params, self.max_tokens_field(): cap}
            if self.stream_usage:
                body["stream_options"] = {"include_usage": True}
        return self.send(body, client_left)

    def max_tokens_field(self):
        """OpenAI's reasoning models refuse max_tokens; some compatible servers ignore max_completion_tokens."""
        field = self.config["CHAT_MAX_TOKENS_FIELD"]
        if field == "auto":
            return "max_tokens" if self.config["OPENAI_BASE_URL"] else "max_completion_tokens"
        return field

    def responses_body(self, model, messages, params, cap):
        """The Responses API's request: the leading system messages become its instructions, the rest input items.

        `store` is off unless CHAT_RESPONSES_STORE=1 (OpenAI's own default keeps every conversation).
        """
        lead = 0
        while lead < len(messages) - 1 and messages[lead]["role"] in ("system", "developer"):
            lead += 1
        effort = params.pop("reasoning_effort", None)
        body = {
            "model": model,
            "input": [input_item(message) for message in messages[lead:]],
            "stream": True,
            "store": self.config["CHAT_RESPONSES_STORE"] == "1",
            "max_output_tokens": cap,
            **params,  # temperature and top_p, which both APIs have
        }
        if lead:
            body["instructions"] = "\n\n".join(text_of(message["content"]) for message in messages[:lead])
        reasoning = {"effort": effort} if effort else {}
        if self.config["CHAT_REASONING_SUMMARY"] != "off":
            reasoning["summary"] = self.config["CHAT_REASONING_SUMMARY"]
        refused = self.reasoning_refused.get(model)
        if refused == "summary":
            reasoning.pop("summary", None)
        if reasoning and refused != "reasoning":
            body["reasoning"] = reasoning
        return body

    def send(self, body, client_left):
        """Send `body` until it is answered, and return the reply as a ModelStream of this upstream's dialect.

        A refused request is sent again up to CHAT_UPSTREAM_RETRIES times, only when nothing was paid for
        and the wait it asks for is short: never after a timeout (the SDK's own retries are off, as it
        retries those too). A 400 refusing a field we can do without is sent again without it, at once.
        """
        extra = json.loads(self.config["CHAT_EXTRA_BODY"] or "{}") or None
        retries = self.config["CHAT_UPSTREAM_RETRIES"]
        while True:
            try:
                with watching(client_left, self.config["CHAT_HEARTBEAT_SECONDS"]):
                    # The SDK's lower-level call: the same request, auth, base URL and typed errors as the
                    # resource's create(), without its TypedDict transform of the body (~0.5 ms of CPU per
                    # request) and without the response objects it would keep for the whole stream.
                    sdk, options = self.next_sdk_client(), {"extra_json": extra} if extra else {}
                    response = sdk.post(
                        self.dialect.path, body=body, options=options, cast_to=httpx2.Response, stream=True
                    )
                return ModelStream.of(response, self.dialect())  # a 4xx/5xx raised its typed error above
            except openai.APIStatusError as exc:
                if exc.status_code == 400 and self.drop_refused(exc.body, body):
                    continue
                wait = retry_after(exc.response.headers) or 0.5
                if retries <= 0 or exc.status_code not in RETRIED or wait > self.config["CHAT_RETRY_MAX_WAIT"]:
                    raise
            except openai.APIConnectionError as exc:
                if retries <= 0 or isinstance(exc, openai.APITimeoutError):
                    raise
                wait = 0.5
            retries -= 1
            log.info("upstream refused; sending again in %.1fs", wait)
            time.sleep(wait)

    def drop_refused(self, error, body):
        """Drop from `body` what a 400's `error` refuses and we can do without; tell whether there was any.

        stream_options: older Azure versions and old Ollama (with CHAT_STREAM_USAGE=auto). reasoning, or
        its summary: a model that does not reason, or an organization OpenAI has not verified. Both are
        remembered: stream_options for the worker, reasoning per model.
        """
        said = str(error)
        if "stream_options" in body and "stream_options" in said and self.config["CHAT_STREAM_USAGE"] == "auto":
            log.warning("upstream refuses stream_options: no longer asked for usage (CHAT_STREAM_USAGE)")
            self.stream_usage = False
            del body["stream_options"]
            return True
        if "reasoning" in body and "reasoning" in said:
            param = error.get("param") if isinstance(error, dict) else None
            refused = "summary" if param == "reasoning.summary" else "reasoning"
            log.warning("upstream refuses %s for %s, no longer asked for it: %s", param, body["model"], said[:300])
            self.reasoning_refused[body["model"]] = refused
            body["reasoning"].pop(refused, None)
            if refused == "reasoning" or not body["reasoning"]:
                del body["reasoning"]
            return True
        return False

    def next_sdk_client(self):
        """Take the SDK clients in turn: one pool for thousands of streams would cost O(streams) per stream."""
        self.turn = (self.turn + 1) % len(self.sdk_clients)
        return self.sdk_clients[self.turn]

    def warm_up(self):
        """Let the SDK import the parts it loads on first use: the first request would wait ~50 ms for them."""
        for sdk in self.sdk_clients[:1]:
            self.dialect.endpoint(sdk)


def input_item(message):
    """A chat message as a Responses input item: text parts become input_text, image parts input_image."""
    role, content = message["role"], message["content"]
    if isinstance(content, str) or role != "user":  # an assistant's parts would have to be output_text
        return {"role": role, "content": text_of(content)}
    parts = []
    for part in content:
        if part["type"] == "text":
            parts.append({"type": "input_text", "text": part["text"]})
        else:
            image = part["image_url"]
            parts.append({"type": "input_image", "image_url": image["url"], "detail": image.get("detail", "auto")})
    return {"role": role, "content": parts}


RETRIED = {429, 500, 502, 503}  # statuses for which nothing was generated; 408 and 504 are timeouts


def retry_after(headers):
    """Return the seconds the upstream asks us to wait: retry-after-ms, or Retry-After in seconds or as a date."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            wait = float(headers.get(name, "")) * scale
        except ValueError:
            continue
        if math.isfinite(wait):
            return max(0.0, wait)
    try:
        return max(0.0, parsedate_to_datetime(headers.get("retry-after", "")).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


# An upstream failure, as (status before the stream, code, sentence for a person); by SDK exception
# or by the upstream's HTTP status. Only a 400's own text is passed on, redacted.
UPSTREAM_FAILURES = {
    ClientLeft: (499, "client_gone", "The client left before the model answered."),  # nobody reads it
    openai.APITimeoutError: (504, "upstream_timeout", "The model took too long to answer."),
    openai.APIConnectionError: (502, "upstream_unreachable", "The model could not be reached."),
    400: (400, "upstream_rejected", None),
    401: (502, "upstream_auth", "The service could not authenticate with the model."),  # its text may echo the key
    403: (502, "upstream_auth", "The service could not authenticate with the model."),
    404: (502, "model_not_found", "The model {model} was not found by the service's upstream."),
    429: (429, "rate_limited", "The model is busy. Please try again shortly."),
}
OTHER_FAILURE = (502, "upstream_error", "The model failed to answer.")
TOO_LONG = (400, "context_too_long", "The conversation is too long for the model. Drop the oldest messages.")
CONTEXT_WORDS = re.compile(r"context.length|context.window|maximum context|too many tokens|prompt is too long", re.I)
PROXY_PREFIX = re.compile(r"^(?:litellm\.\w+:\s*)?(?:\w+Exception\s*-\s*)?")  # LiteLLM's wrapping of the text


def refusal(exc, model):
    """Return (status, code, message, headers) for a refused or failed request, and log what the upstream said."""
    if isinstance(exc, openai.APIStatusError):
        key, said = exc.status_code, upstream_text(exc.body)
    else:
        key, said = type(exc), ""
    status, code, message = UPSTREAM_FAILURES.get(key, OTHER_FAILURE)
    if key == 400 and (CONTEXT_WORDS.search(said) or "context_length" in str(exc.body)):
        status, code, message = TOO_LONG
    if message is None:  # the upstream's own words: never a format string
        message = PROXY_PREFIX.sub("", said) or "The model rejected the request."
    else:
        message = message.format(model=model[:100])
    headers = {}
    if status == 429 and (wait := retry_after(exc.response.headers)) is not None:
        headers["Retry-After"] = str(math.ceil(wait))
    log.warning(
        "upstream refused: %s %s (upstream status=%s request_id=%s): %s",
        status,
        code,
        getattr(exc, "status_code", type(exc).__name__),
        getattr(exc, "request_id", None),
        said,  # app.py redacts every value in the log, then cuts it
    )
    return status, code, message, headers


def upstream_text(body):
    """The message of an upstream error body: the SDK gives its `error` object, or the text."""
    message = body.get("message") if isinstance(body, dict) else body
    return message if isinstance(message, str) else ""


# --- Reading the reply: bytes, chunks, lines, deltas ------------------------------------------------


class ModelStream:
    """The reply of a model: `body` moves its bytes, LineSplitter cuts lines, `dialect` makes deltas."""

    def __init__(self, body, dialect, on_close=None):
        self.body, self.dialect, self.on_close = body, dialect, on_close
        self.lines = LineSplitter()
        self.reader, self.api = body.name, dialect.api
        self.finished, self.failure = False, None

    @classmethod
    def of(cls, response, dialect):
        """Read `response` (httpx2's, its body not read yet) from its socket when it can be, else through httpx.

        The socket path needs our own connection (HeadFirstStream) with nothing read past the head,
        and a body that is chunked and not compressed. Anything else (a Content-Length, a
        Content-Encoding, a proxy, HTTP/2) goes through httpx: correct, but with no heartbeats during
        a silence. TLS needs no exception: an SSL socket's recv() returns what it has already
        decrypted before it waits.
        """
        connection = response.extensions.get("network_stream")
        plain = response.headers.get("content-encoding", "identity") == "identity"
        chunked = response.headers.get("transfer-encoding", "").lower() == "chunked"
        if isinstance(connection, HeadFirstStream) and connection.at_body and plain and chunked:
            leftover, connection.pending = connection.pending, b""  # what httpcore's head read left over
            body = SocketBody(connection.get_extra_info("socket"), leftover)
        else:
            connection, body = None, HttpxBody(response.iter_raw() if plain else response.iter_bytes())
        return cls(body, dialect, lambda finished: finish_response(response, body, connection, finished))

    def read(self, timeout):
        if self.failure:
            raise self.failure
        data = self.body.read(timeout)
        deltas = []
        if data:
            try:
                self.dialect.parse(self.lines.split(data), deltas)
            except UpstreamError as exc:
                if not deltas:
                    raise
                self.failure = exc  # the deltas before it still go out; the next read raises it
        if self.dialect.done:
            self.finished = True
        elif self.body.ended:  # the body ended without its dialect's last word
            self.finished = self.dialect.finish_reason is not None
            if not self.finished:
                self.failure = self.failure or UpstreamError("The reply was cut off.", "upstream_incomplete")
        return deltas

    @property
    def finish_reason(self):
        return self.dialect.finish_reason

    @property
    def usage(self):
        return self.dialect.usage

    def close(self):
        if self.on_close is not None:
            self.on_close(self.finished)


def finish_response(response, body, connection, finished):
    """Close the reply; keep the connection for the next request only if its body has already ended."""
    if connection is not None:
        if finished and not body.ended:  # the last chunk normally follows the reply's last word at once
            with contextlib.suppress(UpstreamError):
                body.read(0.001)
        if body.ended:
            connection.pending = b"0\r\n\r\n"  # httpx reads the end of the body, and pools the connection
            with contextlib.suppress(httpx2.HTTPError):
                response.read()
    response.close()


class SocketBody:
    """The body's bytes straight from the connection's socket, de-chunked: one recv() per read, with a timeout."""

    name = "socket"

    def __init__(self, sock, leftover=b""):
        self.sock, self.leftover = sock, leftover  # a plain or an SSL socket
        self.chunks = ChunkedDecoder()
        self.ended = False  # the last chunk has come: the connection can serve the next request

    def read(self, timeout):
        """Return the body bytes that came within `timeout` seconds (b"" if none did)."""
        if self.chunks.failure:
            raise self.chunks.failure
        if self.leftover:
            data, self.leftover = self.leftover, b""
        else:
            try:
                self.sock.settimeout(max(timeout, 0.001))
                data = self.sock.recv(65536)  # an SSL socket gives what it has already decrypted first
            except TimeoutError:
                return b""  # nothing yet: time for a heartbeat, or a deadline
            except OSError:
                raise UpstreamError("The connection to the model was lost.", "upstream_cut") from None
            if not data:
                raise UpstreamError("The connection to the model was lost.", "upstream_cut")
        data = self.chunks.feed(data)
        self.ended = self.chunks.ended
        return data


class HttpxBody:
    """The body's bytes through httpx's iterator: for what the socket path cannot read. It waits httpx's timeout."""

    name = "httpx"

    def __init__(self, pieces):
        self.pieces, self.ended = pieces, False

    def read(self, timeout):
        try:
            data = next(self.pieces, None)
        except httpx2.TimeoutException:
            raise StreamTimeout("The model stopped answering.", "idle_timeout") from None
        except httpx2.TransportError:
            raise UpstreamError("The connection to the model was lost.", "upstream_cut") from None
        if data is None:
            self.ended = True
        return data or b""


# A chunk-size line as RFC 9112 (7.1) has it: hex digits, then extensions (";name=value", visible characters).
# Sixteen digits are more than any reply; int() alone would take "-6", " 6", "0x6" or "6_0" too.
CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[\t\x20-\x7e\x80-\xff]*)?")
MAX_FRAMING_BYTES = 1024  # a size line, or trailers, longer than this is not from an HTTP server


class ChunkedDecoder:
    """Undo HTTP/1.1 chunked framing (RFC 9112, 7.1), a network read at a time: feed() returns body bytes.

    Anything the RFC does not allow raises upstream_malformed, after the body bytes before it have been
    returned. Each feed() makes one pass over its bytes: it cannot loop, whatever they are.
    """

    def __init__(self):
        self.framing = b""  # the start of a size line, or of a chunk's closing CRLF
        self.data_left = 0  # bytes of the current chunk's data still to come
        self.crlf_due = False  # the current chunk's data has come; its CRLF is next
        self.trailers = None  # after the last chunk: the trailer section so far
        self.ended, self.failure = False, None

    def feed(self, data):
        if self.trailers is not None:
            self.read_trailers(data)
            return b""
        framing = self.framing + data if self.framing else data
        out, i, size = [], 0, len(framing)
        try:
            while i < size:
                if self.data_left:
                    taken = min(self.data_left, size - i)
                    out.append(framing[i : i + taken])
                    i, self.data_left = i + taken, self.data_left - taken
                elif self.crlf_due:
                    if size - i < 2:
                        break
                    if framing[i : i + 2] != b"\r\n":
                        raise malformed()
                    i, self.crlf_due = i + 2, False
                else:
                    end = framing.find(b"\r\n", i, i + MAX_FRAMING_BYTES)
                    if end < 0:
                        break  # the size line is not all here yet
                    line = CHUNK_SIZE_LINE.fullmatch(framing, i, end)
                    if line is None:
                        raise malformed()
                    length = int(line[1], 16)
                    if not length:  # the last chunk: trailers (none, in practice) end with a blank line
                        self.trailers = b""
                        self.read_trailers(framing[end:])
                        i = size
                        break
                    i, self.data_left, self.crlf_due = end + 2, length, True
            self.framing = framing[i:]
            if len(self.framing) > MAX_FRAMING_BYTES:
                raise malformed()
        except UpstreamError as exc:
            if not out:
                raise
            self.failure = exc
        return out[0] if len(out) == 1 else b"".join(out)

    def read_trailers(self, data):
        """Read the trailer section after the last chunk (from the last chunk's CRLF), up to its blank line."""
        if self.ended:
            return
        self.trailers += data
        self.ended = b"\r\n\r\n" in self.trailers
        if not self.ended and len(self.trailers) > MAX_FRAMING_BYTES:
            raise malformed()


MAX_LINE_BYTES = 256 * 1024  # an upstream SSE line longer than this is not a reply's: end the stream


class LineSplitter:
    """Cut a body into its lines (the "\\n" taken off), however the reads split them; none may be too long."""

    def __init__(self):
        self.pieces, self.size = [], 0  # the line read so far, in pieces

    def split(self, data):
        """Return the lines that `data` completes; keep an unfinished last line for later."""
        if b"\n" not in data:
            self.pieces.append(data)
            self.size += len(data)
            if self.size > MAX_LINE_BYTES:
                raise UpstreamError("The model sent a line too long to be a reply.", "upstream_malformed")
            return ()
        lines = (b"".join(self.pieces) + data if self.pieces else data).split(b"\n")
        last = lines.pop()
        self.pieces, self.size = ([last], len(last)) if last else ([], 0)
        if self.size > MAX_LINE_BYTES:
            raise UpstreamError("The model sent a line too long to be a reply.", "upstream_malformed")
        return lines


def json_payload(line):
    """Return the JSON value of an SSE `data:` line, or raise upstream_malformed; "[DONE]" comes back as it is."""
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return "[DONE]"
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser's stack
        raise malformed() from None


class Dialect:
    """What both dialects share: SSE `data:` lines, each a JSON object for add(), or `[DONE]`.

    Blank lines end events, ":" lines are comments, and Responses' `event:` lines repeat the data's type.
    """

    def __init__(self):
        self.done, self.finish_reason, self.usage = False, None, None

    def parse(self, lines, deltas):
        for line in lines:
            if line.startswith(b"data:"):
                payload = json_payload(line)
                if payload == "[DONE]":
                    self.done = True
                elif isinstance(payload, dict):
                    self.add(payload, deltas)


class ChatChunks(Dialect):
    """The chat.completions dialect: each `data:` line a chat.completion.chunk, then `data: [DONE]`.

    A dialect offers parse(lines, deltas), adding the (kind, text) deltas of SSE lines to `deltas` and
    raising UpstreamError for an error in the stream; `done` once its last word came; `finish_reason`
    and `usage` (in chat.completions' words); `api`, its name for the log; `lacks`, the request
    parameters its API does not have; `path`, where the request is posted (below the base URL); and
    endpoint(sdk_client), the SDK's resource for it (warm_up loads it). Anything of the wrong type is ignored.
    """

    api, lacks, path = "chat", (), "/chat/completions"

    @staticmethod
    def endpoint(sdk):
        return sdk.chat.completions.with_streaming_response

    def add(self, chunk, deltas):
        if chunk.get("error"):
            error = chunk["error"]
            detail = error.get("message") if isinstance(error, dict) else error
            raise UpstreamError("The model stopped with an error.", "upstream_error", str(detail))
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():  # the usage chunk has no choices
            if not isinstance(choice, dict):
                continue
            if choice.get("finish_reason") and isinstance(choice["finish_reason"], str):
                self.finish_reason = choice["finish_reason"]
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            # Thinking: llama.cpp, DeepSeek, SGLang and LM Studio say reasoning_content; vLLM, Ollama say reasoning.
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning and isinstance(reasoning, str):
                deltas.append(("reasoning", reasoning))
            content = delta.get("content")
            if content and isinstance(content, str):
                deltas.append(("content", content))


class ResponsesEvents(Dialect):
    """The Responses API's dialect: `event:` and `data:` lines, each data line a typed event (its `type`).

    The events are openai-python's types (openai.types.responses): text, refusal and reasoning deltas;
    the end as response.completed or response.incomplete, after which OpenAI sends no [DONE] (some
    gateways append one: it ends the reply too); failures as response.failed or error. The rest is
    skipped, except output items other than a message or reasoning: the service asks for no tools, so
    one means output we would drop silently.
    """

    api, lacks, path = "responses", ("stop", "seed", "presence_penalty", "frequency_penalty"), "/responses"
    KINDS = {
        "response.output_text.delta": "content",
        "response.refusal.delta": "content",  # the user sees why the model will not answer
        "response.reasoning_summary_text.delta": "reasoning",
        "response.reasoning_text.delta": "reasoning",  # vLLM and others: the thinking itself
    }
    FINISH_REASONS = {"max_output_tokens": "length", "content_filter": "content_filter"}

    def __init__(self):
        super().__init__()
        self.part = None  # the reasoning part the last reasoning delta belonged to

    @staticmethod
    def endpoint(sdk):
        return sdk.responses.with_streaming_response

    def add(self, event, deltas):
        if not isinstance(event.get("type"), str):
            return
        kind, delta = self.KINDS.get(event["type"]), event.get("delta")
        if kind == "reasoning" and isinstance(delta, str):
            part = (event.get("item_id"), event.get("summary_index"), event.get("content_index"))
            if self.part is not None and part != self.part:
                delta = "\n\n" + delta  # a new summary part: a paragraph of its own
            self.part = part
        if kind and delta and isinstance(delta, str):
            deltas.append((kind, delta))
        elif kind is None:
            self.end(event)

    def end(self, event):
        """The events that end the reply, or that it cannot go on after."""
        kind, response = event.get("type"), event.get("response")
        response = response if isinstance(response, dict) else {}
        if kind in ("response.output_item.added", "response.output_item.done"):
            item = event.get("item") if isinstance(event.get("item"), dict) else {}
            if item.get("type") not in ("message", "reasoning"):
                detail = f"output item {str(item.get('type'))[:100]}"
                raise UpstreamError(
                    "The model answered with something this service cannot show.", "unsupported_output", detail
                )
        elif kind == "response.completed":
            self.done, self.finish_reason, self.usage = True, "stop", chat_usage(response.get("usage"))
        elif kind == "response.incomplete":
            details = response.get("incomplete_details")
            reason = details.get("reason") if isinstance(details, dict) else None
            self.done, self.usage = True, chat_usage(response.get("usage"))
            self.finish_reason = self.FINISH_REASONS.get(reason, "other")
            if self.finish_reason == "other":
                log.info("upstream reply incomplete: %s", str(reason)[:100])
        elif kind in ("response.failed", "error"):
            error = response.get("error") if kind == "response.failed" else event.get("error", event)
            error = error if isinstance(error, dict) else {}
            detail = f"{str(error.get('code'))[:100]}: {str(error.get('message'))[:300]}"
            raise UpstreamError("The model stopped with an error.", "upstream_error", detail)


def chat_usage(usage):
    """The Responses API's usage in chat.completions' words, which the relay and its clients know."""
    if not isinstance(usage, dict):
        return None
    mapped = {
        "prompt_tokens": usage.get("input_tokens"),
        "completion_tokens": usage.get("output_tokens"),
        "total_tokens": usage.get("total_tokens"),
    }
    details = usage.get("output_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("reasoning_tokens"), int):
        mapped["completion_tokens_details"] = {"reasoning_tokens": details["reasoning_tokens"]}
    return mapped


# --- The connection below the SDK: the response's head for httpx, its body left on the socket -------


waiting_client = contextvars.ContextVar("waiting_client", default=None)  # (client_left, heartbeat) of this stream


@contextlib.contextmanager
def watching(client_left, heartbeat):
    """While the SDK waits for the response's head, ask `client_left()` every `heartbeat` seconds.

    A context variable reaches the connection below the SDK and httpx; each greenlet (or thread) has its own.
    """
    token = waiting_client.set(None if client_left is None else (client_left, heartbeat))
    try:
        yield
    finally:
        waiting_client.reset(token)


# The kernel's buffers for each side of a stream (it doubles the figure). Left to autotuning they grow to
# megabytes, which a client that stops reading would keep filling from the model: the relay waits instead.
SOCKET_BUFFER = 64 * 1024


class HeadFirstStream(httpcore2.NetworkStream):
    """A connection to the upstream that gives httpcore the response's head and nothing after it.

    httpcore reads 64 KB at a time, so the first body bytes would sit in its buffer after the head;
    stopping each head read at its blank line leaves the whole body on the socket for the relay
    (`at_body`). Everything else passes through. A head not ended by CRLF CRLF, or an informational
    (1xx) head, keeps `at_body` false: the relay then reads through httpx.
    """

    def __init__(self, stream):
        self.stream, self.pending, self.head, self.at_body = stream, b"", b"", False

    def write(self, buffer, timeout=None):
        self.head, self.at_body = b"", False  # a request: its response's head comes next
        self.stream.write(buffer, timeout)

    def read(self, max_bytes, timeout=None):
        waiting = waiting_client.get()
        if self.pending:
            data, self.pending = self.pending, b""
        elif self.at_body or self.head is None or waiting is None:
            data = self.stream.read(max_bytes, timeout)
        else:
            data = self.read_head(max_bytes, timeout, *waiting)
        if self.at_body or self.head is None:
            return data
        head = self.head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            self.head = head if len(head) < 65536 else None  # None: no head we can find; just pass through
            return data
        cut = end + 4 - len(self.head)
        self.pending, self.head = data[cut:], b""
        self.at_body = not head.startswith(b"HTTP/1.1 1")
        return data[:cut]

    def read_head(self, max_bytes, timeout, client_left, heartbeat):
        """Wait for the response's head a heartbeat at a time, and give up as soon as the client has left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = heartbeat if deadline is None else min(heartbeat, deadline - time.monotonic())
            try:
                return self.stream.read(max_bytes, max(wait, 0.001))
            except httpcore2.ReadTimeout:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                if client_left():
                    raise ClientLeft from None

    def close(self):
        self.stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        return HeadFirstStream(self.stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info):
        return self.stream.get_extra_info(info)


class HeadFirstBackend(httpcore2.NetworkBackend):
    """httpcore's own sockets, wrapped in HeadFirstStream."""

    def __init__(self):
        self.backend = httpcore2.SyncBackend()

    def connect_tcp(self, *args, **kwargs):
        return HeadFirstStream(self.backend.connect_tcp(*args, **kwargs))

    def connect_unix_socket(self, *args, **kwargs):
        return HeadFirstStream(self.backend.connect_unix_socket(*args, **kwargs))

    def sleep(self, seconds):
        self.backend.sleep(seconds)


def relay_transport(tls):
    """Return httpx's transport for the SDK, its connections made by HeadFirstBackend.

    httpx2's HTTPTransport takes no network backend, so its connection pool is replaced by an
    identical one that has ours: the one private attribute this module touches (httpx2 and
    httpcore2 are pinned exactly; tests/test_relay.py fails if the fast path is not taken).
    """
    transport = httpx2.HTTPTransport(verify=tls)
    transport._pool = httpcore2.ConnectionPool(
        ssl_context=tls,
        max_connections=None,
        max_keepalive_connections=16,
        keepalive_expiry=5.0,  # httpx's default
        socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)],
        network_backend=HeadFirstBackend(),
    )
    return transport


POOL_STREAMS = 64  # streams per SDK client: httpx's pool scans all its connections as each request starts and ends


def make_openai_clients(config):
    """Make one SDK client per POOL_STREAMS of CHAT_MAX_STREAMS, sharing one TLS context (~30 ms to build).

    They need no connection limit of their own: CHAT_MAX_STREAMS bounds them all.
    """
    tls = httpx2.create_ssl_context()  # what httpx builds by default: the system's trust store
    timeout = httpx2.Timeout(config["CHAT_FIRST_TOKEN_TIMEOUT"], connect=config["CHAT_CONNECT_TIMEOUT"])
    return [
        openai.OpenAI(
            # A local server (Ollama, vLLM, llama.cpp) needs no key, but the SDK insists on one.
            api_key=config["OPENAI_API_KEY"] or "unused",
            base_url=config["OPENAI_BASE_URL"] or None,
            max_retries=0,  # Upstream.send retries, and never a request that timed out: its prompt would be paid twice
            http_client=openai.DefaultHttpxClient(transport=relay_transport(tls), timeout=timeout),
        )
        for _ in range(-(-config["CHAT_MAX_STREAMS"] // POOL_STREAMS))
    ]


# --- The demo model --------------------------------------------------------------------------------


class ScriptedStream:
    """A reply known in advance: (time.monotonic() it is due, kind, text) steps, each given out when due.

    The demo model is one, and so is operate.py's diagnostic stream. `steps` may be given later,
    before the first read; the last one finishes the reply with `ending` (finish reason, usage).
    """

    reader = "script"

    def __init__(self, steps=(), ending=("stop", None)):
        self.steps, self.ending = collections.deque(steps), ending
        self.finished, self.finish_reason, self.usage = False, None, None

    def read(self, timeout):
        due, kind, text = self.steps[0]
        wait = due - time.monotonic()
        if wait > timeout:
            time.sleep(max(timeout, 0))
            return []
        time.sleep(max(wait, 0))
        self.steps.popleft()
        if not self.steps:
            self.finished, (self.finish_reason, self.usage) = True, self.ending
        return [(kind, text)]

    def close(self):
        pass


class DemoStream(ScriptedStream):
    """A stand-in model: a fixed reply, word by word, so the service runs with no key and no network."""

    reader, api = "demo", "demo"

    def __init__(self, messages, seconds_per_word):
        said = next((text_of(m["content"]) for m in reversed(messages) if m["role"] == "user"), "")
        said = " ".join(said.split())[:200]
        reply = (
            "Hello! I am the built-in demo model, streaming this reply word by word over "
            f'Server-Sent Events. You said: "{said}". Set OPENAI_API_KEY, or OPENAI_BASE_URL '
            "for a local server such as Ollama or vLLM, to talk to a real model."
        )
        words = re.findall(r"\S+\s*", reply)
        prompt = sum(len(text_of(m["content"]).split()) for m in messages)
        usage = {"prompt_tokens": prompt, "completion_tokens": len(words), "total_tokens": prompt + len(words)}
        now = time.monotonic()
        steps = [(now + i * seconds_per_word, "content", word) for i, word in enumerate(words, 1)]
        super().__init__(steps, ("stop", usage))


def text_of(content):
    """Return the text of a message's content: the string, or its text parts (images left out)."""
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")
