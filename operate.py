"""Operate the chat service: Prometheus metrics over all workers, and a doctor for the path to the browser.

app.py imports this module only where it is used: with CHAT_METRICS off and no doctor about, none
of it runs and prometheus_client is never imported.

Metrics. The relay tells them once per stream, when it opens and when it ends, never per event; the
error handler once per refused request. gunicorn's workers are separate processes, so
prometheus_client's multiprocess mode keeps each one's figures in files in PROMETHEUS_MULTIPROC_DIR
(gunicorn.conf.py makes it) and /metrics adds them all up, whichever worker answers.

The doctor. `flask --app app doctor URL` sends two diagnostic streams through every proxy in front
of the app and checks what arrives. A diagnostic stream is POST api/chat?diagnostic=stream: the
chat's own URL, so it takes the chat's way through the proxies and the real relay with its
heartbeats, but no model: a known script of events and pauses. How each one ended is recorded in
the same shared directory, for the doctor to ask about afterwards whichever worker answers.
app.py answers those requests with diagnostic_stream() and report(); this module never calls back.
"""

import http.client
import json
import os
import socket
import ssl
import threading
import time
import zlib
from urllib.parse import urlencode, urlsplit

from protocols import REQUEST_ID, ApiError
from upstream import ScriptedStream

# --- Metrics: counted once per stream, summed over the workers --------------------------------------

FIRST_OUTPUT_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)  # seconds; CHAT_FIRST_TOKEN_TIMEOUT is 120
DURATION_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600)  # seconds; CHAT_MAX_DURATION is 600

# The finish_reason values a label may take: an upstream can send any string, and every new label value is
# a series Prometheus keeps for good. The rest are counted as "other".
FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}
ERROR_OUTCOMES = {"timeout", "error", "shutdown"}  # where `code` is the error event's, from our own code

_metrics = None
_metrics_made = threading.Lock()


def metrics():
    """Return this process's Metrics, made on first use: in the worker, after gunicorn forked it."""
    global _metrics
    with _metrics_made:
        if _metrics is None:
            _metrics = Metrics()
    return _metrics


class Metrics:
    """The service's figures, and the relay's watcher for chat streams (app.py's `Watcher` contract)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        # This process's own registry, for /metrics in a single process (flask run). With gunicorn,
        # exposition() reads every worker's files instead; nothing goes into the global REGISTRY,
        # which a host app may use for its own metrics.
        self.registry = registry = CollectorRegistry()
        self.open_streams = Gauge(
            "chat_streams_open", "Streams open now.", registry=registry, multiprocess_mode="livesum"
        )  # livesum: the live workers' figures added up; an exited worker's are dropped (gunicorn.conf.py)
        self.streams_ended = Counter(
            "chat_streams_ended",
            "Streams ended, by outcome (as the stream's log line says), code (the error event's, or the"
            " finish_reason of a complete reply) and api (the upstream's: chat or responses).",
            ["outcome", "code", "api"],
            registry=registry,
        )
        self.first_reasoning = Histogram(
            "chat_time_to_first_reasoning_seconds",
            "Seconds from the request to the first reasoning delta.",
            buckets=FIRST_OUTPUT_BUCKETS,
            registry=registry,
        )
        self.first_content = Histogram(
            "chat_time_to_first_content_seconds",
            "Seconds from the request to the first content delta.",
            buckets=FIRST_OUTPUT_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "chat_stream_duration_seconds", "Seconds a stream was open.", buckets=DURATION_BUCKETS, registry=registry
        )
        self.tokens = Counter(
            "chat_tokens",
            "Tokens by direction: in (the prompt) and out (the reply), from the upstream's usage; without"
            " one, out counts the deltas relayed.",
            ["direction"],
            registry=registry,
        )
        self.refusals = Counter(
            "chat_upstream_refusals",
            "Requests the upstream refused before the stream, by its HTTP status (none: timeout or no"
            " connection) and the code the client got.",
            ["status", "code"],
            registry=registry,
        )
        self.unresumable_streams = Counter(
            "chat_streams_unresumable",
            "Streams sent without a log, so with no resume: its store failed (Redis down, a full disk) or the"
            " worker's CHAT_RESUME_WORKER_BYTES was spent.",
            registry=registry,
        )
        self.errors = Counter(
            "chat_request_errors",
            "Requests answered with a JSON error before any stream, by status and code.",
            ["status", "code"],
            registry=registry,
        )

    def opened(self, stream_id):
        self.open_streams.inc()

    def ended(self, outcome, code, first, duration, usage, deltas, api="chat"):
        """Count one stream that ended: the relay calls this once, from its `finally`."""
        self.open_streams.dec()
        if code and outcome not in ERROR_OUTCOMES and code not in FINISH_REASONS:
            code = "other"
        self.streams_ended.labels(outcome, code or "", api).inc()
        if "reasoning" in first:
            self.first_reasoning.observe(first["reasoning"])
        if "content" in first:
            self.first_content.observe(first["content"])
        self.duration.observe(duration)
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", deltas)
        if isinstance(prompt, int) and prompt > 0:
            self.tokens.labels("in").inc(prompt)
        if isinstance(completion, int) and completion > 0:
            self.tokens.labels("out").inc(completion)

    def upstream_refused(self, status, code):
        self.refusals.labels(str(status), code).inc()

    def unresumable(self):
        self.unresumable_streams.inc()

    def refused_before_stream(self, status, code):
        self.errors.labels(str(status), code).inc()

    def exposition(self):
        """Return /metrics: every worker's figures added up (multiprocess mode), or this process's."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        return generate_latest(registry), 200, {"Content-Type": CONTENT_TYPE_LATEST}


# --- The diagnostic stream: a known script through the real relay, no model ---------------------------

# Events sent 50 ms apart, for the buffering check: a proxy that gathers writes for 100-250 ms (HAProxy
# compressing) then shows as fewer reads than events, which 250 ms apart it did not.
TICKS, TICK_SECONDS = 20, 0.05
MAX_SILENCE = 600.0  # seconds a diagnostic stream may be asked to stay silent
# The abort stream's silence, in heartbeats: the doctor hangs up at the first ping of it, and a proxy that
# passes the hang-up on late (Apache: 2 to 3 heartbeats) still has room to, before the stream ends.
ABORT_HEARTBEATS = 5
DIAGNOSTIC_STREAMS = 4  # open at once per worker (a doctor opens 2); past it 503
diagnostic_slots = threading.BoundedSemaphore(DIAGNOSTIC_STREAMS)


def diagnostic_stream(args, heartbeat):
    """Return the diagnostic stream of POST api/chat?diagnostic=stream&silence=S (or =abort), for app.py to relay.

    It holds one of DIAGNOSTIC_STREAMS slots until its release(), and is bounded in time by its
    `limits` (its script and 30 s). The chat's token is checked before this is called.
    """
    kind = args.get("diagnostic")
    if kind == "abort":  # the doctor hangs up after the ticks; the app should notice at its next heartbeat
        silence = min(ABORT_HEARTBEATS * heartbeat, MAX_SILENCE)
    elif kind == "stream":
        try:
            silence = float(args.get("silence", 70))
        except ValueError:
            silence = -1.0
        if not 0 <= silence <= MAX_SILENCE:
            raise ApiError(400, "invalid_request", f"silence must be 0 to {MAX_SILENCE:g} seconds.")
    else:
        raise ApiError(400, "invalid_request", "diagnostic must be stream, abort or report.")
    if not diagnostic_slots.acquire(blocking=False):
        message = "Too many diagnostic streams are open. Please try again shortly."
        raise ApiError(503, "too_many_streams", message, {"Retry-After": "10"})
    return DiagnosticStream(silence, heartbeat)


class DiagnosticStream(ScriptedStream):
    """A stand-in for the model with a known script, which is also the relay's watcher for its stream.

    The script: one event that says what follows (the stream's id, the worker, the heartbeat), TICKS
    events TICK_SECONDS apart, `silence` seconds with nothing (the relay pings, as for a model that
    thinks), one last event, the end. Each is a content event whose text is a line of JSON. When the
    stream ends, how is recorded for `report`.
    """

    reader = api = "diagnostic"

    def __init__(self, silence, heartbeat):
        super().__init__()
        self.silence, self.heartbeat, self.id = silence, heartbeat, None
        limit = TICKS * TICK_SECONDS + silence + 30
        self.limits = dict.fromkeys(("CHAT_FIRST_TOKEN_TIMEOUT", "CHAT_IDLE_TIMEOUT", "CHAT_MAX_DURATION"), limit)

    def opened(self, stream_id):
        now, self.id = time.monotonic(), stream_id
        about = {"id": stream_id, "pid": os.getpid(), "heartbeat": self.heartbeat, "silence": self.silence}
        script = [(now, {**about, "ticks": TICKS, "tick_seconds": TICK_SECONDS})]
        script += [(now + i * TICK_SECONDS, {"tick": i}) for i in range(1, TICKS + 1)]
        script.append((now + TICKS * TICK_SECONDS + self.silence, {"after_silence": self.silence}))
        # A chat client shows each as a line of JSON.
        self.steps.extend((due, "content", json.dumps(payload) + "\n") for due, payload in script)

    def ended(self, outcome, code, first, duration, usage, deltas, api="diagnostic"):
        save_record({"id": self.id, "end": outcome, "duration": round(duration, 3), "pid": os.getpid()})

    def release(self):
        """Give back the stream's slot: app.py calls it when the response is closed, however it ended."""
        diagnostic_slots.release()


# Records are asked for within seconds, by one doctor; anyone can make them (no token is the default). So a
# record goes to one of RECORD_SLOTS files, picked by its id, and replaces whatever was there: at most
# 1,000 files of under 200 bytes whatever the flood, and no request ever scans the directory.
RECORD_SLOTS = 1000
records_in_memory = {}  # without a shared directory (flask run: one process)


def record_path(stream_id):
    slot = zlib.crc32(stream_id.encode()) % RECORD_SLOTS  # the same in every worker, unlike hash()
    return os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], f"diagnostic-{slot:03d}.json")


def save_record(record):
    """Keep how a diagnostic stream ended where every worker can read it: the directory they share."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        records_in_memory[record["id"]] = record
        while len(records_in_memory) > 100:
            del records_in_memory[next(iter(records_in_memory))]
        return
    path = record_path(record["id"])
    with open(f"{path}.{os.getpid()}", "w") as file:
        json.dump(record, file)
    os.replace(f"{path}.{os.getpid()}", path)  # a reader sees the whole record or none


def report(stream_id):
    """Say how the diagnostic stream `stream_id` ended; 404 while it is open (or never was, or was overwritten)."""
    record = None
    if REQUEST_ID.fullmatch(stream_id):
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            record = records_in_memory.get(stream_id)
        else:
            try:
                with open(record_path(stream_id)) as file:
                    record = json.load(file)
            except (FileNotFoundError, ValueError):
                pass
    if not isinstance(record, dict) or record.get("id") != stream_id:  # its slot may hold another stream's
        raise ApiError(404, "not_found", "No diagnostic stream with this id has ended.")
    return record


# --- The doctor: `flask --app app doctor URL` ---------------------------------------------------------
#
# Standard library only, so it runs from any machine with the checkout: http.client for the streams,
# ssl and socket for TLS and ALPN. Its streams are HTTP/1.1 (what http.client speaks), and where the
# server offers HTTP/2 the abort check runs over it too, with just enough of HTTP/2 for one stream.

CHAT_BODY = json.dumps({"messages": [{"role": "user", "content": "flask doctor"}]}).encode()


class Target:
    """Where the doctor sends its requests: the chat's URL (URL itself, or URL + api/chat), and how."""

    def __init__(self, url, token, cafile, insecure=False):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        self.tls, self.host = parts.scheme == "https", parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        base = parts.path.rstrip("/")
        self.chat = base if base.endswith("/api/chat") else base + "/api/chat"
        self.token, self.cafile, self.insecure = token, cafile, insecure
        self.verified = True  # false once the certificate failed: the streams are then sent unverified

    def sends_token(self):
        """Send the token only where it cannot be stolen: a verified server (or plain HTTP, as asked), or --insecure."""
        return bool(self.token) and (self.verified or self.insecure)

    def withholds_token(self):
        return bool(self.token) and not self.sends_token()

    def context(self, alpn):
        context = ssl.create_default_context(cafile=self.cafile)
        if not self.verified:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        context.set_alpn_protocols(alpn)
        return context

    def connection(self, timeout):
        if not self.tls:
            return http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        # HTTP/1.1 only: offered h2, the server would choose it, and http.client cannot speak it.
        return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.context(["http/1.1"]))

    def path(self, query):
        return f"{self.chat}?{urlencode(query)}"

    def headers(self, accept="gzip"):
        """The doctor's request headers: a browser's Accept-Encoding on the streams, identity elsewhere."""
        auth = {"Authorization": f"Bearer {self.token}"} if self.sends_token() else {}
        return {"Content-Type": "application/json", "Accept-Encoding": accept, **auth}

    def post(self, connection, body=b"", accept="gzip", **query):
        # One request per connection: a proxy may cut a stream on a connection it would reuse (Caddy did,
        # 1 in 10-25 streams, until the app read the body first and the doctor sent `Connection: close`).
        connection.request("POST", self.path(query), body, {**self.headers(accept), "Connection": "close"})
        return connection.getresponse()


class Run:
    """One diagnostic stream as the doctor received it: status, headers, and each line with its arrival."""

    def __init__(self, target, http2=False, **query):
        self.target, self.http2, self.query = target, http2, query
        self.status, self.headers, self.body, self.error = None, {}, b"", None
        self.lines = []  # (monotonic time of arrival, line)
        self.sent_at = self.ended_at = self.hung_up_at = None
        self.exchange, self.hanging_up = None, threading.Lock()

    def run(self, timeout, hang_up=False):
        """Read the stream to its end; with `hang_up`, hang up at the first ping of its silence (the path
        has then held a heartbeat without events), or once that ping is overdue."""
        self.sent_at, finished = time.monotonic(), threading.Event()
        if hang_up:
            threading.Thread(target=self.hang_up_when_overdue, args=(finished,), daemon=True).start()
        try:
            self.exchange = (Http2Exchange if self.http2 else Http1Exchange)(self.target, timeout)
            self.read(hang_up)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # cut short, or hung up
            if self.hung_up_at is None:
                self.error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # whatever else: a line in the report, never a traceback
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ended_at = time.monotonic()
            finished.set()
            if self.exchange and not (self.http2 and self.hung_up_at):
                self.exchange.close()  # an HTTP/2 connection outlives its stream, as a browser's does: `close`

    def read(self, hang_up):
        self.status, self.headers = self.exchange.request(self.target, self.query, CHAT_BODY)
        if self.status not in (200, None):
            self.body = self.exchange.body()
            return
        inflate, pending = None, b""
        for data in self.exchange.chunks():  # read on after hanging up: the exchange ends it its own way
            arrived = time.monotonic()
            inflate = inflate or decoder(self.headers.get("Content-Encoding"), data)
            *lines, pending = (pending + inflate(data)).split(b"\n")
            self.lines += [(arrived, line) for line in lines]
            if hang_up and self.pinged_in_silence():
                self.hang_up()

    def hang_up_when_overdue(self, finished):
        """Hang up when no event came at all, or the silence's first ping is two heartbeats late: held back."""
        while not finished.wait(0.05):
            about, ticks = self.about(), self.ticks()
            if about and ticks:
                due = ticks[-1] + 2 * float(about.get("heartbeat", 1)) + 1
            else:
                due = self.sent_at + TICKS * TICK_SECONDS + 1.5
            if time.monotonic() > due:
                self.hang_up()
                return

    def hang_up(self):
        """Hang up, once: the reading thread and the watch may both try; the reading thread closes."""
        with self.hanging_up:
            if self.hung_up_at is None and self.exchange is not None:
                self.hung_up_at = time.monotonic()
                self.exchange.cancel()

    def close(self):
        if self.exchange:
            self.exchange.close()

    def pinged_in_silence(self):
        ticks = self.ticks()
        return len(ticks) >= TICKS and any(value == "ping" and at >= ticks[-1] for at, value in self.events())

    def events(self):
        """(arrival, value) of each data event (a dict, or "[DONE]") and comment (": ping" -> "ping")."""
        for at, line in self.lines:
            if line.startswith(b":"):
                yield at, line[1:].strip().decode(errors="replace")
            elif line.startswith(b"data:") and line[5:].strip() == b"[DONE]":
                yield at, "[DONE]"
            elif line.startswith(b"data:"):
                try:
                    yield at, json.loads(line[5:])
                except ValueError:
                    continue

    def diagnostics(self):
        """(arrival, payload) of the diagnostic stream's events: their content is a line of JSON."""
        found = []
        for at, value in self.events():
            try:
                payload = json.loads(value["content"])
            except (TypeError, KeyError, ValueError):
                continue
            if isinstance(payload, dict):
                found.append((at, payload))
        return found

    def about(self):
        """The first event's facts (id, pid, heartbeat, silence), or {} if it never came."""
        return next((d for _, d in self.diagnostics() if "id" in d), {})

    def about_at(self):
        return next((at for at, d in self.diagnostics() if "id" in d), None)

    def ticks(self):
        return [at for at, d in self.diagnostics() if "tick" in d]

    def complete(self):
        return any(value == "[DONE]" for _, value in self.events())

    def refused(self):
        """Why the stream never started, in words; None if it did."""
        if self.status is None and not self.lines:
            return f"no answer: {self.error}" if self.error else "nothing came back before the doctor hung up"
        if self.status in (200, None):
            return None
        try:
            message = json.loads(self.body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = self.body[:200].decode(errors="replace").strip()
        withheld = " (the token was not sent: the certificate is not trusted)" if self.target.withholds_token() else ""
        return f"the diagnostic stream got HTTP {self.status}: {message}{withheld}"


def decoder(encoding, first):
    """Return a function that turns what arrives into the stream's bytes: gzip and deflate inflated (by
    the header, or gzip's magic where no header was read: HTTP/2), anything else dropped as unreadable."""
    encoding = (encoding or ("gzip" if first.startswith(b"\x1f\x8b") else "identity")).lower()
    if encoding == "identity":
        return lambda data: data
    inflate = {"gzip": zlib.decompressobj(16 + zlib.MAX_WBITS), "deflate": zlib.decompressobj()}.get(encoding)
    return inflate.decompress if inflate else lambda data: b""


class Http1Exchange:
    """One request and its response over HTTP/1.1 (http.client); the hang-up is a shutdown of the socket."""

    def __init__(self, target, timeout):
        self.connection, self.sock, self.response = target.connection(timeout), None, None

    def request(self, target, query, body):
        self.connection.connect()
        self.sock = self.connection.sock  # the response takes it over (`Connection: close`): keep it to hang up
        self.response = target.post(self.connection, body, **query)
        return self.response.status, self.response.headers

    def chunks(self):
        while data := self.response.read1(65536):
            yield data

    def body(self):
        return self.response.read(4096)

    def cancel(self):
        """Called from the watch's thread too, so only a shutdown: the reading thread sees its end and closes.
        (Closing here raced read1() inside http.client: an AttributeError in the report.)"""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except (AttributeError, OSError):
            pass

    def close(self):
        for part in (self.response, self.connection, self.sock):
            if part is not None:
                part.close()


class Http2Exchange:
    """Just enough HTTP/2 (RFC 9113) for one POST and its stream, to hang up as a browser closes a tab:
    a RST_STREAM on a connection that stays open, which a proxy must pass on as the close of its
    upstream request. Headers are sent as HPACK literals, and only the response's :status is decoded.
    Everything is sent from the reading thread; a hang-up asked from another is sent at its next poll."""

    PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
    END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
    STATUSES = {0x88: 200, 0x89: 204, 0x8A: 206, 0x8B: 304, 0x8C: 400, 0x8D: 404, 0x8E: 500}  # HPACK's static table
    WINDOW = 1 << 24  # bytes the server may send before the doctor says it read them: more than a diagnostic stream

    def __init__(self, target, timeout):
        raw = socket.create_connection((target.host, target.port), timeout=timeout)
        self.sock = target.context(["h2"]).wrap_socket(raw, server_hostname=target.host)
        if self.sock.selected_alpn_protocol() != "h2":
            self.sock.close()
            raise OSError("the server did not choose HTTP/2")
        self.sock.settimeout(0.05)  # polls, so that a hang-up asked from another thread is sent from this one
        self.timeout, self.buffer, self.cancelled, self.reset = timeout, b"", False, False

    def frame(self, kind, flags, stream, payload=b""):
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload

    def request(self, target, query, body):
        fields = [(":method", "POST"), (":scheme", "https"), (":authority", f"{target.host}:{target.port}")]
        fields += [(":path", target.path(query)), ("content-length", str(len(body)))]
        fields += [(name.lower(), value) for name, value in target.headers().items()]
        block = b"".join(b"\x00" + hpack_string(name) + hpack_string(value) for name, value in fields)
        settings = (4).to_bytes(2, "big") + self.WINDOW.to_bytes(4, "big")  # SETTINGS_INITIAL_WINDOW_SIZE
        self.sock.sendall(
            self.PREFACE
            + self.frame(self.SETTINGS, 0, 0, settings)
            + self.frame(self.WINDOW_UPDATE, 0, 0, self.WINDOW.to_bytes(4, "big"))
            + self.frame(self.HEADERS, self.END_HEADERS, 1, block)
            + self.frame(self.DATA, self.END_STREAM, 1, body)
        )
        for kind, flags, payload in self.frames():
            if kind == self.HEADERS:
                return self.STATUSES.get(payload[1 if flags & self.PADDED else 0]), {}
        return None, {}

    def chunks(self):
        """The DATA of stream 1 as it arrives, until it ends, the server resets it, or the doctor hangs up."""
        for kind, flags, payload in self.frames():
            if kind == self.DATA:
                yield payload[1 : len(payload) - payload[0]] if flags & self.PADDED else payload
            if kind in (self.DATA, self.HEADERS) and flags & self.END_STREAM:
                return

    def body(self):
        return b"".join(self.chunks())[:4096]

    def frames(self):
        """(type, flags, payload) of stream 1's frames; answers the connection's SETTINGS and PINGs."""
        while True:
            while len(self.buffer) < 9 or len(self.buffer) < 9 + int.from_bytes(self.buffer[:3], "big"):
                self.receive()
            length, kind, flags = int.from_bytes(self.buffer[:3], "big"), self.buffer[3], self.buffer[4]
            stream = int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
            payload, self.buffer = self.buffer[9 : 9 + length], self.buffer[9 + length :]
            if kind == self.SETTINGS and not flags & self.ACK:
                self.sock.sendall(self.frame(self.SETTINGS, self.ACK, 0))
            elif kind == self.PING and not flags & self.ACK:
                self.sock.sendall(self.frame(self.PING, self.ACK, 0, payload))
            elif kind == self.GOAWAY or (kind == self.RST_STREAM and stream == 1):
                raise ConnectionResetError("the server ended the HTTP/2 stream (RST_STREAM or GOAWAY)")
            elif stream == 1:
                yield kind, flags, payload

    def receive(self):
        idle_until = time.monotonic() + self.timeout
        while True:
            if self.cancelled and not self.reset:
                self.reset = True
                self.sock.sendall(self.frame(self.RST_STREAM, 0, 1, (0x8).to_bytes(4, "big")))  # CANCEL
            if self.reset:
                raise ConnectionAbortedError("the doctor hung up")
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                if time.monotonic() > idle_until:
                    raise
                continue
            if not data:
                raise ConnectionResetError("the server closed the connection")
            self.buffer += data
            return

    def cancel(self):
        self.cancelled = True  # the reading thread sends the RST_STREAM (see `receive`)

    def close(self):
        self.sock.close()


def hpack_string(text):
    """An HPACK string literal without Huffman coding: its length as a 7-bit-prefix integer, then it."""
    data, length, prefix = text.encode(), len(text.encode()), b""
    if length < 127:
        return bytes([length]) + data
    prefix, length = b"\x7f", length - 127
    while length >= 128:
        prefix, length = prefix + bytes([length % 128 + 128]), length // 128
    return prefix + bytes([length]) + data


class Check:
    """One line of the doctor's report: PASS or FAIL, what it saw, and for a failure the fix (one line per proxy)."""

    def __init__(self, name, passed, seen, fix=""):
        self.name, self.passed, self.seen, self.fix = name, passed, seen, fix

    def lines(self):
        yield f"{'PASS' if self.passed else 'FAIL'}  {self.name:<16} {self.seen}"
        if not self.passed:
            first, *more = self.fix.split("\n")
            yield f"{'':<23}Fix: {first}"
            yield from (f"{'':<23}  {line}" for line in more)


def doctor(url, silence, token, cafile=None, echo=print, insecure=False):
    """Run every check against `url`, print each as PASS or FAIL with the fix; return the exit status."""
    try:
        target = Target(url, token, cafile, insecure)
    except ValueError as exc:
        echo(f"doctor: {exc}")
        return 2
    length = TICKS * TICK_SECONDS + silence
    echo(f"Checking POST {target.chat}?diagnostic=... at {url}: a silence of {silence:g} s, about {length:.0f} s.")
    tls = probe_tls(target) if target.tls else None
    if tls and not tls["verified"] and token:
        if insecure:
            echo(f"WARNING: the certificate is not trusted ({tls['error']}); --insecure: the token is sent anyway.")
        else:
            echo(f"The certificate is not trusted ({tls['error']}): the token is not sent. {TRUST}")
    main = Run(target, diagnostic="stream", silence=f"{silence:g}")
    aborts = [("HTTP/1.1", Run(target, diagnostic="abort"))]
    if tls and tls["alpn"] == "h2":  # a browser's tab over HTTP/2 ends with a RST_STREAM, not a closed connection
        aborts.append(("HTTP/2", Run(target, http2=True, diagnostic="abort")))
    timeout = silence + 30  # no byte for that long: the stream is stuck somewhere
    aborting = [threading.Thread(target=run.run, args=(timeout, True), daemon=True) for _, run in aborts]
    for thread in aborting:
        thread.start()
    main.run(timeout)
    for thread in aborting:
        thread.join()
    proxy = proxy_in_front(main.headers) or proxy_in_front(aborts[0][1].headers)
    checks = [
        *check_stream(main, silence, proxy),
        check_http2(target, tls, proxy),
        check_abort(target, aborts, proxy),
        check_tls(target, tls),
    ]
    for _, run in aborts:
        run.close()
    for check in checks:
        for line in check.lines():
            echo(line)
    failed = sum(not check.passed for check in checks)
    echo(f"{failed} of {len(checks)} checks fail." if failed else f"All {len(checks)} checks pass.")
    return 1 if failed else 0


def probe_tls(target):
    """Shake hands offering h2 and http/1.1, as a browser does; say what the server showed."""
    found = {"verified": False, "version": None, "alpn": None, "days_left": None, "error": None}
    for verify in (True, False):  # an untrusted certificate: shake hands again without checking it
        target.verified = verify
        try:
            with socket.create_connection((target.host, target.port), timeout=10) as raw:
                with target.context(["h2", "http/1.1"]).wrap_socket(raw, server_hostname=target.host) as tls:
                    found.update(verified=verify, version=tls.version(), alpn=tls.selected_alpn_protocol())
                    if verify:
                        expires = ssl.cert_time_to_seconds(tls.getpeercert()["notAfter"])
                        found["days_left"] = (expires - time.time()) / 86400
                    return found
        except ssl.SSLCertVerificationError as exc:
            found["error"] = exc.verify_message or str(exc)
        except OSError as exc:
            found["error"] = found["error"] or str(exc)
            return found
    return found


def fetch_report(target, stream_id, until):
    """Ask how a stream ended until a record says, or `until` passes; any worker may answer."""
    while time.monotonic() < until:
        connection = target.connection(10)
        try:
            response = target.post(connection, CHAT_BODY, accept="identity", diagnostic="report", id=stream_id)
            body = response.read()
            if response.status == 200:  # read whatever its encoding: a proxy may compress it all the same
                return json.loads(decoder(response.headers.get("Content-Encoding"), body)(body))
        except (OSError, http.client.HTTPException, ValueError, zlib.error):
            pass
        finally:
            connection.close()
        time.sleep(0.25)
    return None


# --- The fixes, in the words of the proxy in front ------------------------------------------------
#
# Caddy says who it is (`Server: Caddy` beside gunicorn's), nginx replaces gunicorn's Server header
# with its own. HAProxy and Apache pass `Server: gunicorn` on and add no Via, so where the doctor
# cannot tell, a fix names the directive of each of the four (README: Behind Caddy, HAProxy or Apache).

PROXIES = ("nginx", "Caddy", "HAProxy", "Apache")
FIXES = {
    "unbuffer": (
        "Let each event through as the app writes it.",
        {
            "nginx": "`proxy_buffering off;` and `gzip off;` in the chat's location.",
            "Caddy": "no `encode` that matches text/event-stream, no `buffer_responses`, no positive `flush_interval`.",
            "HAProxy": "no `compression` of the stream: a `compression type` list without text/event-stream.",
            "Apache": "`SetEnv no-gzip 1` in the chat's <LocationMatch>, and `flushpackets=on` on its ProxyPass.",
        },
    ),
    "uncompress": (
        "Do not compress the stream.",
        {
            "nginx": "`gzip off;` in the chat's location, and text/event-stream in no gzip_types.",
            "Caddy": "an `encode` without a `match` that takes text/event-stream in (its default types leave it out).",
            "HAProxy": "text/event-stream in no `compression type` (the app's `Cache-Control: no-transform` stops it).",
            "Apache": "`SetEnv no-gzip 1` in the chat's <LocationMatch> (mod_deflate ignores `no-transform`).",
        },
    ),
    "read_timeout": (
        "Raise the proxy's timeout between two reads from the app, or set CHAT_HEARTBEAT_SECONDS below {idle}.",
        {
            "nginx": "`proxy_read_timeout 300s;` in the chat's location.",
            "Caddy": "`read_timeout 300s` in the `transport http` block of `reverse_proxy` (or none: Caddy's default).",
            "HAProxy": "`timeout server 300s` (`timeout tunnel` does not cover an SSE response).",
            "Apache": "`timeout=300` on the chat's ProxyPass (the default is `Timeout`: 60 s).",
        },
    ),
    "http2": (
        "Offer HTTP/2: over HTTP/1.1 a browser holds at most 6 streams per site.",
        {
            "nginx": "`http2` on the `listen 443 ssl` line.",
            "Caddy": "an https site address: Caddy offers h2 there (unless the `servers` option `protocols` drops it).",
            "HAProxy": "`alpn h2,http/1.1` on the `bind ... ssl crt ...` line.",
            "Apache": "`Protocols h2 http/1.1` in the site, with mod_http2 (a2enmod http2) and mpm_event.",
        },
    ),
    "abort": (
        "Pass a closed tab on to the app at once, so that it stops the model.",
        {
            "nginx": "`proxy_ignore_client_abort off;` (the default) in the chat's location.",
            "Caddy": "no `flush_interval -1` in `reverse_proxy`: it keeps the app's request going once the tab left.",
            "HAProxy": "`option abortonclose` in the defaults (or the backend).",
            "Apache": "no directive (it hears of a closed tab at its 2nd failed write): set CHAT_HEARTBEAT_SECONDS=5.",
        },
    ),
}
KEEP_HEADERS = "Pass the app's response headers through unchanged (proxy_hide_header, add_header, a CDN's transforms)."
TOTAL_TIMEOUT = (
    "Something ends responses after {} s however many bytes flow: raise that total timeout"
    " (Caddy: the `servers` option `timeouts { write }`; a load balancer or CDN in front)."
)
POINT = "Point the doctor at the chat's URL, with its token."
HTTPS = "Serve it over HTTPS (README: Deploy on a VM for nginx; Behind Caddy, HAProxy or Apache)."
TRUST = "Pass the CA with --cafile, or --insecure to send the token to this server all the same."


def proxy_in_front(headers):
    """The proxy that says who it is in the Server header (Caddy, nginx), or None."""
    servers = " ".join(getattr(headers, "get_all", lambda name: None)("Server") or []).lower()
    if "caddy" in servers:
        return "Caddy"
    return "nginx" if servers.startswith("nginx") else None


def fix(kind, proxy, **values):
    """The fix for `kind`, in the directive of `proxy`, or of each of the four when it is None."""
    sentence, directives = FIXES[kind]
    sentence = sentence.format(**values)
    if proxy:
        return f"{sentence} {proxy}: {directives[proxy]}"
    return "\n".join([f"{sentence} By the proxy in front:", *(f"{name}: {directives[name]}" for name in PROXIES)])


def check_stream(run, silence, proxy):
    """The checks of the main diagnostic stream: buffering, compression, headers, the silence, the heartbeat."""
    names = ["not buffered", "not compressed", "SSE headers", f"silence of {silence:g} s", "heartbeat"]
    if run.refused():
        return [Check(name, False, run.refused(), POINT) for name in names]
    return [
        check_buffering(run, proxy),
        check_compression(run, proxy),
        check_headers(run),
        *check_silence(run, silence, proxy),
    ]


LATE_SECONDS = 0.5  # an event that arrives this much later than the promptest one (for when each was sent) was held


def check_buffering(run, proxy):
    """Did each event arrive when it was sent, in a read of its own? Spread out is not enough: a proxy that
    holds each write until the next one, or for a heartbeat, spreads them out late."""
    ticks, about_at = run.ticks(), run.about_at()
    if len(ticks) < TICKS or about_at is None:
        unreadable = " (compressed in a way the doctor cannot read)" if not run.lines else ""
        seen = f"{len(ticks)} of {TICKS} events arrived{unreadable}"
        return Check("not buffered", False, seen, fix("unbuffer", proxy))
    # Arrival minus sending time, for each event (the clocks differ: only the differences count).
    delays = [at - i * TICK_SECONDS for i, at in enumerate([about_at, *ticks])]
    late, reads = max(delays) - min(delays), len({about_at, *ticks})
    seen = (
        f"{TICKS + 1} events sent {TICK_SECONDS * 1000:.0f} ms apart arrived in {reads} read{'s' * (reads > 1)}, up to"
    )
    seen += f" {late * 1000:.0f} ms late"
    if late > LATE_SECONDS:
        return Check("not buffered", False, seen + ": held back", fix("unbuffer", proxy))
    if reads < (TICKS + 1) // 2:
        return Check("not buffered", False, seen + ": gathered, then sent together", fix("unbuffer", proxy))
    return Check("not buffered", True, seen)


def check_compression(run, proxy):
    encoding = run.headers.get("Content-Encoding") or "identity"
    if encoding.lower() == "identity":
        return Check("not compressed", True, "no Content-Encoding, though the doctor accepts gzip")
    return Check("not compressed", False, f"Content-Encoding: {encoding}", fix("uncompress", proxy))


def check_headers(run):
    content_type, cache = run.headers.get("Content-Type", ""), run.headers.get("Cache-Control", "")
    wrong = []
    if not content_type.startswith("text/event-stream"):
        wrong.append(f"Content-Type: {content_type or 'none'}")
    if "no-cache" not in cache:
        wrong.append(f"Cache-Control: {cache or 'none'}")
    if run.headers.get("Content-Length"):
        wrong.append("a Content-Length: the whole body was read first")
    if wrong:
        return Check("SSE headers", False, "; ".join(wrong), KEEP_HEADERS)
    return Check("SSE headers", True, f"Content-Type: {content_type}, Cache-Control: {cache}")


def check_silence(run, silence, proxy):
    """Did the silence get through (with the pings a real stream has), and if not, was it cut for idling?"""
    name, heartbeat, ticks = f"silence of {silence:g} s", run.about().get("heartbeat"), run.ticks()
    if heartbeat is None or len(ticks) < TICKS:
        never = "the stream never reached its silence"
        return [Check(name, False, never, "Fix the checks above first."), Check("heartbeat", False, never, "Idem.")]
    pings = sum(1 for at, value in run.events() if value == "ping" and at >= ticks[-1])
    if run.complete():
        held = Check(name, True, f"held, with a ping every {heartbeat:g} s ({pings} in it)")
        if silence < heartbeat:
            untested = f"every {heartbeat:g} s: longer than the silence, so not tested"
            return [held, Check("heartbeat", False, untested, f"Run the doctor with --silence above {heartbeat:g}.")]
        return [held, Check("heartbeat", True, f"every {heartbeat:g} s: each gap was short enough for the path")]
    idle = run.ended_at - max(at for at, _ in run.lines)
    seen = f"cut {run.ended_at - ticks[-1]:.1f} s into it, {idle:.1f} s after the last bytes ({pings} pings)"
    if idle < heartbeat:  # cut between two pings: an idle timeout shorter than the heartbeat
        timeout = fix("read_timeout", proxy, idle=f"{idle:.0f}")
        idled = f"every {heartbeat:g} s, but the path cut {idle:.1f} s without a byte"
        return [Check(name, False, seen, timeout), Check("heartbeat", False, idled, timeout)]
    total = TOTAL_TIMEOUT.format(f"{run.ended_at - run.sent_at:.0f}")
    return [Check(name, False, seen, total), Check("heartbeat", True, f"every {heartbeat:g} s, and the pings arrived")]


def check_http2(target, tls, proxy):
    if not target.tls:
        return Check("HTTP/2", False, "plain HTTP: browsers speak HTTP/2 only over TLS", HTTPS)
    if tls["alpn"] == "h2":
        return Check("HTTP/2", True, "offered (ALPN h2); the abort check runs over it too")
    return Check("HTTP/2", False, f"not offered (ALPN: {tls['alpn'] or 'none'})", fix("http2", proxy))


def check_abort(target, runs, proxy):
    """Did the app learn at its next heartbeat that the doctor hung up, over each HTTP version it tried?"""
    verdicts = [(label, *abort_verdict(target, run, proxy)) for label, run in runs]
    seen = "; ".join(f"{label}: {seen}" for label, _, seen, _ in verdicts) if len(verdicts) > 1 else verdicts[0][2]
    failed = [fix for _, passed, _, fix in verdicts if not passed]
    return Check("client abort", not failed, seen, failed[0] if failed else "")


def abort_verdict(target, run, proxy):
    """(passed, seen, fix) of one abort stream: the doctor hung up at the first ping of its silence (so a
    timeout that cuts a silence cannot pass for an abort passed on), and the app's record says when it knew."""
    about, ticks = run.about(), run.ticks()
    stream_id, heartbeat = about.get("id"), about.get("heartbeat")
    if not stream_id and (run.hung_up_at or not run.refused()):
        return False, "no event came before the doctor hung up: held back", fix("unbuffer", proxy)
    if run.refused():
        return False, run.refused(), POINT
    if run.complete():
        return False, "the stream arrived whole: no time to hang up in it", fix("unbuffer", proxy)
    if run.hung_up_at is None:
        cut = run.ended_at - (ticks[-1] if ticks else run.sent_at)
        seen = f"the path cut the stream {cut:.1f} s into its silence, before the doctor hung up"
        return False, seen, fix("read_timeout", proxy, idle=f"{cut:.0f}")
    if not run.pinged_in_silence():
        return False, "no ping of its silence came within two heartbeats: held back", fix("unbuffer", proxy)
    until = run.sent_at + TICKS * TICK_SECONDS + (ABORT_HEARTBEATS + 1) * heartbeat + 10
    record = fetch_report(target, stream_id, until)
    if record is None:
        lost = (
            "no word of how the stream ended: the report went to another app server, or the workers share no directory"
        )
        return False, lost, "Run the doctor against one app server, with gunicorn.conf.py."
    noticed = record["duration"] - (run.hung_up_at - run.sent_at)
    seen = f"the app noticed the hang-up {noticed:.1f} s later (end={record['end']}, heartbeat {heartbeat:g} s)"
    if record["end"] == "client_gone" and noticed <= 1.5 * heartbeat:
        return True, seen, ""
    return False, seen + ": not at its next heartbeat", fix("abort", proxy)


def check_tls(target, tls):
    if not target.tls:
        return Check("TLS", False, "plain HTTP", HTTPS)
    if tls["version"] is None:
        return Check("TLS", False, f"no TLS handshake: {tls['error']}", "Listen with `ssl` on this port.")
    if not tls["verified"]:
        untrusted = f"{tls['version']}, certificate not trusted: {tls['error']}"
        return Check("TLS", False, untrusted, "Install a certificate browsers trust, with its chain (certbot does).")
    seen = f"{tls['version']}, certificate trusted, valid for {tls['days_left']:.0f} more days"
    if tls["days_left"] < 14:
        return Check("TLS", False, seen, "Renew the certificate: `certbot renew` (its timer should have).")
    return Check("TLS", True, seen)
