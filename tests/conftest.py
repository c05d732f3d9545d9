"""Fixtures: which real servers a test gets, and for how long. What they are lives in fake_upstream.py,
live_servers.py (gunicorn), nginx_server.py, redis_server.py and browser.py; chat_client.py is the streaming client."""

import shutil
import subprocess

import pytest

from browser import fresh_page, running_chromium
from fake_upstream import running_fake_upstream
from live_servers import FAST_LIFECYCLE, ROOT, Gunicorns, unavailable
from nginx_server import Nginxes
from redis_server import Redises


@pytest.fixture(scope="session")
def fake_upstream_server():
    """One fake upstream for the session; tests take it through `upstream`."""
    with running_fake_upstream() as server:
        yield server


@pytest.fixture
def upstream(fake_upstream_server):
    """The fake upstream, with a fresh script and record for this test."""
    fake_upstream_server.reset()
    return fake_upstream_server


@pytest.fixture
def start_gunicorn(fake_upstream_server, tmp_path_factory):
    """`start(env)` starts a gunicorn of the test's own (see `Gunicorns.start`); all stop when the test ends."""
    with Gunicorns(tmp_path_factory, fake_upstream_server.url) as gunicorns:
        yield gunicorns.start


@pytest.fixture(scope="session")
def gunicorn(fake_upstream_server, tmp_path_factory):
    """The session's gunicorn: default settings, two models to choose from."""
    with Gunicorns(tmp_path_factory, fake_upstream_server.url) as gunicorns:
        yield gunicorns.start({"CHAT_MODEL": "gpt-test", "CHAT_MODELS": "gpt-test,other"})


@pytest.fixture(scope="session")
def fast_gunicorn(fake_upstream_server, tmp_path_factory):
    """The session's gunicorn with heartbeats every 0.25 s and timeouts of a second or two."""
    with Gunicorns(tmp_path_factory, fake_upstream_server.url) as gunicorns:
        yield gunicorns.start(FAST_LIFECYCLE, name="fast")


@pytest.fixture
def demo_gunicorn(start_gunicorn):
    """gunicorn with no OPENAI_* or CHAT_* variables at all: the demo model answers."""
    return start_gunicorn(name="demo", upstream=False)


@pytest.fixture
def start_nginx(tmp_path_factory):
    """`start(name, app_servers, replace)` starts an nginx of the test's own (see `Nginxes.start`)."""
    with Nginxes(tmp_path_factory) as nginxes:
        yield nginxes.start


@pytest.fixture
def start_redis(tmp_path_factory):
    """`start(name)` starts a redis-server of the test's own (see `Redises.start`); it has `redis_url`."""
    with Redises(tmp_path_factory) as redises:
        yield redises.start


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made with openssl: (certificate, key)."""
    if shutil.which("openssl") is None:
        unavailable("openssl is not installed (apt-get install openssl; .ci/run does)")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    command += ["-keyout", key, "-out", cert, "-days", "30", "-subj", "/CN=127.0.0.1"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(command, check=True, capture_output=True, timeout=30)
    return cert, key


@pytest.fixture(scope="session")
def browser():
    """One Chromium for the session; each test gets its own context and page."""
    with running_chromium() as chromium:
        yield chromium


@pytest.fixture
def page(browser):
    """A fresh page; a JavaScript error in it fails the test."""
    with fresh_page(browser) as page:
        yield page


@pytest.fixture(scope="session")
def node():
    """Node's path, for the JavaScript clients; a missing one skips, or fails in CI."""
    path = shutil.which("node")
    if path is None:
        unavailable("node is not installed (apt-get install nodejs npm; .ci/run does)")
    return path


@pytest.fixture(scope="session")
def js_clients(node):
    """Node's path, once `npm ci` in tests/ has installed the JavaScript clients tests/package.json pins."""
    if not (ROOT / "tests" / "node_modules").is_dir():
        unavailable("the JavaScript clients are not installed (npm ci in tests/; .ci/run does)")
    return node
