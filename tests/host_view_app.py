"""A host app that relays in views of its own, with only the relay's public piece: no blueprint.

Started by gunicorn in test_host_view.py (`tests.host_view_app:host`). Its request shape is its own
({"question": ...}); what it streams is the built-in demo model, upstream.py's Upstream (the SDK's
request, the reply read off its socket), or the SDK's stream of its own client wrapped as the
relay's UpstreamStream contract (app.py).
"""

import functools
import os
from collections import ChainMap

import openai
from flask import Flask, request

from app import DEFAULTS, BrowserSocket, relay_response
from protocols import EventStream
from upstream import DemoStream, Upstream, UpstreamError

host = Flask(__name__)
HOST_TOKEN = "host-token-that-looks-like-nothing-42"


@host.get("/")
def home():
    return "The host app's home page."


@host.post("/ask")
def ask():
    """The demo model, relayed with a settings mapping of the host's own: the rest take their defaults."""
    messages = [{"role": "user", "content": request.json["question"]}]
    demo = DemoStream(messages, request.json.get("pace", 0.01))
    return relay_response(demo, EventStream(), {"CHAT_HEARTBEAT_SECONDS": 0.2})


@host.post("/ask-model")
def ask_model():
    """The host's own SDK client and stream, relayed with the host's Flask config (it has no CHAT_* key)."""
    messages = [{"role": "user", "content": request.json["question"]}]
    chunks = sdk_client().chat.completions.create(model="gpt-test", messages=messages, stream=True)
    return relay_response(SDKStream(chunks), EventStream(), host.config, model="gpt-test")


@host.post("/ask-fast")
def ask_fast():
    """upstream.py's reader, with heartbeats in silences: one Upstream per worker, made on first use."""
    messages = [{"role": "user", "content": request.json["question"]}]
    settings = upstream_settings()
    stream = worker_upstream().open("gpt-test", messages, client_left=BrowserSocket.of_request(settings).has_left)
    return relay_response(stream, EventStream(), settings, model="gpt-test")


@functools.cache
def upstream_settings():
    """The host's settings for the model, with app.py's DEFAULTS for the rest (read once, not at import)."""
    own = {key: os.environ[key] for key in ("OPENAI_BASE_URL", "OPENAI_API_KEY")} | {"CHAT_HEARTBEAT_SECONDS": 0.2}
    own["CHAT_API_TOKEN"] = HOST_TOKEN  # nothing here checks it: it is a secret of these settings, for the log
    return ChainMap(own, DEFAULTS)


@functools.cache
def worker_upstream():
    return Upstream(upstream_settings())


@functools.cache
def sdk_client():
    return openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ["OPENAI_API_KEY"], max_retries=0)


class SDKStream:
    """The SDK's chunk iterator as an UpstreamStream. It waits for each chunk, so a silence has no heartbeat."""

    reader = "sdk-chunks"

    def __init__(self, chunks):
        self.chunks, self.finished, self.finish_reason, self.usage = chunks, False, None, None

    def read(self, timeout):
        try:
            chunk = next(self.chunks, None)
        except openai.APIError as exc:
            raise UpstreamError("The model stopped with an error.", "upstream_error", str(exc)) from None
        if chunk is None:
            self.finished = True
            return []
        self.usage = chunk.usage.model_dump() if chunk.usage else self.usage
        for choice in chunk.choices:
            self.finish_reason = choice.finish_reason or self.finish_reason
        return [("content", choice.delta.content) for choice in chunk.choices if choice.delta.content]

    def close(self):
        self.chunks.close()
