"""Caddy, HAProxy and Apache in front of live gunicorns, with the configs the README gives (proxy_servers.py):
the stream through each, and `flask --app app doctor` behind each, tuned and as their docs first lead.

Heartbeats are scaled down (0.5 s for the streams, 1 s for the doctor) and so are the timeouts a test
replaces, so that every silence lasts seconds.
"""

import http.client
import json
import socket
import ssl
import time

import pytest
from proxy_servers import Proxies
from test_operate import doctor, with_heartbeat

import operate
from chat_client import Reply
from live_servers import Gunicorns

HI = {"messages": [{"role": "user", "content": "Hi"}]}
PROXIES = ["caddy", "haproxy", "apache"]
HEARTBEAT = 0.5  # seconds: the stream app's CHAT_HEARTBEAT_SECONDS
# The abort test's heartbeat, and how long after a closed connection, 0.2 s into a silence, the upstream may
# be closed: at the app's next ping (0.8 s), not the one after (1.8 s: HAProxy without `option abortonclose`);
# Apache at its second write to the closed connection, up to 3 heartbeats (the README's figures).
ABORT_HEARTBEAT = 1.0
ABORT_NOTICED = {"caddy": 1.3, "haproxy": 1.3, "apache": 3 * ABORT_HEARTBEAT + 0.5}
# Each README config's time allowed between two reads from gunicorn, and the same scaled down to 1 s.
READ_TIMEOUT = {
    "caddy": ("read_timeout 300s", "read_timeout 1s"),
    "haproxy": ("timeout server 300s", "timeout server 1s"),
    "apache": ("timeout=300 ttl=4", "timeout=1 ttl=4"),
}


# --- Fixtures: the proxies, the app servers behind them, a certificate ----------------------------


@pytest.fixture(scope="module")
def gunicorns(fake_upstream_server, tmp_path_factory):
    with Gunicorns(tmp_path_factory, fake_upstream_server.url) as gunicorns:
        yield gunicorns


@pytest.fixture(scope="module")
def stream_app(gunicorns):
    """Heartbeats every half second: the app the streams go to."""
    return gunicorns.start({"CHAT_HEARTBEAT_SECONDS": str(HEARTBEAT)}, name="gunicorn-proxied")


@pytest.fixture(scope="module")
def quiet_app(gunicorns):
    """The default heartbeat (15 s): a silence of seconds has no ping in it."""
    return gunicorns.start(name="gunicorn-quiet")


@pytest.fixture(scope="module")
def abort_app(gunicorns):
    """Heartbeats every second: one ping after a hang-up is told apart from two."""
    # No resuming: a hang-up then ends the model's request at once (else it runs on CHAT_RESUME_SECONDS).
    return gunicorns.start(
        {"CHAT_HEARTBEAT_SECONDS": str(ABORT_HEARTBEAT), "CHAT_RESUME_SECONDS": "0"}, name="gunicorn-aborted"
    )


@pytest.fixture(scope="module")
def doctor_app(gunicorns):
    """Two workers, heartbeats every second, a token: what the doctor is pointed at."""
    return gunicorns.start(with_heartbeat(1), name="gunicorn-doctored", workers=2)


@pytest.fixture(scope="module")
def slow_heartbeat_app(gunicorns):
    """Heartbeats every 2.5 s: longer than the 2 s timeout of the short HAProxy below."""
    return gunicorns.start(with_heartbeat(2.5), name="gunicorn-slow-heartbeat-proxied")


@pytest.fixture(scope="module")
def proxies(tmp_path_factory):
    with Proxies(tmp_path_factory) as proxies:
        yield proxies


def start(proxies, kind, name, app, certificate, config=None, replace=()):
    return getattr(proxies, f"start_{kind}")(name, app, certificate, config, replace)


@pytest.fixture(scope="module", params=PROXIES)
def proxy(request, proxies, stream_app, certificate):
    """Each proxy with the README's config, in front of the stream app: (kind, Proxy)."""
    return request.param, start(proxies, request.param, request.param, stream_app, certificate)


def client_context(certificate):
    context = ssl.create_default_context(cafile=str(certificate[0]))
    context.set_alpn_protocols(["http/1.1"])
    return context


def post(proxy, certificate, body=HI, headers=None, source="127.0.0.1", path="/api/chat"):
    """POST over HTTPS and read the reply as it arrives (chat_client.post_chat, over TLS)."""
    started = time.monotonic()
    connection = http.client.HTTPSConnection(
        "127.0.0.1", proxy.tls_port, timeout=30, context=client_context(certificate), source_address=(source, 0)
    )
    payload = json.dumps(body).encode() if body is not None else None
    connection.request(
        "POST" if body is not None else "GET", path, payload, {"Content-Type": "application/json", **(headers or {})}
    )
    response = connection.getresponse()
    arrivals, raw = [], b""
    try:
        while chunk := response.read1(65536):
            arrivals.append((time.monotonic(), chunk))
            raw += chunk
    except http.client.IncompleteRead:  # cut short by the proxy: what arrived is the answer
        pass
    connection.close()
    headers = {name.title(): value for name, value in response.getheaders()}  # HAProxy sends them in lower case
    return Reply(response.status, headers, raw, arrivals, started)


# --- The stream through each proxy ------------------------------------------------------------------


def test_stream_arrives_event_by_event_and_uncompressed(proxy, certificate, upstream):
    """The first event long before the upstream finishes, each in its own read, no Content-Encoding
    although the client accepts gzip (HAProxy compressing gathered them into ~250 ms bursts)."""
    kind, server = proxy
    upstream.reset(tokens=[f"t{i} " for i in range(30)], delay=0.05)
    reply = post(server, certificate, headers={"Accept-Encoding": "gzip"})

    assert reply.status == 200, reply.raw
    assert "Content-Encoding" not in reply.headers
    assert reply.text == "".join(f"t{i} " for i in range(30))
    assert reply.first_time() < 0.5
    assert reply.arrivals[-1][0] - reply.started > 1.4
    assert len([chunk for _, chunk in reply.arrivals if b'"content": "t' in chunk]) >= 25


@pytest.mark.parametrize("kind", PROXIES)
@pytest.mark.parametrize(
    "app_server, survives", [("stream_app", True), ("quiet_app", False)], ids=["pinged", "unpinged"]
)
def test_a_silence_past_the_read_timeout(kind, app_server, survives, request, proxies, certificate, upstream):
    """The README's read timeout scaled down to 1 s, and a model that thinks 1.5 s: the app's pings
    every half second keep the stream open; without them (the control) the proxy cuts it."""
    app = request.getfixturevalue(app_server)
    server = start(proxies, kind, f"{kind}-short-{app_server}", app, certificate, replace=[READ_TIMEOUT[kind]])
    upstream.reset(tokens=["Hel", "lo"], hold=1.5)
    reply = post(server, certificate)

    assert reply.status in (200, 502, 504)
    assert (reply.data[-1:] == ["[DONE]"] and reply.text == "Hello") is survives, reply.raw
    if survives:
        assert b": ping\n" in reply.raw


@pytest.mark.parametrize("kind", PROXIES)
def test_an_abort_in_a_silence_closes_the_upstream(kind, proxies, abort_app, certificate, upstream):
    """A browser that leaves while the model thinks: the proxy closes its side at once and the app
    finds it at its next heartbeat, so the model's request ends. Apache notices only when its second
    write to the closed connection fails: up to 3 heartbeats (README, Apache)."""
    server = start(proxies, kind, f"{kind}-abort", abort_app, certificate)
    upstream.reset(tokens=["late"], hold=8.0)
    raw = socket.create_connection(("127.0.0.1", server.tls_port), timeout=10)
    client = client_context(certificate).wrap_socket(raw, server_hostname="127.0.0.1")
    body = json.dumps(HI).encode()
    client.sendall(
        b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    deadline = time.monotonic() + 5
    while not upstream.received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert upstream.received, "the request never reached the upstream:\n" + server.log()
    time.sleep(0.2)  # inside the silence
    client.close()
    closed_at = time.monotonic()

    [received] = upstream.received
    assert received.hung_up.wait(6), "the upstream never saw the client leave:\n" + server.log()
    noticed = received.hung_up_at - closed_at
    print(f"{kind}: the upstream was closed {noticed:.2f} s after the client (heartbeat {ABORT_HEARTBEAT} s)")
    assert noticed < ABORT_NOTICED[kind]


def resumed(server, certificate, upstream):
    """A chat through `server`, then its resume (GET /api/chat/<stream id>, with the owner's cookie): both replies."""
    upstream.reset(tokens=[f"t{i} " for i in range(5)], delay=0.02)
    first = post(server, certificate)
    cookie = first.headers["Set-Cookie"].split(";")[0]
    path = f"/api/chat/{first.headers['X-Stream-Id']}"
    return first, post(server, certificate, body=None, path=path, headers={"Cookie": cookie, "Accept-Encoding": "gzip"})


def test_a_resume_takes_the_stream_path(proxy, certificate, upstream):
    """GET /api/chat/<stream id> (Resuming) is a stream too: the same events again, uncompressed."""
    kind, server = proxy
    first, again = resumed(server, certificate, upstream)

    assert again.status == 200, again.raw
    assert "Content-Encoding" not in again.headers
    assert again.data == first.data


def test_metrics_only_from_this_machine(proxy, certificate):
    """/metrics from 127.0.0.2 (anyone outside) gets the proxy's 403; from 127.0.0.1 the app answers
    (404 here: CHAT_METRICS is off), and /healthz answers everyone."""
    kind, server = proxy
    statuses = {
        (path, source): post(server, certificate, body=None, source=source, path=path).status
        for path in ("/metrics", "/healthz")
        for source in ("127.0.0.1", "127.0.0.2")
    }

    assert statuses == {
        ("/metrics", "127.0.0.1"): 404,
        ("/metrics", "127.0.0.2"): 403,
        ("/healthz", "127.0.0.1"): 200,
        ("/healthz", "127.0.0.2"): 200,
    }


# --- The doctor behind each proxy: the config its docs lead to first, and the README's -----------------

CADDY_NAIVE = """{
	email you@example.com
}

chat.example.com {
	reverse_proxy 127.0.0.1:8000 {
		# The SSE advice found first, for "low-latency mode".
		flush_interval -1
	}
}
"""
HAPROXY_NAIVE = """global
    log /dev/log local0

defaults
    mode http
    log global
    timeout connect 5s
    timeout client 10s
    timeout server 10s

frontend chat
    bind :80
    compression algo gzip
    default_backend app

backend app
    server app1 127.0.0.1:8000
"""
# A `timeout server` below the heartbeat, which `timeout tunnel` does not make up for.
HAPROXY_TUNNEL = HAPROXY_NAIVE.replace("timeout server 10s", "timeout server 2s\n    timeout tunnel 1h")
APACHE_NAIVE = """<VirtualHost *:80>
    ProxyPass "/" "http://127.0.0.1:8000/"
    ProxyPassReverse "/" "http://127.0.0.1:8000/"
    SetOutputFilter DEFLATE
</VirtualHost>
"""
# mod_deflate's force-gzip: every response compressed, whatever the client accepts; the abort report too.
APACHE_FORCE_GZIP = APACHE_NAIVE.replace("SetOutputFilter DEFLATE", "SetOutputFilter DEFLATE\n    SetEnv force-gzip 1")
ALL_FOUR = ("nginx: ", "Caddy: ", "HAProxy: ", "Apache: ")

DOCTOR_CASES = [
    # id, proxy, config (None: the README's), app, over TLS, the checks that fail, (check, words in its verdict)
    (
        "caddy-naive",
        "caddy",
        CADDY_NAIVE,
        "doctor_app",
        True,
        ["client abort"],
        [("client abort", "stops the model. Caddy: no `flush_interval -1`")],
    ),
    ("caddy", "caddy", None, "doctor_app", True, [], [("client abort", "HTTP/2: the app noticed")]),
    (
        "haproxy-naive",
        "haproxy",
        HAPROXY_NAIVE,
        "doctor_app",
        False,
        ["HTTP/2", "TLS", "client abort"],
        [("client abort", "option abortonclose"), *(("client abort", name) for name in ALL_FOUR)],
    ),
    ("haproxy", "haproxy", None, "doctor_app", True, [], [("client abort", "HTTP/2: the app noticed")]),
    (
        "haproxy-timeout-tunnel",
        "haproxy",
        HAPROXY_TUNNEL,
        "slow_heartbeat_app",
        False,
        ["HTTP/2", "TLS", "client abort", "heartbeat", "silence of 3 s"],
        [("silence of 3 s", "`timeout server 300s`"), ("client abort", "before the doctor hung up")],
    ),
    (
        "apache-naive",
        "apache",
        APACHE_NAIVE,
        "doctor_app",
        False,
        ["HTTP/2", "TLS", "client abort", "not compressed"],
        [("not compressed", "`SetEnv no-gzip 1`"), ("client abort", "CHAT_HEARTBEAT_SECONDS")],
    ),
    (
        "apache-force-gzip",
        "apache",
        APACHE_FORCE_GZIP,
        "doctor_app",
        False,
        ["HTTP/2", "TLS", "client abort", "not compressed"],
        [("client abort", "the app noticed the hang-up"), ("not buffered", "in 21 reads")],
    ),
    ("apache", "apache", None, "doctor_app", True, ["client abort"], [("client abort", "CHAT_HEARTBEAT_SECONDS")]),
]


@pytest.mark.parametrize(
    "proxy_kind, config, app_server, tls, failing, verdicts",
    [case[1:] for case in DOCTOR_CASES],
    ids=[case[0] for case in DOCTOR_CASES],
)
def test_doctor_behind_each_proxy(
    proxy_kind, config, app_server, tls, failing, verdicts, request, proxies, certificate
):
    """Every verdict true: what is wrong fails, with the fix in the directive of the proxy in front (or of
    all four, where the proxy cannot be told), and the rest passes. No traceback (test_operate.doctor)."""
    app = request.getfixturevalue(app_server)
    server = start(proxies, proxy_kind, f"{proxy_kind}-doctor", app, certificate if tls else None, config)
    if tls:
        diagnosis = doctor(server.https, "--cafile", str(certificate[0]))
    else:
        diagnosis = doctor(server.http)

    assert diagnosis.failed() == sorted(failing), diagnosis.output
    assert diagnosis.returncode == (1 if failing else 0)
    for check, words in verdicts:
        assert words in diagnosis.checks[check][1], diagnosis.output


# --- The buffering check's arithmetic, on arrivals as the proxies above were seen to deliver them -------


def arrivals(pattern, heartbeat=1.0):
    """A diagnostic stream's lines as they would arrive: its first event at 0, then the ticks, each at the
    time `pattern(i, sent)` gives for tick i, sent at `sent`."""
    run = operate.Run(operate.Target("http://127.0.0.1/", None, None))
    about = {"id": "0123456789ab", "heartbeat": heartbeat, "silence": 3}
    events = [(pattern(0, 0.0), about)]
    events += [(pattern(i, i * operate.TICK_SECONDS), {"tick": i}) for i in range(1, operate.TICKS + 1)]
    for at, payload in events:
        run.lines.append((at, b"data: " + json.dumps({"content": json.dumps(payload)}).encode()))
    return run


BURST = 0.25  # seconds: HAProxy's bursts when it compressed the stream


@pytest.mark.parametrize(
    "pattern, passed, words",
    [
        (lambda i, sent: 0.01 + sent, True, "in 21 reads, up to 0 ms late"),
        (lambda i, sent: (sent // BURST + 1) * BURST, False, "gathered, then sent together"),  # D4
        (lambda i, sent: 0.01 + sent + (1.0 if i == operate.TICKS else 0), False, "held back"),  # held to the ping
        (lambda i, sent: 0.01 + sent * 8, False, "held back"),  # D3: spread out, late: 0.95 s over 7.6 s
    ],
    ids=["on-time", "250-ms-bursts", "last-held-for-a-heartbeat", "spread-out-late"],
)
def test_the_buffering_check_asks_for_each_event_on_time(pattern, passed, words):
    check = operate.check_buffering(arrivals(pattern), "HAProxy")

    assert check.passed is passed
    assert words in check.seen
    assert passed or "HAProxy: no `compression` of the stream" in check.fix


def test_apache_keeps_the_stream_uncompressed_under_a_compress_everything_filter(
    proxies, stream_app, certificate, upstream
):
    """The README's `SetEnv no-gzip 1` holds even where mod_deflate's first documented snippet,
    `SetOutputFilter DEFLATE`, compresses every response of the site (the page is compressed, the stream not)."""
    deflating = ("    # Everything else (the page", "    SetOutputFilter DEFLATE\n    # Everything else (the page")
    server = proxies.start_apache("apache-deflate-all", stream_app, certificate, replace=[deflating])
    upstream.reset(tokens=[f"t{i} " for i in range(10)], delay=0.05)
    reply = post(server, certificate, headers={"Accept-Encoding": "gzip"})
    page = post(server, certificate, body=None, path="/", headers={"Accept-Encoding": "gzip"})

    first, again = resumed(server, certificate, upstream)

    assert reply.status == 200
    assert "Content-Encoding" not in reply.headers
    assert reply.data[-1] == "[DONE]"
    assert again.status == 200 and "Content-Encoding" not in again.headers  # a resume is in the stream location
    assert page.headers.get("Content-Encoding") == "gzip"  # the premise: this Apache compresses
