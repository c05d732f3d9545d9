"""Stream an LLM's chat reply to the browser as Server-Sent Events.

One Flask module: ``POST /api/chat`` takes ``{"messages": [...]}`` and answers with
``text/event-stream``, one ``data: {"content": ...}`` event per token and ``data: [DONE]``
at the end. The upstream is any OpenAI-compatible server, reached with the official
``openai`` SDK; with neither ``OPENAI_API_KEY`` nor ``OPENAI_BASE_URL`` set, a built-in
demo model answers, so everything runs offline.

Run it:   gunicorn -c gunicorn.conf.py app:app      (production: gevent workers)
          flask --app app run                         (development)
Mount it: from app import chat; other_app.register_blueprint(chat, url_prefix="/assistant")
"""

import hmac
import itertools
import json
import logging
import os
import queue
import re
import select
import socket
import sys
import threading
import time
import uuid

import httpx2  # the openai SDK's HTTP client: its errors surface once the body is being read
import openai
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("chat")

# Every setting, its default, and its type: read from the environment by config_from_env().
DEFAULTS = {
    "OPENAI_API_KEY": "",  # neither this nor OPENAI_BASE_URL: the built-in demo model answers
    "OPENAI_BASE_URL": "",  # e.g. http://127.0.0.1:11434/v1 (Ollama), http://127.0.0.1:8000/v1 (vLLM)
    "CHAT_MODEL": "gpt-4o-mini",  # the model used when a request names none
    "CHAT_MODELS": "",  # comma-separated models a request may ask for; empty: just CHAT_MODEL
    "CHAT_SYSTEM_PROMPT": "",  # prepended as a system message when set
    "CHAT_HEARTBEAT_SECONDS": 15.0,  # a ": ping" after this much silence: keeps proxies open, finds gone clients
    "CHAT_FIRST_TOKEN_TIMEOUT": 120.0,  # seconds to wait for the first token (a long prompt on a busy server)
    "CHAT_IDLE_TIMEOUT": 60.0,  # seconds to wait for each next token
    "CHAT_MAX_DURATION": 600.0,  # seconds a whole reply may take
    "CHAT_MAX_BODY_BYTES": 1_048_576,  # larger request bodies get 413 (nginx.conf says the same)
    "CHAT_MAX_MESSAGES": 200,  # longer conversations get 400
    "CHAT_UPSTREAM_RETRIES": 1,  # the SDK's retries of a refused or failed request, before the first byte only
    "CHAT_RETRY_MAX_WAIT": 5.0,  # a 429 asking to wait longer than this goes back to the client at once
    "CHAT_CONNECT_TIMEOUT": 5.0,  # seconds to open a connection to the upstream
    "CHAT_MAX_STREAMS": 900,  # open streams per worker; past it 503. Keep below gunicorn's worker_connections
    "CHAT_API_TOKEN": "",  # when set, /api/chat wants "Authorization: Bearer <token>"
    "CHAT_CORS_ORIGINS": "",  # comma-separated origins allowed to call /api/chat from a browser; empty: none
    "CHAT_DEMO_WORD_SECONDS": 0.05,  # the demo model's pace: slow enough to watch it type
}

ROLES = {"system", "developer", "user", "assistant"}
MESSAGE_FIELDS = {"role", "content", "name"}
REQUEST_FIELDS = {"messages", "model"}


def config_from_env(environ=os.environ):
    """Read every setting from the environment, cast to the type of its default."""
    return {key: type(default)(environ.get(key, default)) for key, default in DEFAULTS.items()}


def comma_list(value):
    """Split a comma-separated setting into its non-empty items."""
    return [item.strip() for item in value.split(",") if item.strip()]


def allowed_models(config):
    """Return the models a request may name: CHAT_MODELS, or just CHAT_MODEL."""
    return comma_list(config["CHAT_MODELS"]) or [config["CHAT_MODEL"]]


def uses_demo(config):
    """Tell whether the built-in demo model answers: no key and no server to talk to."""
    return not config["OPENAI_API_KEY"] and not config["OPENAI_BASE_URL"]


# --- Server-Sent Events ---------------------------------------------------------------------

DONE = b"data: [DONE]\n\n"
OPENED = b": ok\n\n"  # sent with the headers, so proxies and the browser see the stream open at once
PING = b": ping\n\n"  # a comment: every SSE client ignores it


# Made once: json.dumps(..., ensure_ascii=False) builds a new encoder on every call.
to_json = json.JSONEncoder(ensure_ascii=False).encode


def sse(payload):
    """Encode one event: `data: <json>` and the blank line that ends it (one line, as JSON escapes newlines)."""
    return b"data: " + to_json(payload).encode("utf-8", "replace") + b"\n\n"


# --- Upstreams: the openai SDK stream and the demo model, one interface ------------------------
#
# An upstream is an iterator of text deltas with a close() method; once exhausted it has set
# `finish_reason` and `usage`. The relay below cannot tell the two apart.


class UpstreamError(Exception):
    """The upstream failed after the stream began; `code` goes on the wire, the message to the user."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class OpenAIStream:
    """Read the chat completion's SSE body ourselves: the SDK made the request, we parse the bytes.

    The SDK's typed chunk objects cost several times more CPU per token than `json.loads` on the
    line, and its text and line layers most of the rest; the relay needs three fields.
    """

    def __init__(self, response):
        self.response = response  # an openai APIResponse, opened with with_streaming_response
        self.finish_reason = None
        self.usage = None

    def __iter__(self):
        http = self.response.http_response
        # Without a Content-Encoding (the usual case for SSE) the raw bytes skip httpx's decoder layers.
        reads = http.iter_raw() if http.headers.get("content-encoding", "identity") == "identity" else http.iter_bytes()
        pending = b""
        for data in reads:  # what one network read gave: lines, or part of one
            lines = (pending + data).split(b"\n")
            pending = lines.pop()  # an unfinished last line waits for the rest
            for line in lines:
                if not line.startswith(b"data:"):
                    continue  # blank lines end events; ":" lines are comments
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    for _ in reads:  # the end of the body, normally already here: the connection can be reused
                        pass
                    return
                chunk = json.loads(payload)
                if chunk.get("error"):
                    raise UpstreamError("The model stopped with an error.", "upstream_error")
                if chunk.get("usage"):
                    self.usage = chunk["usage"]
                for choice in chunk.get("choices") or ():  # the usage chunk has no choices
                    self.finish_reason = choice.get("finish_reason") or self.finish_reason
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        yield content
        if self.finish_reason is None:  # no [DONE], no finish_reason: the upstream was cut off
            raise UpstreamError("The reply was cut off.", "upstream_incomplete")

    def close(self):
        self.response.close()


class DemoStream:
    """A stand-in model: a fixed reply, word by word, so the service runs with no key and no network."""

    def __init__(self, messages, seconds_per_word):
        said = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        said = " ".join(said.split())[:200]
        reply = (
            "Hello! I am the built-in demo model, streaming this reply word by word over "
            f'Server-Sent Events. You said: "{said}". Set OPENAI_API_KEY, or OPENAI_BASE_URL '
            "for a local server such as Ollama or vLLM, to talk to a real model."
        )
        self.words = re.findall(r"\S+\s*", reply)
        self.prompt_words = sum(len(m["content"].split()) for m in messages)
        self.seconds_per_word = seconds_per_word
        self.closed = False
        self.finish_reason = None
        self.usage = None

    def __iter__(self):
        for word in self.words:
            time.sleep(self.seconds_per_word)
            if self.closed:
                return
            yield word
        self.finish_reason = "stop"
        self.usage = {
            "prompt_tokens": self.prompt_words,
            "completion_tokens": len(self.words),
            "total_tokens": self.prompt_words + len(self.words),
        }

    def close(self):
        self.closed = True


def per_process(app, name, create):
    """Return this worker process's `name` object for `app`, made anew after a fork: sockets can't be shared."""
    pid, value = app.extensions.get(name, (None, None))
    if pid != os.getpid():
        value = create(app.config)
        app.extensions[name] = (os.getpid(), value)
    return value


POOL_STREAMS = 64  # streams per SDK client: httpx's pool scans all its connections as each request starts and ends


def create_openai_clients(config):
    """Make this worker's SDK clients, one per POOL_STREAMS of CHAT_MAX_STREAMS, taken in turn.

    One pool for thousands of streams would cost O(streams) per stream and stall the worker past a
    few thousand; small pools keep that constant. They share one TLS context (~30 ms to build) and
    need no connection limit of their own: CHAT_MAX_STREAMS bounds them all.
    """
    # The wait for headers is the first-token timeout; body reads get a second more than the relay's
    # own timeouts, so that those fire first, with their clearer codes, and close the upstream.
    read_timeout = max(config["CHAT_FIRST_TOKEN_TIMEOUT"], config["CHAT_IDLE_TIMEOUT"]) + 1.0
    tls = httpx2.create_ssl_context()  # what httpx builds by default: the system's trust store

    def client():
        return openai.OpenAI(
            # A local server (Ollama, vLLM, llama.cpp) needs no key, but the SDK insists on one.
            api_key=config["OPENAI_API_KEY"] or "unused",
            base_url=config["OPENAI_BASE_URL"] or None,
            max_retries=config["CHAT_UPSTREAM_RETRIES"],
            http_client=openai.DefaultHttpxClient(
                verify=tls,
                timeout=httpx2.Timeout(read_timeout, connect=config["CHAT_CONNECT_TIMEOUT"]),
                limits=httpx2.Limits(max_connections=None, max_keepalive_connections=16),
                event_hooks={"response": [refuse_long_retry_waits(config["CHAT_RETRY_MAX_WAIT"])]},
            ),
        )

    return itertools.cycle([client() for _ in range(-(-config["CHAT_MAX_STREAMS"] // POOL_STREAMS))])


def refuse_long_retry_waits(max_wait):
    """Make the SDK skip a retry the upstream wants us to wait long for: the user would see nothing meanwhile.

    The SDK honours Retry-After up to two minutes per retry; `x-should-retry: false` is its
    documented way to say no.
    """

    def hook(response):
        try:
            wait = float(response.headers.get("retry-after", 0))
        except ValueError:
            return
        if wait > max_wait:
            response.headers["x-should-retry"] = "false"

    return hook


def open_upstream(config, model, messages):
    """Start the completion and wait for its response headers, so a refusal can still be an HTTP status."""
    if uses_demo(config):
        return DemoStream(messages, config["CHAT_DEMO_WORD_SECONDS"])
    client = next(per_process(current_app, "chat.openai", create_openai_clients))
    completion = client.chat.completions.with_streaming_response.create(
        model=model,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    return OpenAIStream(completion.__enter__())  # sends it; a 4xx/5xx raises here, before our headers


def describe_failure(exc):
    """Map an upstream failure to (HTTP status, code, message for a person), hiding upstream internals."""
    if isinstance(exc, UpstreamError):
        return 502, exc.code, str(exc)
    if isinstance(exc, httpx2.TimeoutException):
        return 504, "upstream_timeout", "The model stopped answering."
    if isinstance(exc, httpx2.TransportError):  # e.g. the connection closed in the middle of the body
        return 502, "upstream_cut", "The connection to the model was lost."
    if isinstance(exc, openai.APITimeoutError):
        return 504, "upstream_timeout", "The model took too long to answer."
    if isinstance(exc, openai.APIConnectionError):
        return 502, "upstream_unreachable", "The model could not be reached."
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code == 429:
            return 429, "rate_limited", "The model is busy. Please try again shortly."
        if exc.status_code in (401, 403):  # the upstream's text can echo part of the key
            return 502, "upstream_auth", "The service could not authenticate with the model."
        if exc.status_code == 400:  # e.g. the conversation is longer than the model's context
            return 400, "upstream_rejected", upstream_message(exc)
        return 502, "upstream_error", "The model failed to answer."
    return 502, "upstream_error", "The connection to the model failed."


def upstream_message(exc):
    """Return the message of an upstream 400 (the SDK's body is the `error` object, or text)."""
    body = exc.body if isinstance(exc.body, dict) else {}
    return str(body.get("message") or "The model rejected the request.")[:500]


# --- The relay: upstream deltas in, SSE events out --------------------------------------------
#
# A blocking read on the upstream cannot be interrupted to send a heartbeat, so a second greenlet
# (a thread under the dev server) reads the upstream into a queue, and the response generator
# waits on the queue with a timeout. Standard library only: gevent's patching makes both cooperative.

END = object()  # the reader's last item when the upstream finished cleanly


class StreamTimeout(UpstreamError):
    """The upstream was too slow; the stream ends with this error and a closed upstream."""


TIMEOUTS = {  # code: (setting, message for a person)
    "first_token_timeout": ("CHAT_FIRST_TOKEN_TIMEOUT", "The model took too long to start answering."),
    "idle_timeout": ("CHAT_IDLE_TIMEOUT", "The model stopped answering."),
    "max_duration": ("CHAT_MAX_DURATION", "The reply took too long and was stopped."),
}


def read_upstream(upstream, items):
    """Move deltas from the upstream into `items`; end with END, or with the exception that stopped it."""
    try:
        for delta in upstream:
            items.put(delta)
        items.put(END)
    except Exception as exc:  # the relay reports it; after close() it is expected and unread
        items.put(exc)


def take_waiting(items, first):
    """Return `first` and whatever already waits behind it, up to an END or an exception."""
    batch = [first]
    while batch[-1] is not END and not isinstance(batch[-1], Exception):
        try:
            batch.append(items.get_nowait())
        except queue.Empty:
            break
    return batch


def client_has_left(client):
    """Tell whether the client closed its end, so a silent stream ends now, not one failed write later.

    A write after the client closed still succeeds (the kernel takes it, the peer answers with a
    reset), so heartbeats alone notice only at the second one. `client` is gunicorn's socket, or None.
    """
    if client is None:
        return False
    poller = select.poll()  # not select.select(): it fails on descriptors past 1024, i.e. past ~500 streams
    poller.register(client, select.POLLIN)
    try:
        return bool(poller.poll(0)) and not client.recv(1, socket.MSG_PEEK)  # readable and empty: closed
    except OSError:  # reset by the peer: gone as well
        return True


def relay(upstream, stream_id, model, config, client=None):
    """Yield the SSE events of one reply, with heartbeats in silences; close the upstream however we leave.

    Every way out, done, error, timeout, client gone (gunicorn closes the generator when a write
    fails: GeneratorExit at a yield) or worker shutdown, closes the upstream once and logs one line.
    """
    items = queue.Queue()
    threading.Thread(target=read_upstream, args=(upstream, items), daemon=True).start()
    heartbeat = config["CHAT_HEARTBEAT_SECONDS"]
    started = last_token = time.monotonic()
    first_token, events, outcome = None, 0, None
    try:
        yield OPENED
        while True:
            code = "first_token_timeout" if first_token is None else "idle_timeout"
            deadline = last_token + config[TIMEOUTS[code][0]]
            if started + config["CHAT_MAX_DURATION"] < deadline:
                code, deadline = "max_duration", started + config["CHAT_MAX_DURATION"]
            try:
                item = items.get(timeout=max(0.0, min(heartbeat, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise StreamTimeout(TIMEOUTS[code][1], code) from None
                if client_has_left(client):
                    outcome = "client_gone"
                    return
                yield PING
                continue
            batch = take_waiting(items, item)
            deltas = [delta for delta in batch if isinstance(delta, str)]
            if deltas:
                last_token = time.monotonic()
                first_token = first_token or last_token
                events += len(deltas)
                yield b"".join([sse({"content": delta}) for delta in deltas])  # one write for all
            if batch[-1] is END:
                break
            if isinstance(batch[-1], Exception):
                raise batch[-1]
        outcome = "done"
        yield sse({"content": "", "finish_reason": upstream.finish_reason, "usage": upstream.usage})
        yield DONE
    except Exception as exc:  # never BaseException: GeneratorExit must pass through to `finally`
        status, code, message = describe_failure(exc)
        outcome = "timeout" if isinstance(exc, StreamTimeout) else "error"
        log.warning("stream %s failed: %s %s", stream_id, code, type(exc).__name__)
        yield sse({"error": message, "code": code})
    finally:
        upstream.close()  # also ends the reader: its blocking read fails
        if outcome is None:  # left at a yield: the client went away, or the worker is being stopped
            outcome = "client_gone" if isinstance(sys.exception(), GeneratorExit) else "shutdown"
        usage = upstream.usage or {}
        log.info(
            "stream %s model=%s end=%s ttft=%s duration=%.3fs events=%d tokens=%s",
            stream_id,
            model,
            outcome,
            "-" if first_token is None else f"{first_token - started:.3f}s",
            time.monotonic() - started,
            events,
            usage.get("completion_tokens", events),
        )


# --- The blueprint: the API and the page ------------------------------------------------------

# The page's files get their own URL path: an app's /static would shadow an unprefixed blueprint's.
chat = Blueprint("chat", __name__, static_folder="static", static_url_path="/chat-static")


@chat.record_once
def apply_defaults(state):
    """Fill in settings the host app has not set, and say once if the demo model will answer."""
    for key, value in config_from_env().items():
        state.app.config.setdefault(key, value)
    if uses_demo(state.app.config):
        log.warning(
            "No OPENAI_API_KEY or OPENAI_BASE_URL: the built-in demo model answers. "
            "Set OPENAI_API_KEY for OpenAI, or OPENAI_BASE_URL for a compatible server."
        )


def error(status, code, message, headers=None):
    """Answer with the JSON error body every non-stream failure uses."""
    return jsonify(error={"message": message, "code": code}), status, headers or {}


class BadRequest(Exception):
    """The request is unusable; the message names what is wrong, `status` is the 4xx to answer."""

    def __init__(self, message, status=400, code="invalid_request"):
        super().__init__(message)
        self.status, self.code = status, code


def read_body(limit):
    """Return the request body, refusing more than `limit` bytes even when it comes chunked, with no length."""
    if (request.content_length or 0) > limit:
        raise BadRequest(f"The body is larger than {limit} bytes.", 413, "body_too_large")
    chunks, size = [], 0
    while chunk := request.stream.read(65536):
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"The body is larger than {limit} bytes.", 413, "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_chat_request(config):
    """Return (model, messages) from the request body, or raise BadRequest naming what is wrong."""
    if request.mimetype != "application/json":
        raise BadRequest("Content-Type must be application/json.", 415, "unsupported_media_type")
    try:
        body = json.loads(read_body(config["CHAT_MAX_BODY_BYTES"]).decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("The body is not UTF-8.") from None
    except RecursionError:
        raise BadRequest("The body is nested too deeply.") from None
    except ValueError as exc:
        raise BadRequest(f"The body is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.")
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        raise BadRequest(f"Unknown field: {unknown[0]}.")

    model = body.get("model", config["CHAT_MODEL"])
    if model not in allowed_models(config):
        raise BadRequest(f"Unknown model: {str(model)[:100]}. Allowed: {', '.join(allowed_models(config))}.")

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list.")
    if len(messages) > config["CHAT_MAX_MESSAGES"]:
        raise BadRequest(f"messages has more than {config['CHAT_MAX_MESSAGES']} items.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object.")
        unknown = sorted(set(message) - MESSAGE_FIELDS)
        if unknown:
            raise BadRequest(f"messages[{i}] has an unknown field: {unknown[0]}.")
        if message.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}.")
        if not isinstance(message.get("content"), str):
            raise BadRequest(f"messages[{i}].content must be a string.")
    if config["CHAT_SYSTEM_PROMPT"]:
        messages = [{"role": "system", "content": config["CHAT_SYSTEM_PROMPT"]}, *messages]
    return model, messages


@chat.post("/api/chat")
def chat_completion():
    """Validate, open the upstream, then stream: every failure before the first byte is an HTTP status."""
    config = current_app.config
    if not authorized(config["CHAT_API_TOKEN"]):
        return error(401, "unauthorized", "Send Authorization: Bearer <token>.", {"WWW-Authenticate": "Bearer"})
    try:
        model, messages = parse_chat_request(config)
    except BadRequest as exc:
        return error(exc.status, exc.code, str(exc))

    slots = per_process(current_app, "chat.slots", StreamSlots)
    if not slots.acquire():
        return error(503, "too_many_streams", "The server is busy. Please try again shortly.", {"Retry-After": "5"})
    try:
        upstream = open_upstream(config, model, messages)
    except openai.OpenAIError as exc:
        slots.release()
        status, code, message = describe_failure(exc)
        retry_after = exc.response.headers.get("Retry-After") if status == 429 else None
        log.warning("upstream refused: %s %s (%s)", status, code, type(exc).__name__)
        return error(status, code, message, {"Retry-After": retry_after} if retry_after else None)
    except BaseException:
        slots.release()  # any other failure (a bug, a worker stopping) must not keep the slot either
        raise

    stream_id = request_id()
    response = Response(
        relay(upstream, stream_id, model, config, request.environ.get("gunicorn.socket")),
        # No "Connection: keep-alive": it is hop-by-hop, gunicorn drops it and HTTP/2 forbids it.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": stream_id},
        content_type="text/event-stream",  # UTF-8 by definition: no charset parameter needed
    )
    response.call_on_close(slots.release)  # called by the server however the response ends, even unstarted
    return response


class StreamSlots:
    """Count this worker's open streams; past CHAT_MAX_STREAMS, say "come back" rather than queue."""

    def __init__(self, config):
        self.cap, self.open, self.lock = config["CHAT_MAX_STREAMS"], 0, threading.Lock()

    def acquire(self):
        with self.lock:
            if self.open >= self.cap:
                return False
            self.open += 1
            return True

    def release(self):
        with self.lock:
            self.open -= 1


def request_id():
    """Use nginx's X-Request-Id when it looks like one, so its log, gunicorn's and ours share one id."""
    given = request.headers.get("X-Request-Id", "")
    return given if re.fullmatch(r"[A-Za-z0-9._-]{8,64}", given) else uuid.uuid4().hex[:12]


def authorized(token):
    """Check the bearer token, when one is configured, in constant time."""
    if not token:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


@chat.after_request
def allow_listed_origins(response):
    """Allow cross-origin calls from CHAT_CORS_ORIGINS only; none by default, as the page is same-origin."""
    allowed = comma_list(current_app.config["CHAT_CORS_ORIGINS"])
    if allowed:
        response.vary.add("Origin")
    origin = request.headers.get("Origin")
    if origin in allowed:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Methods"] = "POST"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
        response.headers["Access-Control-Expose-Headers"] = "Retry-After, X-Request-Id"
        response.headers["Access-Control-Max-Age"] = "600"
    return response


@chat.route("/api/chat", methods=["GET", "PUT", "PATCH", "DELETE"])
def chat_wrong_method():
    """Answer a wrong method with the same JSON error as everything else (Flask's 405 is HTML)."""
    return error(405, "method_not_allowed", "Use POST.", {"Allow": "POST"})


@chat.errorhandler(HTTPException)
def http_error(exc):
    """Turn werkzeug's HTML errors (413 from the body limit, say) into the JSON error body."""
    return error(exc.code, exc.name.lower().replace(" ", "_"), exc.description)


# The page's own files only: nothing inline, nothing from another origin, and no HTML built from strings
# (Trusted Types), so text from the model cannot become markup or script. nginx.conf sends the same.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    "require-trusted-types-for 'script'; trusted-types 'none'"
)


@chat.get("/")
def page():
    """Serve the chat page; its URLs are relative, so it works under any url_prefix."""
    response = chat.send_static_file("index.html")
    response.headers["Content-Security-Policy"] = PAGE_CSP
    return response


@chat.get("/healthz")
def healthz():
    """Answer load balancers without touching the upstream; the figures are this worker's."""
    open_streams = per_process(current_app, "chat.slots", StreamSlots).open
    return {"status": "ok", "open_streams": open_streams, "threads": threading.active_count()}


# --- The application --------------------------------------------------------------------------


def create_app(config=None):
    """Build a Flask app serving the chat blueprint; `config` overrides the environment."""
    app = Flask(__name__, static_folder=None)  # the blueprint serves static/ at /chat-static
    app.config.update(config or {})
    app.register_blueprint(chat)
    if not uses_demo(app.config):
        # Make the SDK clients now, in the worker (gunicorn imports the app after it forks), and let
        # the SDK import the parts it loads on first use: the first request would wait ~50 ms for both.
        clients = per_process(app, "chat.openai", create_openai_clients)
        next(clients).chat.completions.with_streaming_response  # noqa: B018 (the access is the point)
    return app


app = create_app()
