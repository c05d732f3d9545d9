"""Stream an LLM's chat reply to the browser as Server-Sent Events.

One Flask module: ``POST /api/chat`` takes ``{"messages": [...]}`` and answers with
``text/event-stream``, one ``data: {"content": ...}`` event per token and ``data: [DONE]``
at the end; ``POST /api/ui-chat`` is the same chat in the Vercel AI SDK's protocol, for its
``useChat``. The upstream is any OpenAI-compatible server, reached with the official
``openai`` SDK; with neither ``OPENAI_API_KEY`` nor ``OPENAI_BASE_URL`` set, a built-in
demo model answers, so everything runs offline.

Run it:   gunicorn -c gunicorn.conf.py 'app:create_app()'    (production: gevent workers)
          flask --app app run                              (development)
Mount it: from app import chat; other_app.register_blueprint(chat, url_prefix="/assistant")
Check it: flask --app app doctor https://chat.example.com/      (the whole path to the browser: operate.py)
"""

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

import click
import gevent
import openai
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from gevent.monkey import get_original, is_module_patched
from greenlet import GreenletExit  # how gevent stops a stream that outlives the worker's graceful_timeout
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from protocols import EventStream, UIMessageStream, check_content, is_text, native_body
from upstream import SOCKET_BUFFER, ClientLeft, StreamTimeout, Upstream, UpstreamError, refusal, uses_demo

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
    "CHAT_METRICS": "",  # 1: count streams for Prometheus at /metrics (operate.py); unset or 0: nothing is loaded
}


class SettingError(Exception):
    """A setting the service cannot run with; the message is one sentence naming it."""


def in_range(low, high, above=False, kind=(int, float)):
    """Return a check: a number of `kind` (never a bool) from low (or above it) to high."""
    return lambda v: isinstance(v, kind) and not isinstance(v, bool) and (v > low if above else v >= low) and v <= high


def one_of(*choices):
    """Return a check that a value is one of `choices`, and what it must be."""
    return lambda v: v in choices, f"one of {', '.join(choices)}"  # a tuple: `[] in` it is False, not a TypeError


def json_object(text):
    try:
        return isinstance(json.loads(text or "{}"), dict)
    except (TypeError, ValueError):
        return False


SECONDS = (in_range(0, 86400, above=True), "a number of seconds above 0, at most 86400")
WAIT = (in_range(0, 3600), "a number of seconds from 0 to 3600")
COUNT = (in_range(1, math.inf, kind=int), "an integer of at least 1")
SETTING_RULES = {  # setting: (check, what it must be); checked when the app is created
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
    "CHAT_METRICS": (lambda v: v in ("", "0", "1"), "1 (on), or 0 or unset (off)"),
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
            shown = "" if key.endswith(("_KEY", "_TOKEN")) else f", not {config[key]!r}"
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


def comma_list(value):
    """Split a comma-separated setting into its non-empty items."""
    return [item.strip() for item in value.split(",") if item.strip()]


def allowed_models(config):
    """Return the models a request may name: CHAT_MODELS, or just CHAT_MODEL."""
    return comma_list(config["CHAT_MODELS"]) or [config["CHAT_MODEL"]]


# --- The request: validate, open the upstream, return the stream ---------------------------------

# The page's files get their own URL path: an app's /static would shadow an unprefixed blueprint's.
# Its one CLI command is the app's own: `flask --app app doctor`, not `flask --app app chat doctor`.
chat = Blueprint("chat", __name__, static_folder="static", static_url_path="/chat-static", cli_group=None)


class ApiError(HTTPException):
    """Every failure before the stream: an HTTP status, a code for programs and a sentence for people."""

    def __init__(self, status, code, message, headers=None):
        super().__init__(message)
        # Werkzeug calls the HTTP status `code`; the body's short code for programs is `error_code`.
        self.code, self.error_code, self.headers = status, code, headers or {}


@chat.post("/api/chat")
def chat_reply():
    """Validate, open the upstream, then stream: every failure before the first byte is an HTTP status."""
    config = current_app.config
    check_token(config["CHAT_API_TOKEN"])
    if "diagnostic" in request.args:  # `flask doctor`'s stream: at the chat's URL, so it takes the chat's proxy path
        require_json()  # or any site could open diagnostic streams from its visitors' browsers, with a form
        import operate

        return operate.diagnostic(request.args, config, relay_diagnostic)
    model, messages, params = parse_chat_request(config, read_json(config))
    return stream_reply(config, model, messages, params, EventStream())


@chat.post("/api/ui-chat")
def ui_chat():
    """The same chat for the AI SDK's useChat: its request body in, its UI message stream out."""
    config = current_app.config
    check_token(config["CHAT_API_TOKEN"])
    try:
        body = native_body(read_json(config))
    except ValueError as exc:  # the message names the field as the AI SDK spells it
        raise invalid(str(exc)) from None
    model, messages, params = parse_chat_request(config, body)
    return stream_reply(config, model, messages, params, UIMessageStream())


def stream_reply(config, model, messages, params, events):
    """Open the upstream, then return the response that relays it, encoded by `events` (one per protocol)."""
    worker = worker_state(current_app)
    if not worker.slots.acquire():
        raise ApiError(503, "too_many_streams", "The server is busy. Please try again shortly.", {"Retry-After": "5"})
    requested_at = time.monotonic()
    client = Client.of_request(config)
    try:
        upstream = worker.upstream.open(model, messages, params, client.has_left)
    except (openai.OpenAIError, ClientLeft) as exc:
        worker.slots.release()
        refused = ApiError(*refusal(exc, model))
        if (meter := metrics(config)) and not isinstance(exc, ClientLeft):
            meter.upstream_refused(getattr(exc, "status_code", "none"), refused.error_code)
        raise refused from None
    except BaseException:
        worker.slots.release()  # any other failure (a bug, a worker stopping) must not keep the slot either
        raise
    return respond(upstream, events, client, config, model, requested_at, worker.slots.release, metrics(config))


def respond(upstream, events, client, config, model, requested_at, release, watch=None):
    """Return the Response that relays `upstream`; `release` is called however it ends."""
    stream_id = request_id()
    response = Response(
        relay(upstream, events, client, config, stream_id, model, requested_at, watch),
        # No "Connection: keep-alive": it is hop-by-hop, gunicorn drops it and HTTP/2 forbids it.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": stream_id, **events.headers},
        content_type=events.media_type,  # text/event-stream is UTF-8 by definition: no charset needed
    )
    response.call_on_close(release)  # called by the server however the response ends
    return response


def relay_diagnostic(stream, config, release):
    """Relay operate.py's diagnostic stream like a model's reply, in the native format; no model is called."""
    client = Client.of_request(config)
    return respond(stream, EventStream(), client, config, "diagnostic", time.monotonic(), release, stream)


def check_token(token):
    """Refuse the request unless it bears CHAT_API_TOKEN, when one is set (compared in constant time)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if token and not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())):
        raise ApiError(401, "unauthorized", "Send Authorization: Bearer <token>.", {"WWW-Authenticate": "Bearer"})


ROLES = ("system", "developer", "user", "assistant")  # a tuple: `[] in ROLES` is False, not a TypeError
MESSAGE_FIELDS = {"role", "content", "name"}


def is_stop(value):
    return is_text(value) or (isinstance(value, list) and len(value) <= 4 and all(map(is_text, value)))


# The OpenAI parameters a request may set: name -> (check, what the 400 says it must be).
PARAMETERS = {
    "temperature": (in_range(0, 2), "a number from 0 to 2"),
    "top_p": (in_range(0, 1, above=True), "a number above 0, at most 1"),
    "max_tokens": (in_range(1, math.inf, kind=int), "an integer of at least 1"),
    "stop": (is_stop, "a string or a list of up to 4 strings"),
    "seed": (in_range(-(2**63), 2**63 - 1, kind=int), "a 64-bit integer"),
    "presence_penalty": (in_range(-2, 2), "a number from -2 to 2"),
    "frequency_penalty": (in_range(-2, 2), "a number from -2 to 2"),
    "reasoning_effort": one_of("none", "minimal", "low", "medium", "high"),
}
REQUEST_FIELDS = {"messages", "model", *PARAMETERS}


class BodyTimeout(Exception):
    """The request's body took longer than CHAT_BODY_TIMEOUT to arrive."""


def require_json():
    """Refuse a body that is not JSON. A page on another site can POST a form or text/plain here unasked;
    JSON needs a CORS preflight first, which only CHAT_CORS_ORIGINS pass."""
    if request.mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json.")


def read_json(config):
    """Return the request's JSON body, or raise ApiError: not JSON, too large, not UTF-8, too deep."""
    require_json()
    limit = request.max_content_length = config["CHAT_MAX_BODY_BYTES"]
    # A body that trickles in would hold its connection for good: under gevent, cut it at a total time.
    allowed = config["CHAT_BODY_TIMEOUT"] if is_module_patched("socket") else None  # None: no timer at all
    try:
        with gevent.Timeout(allowed, BodyTimeout):
            data = request.get_data(cache=False)  # 413 at once for a Content-Length over the limit
            if len(data) == limit:  # a chunked body is cut off at the limit silently: reading on says 413
                request.stream.read(1)
        body = json.loads(data.decode("utf-8"))
    except BodyTimeout:
        raise ApiError(408, "body_timeout", f"The body was not all sent within {allowed:g} s.") from None
    except RequestEntityTooLarge:
        raise ApiError(413, "body_too_large", f"The body is larger than {limit - 1} bytes.") from None
    except UnicodeDecodeError:
        raise invalid("The body is not UTF-8.") from None
    except RecursionError:
        raise invalid("The body is nested too deeply.") from None
    except ValueError as exc:
        raise invalid(f"The body is not valid JSON: {exc}.") from None
    return body


def parse_chat_request(config, body):
    """Return (model, messages, parameters to send) from the request's body, or raise ApiError naming the field."""
    if not isinstance(body, dict):
        raise invalid("The body must be a JSON object.")
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        raise invalid(f"Unknown field: {unknown[0][:100]}.")

    model = body.get("model", config["CHAT_MODEL"])
    if model not in allowed_models(config):
        named = model[:100] if isinstance(model, str) else "not a string"
        raise invalid(f"Unknown model: {named}. Allowed: {', '.join(allowed_models(config))}.")
    params = {name: body[name] for name in PARAMETERS if name in body}
    for name, value in params.items():
        if not PARAMETERS[name][0](value):
            raise invalid(f"{name} must be {PARAMETERS[name][1]}.")
    params["max_tokens"] = min(params.get("max_tokens", math.inf), config["CHAT_MAX_OUTPUT_TOKENS"])

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list.")
    if len(messages) > config["CHAT_MAX_MESSAGES"]:
        limit = config["CHAT_MAX_MESSAGES"]
        raise ApiError(400, "too_many_messages", f"The conversation has more than {limit} messages.")
    images = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}] must be an object.")
        unknown = sorted(set(message) - MESSAGE_FIELDS)
        if unknown:
            raise invalid(f"messages[{i}] has an unknown field: {unknown[0][:100]}.")
        if message.get("role") not in ROLES:
            raise invalid(f"messages[{i}].role must be one of {', '.join(ROLES)}.")
        if "name" in message and not is_text(message["name"]):
            raise invalid(f"messages[{i}].name must be a string (no lone surrogates).")
        try:
            images += check_content(message.get("content"), f"messages[{i}].content", message["role"], config)
        except ValueError as exc:
            raise invalid(str(exc)) from None
    if images > config["CHAT_MAX_IMAGES"]:
        raise invalid(f"The conversation has {images} images; at most {config['CHAT_MAX_IMAGES']} are allowed.")
    if config["CHAT_SYSTEM_PROMPT"]:
        messages = [{"role": "system", "content": config["CHAT_SYSTEM_PROMPT"]}, *messages]
    return model, messages, params


def invalid(message):
    """A 400 for a body we cannot use; the message names the field."""
    return ApiError(400, "invalid_request", message)


# --- The relay: upstream deltas in, SSE events out, in one greenlet per stream -------------------
#
# Why one greenlet: a reader greenlet and a queue cost twice the CPU per event, and let a client that
# stops reading pin the stream while the queue grows. Instead the response generator reads the
# upstream itself (upstream.ModelStream: straight from the socket, or through httpx for a body it
# cannot read that way), waiting no longer than until the next heartbeat or the nearest deadline.
# A wait that ends with nothing read is a heartbeat due or a deadline passed: no timer, no second
# greenlet. It writes what it read before it reads more, so a stream holds one read's worth of the
# reply, and before each write it waits for the client's socket to have room, at most
# CHAT_SEND_TIMEOUT. gevent makes every wait cooperative; under the dev server each stream is a thread.


class ClientStalled(Exception):
    """The client took no bytes for CHAT_SEND_TIMEOUT; nothing more can be written to it."""


DEADLINES = {  # code: (setting, message for a person)
    "first_token_timeout": ("CHAT_FIRST_TOKEN_TIMEOUT", "The model took too long to start answering."),
    "idle_timeout": ("CHAT_IDLE_TIMEOUT", "The model stopped answering."),
    "max_duration": ("CHAT_MAX_DURATION", "The reply took too long and was stopped."),
}


def relay(upstream, events, client, config, stream_id, model, requested_at, watch=None):
    """Yield the SSE events of one reply, with heartbeats in silences; close the upstream however we leave.

    Every way out (done, error, timeout, client gone or stalled, worker shutdown) closes the upstream
    once and logs one line. A client that hangs up makes gunicorn close this generator (GeneratorExit
    at a yield). `watch` (the metrics, or a diagnostic stream's record) hears when the stream opens
    and, once, how it ended: never per event.
    """
    started = last_output = last_write = time.monotonic()
    first = {}  # kind of output ("content", "reasoning"): seconds from the request to its first delta
    counts = {"content": 0, "reasoning": 0}
    show = {"content", "reasoning"} if config["CHAT_REASONING"] == "show" else {"content"}
    outcome, error = None, None  # error: the code of the error event sent, if one was
    if watch:
        watch.opened(stream_id)
    try:
        yield events.opened()
        while not upstream.finished:
            code, deadline = nearest_deadline(config, requested_at, last_output, bool(first))
            heartbeat_at = last_write + config["CHAT_HEARTBEAT_SECONDS"]
            deltas = upstream.read(min(heartbeat_at, deadline) - time.monotonic())
            now = time.monotonic()
            if deltas:
                last_output = now  # thinking is output too: it resets every deadline but the total
                for kind, _ in deltas:
                    first.setdefault(kind, now - requested_at)
                    counts[kind] += 1
                shown = [(kind, text) for kind, text in deltas if kind in show]
                if not shown:
                    continue
                data = b"".join([events.delta(kind, text) for kind, text in shown])  # one write for all
            elif now >= deadline:
                raise StreamTimeout(DEADLINES[code][1], code)
            elif now >= heartbeat_at:
                if client.has_left():
                    outcome = "client_gone"
                    return
                data = events.ping()
            else:
                continue
            yield from client.send(data, deadline)
            last_write = time.monotonic()
        yield from client.send(events.end(upstream.finish_reason, upstream.usage))
        outcome = "done"
    except ClientStalled:
        outcome = "client_stalled"
        client.hang_up()  # the server's last write then fails at once instead of blocking
    except GreenletExit:  # the worker gave up waiting for this stream to end: say so, then stop
        outcome, error = "shutdown", "server_shutdown"
        yield events.error(error, "The server is restarting. Please send your message again.")
    except Exception as exc:  # never BaseException: GeneratorExit must pass through to `finally`
        outcome = "timeout" if isinstance(exc, StreamTimeout) else "error"
        if isinstance(exc, UpstreamError):
            error, message = exc.error_code, str(exc)
            log.warning("stream %s failed: %s %s", stream_id, error, exc.detail)
        else:  # a bug of ours, not the upstream's
            error, message = "relay_error", "The reply failed."
            log.exception("stream %s failed: %s", stream_id, error)
        if client.has_room():
            yield events.error(error, message)
    finally:
        upstream.close()
        outcome = outcome or client.why_closed()  # left at a yield: the server closed us because a write failed
        duration = time.monotonic() - started
        usage = upstream.usage if isinstance(upstream.usage, dict) else {}
        details = usage.get("completion_tokens_details")
        details = details if isinstance(details, dict) else {}
        log.info(
            "stream %s model=%s end=%s ttfr=%s ttft=%s duration=%.3fs events=%d tokens=%s reasoning=%s reader=%s",
            stream_id,
            model,
            outcome,
            seconds(first.get("reasoning")),
            seconds(first.get("content")),
            duration,
            counts["content"],
            usage.get("completion_tokens", counts["content"] + counts["reasoning"]),
            details.get("reasoning_tokens", counts["reasoning"]),
            upstream.reader,
        )
        if watch:
            watch.ended(outcome, error or upstream.finish_reason, first, duration, usage, sum(counts.values()))


def nearest_deadline(config, requested_at, last_output, answering):
    """Return (code, monotonic time) of the deadline that comes first: first output or idle, or the total.

    The first output and the total are counted from the request: the wait for the upstream's headers
    is part of both. Output is content or thinking, shown or hidden.
    """
    if answering:
        code, deadline = "idle_timeout", last_output + config["CHAT_IDLE_TIMEOUT"]
    else:
        code, deadline = "first_token_timeout", requested_at + config["CHAT_FIRST_TOKEN_TIMEOUT"]
    if requested_at + config["CHAT_MAX_DURATION"] < deadline:
        code, deadline = "max_duration", requested_at + config["CHAT_MAX_DURATION"]
    return code, deadline


def seconds(value):
    return "-" if value is None else f"{value:.3f}s"


# --- The client's end: has it left, will it take bytes ----------------------------------------------

poll_now = get_original("select", "poll")  # the unpatched one: gevent's would switch to its hub just to ask
WRITE_PIECE = 16 * 1024  # less than a socket that polls writable has room for, so no write blocks midway


class Client:
    """The client's socket, as the relay needs it: has it left, has it room, is it stalled.

    `sock` is gunicorn's socket for the request (werkzeug's under the dev server), or None when the
    server gives none: the relay then just yields, as any WSGI app does. Asking costs one real
    poll() (not select(), which fails on descriptors past 1024); only waiting goes through gevent's.
    """

    def __init__(self, sock, config):
        self.sock, self.send_timeout, self.writing_since = sock, config["CHAT_SEND_TIMEOUT"], None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.settimeout(self.send_timeout)  # a backstop: a write that still blocks midway gives up too

    @classmethod
    def of_request(cls, config):
        """The client of the request being served: gunicorn's socket, or werkzeug's under the dev server."""
        return cls(request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket"), config)

    def send(self, data, deadline=None):
        """Yield `data` for the server to write, in pieces, each once the socket has room for it.

        A client whose socket takes nothing for CHAT_SEND_TIMEOUT seconds, or until `deadline`, has
        stalled: ClientStalled.
        """
        for start in range(0, len(data), WRITE_PIECE):
            if not self.has_room():
                wait = self.send_timeout if deadline is None else min(self.send_timeout, deadline - time.monotonic())
                poller = select.poll()  # gevent's, under gunicorn: the wait blocks only this stream
                poller.register(self.sock, select.POLLOUT)
                if not poller.poll(max(0.0, wait) * 1000):
                    raise ClientStalled
            self.writing_since = time.monotonic()
            yield data[start : start + WRITE_PIECE]
            self.writing_since = None

    def has_room(self, events=select.POLLOUT):
        """Tell, without waiting, whether a write would go through (or, with POLLIN, a read)."""
        if self.sock is None:
            return events == select.POLLOUT
        poller = poll_now()
        poller.register(self.sock, events)
        return bool(poller.poll(0))

    def has_left(self):
        """Tell whether the client closed its end, so a silent stream ends now, not one failed write later.

        A write after the client closed still succeeds (the kernel takes it, the peer answers with a
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
        """Shut a stalled client's connection, so that no write to it can block again."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except (AttributeError, OSError):  # no socket, or already gone
            pass


# --- Plumbing: per-worker state, errors, CORS, the page, health -----------------------------------


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
    return given if re.fullmatch(r"[A-Za-z0-9._-]{8,64}", given) else uuid.uuid4().hex[:12]


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
    message = from_outside(exc.description, SHOWN_CHARACTERS)  # an upstream's 400 is passed on in its own words
    if request.path.endswith("/api/ui-chat"):
        return Response(message, exc.code, headers, mimetype="text/plain")
    return jsonify(error={"message": message, "code": code}), exc.code, headers


# --- Text from outside (an upstream's errors, a client's values), on its way to a client or the log ---

KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_-]{6,}|\b[Bb]earer\s+[A-Za-z0-9._~+/=-]{6,}")
SHORTEST_PIECE = 8  # a piece of a configured secret this long, at either end of it, is redacted too
secrets = {}  # the configured key and token -> a pattern of their pieces; added when the blueprint is registered
SHOWN_CHARACTERS, LOGGED_CHARACTERS = 500, 300  # of one value from outside, to a client and into the log
READ_CHARACTERS = 4000  # what lies past this in one value is never shown, so it is not searched either
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # line breaks, ANSI escapes and the like


def keep_secret(secret):
    """Redact `secret` from now on: whole, or in pieces that start or end it (a key cut short, or half echoed)."""
    shortest = min(len(secret), SHORTEST_PIECE)
    pieces = {piece for n in range(shortest, len(secret) + 1) for piece in (secret[:n], secret[-n:])}
    secrets[secret] = re.compile("|".join(map(re.escape, sorted(pieces, key=len, reverse=True))))


def redact(text):
    """Hide key-like strings (sk-..., bearer tokens) and the configured key and token, whole or in pieces."""
    for secret, pieces in secrets.items():
        text = text.replace(secret, "[redacted]")
        if secret[:SHORTEST_PIECE] in text or secret[-SHORTEST_PIECE:] in text:  # most text has neither end
            text = pieces.sub("[redacted]", text)
    return KEY_LIKE.sub("[redacted]", text)


def from_outside(text, limit):
    """Redact a value that came from outside, then cut it to `limit` characters: the other way round, a
    key across the cut would go out less its last character."""
    return redact(text[:READ_CHARACTERS])[:limit]


def one_line(text):
    """Escape control characters, so that a value cannot start a log line of its own or hide one."""
    return CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


class Redacting(logging.Filter):
    """Keep the "chat" log's lines true: every value in one (upstream text included) is redacted, cut and
    escaped, so that none can leak a key or forge a line. The lines' wording is the code's own."""

    def filter(self, record):
        if isinstance(record.args, dict):  # log.info("%(name)s", {...})
            record.args = {name: logged(value) for name, value in record.args.items()}
        else:
            record.args = tuple(map(logged, record.args or ()))
        record.msg, record.args = one_line(redact(record.getMessage())), None
        return True


def logged(value):
    """A log line's value as the line shows it: numbers as they are, anything else as text from outside."""
    return value if isinstance(value, int | float) else from_outside(str(value), LOGGED_CHARACTERS)


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
        response.headers["Access-Control-Allow-Methods"] = "POST"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
        response.headers["Access-Control-Expose-Headers"] = "Retry-After, X-Request-Id"
        response.headers["Access-Control-Max-Age"] = "600"
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
    for secret in filter(None, (state.app.config["OPENAI_API_KEY"], state.app.config["CHAT_API_TOKEN"])):
        keep_secret(secret)
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
    return app
