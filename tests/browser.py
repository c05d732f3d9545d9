"""Debian's Chromium, headless, driven by Playwright, which never downloads a browser of its own here."""

from contextlib import contextmanager
from pathlib import Path

from live_servers import unavailable

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1000, "height": 720}


@contextmanager
def running_chromium():
    """One headless Chromium until the block ends; a missing one skips, or fails in CI."""
    if sync_playwright is None:
        unavailable("playwright is not installed (pip install -r requirements-dev.txt)")
    if not Path(CHROMIUM).exists():
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@contextmanager
def fresh_page(browser, **options):
    """A page with its own cookies and storage; a JavaScript error in it fails the test. `options`: the context's."""
    context = browser.new_context(viewport=DESKTOP, **options)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    yield page
    context.close()
    assert errors == []
