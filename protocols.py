"""The wire formats: one small encoder per protocol, a message's content, and the AI SDK's request.

The relay in app.py yields only what an encoder returns: opened(), ping(), delta(kind, text) for
"content" or "reasoning", end(finish_reason, usage) and error(code, message). EventStream is the
service's own format (POST /api/chat); UIMessageStream is what the Vercel AI SDK's useChat reads
(POST /api/ui-chat), whose request body native_body() turns into the native one. check_content()
checks a message's text and image parts. The checks raise ValueError with a sentence naming the
field; app.py turns it into the 400.
"""

import base64
import json
import re

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


# --- The content of a message: text, or text and image parts --------------------------------------

LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON may escape one ("\\ud800"); no upstream can be sent it


def is_text(value):
    return isinstance(value, str) and not LONE_SURROGATE.search(value)


IMAGE_URL = re.compile(r"data:image/(png|jpeg|gif|webp);base64,([A-Za-z0-9+/]*={0,2})")
IMAGE_MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "gif": b"GIF8", "webp": b"RIFF"}


def check_content(content, where, role, config):
    """Check a message's content (a string, or text and image parts) and return how many images it holds."""
    if is_text(content):
        return 0
    if not isinstance(content, list) or not content:
        raise ValueError(f"{where} must be a string (no lone surrogates) or a non-empty list of parts.")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and part.keys() == {"type", "text"} and is_text(part["text"]):
            continue
        image = part.get("image_url") if kind == "image_url" and part.keys() == {"type", "image_url"} else None
        if not isinstance(image, dict) or not image.keys() <= {"url", "detail"}:
            raise ValueError(f"{where}[{j}] must be a text part or an image_url part.")
        check_image(image, f"{where}[{j}].image_url", role, config)
    return sum(part["type"] == "image_url" for part in content)


def check_image(image, where, role, config):
    """Check an image part: a PNG, JPEG, GIF or WebP in a base64 data: URL, within CHAT_MAX_IMAGE_BYTES.

    Only data: URLs: the service never asks an upstream to fetch a URL that a browser chose.
    """
    if role != "user":
        raise ValueError(f"{where}: images are accepted in user messages only.")
    if image.get("detail", "auto") not in ("auto", "low", "high"):
        raise ValueError(f"{where}.detail must be auto, low or high.")
    found = IMAGE_URL.fullmatch(image["url"]) if isinstance(image.get("url"), str) else None
    if not found:
        raise ValueError(f"{where}.url must be a data:image/(png|jpeg|gif|webp);base64,... URL.")
    kind, encoded = found.groups()
    try:
        decoded = base64.b64decode(encoded, validate=True)
    except ValueError:  # binascii.Error: the padding is wrong
        raise ValueError(f"{where}.url is not valid base64.") from None
    if len(decoded) > config["CHAT_MAX_IMAGE_BYTES"] or not decoded.startswith(IMAGE_MAGIC[kind]):
        raise ValueError(f"{where} is not a {kind} image of at most {config['CHAT_MAX_IMAGE_BYTES']} bytes.")


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
UI_TRIGGERS = {"submit-message", "regenerate-message"}
UI_MESSAGE_FIELDS = {"id", "role", "parts", "metadata"}
UI_ROLES = {"system", "user", "assistant"}
UI_PART_FIELDS = {  # the parts a chat without tools has (ai's src/ui/validate-ui-messages.ts)
    "text": {"type", "text", "state", "providerMetadata"},
    "reasoning": {"type", "id", "text", "state", "providerMetadata"},
    "file": {"type", "mediaType", "filename", "url", "providerReference", "providerMetadata"},
    "step-start": {"type"},
}


def native_body(body):
    """Turn the body useChat sends into the native one; a 400 names the field as the AI SDK spells it.

    Text parts become the message's text, image file parts its image parts; the model's reasoning
    is not sent back to it. Other fields (model, sampling) stay as they are, for the native checks.
    """
    if not isinstance(body, dict):
        raise ValueError("The body must be a JSON object.")
    for name in ("id", "messageId"):
        if name in body and not isinstance(body[name], str):
            raise ValueError(f"{name} must be a string.")
    if "trigger" in body and not (isinstance(body["trigger"], str) and body["trigger"] in UI_TRIGGERS):
        raise ValueError(f"trigger must be one of {', '.join(sorted(UI_TRIGGERS))}.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list.")
    native = {name: value for name, value in body.items() if name not in UI_REQUEST_FIELDS}
    native["messages"] = [native_message(message, f"messages[{i}]") for i, message in enumerate(messages)]
    return native


def native_message(message, where):
    """Turn one UI message ({id, role, parts}) into {role, content}."""
    if not isinstance(message, dict):
        raise ValueError(f"{where} must be an object.")
    unknown = sorted(set(message) - UI_MESSAGE_FIELDS)
    if unknown:
        raise ValueError(f"{where} has an unknown field: {unknown[0]}.")
    if not (isinstance(message.get("role"), str) and message["role"] in UI_ROLES):
        raise ValueError(f"{where}.role must be one of {', '.join(sorted(UI_ROLES))}.")
    if not isinstance(message.get("parts"), list):
        raise ValueError(f"{where}.parts must be a list.")
    content = []
    for j, part in enumerate(message["parts"]):
        at = f"{where}.parts[{j}]"
        if not isinstance(part, dict):
            raise ValueError(f"{at} must be an object.")
        if not (isinstance(part.get("type"), str) and part["type"] in UI_PART_FIELDS):
            raise ValueError(f"{at}.type must be one of {', '.join(sorted(UI_PART_FIELDS))}.")
        unknown = sorted(set(part) - UI_PART_FIELDS[part["type"]])
        if unknown:
            raise ValueError(f"{at} has an unknown field: {unknown[0]}.")
        if part["type"] in ("text", "reasoning") and not isinstance(part.get("text"), str):
            raise ValueError(f"{at}.text must be a string.")
        if part["type"] == "text":
            content.append({"type": "text", "text": part["text"]})
        elif part["type"] == "file":
            if not str(part.get("mediaType")).startswith("image/"):
                raise ValueError(f"{at}.mediaType must be an image type: only images can be sent.")
            if not isinstance(part.get("url"), str):
                raise ValueError(f"{at}.url must be a string.")
            content.append({"type": "image_url", "image_url": {"url": part["url"]}})
    if not content and message["role"] != "assistant":  # an assistant stopped while it thought may have none
        raise ValueError(f"{where}.parts has no text.")
    if all(item["type"] == "text" for item in content):  # text only: the plain string every upstream takes
        content = "".join(item["text"] for item in content)
    return {"role": message["role"], "content": content}
