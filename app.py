"""Stream an LLM's chat reply to the browser as Server-Sent Events.

``POST /api/chat`` takes ``{"messages": [...]}`` and answers with ``text/event-stream``, one
``data: {"content": ...}`` event per token and ``data: [DONE]`` at the end; ``POST /api/ui-chat``
is the same chat in the Vercel AI SDK's protocol, for its ``useChat``. The upstream is any
OpenAI-compatible server, reached with the official ``openai`` SDK; with neither ``OPENAI_API_KEY``
nor ``OPENAI_BASE_URL`` set, a built-in demo model answers, so everything runs offline.

This file is the request's story; three siblings hold what is self-contained: upstream.py (the
model's side), protocols.py (the request's checks and the wire formats) and operate.py (metrics and
the doctor, loaded only when used). None of them imports this one.

Run it:   gunicorn -c gunicorn.conf.py 'app:create_app()'    (production: gevent workers)
          flask --app app run                              (development)
Mount it: from app import chat; other_app.register_blueprint(chat, url_prefix="/assistant")
Relay in your own view: return relay_response(upstream_stream, EventStream(), your_app.config)
Check it: flask --app app doctor https://chat.example.com/      (the whole path to the browser: operate.py)
"""

import contextlib
import functools
import hmac
import json
import logging
import math
import os
import re
import select
import socket
import threading
import time
import uuid
from collections import ChainMap
from typing import Protocol

import click
import openai
from flask import Blueprint, Flask, Response, current_app, has_app_context, jsonify, request, url_for
from gevent.monkey import get_original
from greenlet import GreenletExit  # how gevent stops a stream that outlives the worker's graceful_timeout
from werkzeug.exceptions import HTTPException

import resume
from protocols import (
    REQUEST_ID,
    ApiError,
    EventStream,
    UIMessageStream,
    allowed_models,
    comma_list,
    in_range,
    native_body,
    one_of,
    parse_chat_request,
    read_json,
    require_json,
)
from upstream import (
    SOCKET_BUFFER,
    ClientLeft,
    StreamTimeout,
    Unsupported,
    Upstream,
    UpstreamError,
    refusal,
    uses_demo,
)

log = logging.getLogger("chat")

# --- Settings: every one, its default and its type, read from the environment -------------------

DEFAULTS = {
    "OPENAI_API_KEY": "",  # neither this nor OPENAI_BASE_URL: the built-in demo model answers
    "OPENAI_BASE_URL": "",  # e.g. http://127.0.0.1:11434/v1 (Ollama), http://127.0.0.1:8000/v1 (vLLM)
    "CHAT_MODEL": "gpt-4o-mini",  # the model used when a request names none
    "CHAT_MODELS": "",  # comma-separated models a request may ask for; empty: just CHAT_MODEL
    "CHAT_SYSTEM_PROMPT": "",  # prepended as a system message when set
    "CHAT_HEARTBEAT_SECONDS": 15.0,  # a ": ping" after this much silence: keeps proxies open, finds gone clients
    "CHAT_FIRST_TOKEN_TIMEOUT": 120.0,  # seconds from the request to the model's first output
    "CHAT_IDLE_TIMEOUT": 60.0,  # seconds to wait for each next output
    "CHAT_MAX_DURATION": 600.0,  # seconds a whole reply may take
    "CHAT_SEND_TIMEOUT": 30.0,  # seconds a client may take no bytes before its stream is ended
    "CHAT_MAX_BODY_BYTES": 1_048_576,  # larger request bodies get 413 (nginx.conf says the same)
    "CHAT_BODY_TIMEOUT": 10.0,  # seconds a request body may take to arrive; then 408 (under gevent workers)
    "CHAT_MAX_MESSAGES": 200,  # longer conversations get 400
    "CHAT_MAX_OUTPUT_TOKENS": 4096,  # always sent as the reply's token limit; a request's max_tokens is held to it
    "CHAT_MAX_IMAGES": 4,  # image parts per request (0: none accepted)
    "CHAT_MAX_IMAGE_BYTES": 700_000,  # decoded size of one image; its base64 must still fit in CHAT_MAX_BODY_BYTES
    "CHAT_UPSTREAM_RETRIES": 1,  # a refused request is sent again this often, before the first byte; never a timeout
    "CHAT_RETRY_MAX_WAIT": 5.0,  # a 429 asking to wait longer than this goes back to the client at once
    "CHAT_CONNECT_TIMEOUT": 5.0,  # seconds to open a connection to the upstream
    "CHAT_MAX_STREAMS": 900,  # open streams per worker; past it 503. Keep below gunicorn's worker_connections
    "CHAT_API_TOKEN": "",  # when set, /api/chat wants "Authorization: Bearer <token>"
    "CHAT_CORS_ORIGINS": "",  # comma-separated origins allowed to call /api/chat from a browser; empty: none
    "CHAT_DEMO_WORD_SECONDS": 0.05,  # the demo model's pace: slow enough to watch it type
    "CHAT_REASONING": "show",  # show: relay a reasoning model's thinking; hide: keep it from the client
    "CHAT_STREAM_USAGE": "auto",  # ask for usage (stream_options); auto: stop asking a server that refuses it
    "CHAT_MAX_TOKENS_FIELD": "auto",  # max_tokens or max_completion_tokens; auto: the latter for OpenAI only
    "CHAT_EXTRA_BODY": "",  # a JSON object merged into every upstream request, e.g. {"chat_template_kwargs": ...}
    "CHAT_UPSTREAM_API": "chat",  # chat: /v1/chat/completions; responses: /v1/responses (OpenAI's reasoning summaries)
    "CHAT_RESPONSES_STORE": "0",  # 1: let OpenAI store Responses conversations (its own default); 0: never
    "CHAT_REASONING_SUMMARY": "auto",  # Responses: ask for reasoning summaries (auto, concise, detailed) or off
    "CHAT_METRICS": "",  # 1: count streams for Prometheus at /metrics (operate.py); unset or 0: nothing is loaded
    "CHAT_RESUME_SECONDS": 60.0,  # a reply goes on this long with no reader, for one to come back (0: ends at once)
    "CHAT_RESUME_KEEP_SECONDS": 300.0,  # a finished reply can be read again this long
    "CHAT_RESUME_MAX_BYTES": 2_097_152,  # a stream's log keeps its last this many bytes; a resume before them gets 409
    "CHAT_RESUME_WORKER_BYTES": 268_435_456,  # one worker's logs; past it the finished ones go first, oldest first
    "CHAT_RESUME_READERS": 4,  # readers one stream may have at once, besides the one that asked for it
    "CHAT_RESUME_DIR": "",  # the logs shared by one VM's workers (gunicorn.conf.py sets it); empty: this process's
    "CHAT_RESUME_REDIS_URL": "",  # redis://host:6379/0: the logs in Redis, shared by several VMs
}


class SettingError(Exception):
    """A setting the service cannot run with; the message is one sentence naming it."""


def json_object(text):
    try:
        return isinstance(json.loads(text or "{}"), dict)
    except (TypeError, ValueError):
        return False


SECONDS = (in_range(0, 86400, above=True), "a number of seconds above 0, at most 86400")
WAIT = (in_range(0, 3600), "a number of seconds from 0 to 3600")
COUNT = (in_range(1, math.inf, kind=int), "an integer of at least 1")
SETTING_RULES = {  # setting: (check, what it must be); checked when the blueprint is registered
    **{key: (lambda v: isinstance(v, str), "a string") for key, v in DEFAULTS.items() if isinstance(v, str)},
    "CHAT_MODEL": (lambda v: isinstance(v, str) and v.strip() != "", "a model's name"),
    "CHAT_HEARTBEAT_SECONDS": (in_range(0.1, 3600), "a number of seconds from 0.1 to 3600"),
    **dict.fromkeys("CHAT_FIRST_TOKEN_TIMEOUT CHAT_IDLE_TIMEOUT CHAT_MAX_DURATION CHAT_SEND_TIMEOUT".split(), SECONDS),
    **dict.fromkeys("CHAT_CONNECT_TIMEOUT CHAT_BODY_TIMEOUT".split(), SECONDS),
    **dict.fromkeys("CHAT_RETRY_MAX_WAIT CHAT_DEMO_WORD_SECONDS".split(), WAIT),
    **dict.fromkeys("CHAT_MAX_BODY_BYTES CHAT_MAX_MESSAGES CHAT_MAX_STREAMS CHAT_MAX_OUTPUT_TOKENS".split(), COUNT),
    "CHAT_MAX_IMAGE_BYTES": COUNT,
    "CHAT_UPSTREAM_RETRIES": (in_range(0, 10, kind=int), "an integer from 0 to 10"),
    "CHAT_MAX_IMAGES": (in_range(0, 1000, kind=int), "an integer from 0 to 1000"),
    "CHAT_REASONING": one_of("show", "hide"),
    "CHAT_STREAM_USAGE": one_of("auto", "on", "off"),
    "CHAT_MAX_TOKENS_FIELD": one_of("auto", "max_tokens", "max_completion_tokens"),
    "CHAT_EXTRA_BODY": (json_object, "a JSON object"),
    "CHAT_UPSTREAM_API": one_of("chat", "responses"),
    "CHAT_RESPONSES_STORE": one_of("0", "1"),
    "CHAT_REASONING_SUMMARY": one_of("auto", "concise", "detailed", "off"),
    "CHAT_METRICS": (lambda v: v in ("", "0", "1"), "1 (on), or 0 or unset (off)"),
    "CHAT_RESUME_SECONDS": WAIT,
    "CHAT_RESUME_KEEP_SECONDS": SECONDS,
    "CHAT_RESUME_MAX_BYTES": (in_range(4096, 2**32, kind=int), "an integer from 4096 to 4294967296"),
    "CHAT_RESUME_WORKER_BYTES": (in_range(4096, math.inf, kind=int), "an integer of at least 4096"),
    "CHAT_RESUME_READERS": (in_range(1, resume.MAX_READERS, kind=int), f"an integer from 1 to {resume.MAX_READERS}"),
    "CHAT_RESUME_REDIS_URL": (
        lambda v: v == "" or v.startswith(("redis://", "rediss://", "unix://")),
        "a redis:// URL",
    ),
}


def config_from_env(environ=os.environ):
    """Read every setting from the environment, cast to the type of its default where it can be."""
    return {key: cast(type(default), environ.get(key, default)) for key, default in DEFAULTS.items()}


def cast(kind, value):
    try:
        return kind(value)
    except ValueError:
        return value  # left as it is: check_settings names it


def check_settings(config):
    """Raise SettingError, naming the setting, for a value out of range or of the wrong type."""
    for key, (check, must_be) in SETTING_RULES.items():
        if not check(config[key]):
            secret = key.endswith(("_KEY", "_TOKEN", "_URL"))  # a URL may hold a password (redis://:pw@host)
            shown = "" if secret else f", not {config[key]!r}"
            raise SettingError(f"{key} must be {must_be}{shown}.")
    if config["CHAT_MODEL"] not in allowed_models(config):
        raise SettingError(f"CHAT_MODEL={config['CHAT_MODEL']!r} must be one of CHAT_MODELS ({config['CHAT_MODELS']}).")
    check_origins(comma_list(config["CHAT_CORS_ORIGINS"]))


ORIGIN = re.compile(r"https?://[^/?#@\s]+")  # what a browser sends in Origin: scheme, host and port, no path


def check_origins(origins):
    """Raise SettingError for a CORS origin that lets in more than it says, or never matches anything."""
    for origin in origins:
        if origin.lower() == "null":  # sandboxed iframes, local files and some redirects: anyone can be one
            raise SettingError("CHAT_CORS_ORIGINS must not list null: any site can send Origin: null.")
        if origin == "*" and len(origins) > 1:
            raise SettingError("CHAT_CORS_ORIGINS must be * (every site, without credentials) or origins, not both.")
        if origin != "*" and not ORIGIN.fullmatch(origin):
            raise SettingError(f"CHAT_CORS_ORIGINS must list origins such as https://app.example, not {origin!r}.")


# --- The request: check it, open the upstream, relay its reply ----------------------------------

# The page's files get their own URL path: an app's /static would shadow an unprefixed blueprint's.
# Its one CLI command is the app's own: `flask --app app doctor`, not `flask --app app chat doctor`.
chat = Blueprint("chat", __name__, static_folder="static", static_url_path="/chat-static", cli_group=None)


@chat.post("/api/chat")
def chat_reply():
    """Check the request, open the upstream, then stream: every failure before the first byte is an HTTP status."""
    config = current_app.config
    check_token(config["CHAT_API_TOKEN"])
    if "diagnostic" in request.args:  # `flask doctor`'s stream: at the chat's URL, so it takes the chat's proxy path
        require_json()  # or any site could open diagnostic streams from its visitors' browsers, with a form
        read_json(config)  # read its body first, as a chat's is: a proxy may cut a stream answered before
        return diagnostic(config)
    if last_event_id := request.headers.get("Last-Event-ID"):  # a client's retry (fetch-event-source): never paid twice
        named = resume.parse_event_id(last_event_id)
        return resume_reply(named[0] if named else "-", last_event_id)
    model, messages, params = parse_chat_request(config, read_json(config))
    return open_reply(config, model, messages, params, EventStream())


@chat.post("/api/ui-chat")
def ui_chat():
    """The same chat for the AI SDK's useChat: its request body in, its UI message stream out."""
    config = current_app.config
    check_token(config["CHAT_API_TOKEN"])
    body = read_json(config)
    model, messages, params = parse_chat_request(config, native_body(body))
    return open_reply(config, model, messages, params, UIMessageStream(), chat_id=body.get("id"))


def open_reply(config, model, messages, params, encoder, chat_id=None):
    """Take one of the worker's stream slots, open the upstream, and return the Response that relays it."""
    worker = worker_state(current_app)
    if not worker.slots.acquire():
        raise ApiError(503, "too_many_streams", "The server is busy. Please try again shortly.", {"Retry-After": "5"})
    requested_at = time.monotonic()
    try:
        browser = BrowserSocket.of_request(config)
        upstream = worker.upstream.open(model, messages, params, browser.has_left)
    except Unsupported as exc:  # a parameter the upstream's API does not have; nothing was sent
        worker.slots.release()
        raise ApiError(400, "unsupported_parameter", str(exc)) from None
    except (openai.OpenAIError, ClientLeft) as exc:
        worker.slots.release()
        refused = ApiError(*refusal(exc, model))
        if (meter := metrics(config)) and not isinstance(exc, ClientLeft):
            meter.upstream_refused(getattr(exc, "status_code", "none"), refused.error_code)
        raise refused from None
    except BaseException:
        worker.slots.release()  # any other failure (a bug, a worker stopping) must not keep the slot either
        raise
    owner, new_secret = owner_of_new_stream()
    stream_log = resume_logs(current_app).create(owner, resume.chat_key(owner, chat_id) if chat_id else None)
    if stream_log is None and (meter := metrics(config)):
        meter.unresumable()  # its log's store failed (Redis down, a full disk) or its budget is spent
    response = relay_response(
        upstream,
        encoder,
        config,
        model=model,
        watcher=metrics(config),
        requested_at=requested_at,
        stream_log=stream_log,
    )
    # Called by the server however the response ends, once the stream's generation has ended too.
    response.call_on_close(worker.slots.release)
    if new_secret:
        set_owner_cookie(response, new_secret)
    return response


def diagnostic(config):
    """Answer `flask doctor` (operate.py): how a diagnostic stream ended, or one through the real relay."""
    import operate

    if request.args.get("diagnostic") == "report":
        return operate.report(request.args.get("id", ""))
    stream = operate.diagnostic_stream(request.args, config["CHAT_HEARTBEAT_SECONDS"])  # holds one of its slots
    try:
        response = relay_response(
            stream, EventStream(), {**config, **stream.limits}, model="diagnostic", watcher=stream
        )
    except BaseException:
        stream.release()
        raise
    response.call_on_close(stream.release)
    return response


def check_token(token):
    """Refuse the request unless it bears CHAT_API_TOKEN, when one is set (compared in constant time)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if token and not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())):
        raise ApiError(401, "unauthorized", "Send Authorization: Bearer <token>.", {"WWW-Authenticate": "Bearer"})


# --- The relay: its three contracts, its door, and its loop ----------------------------------------
#
# Why one greenlet: a reader greenlet and a queue cost twice the CPU per event, and let a client that
# stops reading pin the stream while the queue grows. Instead the response generator reads the
# upstream itself, waiting no longer than until the next heartbeat or the nearest deadline. A wait
# that ends with nothing read is a heartbeat due or a deadline passed: no timer, no second greenlet.
# Each read becomes one block of bytes, written before the next read, so a stream holds one read's
# worth of the reply; no write is let block: the relay waits for the browser's socket to have room
# (at most CHAT_SEND_TIMEOUT) whenever a write might not fit. gevent makes every wait cooperative;
# under the dev server each stream is a thread. The three contracts below are structural: nothing
# has to import this module to meet them.


class UpstreamStream(Protocol):
    """What the relay reads: upstream.py's ModelStream and DemoStream, operate.py's diagnostic stream, or yours."""

    reader: str  # how it reads, for the stream's log line: "socket", "httpx", "demo", ...
    # Optional, `api`: the API that served it, for the log line and metrics ("chat", "responses", "demo").
    # True once the reply is complete: set by the read that brings the last deltas, or by a later one
    # that brings none. The relay reads no more after it, and sends finish_reason and usage as they are.
    finished: bool
    finish_reason: str | None  # "stop", "length", ...
    usage: dict | None  # the upstream's token counts, or None

    def read(self, timeout: float) -> list[tuple[str, str]]:
        """Wait at most `timeout` seconds and return the ("content" or "reasoning", text) deltas that came; [] if none.

        Wait in a way gevent can switch from (a socket's timeout, time.sleep): a read that returns []
        at once, before its timeout, makes the relay spin. When the reply fails, raise
        upstream.UpstreamError(sentence, error_code, detail): the sentence and the code become the
        error event, the detail goes to the log only.
        """

    def close(self) -> None:
        """Let the reply go; the relay calls it exactly once, however the stream ends."""


class Encoder(Protocol):
    """How one protocol frames a reply (protocols.py: EventStream, UIMessageStream): each method returns bytes."""

    media_type: str  # the response's Content-Type
    headers: dict  # more response headers the protocol wants

    def opened(self) -> bytes: ...  # sent first, with the headers
    def delta(self, kind: str, text: str) -> bytes: ...  # kind: "content" or "reasoning"
    def ping(self) -> bytes: ...  # a heartbeat in a silence
    def end(self, finish_reason: str | None, usage: dict | None) -> bytes: ...  # the complete reply's last bytes
    def error(self, code: str, message: str) -> bytes: ...  # a failure after the first byte; nothing follows


class Watcher(Protocol):
    """Who hears a stream open and, once, how it ended (operate.py's Metrics and diagnostic stream); never per event."""

    def opened(self, stream_id: str) -> None: ...

    def ended(
        self, outcome: str, code: str | None, first: dict, duration: float, usage: dict, deltas: int, api: str
    ) -> None:
        """`outcome` as the log line's end=; `code` the error event's, or the finish reason; `first` maps
        "content" and "reasoning" to the seconds from the request to its first delta; `api` as the log line's."""


def relay_response(upstream, encoder, config=None, *, model="-", watcher=None, requested_at=None, stream_log=None):
    """Return the Response that relays `upstream` to this request's browser, framed by `encoder`.

    The relay's one door, for the blueprint's views and a host's own alike. `config` is an app's
    config or any mapping (None: current_app's); a setting it lacks takes its DEFAULTS value.
    `model` names the stream in its log line, `watcher` hears it open and end, and `requested_at`
    (time.monotonic(), default now) is when the request came: the first output's deadline counts from it.
    `stream_log` (resume.py's writer of the stream's log, or None) makes the reply resumable: every event
    gets its `id:` and goes to the log too, and a reader that leaves does not end the reply at once.
    """
    settings = ChainMap(current_app.config if config is None else config, DEFAULTS)
    log.addFilter(REDACTING)  # once; and so the chat log is redacted with no blueprint registered too
    record = StreamRecord(request_id(), model, requested_at or time.monotonic(), watcher, secrets_of(settings))
    reply = Reply(upstream, encoder, settings, record, stream_log)
    response = stream_response(relay(reply, BrowserSocket.of_request(settings)), encoder, record.stream_id)
    if stream_log is not None:
        response.headers["X-Stream-Id"] = stream_log.stream_id
    return response


def stream_response(blocks, encoder, request_id):
    """Return the Response that streams `blocks`, with the headers every stream has."""
    return StreamResponse(
        blocks,
        # No "Connection: keep-alive": it is hop-by-hop, gunicorn drops it and HTTP/2 forbids it.
        # no-transform: HAProxy's compression (and a CDN's) then leaves the stream alone.
        headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no", "X-Request-Id": request_id}
        | encoder.headers,
        content_type=encoder.media_type,  # text/event-stream is UTF-8 by definition: no charset needed
    )


class StreamResponse(Response):
    """A Response whose blocks the server takes straight from the generator, which already yields bytes.

    werkzeug would wrap it in two layers that cost a call each per block (iter_encoded, ClosingIterator);
    the server calls close() on what it iterates however the response ends, and that is the Response's
    own close(): the generator's, then every call_on_close.
    """

    def get_app_iter(self, environ):
        if environ["REQUEST_METHOD"] == "HEAD":
            return super().get_app_iter(environ)  # no body at all
        return ServerIterable(self.response, self.close)


class ServerIterable:
    """What a WSGI server iterates (PEP 3333): `blocks` themselves, and a close() it calls at the end."""

    def __init__(self, blocks, close):
        self.blocks, self.close = blocks, close

    def __iter__(self):
        return self.blocks


def relay(reply, browser):
    """Yield the reply's blocks to the browser as they come, a heartbeat in each silence; close it however we leave.

    Every way out (done, error, timeout, client gone or stalled, worker shutdown) closes the upstream
    once and logs one line. A client that hangs up makes gunicorn close this generator (GeneratorExit
    at a yield): never catch BaseException here, or that stops working.
    """
    try:
        yield reply.opened()
        while not reply.over:
            block = reply.read(until=browser.last_write + reply.heartbeat)
            if block is None:  # a heartbeat's worth of silence: is anyone still there?
                if browser.has_left():
                    reply.record.end("client_gone")
                    return
                block = reply.encoder.ping()
            yield from browser.send(block, reply.deadline)
        reply.record.end("done")
    except ClientStalled:
        reply.record.end("client_stalled")
        browser.hang_up()  # the server's last write then fails at once instead of blocking
    except GreenletExit:  # the worker gave up waiting for this stream to end: say so, then stop
        yield reply.shut_down()
    finally:
        reply.close(browser.why_closed())  # left at a yield: the server closed us because a write failed


DEADLINES = {  # code: what the error event tells a person
    "first_token_timeout": "The model took too long to start answering.",
    "idle_timeout": "The model stopped answering.",
    "max_duration": "The reply took too long and was stopped.",
}


class Reply:
    """One reply as blocks of bytes: each upstream read framed by the encoder, then the end or an error event.

    Where a block goes is the caller's (the relay writes it to the browser). Reading keeps the
    deadlines: first output and total counted from the request, idle from the last output, shown
    or hidden.
    """

    def __init__(self, upstream, encoder, settings, record, stream_log=None):
        self.upstream, self.encoder, self.record = upstream, encoder, record
        self.heartbeat = settings["CHAT_HEARTBEAT_SECONDS"]
        self.idle = settings["CHAT_IDLE_TIMEOUT"]
        self.first_output_by = record.requested_at + settings["CHAT_FIRST_TOKEN_TIMEOUT"]
        self.ends_by = record.requested_at + settings["CHAT_MAX_DURATION"]
        self.shown = ("content", "reasoning") if settings["CHAT_REASONING"] == "show" else ("content",)
        self.over = False  # the last block (the end, or an error) has been given
        self.code, self.deadline = self.nearest_deadline(None)
        self.stream_log, self.unread_for = stream_log, settings["CHAT_RESUME_SECONDS"]  # resume.py's writer, or None
        self.retry = resume.RETRY if stream_log else b""  # sent once, in the first event's block
        if stream_log is not None:
            stream_log.on_stop = upstream.close  # a stop asked for, in any greenlet, closes the upstream at once

    def opened(self):
        self.record.opened()
        block = self.encoder.opened()
        return block if block.startswith(b":") else self.logged(block)  # a comment, or an event (the AI SDK's start)

    def read(self, until):
        """Return the next block, or None if nothing came by `until` (a time.monotonic()): a heartbeat is due."""
        block = self.next_block(until)
        if block is None and self.stream_log is not None:
            self.stream_log.beat()  # a silence: readers elsewhere must not take the producer for dead
        return block if block is None else self.logged(block)

    def logged(self, block):
        """Return `block` as a response sends it: with its ids, written to the log (once per read), `retry:` once."""
        if self.stream_log is None:
            return block
        block = self.stream_log.add(block)
        if self.over:
            self.stream_log.finish()
        retry, self.retry = self.retry, b""
        return retry + block

    def next_block(self, until):
        try:
            while not self.upstream.finished:
                if self.stream_log is not None and self.stream_log.stopping:
                    return self.stopped()
                deltas = self.upstream.read(min(until, self.deadline) - time.monotonic())
                now = time.monotonic()
                if deltas:
                    self.record.output(deltas, now)
                    self.code, self.deadline = self.nearest_deadline(now)  # thinking is output too
                    shown = [self.encoder.delta(kind, text) for kind, text in deltas if kind in self.shown]
                    if shown:
                        return b"".join(shown)  # one write for all the read's deltas
                elif now >= self.deadline:
                    raise StreamTimeout(DEADLINES[self.code], self.code)
                elif now >= until:
                    return None
            self.over, self.deadline = True, None
            return self.encoder.end(self.upstream.finish_reason, self.upstream.usage)
        except Exception as exc:  # never BaseException: GeneratorExit and GreenletExit must pass
            if self.stream_log is not None and self.stream_log.stopping:  # the stop closed the upstream under the read
                return self.stopped()
            self.over = True
            return self.encoder.error(*self.record.failed(exc))

    def stopped(self):
        """Return the end of a reply stopped on request: every reader sees finish_reason "stop" and [DONE]."""
        self.over = True
        self.record.end("stopped")
        return self.encoder.end("stop", self.upstream.usage)

    def nearest_deadline(self, last_output):
        """Return (code, time.monotonic()) of the deadline that comes first: first output or idle, or the total."""
        code, at = (
            ("first_token_timeout", self.first_output_by)
            if last_output is None
            else ("idle_timeout", last_output + self.idle)
        )
        return ("max_duration", self.ends_by) if self.ends_by < at else (code, at)

    def shut_down(self):
        """Return the error event for a worker that is stopping."""
        self.over = True
        self.record.end("shutdown", "server_shutdown")
        return self.logged(
            self.encoder.error("server_shutdown", "The server is restarting. Please send your message again.")
        )

    def close(self, outcome):
        """Close the upstream and log how the stream ended: `outcome`, unless the stream already said.

        A resumable reply whose reader left first goes on without one (go_on_unread). Its log always
        ends with an event, so that a reader that comes back later sees how it ended.
        """
        left = self.record.outcome or outcome
        if self.stream_log is not None and not self.over:
            if self.unread_for > 0 and left in ("client_gone", "client_stalled"):
                self.record.outcome = None
                self.go_on_unread(left)
            if not self.over:
                self.over = True
                self.logged(self.encoder.error("abandoned", "The reply was stopped: nobody was reading it."))
        self.upstream.close()
        self.record.end(outcome)
        self.record.ended(self.upstream)

    def go_on_unread(self, left):
        """Generate on into the log alone, while a reader may come back: CHAT_RESUME_SECONDS with none attached.

        This runs in the stream's own greenlet, after gunicorn closed its response: a worker told to
        stop waits for it as for any request (graceful_timeout), then ends it the same way (GreenletExit).
        The stream's slot is still taken: the server releases it once this returns.
        """
        unread_since = time.monotonic()
        try:
            while not self.over:
                now = time.monotonic()
                if self.stream_log.readers():
                    unread_since = now
                elif now >= unread_since + self.unread_for:
                    self.record.end(left)  # nobody came back: the reply ends as it would have at once
                    return
                self.read(until=min(now + self.heartbeat, unread_since + self.unread_for))
            self.record.end("done")
        except GreenletExit:
            self.shut_down()


class StreamRecord:
    """One stream's bookkeeping: when output first came and how much, how it ended, its log line, its watcher."""

    def __init__(self, stream_id, model, requested_at, watcher, secrets):
        self.stream_id, self.model, self.requested_at = stream_id, model, requested_at
        self.watcher, self.secrets = watcher, secrets
        self.started = time.monotonic()
        self.first = {}  # kind of output ("content", "reasoning"): seconds from the request to its first delta
        self.counts = {"content": 0, "reasoning": 0}
        self.outcome = self.code = None  # code: the error event's, if one was sent

    def opened(self):
        self.started = time.monotonic()
        if self.watcher:
            self.watcher.opened(self.stream_id)

    def output(self, deltas, now):
        for kind, _ in deltas:
            self.first.setdefault(kind, now - self.requested_at)
            self.counts[kind] += 1

    def end(self, outcome, code=None):
        """Say how the stream ended; the first to say wins."""
        if self.outcome is None:
            self.outcome, self.code = outcome, code

    def failed(self, exc):
        """Note that the reply failed with `exc`; return the (code, sentence) its error event carries."""
        if not isinstance(exc, UpstreamError):  # a bug of ours, not the upstream's
            self.end("error", "relay_error")
            log.exception("stream %s failed: relay_error", self.stream_id, extra={"secrets": self.secrets})
            return "relay_error", "The reply failed."
        code = exc.error_code
        self.end("timeout" if isinstance(exc, StreamTimeout) else "error", code)
        log.warning("stream %s failed: %s %s", self.stream_id, code, exc.detail, extra={"secrets": self.secrets})
        return code, str(exc)

    def ended(self, upstream):
        """Log the stream's one line and tell the watcher, once the upstream is closed."""
        duration = time.monotonic() - self.started
        usage = upstream.usage if isinstance(upstream.usage, dict) else {}
        details = usage.get("completion_tokens_details")
        details = details if isinstance(details, dict) else {}
        api = getattr(upstream, "api", "-")  # a host's own stream may not say
        log.info(
            "stream %s model=%s end=%s ttfr=%s ttft=%s duration=%.3fs events=%d tokens=%s reasoning=%s"
            " reader=%s api=%s",
            self.stream_id,
            self.model,
            self.outcome,
            seconds(self.first.get("reasoning")),
            seconds(self.first.get("content")),
            duration,
            self.counts["content"],
            usage.get("completion_tokens", self.counts["content"] + self.counts["reasoning"]),
            details.get("reasoning_tokens", self.counts["reasoning"]),
            upstream.reader,
            api,
            extra={"secrets": self.secrets},
        )
        if self.watcher:
            deltas = sum(self.counts.values())
            self.watcher.ended(
                self.outcome, self.code or upstream.finish_reason, self.first, duration, usage, deltas, api
            )


def seconds(value):
    return "-" if value is None else f"{value:.3f}s"


# --- Resuming: a stream read again from its log -------------------------------------------------------
#
# A resumable reply's events are written to its log (resume.py) as they are sent. A reader that
# comes back names the stream (its id is a capability: 144 random bits) and the last event it has;
# it must also be the stream's owner: the same CHAT_API_TOKEN, or else the cookie the POST set.
# Anything else is the same 404, so that a guess learns nothing.

OWNER_COOKIE = "chat_owner"
OWNER_SECRET = re.compile(r"[A-Za-z0-9_-]{32}")


@chat.get("/api/chat/<stream_id>")
def chat_resume(stream_id):
    """Read a stream again after its event `Last-Event-ID` (or `?after=`), or from its start."""
    check_token(current_app.config["CHAT_API_TOKEN"])
    return resume_reply(stream_id, request.headers.get("Last-Event-ID") or request.args.get("after"))


@chat.post("/api/chat/<stream_id>/stop")
def chat_stop(stream_id):
    """Stop a stream's generation now (the page's Stop): its log ends with finish_reason "stop"; 204 however often."""
    check_token(current_app.config["CHAT_API_TOKEN"])
    with refusals():
        resume_logs(current_app).stop(stream_id, stream_owner())
    return "", 204


@chat.get("/api/ui-chat/<chat_id>/stream")
def ui_chat_resume(chat_id):
    """The AI SDK's resume (useChat's `resume: true`): the chat's latest stream from its start, or 204 if none."""
    check_token(current_app.config["CHAT_API_TOKEN"])
    logs, owner = resume_logs(current_app), stream_owner()
    name = logs.pointed(resume.chat_key(owner, chat_id))
    try:
        reader = logs.open_named(name, owner, 0) if name else None
    except resume.LogRefusal as refusal:
        if refusal.status != 404:
            raise ApiError(refusal.status, refusal.code, str(refusal)) from None
        reader = None
    return replay_response(reader, UIMessageStream()) if reader else Response(status=204)


@chat.post("/api/ui-chat/<chat_id>/stop")
def ui_chat_stop(chat_id):
    """Stop the chat's latest stream: the AI SDK's stop() only aborts its fetch, which a resumable reply outlives."""
    check_token(current_app.config["CHAT_API_TOKEN"])
    logs, owner = resume_logs(current_app), stream_owner()
    name = logs.pointed(resume.chat_key(owner, chat_id))
    if name is None:
        raise ApiError(*resume.NOT_FOUND)
    with refusals():
        logs.stop_named(name, owner)
    return "", 204


def resume_reply(stream_id, last_event_id):
    """Return the response that reads `stream_id` again after `last_event_id` (None: from its start)."""
    position = 0
    if last_event_id:
        named = resume.parse_event_id(last_event_id)
        if named is None or named[0] != stream_id:
            raise ApiError(*resume.NOT_FOUND)
        position = named[1]
    with refusals():
        reader = resume_logs(current_app).open(stream_id, stream_owner(), position)
    return replay_response(reader, EventStream())


def replay_response(reader, encoder):
    """Return the Response that sends what `reader` reads; a slot of the worker's is taken while it does."""
    slots = worker_state(current_app).slots
    if not slots.acquire():
        reader.close()
        raise ApiError(503, "too_many_streams", "The server is busy. Please try again shortly.", {"Retry-After": "5"})
    settings = ChainMap(current_app.config, DEFAULTS)
    browser = BrowserSocket.of_request(settings)
    response = stream_response(
        replay(reader, encoder, browser, settings["CHAT_HEARTBEAT_SECONDS"]), encoder, request_id()
    )
    response.headers["X-Stream-Id"] = reader.stream_id
    response.call_on_close(slots.release)
    return response


def replay(reader, encoder, browser, heartbeat):
    """Yield a log from the reader's cursor, then live as it grows, to its end; a heartbeat in each silence.

    The bytes are the log's, so a reader gets exactly what the first one did, ids included; only
    `retry:` (once) and the heartbeats are this response's own.
    """
    retry = resume.RETRY
    try:
        yield b": ok\n"
        while not reader.finished:
            data = reader.read(browser.last_write + heartbeat - time.monotonic())
            if reader.lost:  # its producer died (kill -9, out of memory): say so rather than wait for ever
                lost = encoder.error("stream_lost", "The reply was lost. Please send your message again.")
                yield from browser.send(retry + reader.last_id_line() + lost)
                return
            if data:
                yield from browser.send(retry + data)
                retry = b""
            elif time.monotonic() >= browser.last_write + heartbeat and not reader.finished:
                if browser.has_left():
                    return
                yield from browser.send(encoder.ping())
    except resume.LogRefusal as refusal:  # it fell more than CHAT_RESUME_MAX_BYTES behind the producer
        yield from browser.send(retry + reader.last_id_line() + encoder.error(refusal.code, str(refusal)))
    except ClientStalled:
        browser.hang_up()
    finally:
        reader.close()


def stream_owner():
    """Return who asks, as a log keeps its owner: the API token's hash, else the owner cookie's (NOBODY without)."""
    token = current_app.config["CHAT_API_TOKEN"]
    secret = token or request.cookies.get(OWNER_COOKIE, "")
    return resume.owner_key(secret) if token or OWNER_SECRET.fullmatch(secret) else NOBODY


NOBODY = bytes(32)  # the owner of no stream: a request without the cookie gets the same 404 as any other


def owner_of_new_stream():
    """Return (owner, a new cookie secret to set, or None): a browser without the cookie gets one now."""
    owner = stream_owner()
    if owner != NOBODY:
        return owner, None
    secret = resume.new_owner()
    return resume.owner_key(secret), secret


def set_owner_cookie(response, secret):
    """Bind this browser's streams to it: only it sends the cookie back (HttpOnly: no script reads it)."""
    path = url_for("chat.chat_reply").rsplit("/", 1)[0]  # /api, or /assistant/api where the blueprint is mounted
    response.set_cookie(
        OWNER_COOKIE, secret, max_age=365 * 86400, path=path, httponly=True, samesite="Lax", secure=request.is_secure
    )


@contextlib.contextmanager
def refusals():
    """Turn the log's refusals (404, 409, 429) into the one JSON error."""
    try:
        yield
    except resume.LogRefusal as refusal:
        headers = {"Retry-After": "5"} if refusal.status == 429 else None
        raise ApiError(refusal.status, refusal.code, str(refusal), headers) from None


def resume_logs(app):
    """Return the worker's stream logs for `app`, made on first use, after gunicorn forked the worker.

    With CHAT_RESUME_REDIS_URL they are in Redis, for several VMs. Else in CHAT_RESUME_DIR, which
    gunicorn.conf.py makes for all of the master's workers; without it (flask run, one process) in a
    directory of this process's own.
    """
    if "chat.resume" not in app.extensions:
        settings = ChainMap(app.config, DEFAULTS)
        if settings["CHAT_RESUME_REDIS_URL"]:
            logs = resume.RedisLogs(settings["CHAT_RESUME_REDIS_URL"], settings)
        else:
            logs = resume.FileLogs(settings["CHAT_RESUME_DIR"], settings)
        app.extensions["chat.resume"] = logs
    return app.extensions["chat.resume"]


# --- The browser's end: has it left, will it take bytes --------------------------------------------

poll_now = get_original("select", "poll")  # the unpatched one: gevent's would switch to its hub just to ask
WRITE_PIECE = 16 * 1024  # less than a socket that polls writable has room for, so no write blocks midway
# Linux's TCP polls writable only while the free send buffer is at least half of what is queued, i.e. at
# least a third of SO_SNDBUF (the kernel's double of SOCKET_BUFFER): after a poll that says so, this much
# more goes in without blocking, so the relay asks again only when it has written that much.
ROOM_AFTER_POLL = SOCKET_BUFFER // 4


class ClientStalled(Exception):
    """The browser took no bytes for CHAT_SEND_TIMEOUT; nothing more can be written to it."""


class BrowserSocket:
    """The browser's socket, as the relay needs it: has it left, has it room, is it stalled.

    `sock` is gunicorn's socket for the request (werkzeug's under the dev server), or None when the
    server gives none: the relay then just yields, as any WSGI app does. Asking costs one real
    poll() (not select(), which fails on descriptors past 1024); only waiting goes through gevent's.
    """

    def __init__(self, sock, config):
        self.sock, self.send_timeout, self.writing_since = sock, config["CHAT_SEND_TIMEOUT"], None
        self.last_write = time.monotonic()
        self.room = 0  # bytes the socket surely takes without blocking, from the last poll that said writable
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.settimeout(self.send_timeout)  # a backstop: a write that still blocks midway gives up too

    @classmethod
    def of_request(cls, config):
        """The socket of the request being served (gunicorn's, or werkzeug's under the dev server), made once."""
        environ = request.environ
        if "chat.browser_socket" not in environ:
            sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
            environ["chat.browser_socket"] = cls(sock, config)
        return environ["chat.browser_socket"]

    def send(self, data, deadline=None):
        """Yield `data` for the server to write, in pieces, each once the socket has room for it.

        It asks the kernel (a poll) only when what it wrote since the last answer may have used up the
        room that answer promised (ROOM_AFTER_POLL): for small events, once in hundreds of writes.

        A browser whose socket takes nothing for CHAT_SEND_TIMEOUT seconds, or until `deadline`, has
        stalled: ClientStalled.
        """
        for start in range(0, len(data), WRITE_PIECE):
            piece = data[start : start + WRITE_PIECE]
            if len(piece) > self.room:
                self.wait_for_room(deadline)
            self.room -= len(piece)
            self.writing_since = time.monotonic()
            yield piece
            self.writing_since = None
        self.last_write = time.monotonic()

    def wait_for_room(self, deadline):
        """Wait until a write would go through; ClientStalled after CHAT_SEND_TIMEOUT, or at `deadline`."""
        if not self.has_room():
            wait = self.send_timeout if deadline is None else min(self.send_timeout, deadline - time.monotonic())
            poller = select.poll()  # gevent's, under gunicorn: the wait blocks only this stream
            poller.register(self.sock, select.POLLOUT)
            if not poller.poll(max(0.0, wait) * 1000):
                raise ClientStalled
        self.room = ROOM_AFTER_POLL

    def has_room(self, events=select.POLLOUT):
        """Tell, without waiting, whether a write would go through (or, with POLLIN, a read)."""
        if self.sock is None:
            return events == select.POLLOUT
        poller = poll_now()
        poller.register(self.sock, events)
        return bool(poller.poll(0))

    def has_left(self):
        """Tell whether the browser closed its end, so a silent stream ends now, not one failed write later.

        A write after the browser closed still succeeds (the kernel takes it, the peer answers with a
        reset), so heartbeats alone notice only at the second one.
        """
        try:
            return self.has_room(select.POLLIN) and not self.sock.recv(1, socket.MSG_PEEK)  # readable, empty
        except OSError:  # reset by the peer: gone as well
            return True

    def why_closed(self):
        """Say why the server closed the stream at a write: it failed (gone) or hit the backstop (stalled)."""
        stuck = self.writing_since is not None and time.monotonic() - self.writing_since >= self.send_timeout
        return "client_stalled" if stuck else "client_gone"

    def hang_up(self):
        """Shut a stalled browser's connection, so that no write to it can block again."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except (AttributeError, OSError):  # no socket, or already gone
            pass


# --- Plumbing: per-worker state, errors and redaction, CORS, the page, health -----------------------


class WorkerState:
    """What one worker process keeps for an app: its way to the model and its count of open streams."""

    def __init__(self, config):
        self.slots = StreamSlots(config["CHAT_MAX_STREAMS"])
        self.upstream = Upstream(config)  # its SDK clients (or the demo model), made after the fork


def worker_state(app):
    """Return `app`'s WorkerState, made on first use (gunicorn builds the app in each worker, after the fork)."""
    if "chat" not in app.extensions:
        app.extensions["chat"] = WorkerState(app.config)
    return app.extensions["chat"]


class StreamSlots:
    """Count this worker's open streams; past CHAT_MAX_STREAMS, say "come back" rather than queue."""

    def __init__(self, cap):
        self.cap, self.open, self.lock = cap, 0, threading.Lock()

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
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:12]


@chat.errorhandler(HTTPException)
def error_response(exc):
    """The one error path: every failure before the stream is {"error": {"message", "code"}} with its status.

    On the AI SDK's route the body is the sentence alone: useChat shows a refused request's body,
    as it is, as the error's message.
    """
    code = getattr(exc, "error_code", None) or exc.name.lower().replace(" ", "_")
    headers = getattr(exc, "headers", None) or {}
    if meter := metrics(current_app.config):
        meter.refused_before_stream(exc.code, code)
    # An upstream's 400 is passed on in its own words.
    message = from_outside(exc.description, SHOWN_CHARACTERS, secrets_of(current_app.config))
    if request.path.endswith("/api/ui-chat"):
        return Response(message, exc.code, headers, mimetype="text/plain")
    return jsonify(error={"message": message, "code": code}), exc.code, headers


# --- Text from outside (an upstream's errors, a client's values), on its way to a client or the log ---

KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_-]{6,}|\b[Bb]earer\s+[A-Za-z0-9._~+/=-]{6,}")
SHORTEST_PIECE = 8  # a piece of a configured secret this long, at either end of it, is redacted too
SHOWN_CHARACTERS, LOGGED_CHARACTERS = 500, 300  # of one value from outside, to a client and into the log
READ_CHARACTERS = 4000  # what lies past this in one value is never shown, so it is not searched either
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # line breaks, ANSI escapes and the like


def secrets_of(config):
    """Return the configured key and token: an app's own (or a relay's settings'), never pooled with another's."""
    return [value for value in (config.get("OPENAI_API_KEY"), config.get("CHAT_API_TOKEN")) if value]


@functools.lru_cache(maxsize=64)
def pieces_of(secret):
    """A pattern of the pieces that start or end `secret` (a key cut short, or half echoed)."""
    shortest = min(len(secret), SHORTEST_PIECE)
    pieces = {piece for n in range(shortest, len(secret) + 1) for piece in (secret[:n], secret[-n:])}
    return re.compile("|".join(map(re.escape, sorted(pieces, key=len, reverse=True))))


def redact(text, secrets=()):
    """Hide key-like strings (sk-..., bearer tokens) and `secrets` (secrets_of a config), whole or in pieces."""
    for secret in secrets:
        text = text.replace(secret, "[redacted]")
        if secret[:SHORTEST_PIECE] in text or secret[-SHORTEST_PIECE:] in text:  # most text has neither end
            text = pieces_of(secret).sub("[redacted]", text)
    return KEY_LIKE.sub("[redacted]", text)


def from_outside(text, limit, secrets=()):
    """Redact a value that came from outside, then cut it to `limit` characters: the other way round, a
    key across the cut would go out less its last character."""
    return redact(text[:READ_CHARACTERS], secrets)[:limit]


def one_line(text):
    """Escape control characters, so that a value cannot start a log line of its own or hide one."""
    return CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


class Redacting(logging.Filter):
    """Keep the "chat" log's lines true: every value in one (upstream text included) is redacted, cut and
    escaped, so that none can leak a key or forge a line. The lines' wording is the code's own.

    The secrets are the line's own (`extra={"secrets": ...}`: the relay logs after its request has
    gone), else those of the app serving the request.
    """

    def filter(self, record):
        secrets = getattr(record, "secrets", None)
        if secrets is None:
            secrets = secrets_of(current_app.config) if has_app_context() else ()
        if isinstance(record.args, dict):  # log.info("%(name)s", {...})
            record.args = {name: logged(value, secrets) for name, value in record.args.items()}
        else:
            record.args = tuple(logged(value, secrets) for value in record.args or ())
        record.msg, record.args = one_line(redact(record.getMessage(), secrets)), None
        return True


def logged(value, secrets=()):
    """A log line's value as the line shows it: numbers as they are, anything else as text from outside."""
    return value if isinstance(value, int | float) else from_outside(str(value), LOGGED_CHARACTERS, secrets)


REDACTING = Redacting()


@chat.route("/api/chat", methods=["GET", "PUT", "PATCH", "DELETE"])
@chat.route("/api/ui-chat", methods=["GET", "PUT", "PATCH", "DELETE"])
def chat_wrong_method():
    """A wrong method gets the JSON error too: Flask's own 405 never reaches a blueprint's handler."""
    raise ApiError(405, "method_not_allowed", "Use POST.", {"Allow": "POST"})


@chat.after_request
def allow_listed_origins(response):
    """Allow cross-origin calls from CHAT_CORS_ORIGINS only; none by default, as the page is same-origin."""
    allowed = comma_list(current_app.config["CHAT_CORS_ORIGINS"])
    origin = request.headers.get("Origin")
    if allowed == ["*"]:  # every site, and so without credentials: cookies are never sent, bearer tokens still are
        origin = "*"
    elif allowed:
        response.vary.add("Origin")
    if origin in allowed:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Methods"] = "GET, POST"  # GET: resuming a stream
        response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization, Last-Event-ID"
        response.headers["Access-Control-Expose-Headers"] = "Retry-After, X-Request-Id, X-Stream-Id"
        response.headers["Access-Control-Max-Age"] = "600"
        if origin != "*" and not current_app.config["CHAT_API_TOKEN"]:  # the owner cookie binds streams: send it
            response.headers["Access-Control-Allow-Credentials"] = "true"
    return response


@chat.after_request
def forbid_sniffing(response):
    """Every response: read as the type it says, never sniffed (JSON or an upload shown as HTML), and no
    Referer sent to the sites a reply links to. A host's own values win."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")  # nginx.conf sends the same
    return response


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


@chat.get("/api/models")
def models():
    """Tell the page which models a request may name, and which one it gets by default."""
    return {"models": allowed_models(current_app.config), "default": current_app.config["CHAT_MODEL"]}


@chat.get("/healthz")
def healthz():
    """Answer load balancers without touching the upstream; the figures are this worker's."""
    return {"status": "ok", "open_streams": worker_state(current_app).slots.open}


# --- Operating it: metrics, and the doctor's command (both in operate.py, loaded only when used) ----


def metrics(config):
    """Return operate.py's metrics when CHAT_METRICS is 1, else None: prometheus_client is then never imported."""
    if config["CHAT_METRICS"] != "1":
        return None
    import operate

    return operate.metrics()


@chat.get("/metrics")
def prometheus_metrics():
    """Serve the Prometheus text format, summed over all workers. nginx.conf lets only the machine itself in."""
    if meter := metrics(current_app.config):
        return meter.exposition()
    raise ApiError(404, "not_found", "Metrics are off: set CHAT_METRICS=1.")


@chat.cli.command("doctor")
@click.argument("url")
@click.option("--silence", default=70.0, type=click.FloatRange(0, 600), help="Seconds of silence to hold (default 70).")
@click.option("--token", help="The deployment's CHAT_API_TOKEN (default: this app's).")
@click.option("--cafile", help="CA certificates to trust for TLS, besides the system's (PEM).")
@click.option("--insecure", is_flag=True, help="Send the token even to a server whose certificate is not trusted.")
def doctor(url, silence, token, cafile, insecure):
    """Check that a deployment streams: buffering, compression, headers, silences, aborts, HTTP/2, TLS."""
    import operate

    token = current_app.config["CHAT_API_TOKEN"] if token is None else token
    raise SystemExit(operate.doctor(url, silence, token, cafile, insecure=insecure))


@chat.record_once
def apply_defaults(state):
    """Fill in settings the host app has not set, and say once if the demo model will answer."""
    for key, value in config_from_env().items():
        state.app.config.setdefault(key, value)
    check_settings(state.app.config)
    log.addFilter(REDACTING)
    if uses_demo(state.app.config):
        log.warning(
            "No OPENAI_API_KEY or OPENAI_BASE_URL: the built-in demo model answers. "
            "Set OPENAI_API_KEY for OpenAI, or OPENAI_BASE_URL for a compatible server."
        )


def create_app(config=None):
    """Build a Flask app serving the chat blueprint; `config` overrides the environment.

    gunicorn calls it in each worker ('app:create_app()'), after gevent has patched the standard
    library; nothing is built when this module is imported.
    """
    # The stream log under `flask run`; a no-op under gunicorn, whose logging is set up first.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Flask(__name__, static_folder=None)  # the blueprint serves static/ at /chat-static
    # /api//models is a 404, not Werkzeug's redirect to /api/models: it would be built from the Host header.
    app.url_map.merge_slashes = False
    app.config.update(config or {})
    app.register_blueprint(chat)
    app.after_request(forbid_sniffing)  # the app's own responses too (a 404 outside the blueprint's URLs)
    worker_state(app).upstream.warm_up()  # the SDK clients now, not on the first request (~50 ms)
    resume_logs(app)  # with CHAT_RESUME_REDIS_URL, importing redis-py would cost the first resume ~100 ms
    return app
