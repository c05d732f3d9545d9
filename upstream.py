"""The model's side of a stream: the request, its failures, and the reply read straight from the socket.

The openai SDK makes the request (auth, base URL, typed errors before the first byte); open_upstream
sends it again only when nothing was paid for, and refusal() maps every failure in one table.
ModelStream then reads the reply's bytes itself, with a timeout per read, so that app.py's relay can
send heartbeats and keep deadlines in the stream's one greenlet. DemoStream answers the same way
with no model at all. Both offer what the relay needs: read(timeout) returns the (kind, text)
deltas that arrived within `timeout` seconds ([] if none did); `finished` once the reply is
complete, then `finish_reason` and `usage`; `reader`, for the log; and close().
"""

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
    """The upstream failed after the stream began; `code` goes on the wire, the message to the user.

    `detail` is what the upstream said, for the log only.
    """

    def __init__(self, message, code, detail=""):
        super().__init__(message)
        self.code, self.detail = code, detail


class StreamTimeout(UpstreamError):
    """The upstream was too slow; the stream ends with this error and a closed upstream."""


class ClientLeft(Exception):
    """The client went away while the upstream's headers were awaited: the request is abandoned."""


# --- Sending the request: retries that never pay twice, failures in one table ------------------------


def open_upstream(worker, config, model, messages, params, client):
    """Send the request and wait for the upstream's headers, so that a refusal can still be an HTTP status.

    A refused request is sent again up to CHAT_UPSTREAM_RETRIES times, only when nothing was paid for
    and the wait it asks for is short: never after a timeout (the SDK's own retries are off, as it
    retries those too). While the headers are awaited, a client that leaves ends the request.
    """
    body = {"model": model, "messages": messages, "stream": True, **params}
    # OpenAI's reasoning models refuse max_tokens; some compatible servers ignore max_completion_tokens.
    field = config["CHAT_MAX_TOKENS_FIELD"]
    if field == "auto":
        field = "max_tokens" if config["OPENAI_BASE_URL"] else "max_completion_tokens"
    body[field] = body.pop("max_tokens")
    if worker.stream_usage:
        body["stream_options"] = {"include_usage": True}
    extra = json.loads(config["CHAT_EXTRA_BODY"] or "{}")
    retries = config["CHAT_UPSTREAM_RETRIES"]
    while True:
        try:
            with watching(client, config["CHAT_HEARTBEAT_SECONDS"]):
                completion = worker.next_sdk_client().chat.completions.with_streaming_response.create(
                    **body, extra_body=extra or None
                )
                return ModelStream(completion.__enter__())  # sends it; a 4xx/5xx raises here, before our headers
        except openai.APIStatusError as exc:
            if "stream_options" in body and refuses_stream_options(exc, config):
                log.warning("upstream refuses stream_options: no longer asked for usage (CHAT_STREAM_USAGE)")
                worker.stream_usage = False
                del body["stream_options"]
                continue
            wait = retry_after(exc.response.headers) or 0.5
            if retries <= 0 or exc.status_code not in RETRIED or wait > config["CHAT_RETRY_MAX_WAIT"]:
                raise
        except openai.APIConnectionError as exc:
            if retries <= 0 or isinstance(exc, openai.APITimeoutError):
                raise
            wait = 0.5
        retries -= 1
        log.info("upstream refused; sending again in %.1fs", wait)
        time.sleep(wait)


RETRIED = {429, 500, 502, 503}  # statuses for which nothing was generated; 408 and 504 are timeouts


def refuses_stream_options(exc, config):
    """Tell whether a 400 says the server does not know stream_options (older Azure versions, old Ollama)."""
    return config["CHAT_STREAM_USAGE"] == "auto" and exc.status_code == 400 and "stream_options" in str(exc.body)


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


# --- Reading the reply --------------------------------------------------------------------------------


waiting_client = contextvars.ContextVar("waiting_client", default=None)  # (Client, heartbeat) of this stream


@contextlib.contextmanager
def watching(client, heartbeat):
    """While the SDK waits for the response's head, check every `heartbeat` seconds that `client` is there.

    A context variable reaches the connection below the SDK and httpx; each greenlet (or thread) has its own.
    """
    token = waiting_client.set((client, heartbeat))
    try:
        yield
    finally:
        waiting_client.reset(token)


# The kernel's buffers for each side of a stream (it doubles the figure). Left to autotuning they grow to
# megabytes, which a client that stops reading would keep filling from the model: the relay waits instead.
SOCKET_BUFFER = 64 * 1024


MAX_LINE_BYTES = 256 * 1024  # an upstream SSE line longer than this is not a chat chunk: end the stream


class ModelStream:
    """Read the chat completion's SSE body ourselves: the SDK made the request, we parse the bytes.

    The fast path reads the body straight from the connection's socket (see HeadFirstStream) and
    undoes the chunked framing itself: one read and one pass per network read, with a timeout, so
    the relay can send heartbeats and keep deadlines in the same greenlet. A body it cannot read
    that way (a Content-Encoding, a Content-Length, a proxy, HTTP/2) goes through httpx's iterator
    instead: correct, but with no heartbeats during a silence. TLS needs no exception: an SSL socket's
    recv() returns what it has already decrypted before it waits.
    """

    def __init__(self, response):
        self.response = response  # an openai APIResponse, opened with with_streaming_response
        http = response.http_response
        stream = http.extensions.get("network_stream")
        plain = http.headers.get("content-encoding", "identity") == "identity"
        chunked = http.headers.get("transfer-encoding", "").lower() == "chunked"
        if isinstance(stream, HeadFirstStream) and stream.at_body and plain and chunked:
            self.connection, self.sock = stream, stream.get_extra_info("socket")  # a plain or an SSL socket
            self.reader, self.body = "socket", None
        else:
            self.connection, self.reader = None, "httpx"
            self.body = http.iter_raw() if plain else http.iter_bytes()
        self.framing = b""  # chunked framing not yet undone
        self.chunk_left = 0  # bytes of the current chunk still to come, its closing CRLF included
        self.body_ended = False  # the last chunk has come: the connection can serve the next request
        self.line, self.line_size = [], 0  # the SSE line read so far, in pieces
        self.finished, self.finish_reason, self.usage, self.failure = False, None, None, None

    def read(self, timeout):
        if self.failure:
            raise self.failure
        if self.connection is None:
            data = self.read_plain()
        else:
            try:
                data = self.unchunk(self.recv(timeout))
            except TimeoutError:
                return []  # nothing yet: time for a heartbeat, or a deadline
            except OSError:
                raise UpstreamError("The connection to the model was lost.", "upstream_cut") from None
        deltas = self.parse(data)
        if self.body_ended and not self.finished and not self.failure:  # the body ended without [DONE]
            if self.finish_reason is None:
                self.failure = UpstreamError("The reply was cut off.", "upstream_incomplete")
            self.finished = self.finish_reason is not None
        return deltas

    def recv(self, timeout):
        """The next bytes on the connection: what httpcore's head read left over, or the socket's."""
        if self.connection.pending:
            data, self.connection.pending = self.connection.pending, b""
            return data
        self.sock.settimeout(max(timeout, 0.001))
        return self.sock.recv(65536)  # an SSL socket gives what it has already decrypted first

    def read_plain(self):
        try:
            data = next(self.body, None)
        except httpx2.TimeoutException:
            raise StreamTimeout("The model stopped answering.", "idle_timeout") from None
        except httpx2.TransportError:
            raise UpstreamError("The connection to the model was lost.", "upstream_cut") from None
        if data is None:
            self.body_ended = True
        return data or b""

    def unchunk(self, data):
        """Undo HTTP/1.1 chunked framing (RFC 9112, 7.1): return the body bytes in `data`, or the end."""
        if not data:
            raise UpstreamError("The connection to the model was lost.", "upstream_cut")
        framing = self.framing + data if self.framing else data
        out, i, size = [], 0, len(framing)
        while i < size:
            if self.chunk_left:
                taken = min(self.chunk_left, size - i)
                body = min(taken, self.chunk_left - 2)  # the chunk's closing CRLF is not body
                if body > 0:
                    out.append(framing[i : i + body])
                i, self.chunk_left = i + taken, self.chunk_left - taken
                continue
            end = framing.find(b"\r\n", i)
            if end < 0:
                break  # the size line is not all here yet
            try:
                length = int(framing[i:end].partition(b";")[0], 16)  # ";..." would be a chunk extension
            except ValueError:
                raise UpstreamError("The model sent a malformed reply.", "upstream_malformed") from None
            if length == 0:  # the last chunk: trailers (none, in practice) end with a blank line
                self.body_ended = framing.find(b"\r\n\r\n", end) >= 0
                break
            i, self.chunk_left = end + 2, length + 2
        self.framing = framing[i:]  # the start of a size line, or the last chunk
        if len(self.framing) > 1024 and not self.body_ended:
            raise UpstreamError("The model sent a malformed reply.", "upstream_malformed")
        return out[0] if len(out) == 1 else b"".join(out)

    def parse(self, data):
        """Return the deltas in the complete SSE lines of `data`; keep an unfinished last line for later."""
        if b"\n" not in data:
            self.line.append(data)
            self.line_size += len(data)
            if self.line_size > MAX_LINE_BYTES:
                raise UpstreamError("The model sent a line too long to be a reply.", "upstream_malformed")
            return []
        lines = (b"".join(self.line) + data).split(b"\n")
        last = lines.pop()
        self.line, self.line_size = [last], len(last)
        deltas = []
        for line in lines:
            if line.startswith(b"data:"):  # blank lines end events; ":" lines are comments
                try:
                    self.parse_data(line[5:].strip(), deltas)
                except UpstreamError as exc:  # the deltas before it still go out; the next read raises it
                    self.failure = exc
                    break
        return deltas

    def parse_data(self, payload, deltas):
        """Add the deltas of one chat.completion.chunk to `deltas`; anything of the wrong type is ignored."""
        if payload == b"[DONE]":
            self.finished = True
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise UpstreamError("The model sent a malformed reply.", "upstream_malformed") from None
        if not isinstance(chunk, dict):
            return
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

    def close(self):
        """Close the reply; keep the connection for the next request only if its body has already ended."""
        if self.connection is not None and self.finished and not self.body_ended:
            try:  # the last chunk normally follows [DONE] at once
                self.unchunk(self.recv(0.001))
            except (OSError, UpstreamError):
                pass
        if self.connection is not None and self.body_ended:
            self.connection.pending = b"0\r\n\r\n"  # httpx reads the end of the body, and pools the connection
            try:
                self.response.http_response.read()
            except httpx2.HTTPError:
                pass
        self.response.close()


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

    def read_head(self, max_bytes, timeout, client, heartbeat):
        """Wait for the response's head a heartbeat at a time, and give up as soon as the client has left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = heartbeat if deadline is None else min(heartbeat, deadline - time.monotonic())
            try:
                return self.stream.read(max_bytes, max(wait, 0.001))
            except httpcore2.ReadTimeout:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                if client.has_left():
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
    httpcore2 are pinned exactly; tests/test_stream.py fails if the fast path is not taken).
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


class DemoStream:
    """A stand-in model: a fixed reply, word by word, so the service runs with no key and no network."""

    reader = "demo"

    def __init__(self, messages, seconds_per_word):
        said = next((text_of(m["content"]) for m in reversed(messages) if m["role"] == "user"), "")
        said = " ".join(said.split())[:200]
        reply = (
            "Hello! I am the built-in demo model, streaming this reply word by word over "
            f'Server-Sent Events. You said: "{said}". Set OPENAI_API_KEY, or OPENAI_BASE_URL '
            "for a local server such as Ollama or vLLM, to talk to a real model."
        )
        self.words = re.findall(r"\S+\s*", reply)
        self.prompt_words = sum(len(text_of(m["content"]).split()) for m in messages)
        self.seconds_per_word = seconds_per_word
        self.next_word_at = time.monotonic() + seconds_per_word
        self.finished, self.finish_reason, self.usage = False, None, None
        self.said = 0

    def read(self, timeout):
        wait = self.next_word_at - time.monotonic()
        if wait > timeout:
            time.sleep(max(timeout, 0))
            return []
        time.sleep(max(wait, 0))
        self.next_word_at += self.seconds_per_word
        word, self.said = self.words[self.said], self.said + 1
        if self.said == len(self.words):
            self.finished, self.finish_reason = True, "stop"
            self.usage = {
                "prompt_tokens": self.prompt_words,
                "completion_tokens": len(self.words),
                "total_tokens": self.prompt_words + len(self.words),
            }
        return [("content", word)]

    def close(self):
        pass


def text_of(content):
    """Return the text of a message's content: the string, or its text parts (images left out)."""
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")


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
            max_retries=0,  # app.py retries, and never a request that timed out: its prompt would be paid twice
            http_client=openai.DefaultHttpxClient(
                transport=relay_transport(tls),
                timeout=timeout,
            ),
        )
        for _ in range(-(-config["CHAT_MAX_STREAMS"] // POOL_STREAMS))
    ]
