"""The wire: what a request may hold, checked in one place, and one small encoder per protocol.

The request. read_json() reads the body within its limits, parse_chat_request() checks the native
body ({"messages": [...]} and the sampling parameters), and native_body() turns the body the Vercel
AI SDK's useChat sends into the native one. Every refusal is an ApiError: an HTTP status, a code for
programs and a sentence naming the field, which app.py's one error handler answers as JSON.

The encoders. EventStream is the service's own format (POST /api/chat), UIMessageStream what useChat
reads (POST /api/ui-chat). Each offers what app.py's `Encoder` contract names; the relay yields only
the bytes they return.
"""

import base64
import json
import math
import re

import gevent
from flask import request
from gevent.monkey import is_module_patched
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

# --- Refusals and the checks every field goes through -------------------------------------------------


class ApiError(HTTPException):
    """Every failure before the stream: an HTTP status, a code for programs and a sentence for people."""

    def __init__(self, status, code, message, headers=None):
        super().__init__(message)
        # Werkzeug calls the HTTP status `code`; the body's short code for programs is `error_code`.
        self.code, self.error_code, self.headers = status, code, headers or {}


def invalid(message):
    """A 400 for a body we cannot use; the message names the field."""
    return ApiError(400, "invalid_request", message)


def check_fields(value, allowed, where, what="an object"):
    """Refuse `value` unless it is an object whose fields are all in `allowed`."""
    if not isinstance(value, dict):
        raise invalid(f"{where} must be {what}.")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise invalid(f"{where} has an unknown field: {unknown[0][:100]}.")


def check_choice(value, choices, where):
    """Refuse `value` unless it is one of `choices` (strings)."""
    if not (isinstance(value, str) and value in choices):
        raise invalid(f"{where} must be one of {', '.join(choices)}.")


def check_list(value, where):
    """Refuse `value` unless it is a non-empty list."""
    if not isinstance(value, list) or not value:
        raise invalid(f"{where} must be a non-empty list.")


def in_range(low, high, above=False, kind=(int, float)):
    """Return a check: a number of `kind` (never a bool) from low (or above it) to high."""
    return lambda v: isinstance(v, kind) and not isinstance(v, bool) and (v > low if above else v >= low) and v <= high


def one_of(*choices):
    """Return a check that a value is one of `choices`, and what it must be."""
    return lambda v: v in choices, f"one of {', '.join(choices)}"  # a tuple: `[] in` it is False, not a TypeError


LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON may escape one ("\\ud800"); no upstream can be sent it


def is_text(value):
    return isinstance(value, str) and not LONE_SURROGATE.search(value)


def is_stop(value):
    return is_text(value) or (isinstance(value, list) and len(value) <= 4 and all(map(is_text, value)))


REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")  # an X-Request-Id we take from nginx, and the ids we make


def comma_list(value):
    """Split a comma-separated setting into its non-empty items."""
    return [item.strip() for item in value.split(",") if item.strip()]


def allowed_models(config):
    """Return the models a request may name: CHAT_MODELS, or just CHAT_MODEL."""
    return comma_list(config["CHAT_MODELS"]) or [config["CHAT_MODEL"]]


# --- The native request: {"messages": [...], "model": ..., sampling parameters} -------------------------

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
ROLES = ("system", "developer", "user", "assistant")
MESSAGE_FIELDS = {"role", "content", "name"}


class BodyTimeout(Exception):
    """The request's body took longer than CHAT_BODY_TIMEOUT to arrive."""


def require_json():
    """Refuse a body that is not JSON. A page on another site can POST a form or text/plain here unasked;
    JSON needs a CORS preflight first, which only CHAT_CORS_ORIGINS pass."""
    if request.mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json.")


def read_json(config):
    """Return the request's JSON body, or raise ApiError: not JSON, too large, too slow, not UTF-8, too deep.

    A body of CHAT_MAX_BODY_BYTES is accepted and one byte more refused, with a Content-Length or
    chunked alike: werkzeug is let read one byte past the limit, so that reading up to it is no refusal.
    """
    require_json()
    limit = config["CHAT_MAX_BODY_BYTES"]
    request.max_content_length = limit + 1  # a larger Content-Length gets 413 before any byte is read
    # A body that trickles in would hold its connection for good: under gevent, cut it at a total time.
    allowed = config["CHAT_BODY_TIMEOUT"] if is_module_patched("socket") else None  # None: no timer at all
    try:
        with gevent.Timeout(allowed, BodyTimeout):
            data = request.get_data(cache=False)
        if len(data) > limit:
            raise RequestEntityTooLarge
        body = json.loads(data.decode("utf-8"))
    except BodyTimeout:
        raise ApiError(408, "body_timeout", f"The body was not all sent within {allowed:g} s.") from None
    except RequestEntityTooLarge:
        raise ApiError(413, "body_too_large", f"The body is larger than {limit} bytes.") from None
    except UnicodeDecodeError:
        raise invalid("The body is not UTF-8.") from None
    except RecursionError:
        raise invalid("The body is nested too deeply.") from None
    except ValueError as exc:
        raise invalid(f"The body is not valid JSON: {exc}.") from None
    return body


def parse_chat_request(config, body):
    """Return (model, messages, parameters to send) from the request's body, or raise ApiError naming the field."""
    check_fields(body, REQUEST_FIELDS, "The body", "a JSON object")
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
    check_list(messages, "messages")
    if len(messages) > config["CHAT_MAX_MESSAGES"]:
        limit = config["CHAT_MAX_MESSAGES"]
        raise ApiError(400, "too_many_messages", f"The conversation has more than {limit} messages.")
    images = sum(check_message(message, f"messages[{i}]", config) for i, message in enumerate(messages))
    if images > config["CHAT_MAX_IMAGES"]:
        raise invalid(f"The conversation has {images} images; at most {config['CHAT_MAX_IMAGES']} are allowed.")
    if config["CHAT_SYSTEM_PROMPT"]:
        messages = [{"role": "system", "content": config["CHAT_SYSTEM_PROMPT"]}, *messages]
    return model, messages, params


def check_message(message, where, config):
    """Check one native message ({role, content, name}) and return how many images it holds."""
    check_fields(message, MESSAGE_FIELDS, where)
    check_choice(message.get("role"), ROLES, f"{where}.role")
    if "name" in message and not is_text(message["name"]):
        raise invalid(f"{where}.name must be a string (no lone surrogates).")
    return check_content(message.get("content"), f"{where}.content", message["role"], config)


# --- The content of a message: text, or text and image parts --------------------------------------

IMAGE_URL = re.compile(r"data:image/(png|jpeg|gif|webp);base64,([A-Za-z0-9+/]*={0,2})")
IMAGE_MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "gif": b"GIF8", "webp": b"RIFF"}


def check_content(content, where, role, config):
    """Check a message's content (a string, or text and image parts) and return how many images it holds."""
    if is_text(content):
        return 0
    if not isinstance(content, list) or not content:
        raise invalid(f"{where} must be a string (no lone surrogates) or a non-empty list of parts.")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and part.keys() == {"type", "text"} and is_text(part["text"]):
            continue
        image = part.get("image_url") if kind == "image_url" and part.keys() == {"type", "image_url"} else None
        if not isinstance(image, dict) or not image.keys() <= {"url", "detail"}:
            raise invalid(f"{where}[{j}] must be a text part or an image_url part.")
        check_image(image, f"{where}[{j}].image_url", role, config)
    return sum(part["type"] == "image_url" for part in content)


def check_image(image, where, role, config):
    """Check an image part: a PNG, JPEG, GIF or WebP in a base64 data: URL, within CHAT_MAX_IMAGE_BYTES.

    Only data: URLs: the service never asks an upstream to fetch a URL that a browser chose.
    """
    if role != "user":
        raise invalid(f"{where}: images are accepted in user messages only.")
    if image.get("detail", "auto") not in ("auto", "low", "high"):
        raise invalid(f"{where}.detail must be auto, low or high.")
    found = IMAGE_URL.fullmatch(image["url"]) if isinstance(image.get("url"), str) else None
    if not found:
        raise invalid(f"{where}.url must be a data:image/(png|jpeg|gif|webp);base64,... URL.")
    kind, encoded = found.groups()
    try:
        decoded = base64.b64decode(encoded, validate=True)
    except ValueError:  # binascii.Error: the padding is wrong
        raise invalid(f"{where}.url is not valid base64.") from None
    if len(decoded) > config["CHAT_MAX_IMAGE_BYTES"] or not decoded.startswith(IMAGE_MAGIC[kind]):
        raise invalid(f"{where} is not a {kind} image of at most {config['CHAT_MAX_IMAGE_BYTES']} bytes.")


# --- The native event stream: one encoder per protocol, the relay calls it -----------------------

# Made once: json.dumps(..., ensure_ascii=False) builds a new encoder on every call.
to_json = json.JSONEncoder(ensure_ascii=False).encode


def sse(payload):
    """Encode one event: `data: <json>` and the blank line that ends it (one line: JSON escapes newlines).

    U+2028, U+2029 and U+0085 are escaped too: some line splitters (Python's str.splitlines among them)
    end a line there and would cut the event.
    """
    text = to_json(payload)
    if not text.isascii():
        text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")
    return b"data: " + text.encode("utf-8", "replace") + b"\n\n"


class EventStream:
    """The service's own format: `data: {"content": ...}` events, readable by any SSE client.

    Every event carries `content` (empty but for text), so a client that appends `content` until
    `[DONE]` rebuilds the reply; newer clients tell events apart by their other keys. Comments are a
    line without a blank line of their own: fetch-event-source hands every blank line on as a message.
    """

    media_type = "text/event-stream"
    headers = {}

    def opened(self):
        return b": ok\n"  # sent with the headers: proxies and the browser see the stream open at once

    def ping(self):
        return b": ping\n"

    def delta(self, kind, text):
        return sse({"content": text}) if kind == "content" else sse({"content": "", kind: text})

    def end(self, finish_reason, usage):
        return sse({"content": "", "finish_reason": finish_reason, "usage": usage}) + b"data: [DONE]\n\n"

    def error(self, code, message):
        return sse({"content": "", "error": message, "code": code})


# --- The AI SDK's UI message stream: the second encoder, and its request ------------------------
#
# What useChat reads through the `ai` package's DefaultChatTransport: one JSON chunk per event,
# told apart by `type` (ai's uiMessageChunkSchema, src/ui-message-stream/ui-message-chunks.ts).
# A reply is `start`, then each run of reasoning or text as a part: `reasoning-start`, deltas,
# `reasoning-end` (or `text-...`), then `finish` with the usage as the message's metadata, and
# `[DONE]`, which the SDK's own servers send last whether or not the reply failed.

FINISH_REASONS = {  # OpenAI's finish reasons, as the SDK names them; any other is "other"
    "stop": "stop",
    "length": "length",
    "content_filter": "content-filter",
    "tool_calls": "tool-calls",
    "function_call": "tool-calls",
}


class UIMessageStream:
    """The Vercel AI SDK's UI message stream (v1): text and reasoning parts, usage on `finish`."""

    media_type = "text/event-stream"
    headers = {"x-vercel-ai-ui-message-stream": "v1"}

    def __init__(self):
        self.part = None  # the open part: ("text" or "reasoning", its id)
        self.parts = 0

    def opened(self):
        return sse({"type": "start"})

    def ping(self):
        return b": ping\n"

    def delta(self, kind, text):
        kind = "text" if kind == "content" else kind
        data = b""
        if self.part is None or self.part[0] != kind:  # a new run of this kind: a new part
            data = self.close_part()
            self.part, self.parts = (kind, str(self.parts)), self.parts + 1
            data += sse({"type": f"{kind}-start", "id": self.part[1]})
        return data + sse({"type": f"{kind}-delta", "id": self.part[1], "delta": text})

    def close_part(self):
        if self.part is None:
            return b""
        (kind, part_id), self.part = self.part, None
        return sse({"type": f"{kind}-end", "id": part_id})

    def end(self, finish_reason, usage):
        finish = {"type": "finish", "finishReason": FINISH_REASONS.get(finish_reason, "other")}
        finish["messageMetadata"] = {"usage": usage}  # where useChat lets a page read it: message.metadata
        return self.close_part() + sse(finish) + b"data: [DONE]\n\n"

    def error(self, code, message):
        # The open part stays open: the SDK leaves it "streaming", which is what it is, cut short.
        return sse({"type": "error", "errorText": message}) + b"data: [DONE]\n\n"


UI_REQUEST_FIELDS = {"id", "messages", "trigger", "messageId"}  # DefaultChatTransport's; the rest as in REQUEST_FIELDS
UI_TRIGGERS = ("regenerate-message", "submit-message")
UI_MESSAGE_FIELDS = {"id", "role", "parts", "metadata"}
UI_ROLES = ("assistant", "system", "user")
UI_PART_FIELDS = {  # the parts a chat without tools has (ai's src/ui/validate-ui-messages.ts)
    "file": {"type", "mediaType", "filename", "url", "providerReference", "providerMetadata"},
    "reasoning": {"type", "id", "text", "state", "providerMetadata"},
    "step-start": {"type"},
    "text": {"type", "text", "state", "providerMetadata"},
}


def native_body(body):
    """Turn the body useChat sends into the native one; a 400 names the field as the AI SDK spells it.

    Text parts become the message's text, image file parts its image parts; the model's reasoning
    is not sent back to it. Other fields (model, sampling) stay as they are, for the native checks.
    """
    if not isinstance(body, dict):  # its fields are checked as the native body's, once turned into it
        raise invalid("The body must be a JSON object.")
    for name in ("id", "messageId"):
        if name in body and not isinstance(body[name], str):
            raise invalid(f"{name} must be a string.")
    if "trigger" in body:
        check_choice(body["trigger"], UI_TRIGGERS, "trigger")
    check_list(body.get("messages"), "messages")
    native = {name: value for name, value in body.items() if name not in UI_REQUEST_FIELDS}
    native["messages"] = [native_message(message, f"messages[{i}]") for i, message in enumerate(body["messages"])]
    return native


def native_message(message, where):
    """Turn one UI message ({id, role, parts}) into {role, content}."""
    check_fields(message, UI_MESSAGE_FIELDS, where)
    check_choice(message.get("role"), UI_ROLES, f"{where}.role")
    if not isinstance(message.get("parts"), list):
        raise invalid(f"{where}.parts must be a list.")
    content = [item for j, part in enumerate(message["parts"]) if (item := native_part(part, f"{where}.parts[{j}]"))]
    if not content and message["role"] != "assistant":  # an assistant stopped while it thought may have none
        raise invalid(f"{where}.parts has no text.")
    if all(item["type"] == "text" for item in content):  # text only: the plain string every upstream takes
        content = "".join(item["text"] for item in content)
    return {"role": message["role"], "content": content}


def native_part(part, where):
    """Turn one UI part into a native content part: text or image_url; None for the parts not sent back."""
    if not isinstance(part, dict):
        raise invalid(f"{where} must be an object.")
    check_choice(part.get("type"), tuple(UI_PART_FIELDS), f"{where}.type")
    check_fields(part, UI_PART_FIELDS[part["type"]], where)
    if part["type"] in ("text", "reasoning") and not isinstance(part.get("text"), str):
        raise invalid(f"{where}.text must be a string.")
    if part["type"] == "text":
        return {"type": "text", "text": part["text"]}
    if part["type"] == "file":
        if not str(part.get("mediaType")).startswith("image/"):
            raise invalid(f"{where}.mediaType must be an image type: only images can be sent.")
        if not isinstance(part.get("url"), str):
            raise invalid(f"{where}.url must be a string.")
        return {"type": "image_url", "image_url": {"url": part["url"]}}
    return None
