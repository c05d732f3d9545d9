"""An existing Flask app that mounts the chat blueprint under /assistant, as the README shows.

Started by gunicorn in test_page.py (`tests.host_app:host`) to prove the page's relative URLs.
"""

from flask import Flask

from app import chat

host = Flask(__name__)
host.register_blueprint(chat, url_prefix="/assistant")


@host.get("/")
def home():
    """The host's own page, which the blueprint must not shadow."""
    return "The host app's home page."
