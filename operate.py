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
            "Streams ended, by outcome (as the stream's log line says) and code (the error event's, or the"
            " finish_reason of a complete reply).",
            ["outcome", "code"],
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

    def ended(self, outcome, code, first, duration, usage, deltas):
        """Count one stream that ended: the relay calls this once, from its `finally`."""
        self.open_streams.dec()
        if code and outcome not in ERROR_OUTCOMES and code not in FINISH_REASONS:
            code = "other"
        self.streams_ended.labels(outcome, code or "").inc()
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

TICKS, TICK_SECONDS = 10, 0.25  # events sent spread out, for the buffering check
MAX_SILENCE = 600.0  # seconds a diagnostic stream may be asked to stay silent
ABORT_HEARTBEATS = 4  # the abort stream's silence, in heartbeats: room to notice a hang-up late
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

    reader = "diagnostic"

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

    def ended(self, outcome, code, first, duration, usage, deltas):
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
# ssl and socket for TLS and ALPN. Its own requests are HTTP/1.1 (what http.client speaks); whether
# the server offers HTTP/2 is asked in a TLS handshake of its own.

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

    def post(self, connection, body=b"", **query):
        auth = {"Authorization": f"Bearer {self.token}"} if self.sends_token() else {}
        headers = {"Content-Type": "application/json", "Accept-Encoding": "gzip", **auth}
        connection.request("POST", f"{self.chat}?{urlencode(query)}", body, headers)
        return connection.getresponse()


class Run:
    """One diagnostic stream as the doctor received it: status, headers, and each line with its arrival."""

    def __init__(self, target, **query):
        self.target, self.query = target, query
        self.status, self.headers, self.body, self.error = None, {}, b"", None
        self.lines = []  # (monotonic time of arrival, line)
        self.sent_at = self.ended_at = self.hung_up_at = None
        self.connection, self.hanging_up = None, threading.Lock()

    def run(self, timeout, hang_up_by=None):
        """Read the stream to its end; with `hang_up_by`, hang up after the ticks, or that many seconds
        after sending if they are held back."""
        self.connection = self.target.connection(timeout)
        self.sent_at = time.monotonic()
        timer = threading.Timer(hang_up_by, self.hang_up) if hang_up_by else None
        if timer:
            timer.start()
        try:
            self.read(hang_up_after_ticks=timer is not None)
        except (OSError, http.client.HTTPException) as exc:  # cut short, or the timer hung up
            if self.hung_up_at is None:
                self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ended_at = time.monotonic()
            if timer:
                timer.cancel()
            self.hang_up()

    def read(self, hang_up_after_ticks):
        response = self.target.post(self.connection, CHAT_BODY, **self.query)
        self.status, self.headers = response.status, response.headers
        if response.status != 200:
            self.body = response.read(4096)
            return
        encoding = (response.headers.get("Content-Encoding") or "identity").lower()
        inflate = {"gzip": zlib.decompressobj(16 + zlib.MAX_WBITS), "deflate": zlib.decompressobj()}.get(encoding)
        pending = b""
        while data := response.read1(65536):
            arrived = time.monotonic()
            if encoding != "identity":
                if inflate is None:
                    continue  # br or the like: unreadable here
                data = inflate.decompress(data)
            *lines, pending = (pending + data).split(b"\n")
            self.lines += [(arrived, line) for line in lines]
            if hang_up_after_ticks and self.ticks()[TICKS - 1 :]:
                self.hang_up()
                return

    def hang_up(self):
        """Close the connection for real, once (the reading thread and the timer may both try)."""
        with self.hanging_up:
            if self.hung_up_at is None and self.connection is not None:
                self.hung_up_at = time.monotonic()
                try:
                    self.connection.sock.shutdown(socket.SHUT_RDWR)
                except (AttributeError, OSError):
                    pass
                self.connection.close()

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

    def ticks(self):
        return [at for at, d in self.diagnostics() if "tick" in d]

    def complete(self):
        return any(value == "[DONE]" for _, value in self.events())

    def refused(self):
        """Why the stream never started, in words; None if it did."""
        if self.status is None:
            return f"no answer: {self.error}" if self.error else "nothing came back before the doctor hung up"
        if self.status == 200:
            return None
        try:
            message = json.loads(self.body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = self.body[:200].decode(errors="replace").strip()
        withheld = " (the token was not sent: the certificate is not trusted)" if self.target.withholds_token() else ""
        return f"the diagnostic stream got HTTP {self.status}: {message}{withheld}"


class Check:
    """One line of the doctor's report: PASS or FAIL, what it saw, and for a failure the fix in one sentence."""

    def __init__(self, name, passed, seen, fix=""):
        self.name, self.passed, self.seen, self.fix = name, passed, seen, fix

    def lines(self):
        yield f"{'PASS' if self.passed else 'FAIL'}  {self.name:<16} {self.seen}"
        if not self.passed:
            yield f"{'':<23}Fix: {self.fix}"


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
    main, abort = Run(target, diagnostic="stream", silence=f"{silence:g}"), Run(target, diagnostic="abort")
    timeout = silence + 30  # no byte for that long: the stream is stuck somewhere
    aborting = threading.Thread(target=abort.run, args=(timeout, TICKS * TICK_SECONDS + 1.5), daemon=True)
    aborting.start()
    main.run(timeout)
    aborting.join()
    checks = [
        *check_stream(main, silence),
        check_http2(target, tls),
        check_abort(target, abort),
        check_tls(target, tls),
    ]
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
            response = target.post(connection, diagnostic="report", id=stream_id)
            body = response.read()
            if response.status == 200:
                return json.loads(body)
        except (OSError, http.client.HTTPException, ValueError):
            pass
        finally:
            connection.close()
        time.sleep(0.25)
    return None


UNBUFFER = "Turn buffering off for the stream on every proxy: nginx's `proxy_buffering off;` and `gzip off;`."
UNCOMPRESS = "Do not compress the stream: `gzip off;` in its nginx location, and text/event-stream in no gzip_types."
KEEP_HEADERS = "Pass the app's response headers through unchanged (proxy_hide_header, add_header, a CDN's transforms)."
READ_TIMEOUT = (
    "Raise the proxy's read timeout (nginx: `proxy_read_timeout 300s;`), or set CHAT_HEARTBEAT_SECONDS below {}."
)
TOTAL_TIMEOUT = "Something ends responses after {} s however many bytes flow: raise that proxy's total timeout."
HTTP2 = "Add `http2` to nginx's `listen 443 ssl` line: over HTTP/1.1 a browser holds at most 6 streams per site."
ABORT = "Set `proxy_ignore_client_abort off;` (the default) where the chat is proxied: a closed tab stops the model."
TRUST = "Pass the CA with --cafile, or --insecure to send the token to this server all the same."
HTTPS = "Serve it over HTTPS: `certbot --nginx -d <your domain>` (README, Deploy on a VM)."


def check_stream(run, silence):
    """The checks of the main diagnostic stream: buffering, compression, headers, the silence, the heartbeat."""
    names = ["not buffered", "not compressed", "SSE headers", f"silence of {silence:g} s", "heartbeat"]
    if run.refused():
        return [
            Check(name, False, run.refused(), "Point the doctor at the chat's URL, with its token.") for name in names
        ]
    return [check_buffering(run), check_compression(run), check_headers(run), *check_silence(run, silence)]


def check_buffering(run):
    ticks, sent_over = run.ticks(), (TICKS - 1) * TICK_SECONDS
    if len(ticks) < TICKS:
        unreadable = " (compressed in a way the doctor cannot read)" if not run.lines else ""
        return Check("not buffered", False, f"{len(ticks)} of {TICKS} events arrived{unreadable}", UNBUFFER)
    spread, reads = ticks[-1] - ticks[0], len(set(ticks))
    seen = f"{TICKS} events sent over {sent_over:.2f} s arrived over {spread:.2f} s, in {reads} reads"
    if spread >= sent_over / 2 and reads >= TICKS // 2:
        return Check("not buffered", True, seen)
    return Check("not buffered", False, seen + ": held back, then sent together", UNBUFFER)


def check_compression(run):
    encoding = run.headers.get("Content-Encoding") or "identity"
    if encoding.lower() == "identity":
        return Check("not compressed", True, "no Content-Encoding, though the doctor accepts gzip")
    return Check("not compressed", False, f"Content-Encoding: {encoding}", UNCOMPRESS)


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


def check_silence(run, silence):
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
        fix = READ_TIMEOUT.format(f"{idle:.0f}")
        idled = f"every {heartbeat:g} s, but the path cut {idle:.1f} s without a byte"
        return [Check(name, False, seen, fix), Check("heartbeat", False, idled, fix)]
    fix = TOTAL_TIMEOUT.format(f"{run.ended_at - run.sent_at:.0f}")
    return [Check(name, False, seen, fix), Check("heartbeat", True, f"every {heartbeat:g} s, and the pings arrived")]


def check_http2(target, tls):
    if not target.tls:
        return Check("HTTP/2", False, "plain HTTP: browsers speak HTTP/2 only over TLS", HTTPS)
    if tls["alpn"] == "h2":
        return Check("HTTP/2", True, "offered (ALPN h2); the doctor's own requests use HTTP/1.1")
    return Check("HTTP/2", False, f"not offered (ALPN: {tls['alpn'] or 'none'})", HTTP2)


def check_abort(target, run):
    """Did the app learn at its next heartbeat that the doctor hung up? Its record of the stream says."""
    about = run.about()
    stream_id, heartbeat = about.get("id"), about.get("heartbeat")
    if (run.status is None and run.error is None) or (run.status == 200 and not stream_id):
        return Check("client abort", False, "no event came before the doctor hung up: held back", UNBUFFER)
    if run.refused():
        return Check("client abort", False, run.refused(), "Point the doctor at the chat's URL, with its token.")
    if run.complete():
        return Check("client abort", False, "the stream arrived whole: no time to hang up in it", UNBUFFER)
    record = fetch_report(
        target, stream_id, run.sent_at + TICKS * TICK_SECONDS + (ABORT_HEARTBEATS + 1) * heartbeat + 10
    )
    if record is None:
        lost = (
            "no word of how the stream ended: the report went to another app server, or the workers share no directory"
        )
        return Check("client abort", False, lost, "Run the doctor against one app server, with gunicorn.conf.py.")
    noticed = record["duration"] - (run.hung_up_at - run.sent_at)
    seen = f"the app noticed the hang-up {noticed:.1f} s later (end={record['end']}, heartbeat {heartbeat:g} s)"
    if record["end"] == "client_gone" and noticed <= 1.5 * heartbeat:
        return Check("client abort", True, seen)
    return Check("client abort", False, seen + ": not at its next heartbeat", ABORT)


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
