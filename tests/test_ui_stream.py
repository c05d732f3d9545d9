"""POST /api/ui-chat: the AI SDK's request body in, its UI message stream out, through a live gunicorn.

The bytes are checked here; tests/test_clients.py has the SDK itself read them.
"""

import json

import pytest

from chat_client import post_chat

UI = "/api/ui-chat"
USAGE = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}


def ui_message(role, *parts, message_id="m1", **fields):
    return {"id": message_id, "role": role, "parts": list(parts), **fields}


def text(value, **fields):
    return {"type": "text", "text": value, **fields}


HI = {"id": "chat1", "messages": [ui_message("user", text("Hi"))], "trigger": "submit-message"}
PIXEL = (  # a 1x1 PNG
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="
)


def test_exact_bytes_on_the_wire(gunicorn, upstream):
    upstream.reset(tokens=["Hel", "lo\n", " 세계 🌏\u2028"], reasoning=["Hmm", ", ok"])
    reply = post_chat(gunicorn.url, HI, path=UI)

    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/event-stream"
    assert reply.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert reply.headers["Cache-Control"] == "no-cache, no-transform"
    assert reply.headers["X-Accel-Buffering"] == "no"
    ids = (b"id: ", b"retry: ")  # every event has an id, for resuming (tests/test_resume.py); set aside here
    assert b"".join(line for line in reply.raw.splitlines(keepends=True) if not line.startswith(ids)) == (
        b'data: {"type": "start"}\n\n'
        b'data: {"type": "reasoning-start", "id": "0"}\n\n'
        b'data: {"type": "reasoning-delta", "id": "0", "delta": "Hmm"}\n\n'
        b'data: {"type": "reasoning-delta", "id": "0", "delta": ", ok"}\n\n'
        b'data: {"type": "reasoning-end", "id": "0"}\n\n'
        b'data: {"type": "text-start", "id": "1"}\n\n'
        b'data: {"type": "text-delta", "id": "1", "delta": "Hel"}\n\n'
        b'data: {"type": "text-delta", "id": "1", "delta": "lo\\n"}\n\n'
        b'data: {"type": "text-delta", "id": "1", "delta": " \xec\x84\xb8\xea\xb3\x84 \xf0\x9f\x8c\x8f\\u2028"}\n\n'
        b'data: {"type": "text-end", "id": "1"}\n\n'
        b'data: {"type": "finish", "finishReason": "stop", "messageMetadata": {"usage": '
        b'{"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}}}\n\n'
        b"data: [DONE]\n\n"
    )


def test_error_after_the_start_is_an_error_chunk(gunicorn, upstream):
    """The SDK shows errorText as the chat's error; the text so far stays, its part left unfinished."""
    upstream.reset(tokens=["a", "b", "c"], cut_after=2)
    reply = post_chat(gunicorn.url, HI, path=UI)

    assert reply.data == [
        {"type": "start"},
        {"type": "text-start", "id": "0"},
        {"type": "text-delta", "id": "0", "delta": "a"},
        {"type": "text-delta", "id": "0", "delta": "b"},
        {"type": "error", "errorText": "The connection to the model was lost."},
        "[DONE]",
    ]


@pytest.mark.parametrize(
    ("upstream_reason", "sdk_reason"),
    [("length", "length"), ("content_filter", "content-filter"), ("tool_calls", "tool-calls"), ("eos", "other")],
)
def test_finish_reasons_are_the_sdks(gunicorn, upstream, upstream_reason, sdk_reason):
    upstream.reset(tokens=["a"], finish_reason=upstream_reason)
    finish = post_chat(gunicorn.url, HI, path=UI).data[-2]
    assert finish == {"type": "finish", "finishReason": sdk_reason, "messageMetadata": {"usage": USAGE}}


def test_first_event_arrives_long_before_the_upstream_finishes(gunicorn, upstream):
    upstream.reset(tokens=["a", "b", "c", "d"], delay=0.4)
    reply = post_chat(gunicorn.url, HI, path=UI)

    first = reply.first_time(b'"type": "text-delta"')
    assert first is not None and first < 1.0  # the whole reply takes 1.6 s
    assert reply.data[-1] == "[DONE]"


def test_the_conversation_reaches_the_upstream_as_openai_messages(gunicorn, upstream):
    """Text parts become the content; the model's own reasoning and the message metadata stay here."""
    body = {
        **HI,
        "model": "other",
        "messages": [
            ui_message("system", text("Be brief."), message_id="s"),
            ui_message("user", text("Hi"), message_id="u1"),
            ui_message(
                "assistant",
                {"type": "reasoning", "id": "0", "text": "They greet me.", "state": "done"},
                text("Hello", state="done"),
                text("!", state="done"),
                message_id="a1",
                metadata={"usage": USAGE},
            ),
            ui_message("user", text("How are you?"), message_id="u2"),
        ],
    }
    assert post_chat(gunicorn.url, body, path=UI).status == 200

    [received] = upstream.received
    assert received.body["model"] == "other"
    assert received.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]


def test_an_image_file_part_becomes_an_image_part(gunicorn, upstream):
    file = {"type": "file", "mediaType": "image/png", "filename": "dot.png", "url": PIXEL}
    body = {**HI, "messages": [ui_message("user", text("What is this?"), file)]}
    assert post_chat(gunicorn.url, body, path=UI).status == 200

    [received] = upstream.received
    assert received.body["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": PIXEL}}],
        }
    ]


USER_HI = ui_message("user", text("Hi"))

BAD_BODIES = [
    # (id, body, words the message must contain)
    ("not an object", [], "must be a JSON object"),
    ("no messages", {"id": "c"}, "messages must be a non-empty list"),
    ("empty messages", {"messages": []}, "messages must be a non-empty list"),
    ("unknown field", {"messages": [USER_HI], "temperatur": 1}, "unknown field: temperatur"),
    ("unknown model", {"messages": [USER_HI], "model": "gpt-9"}, "Unknown model: gpt-9"),
    ("id not a string", {"messages": [USER_HI], "id": 7}, "id must be a string"),
    ("unknown trigger", {"messages": [USER_HI], "trigger": "resume"}, "trigger must be one of"),
    ("trigger not a string", {"messages": [USER_HI], "trigger": ["submit-message"]}, "trigger must be one of"),
    ("message not an object", {"messages": ["Hi"]}, "messages[0] must be an object"),
    ("native message", {"messages": [{"role": "user", "content": "Hi"}]}, "messages[0] has an unknown field: content"),
    ("unknown role", {"messages": [ui_message("tool", text("x"))]}, "messages[0].role must be one of"),
    ("role not a string", {"messages": [ui_message(["user"], text("x"))]}, "messages[0].role must be one of"),
    ("no parts", {"messages": [ui_message("user")]}, "messages[0].parts has no text"),
    ("only reasoning", {"messages": [ui_message("user", {"type": "reasoning", "text": "x"})]}, "has no text"),
    ("parts not a list", {"messages": [ui_message("user") | {"parts": "Hi"}]}, "messages[0].parts must be a list"),
    ("part not an object", {"messages": [ui_message("user", "Hi")]}, "messages[0].parts[0] must be an object"),
    (
        "tool part",
        {"messages": [USER_HI, ui_message("assistant", {"type": "tool-weather", "toolCallId": "t"})]},
        "messages[1].parts[0].type must be one of",
    ),
    ("type not a string", {"messages": [ui_message("user", {"type": {}})]}, "messages[0].parts[0].type must be"),
    ("text not a string", {"messages": [ui_message("user", text(None))]}, "messages[0].parts[0].text must be a string"),
    ("unknown part field", {"messages": [ui_message("user", text("a", colour="red"))]}, "unknown field: colour"),
    (
        "a pdf",
        {"messages": [ui_message("user", {"type": "file", "mediaType": "application/pdf", "url": "data:,x"})]},
        "messages[0].parts[0].mediaType must be an image type",
    ),
    (
        "url not a string",
        {"messages": [ui_message("user", {"type": "file", "mediaType": "image/png", "url": 1})]},
        "messages[0].parts[0].url must be a string",
    ),
]


@pytest.mark.parametrize(("body", "words"), [case[1:] for case in BAD_BODIES], ids=[case[0] for case in BAD_BODIES])
def test_a_bad_body_is_a_400_sentence_and_no_upstream_call(gunicorn, upstream, body, words):
    """The SDK shows a refused request's body as the error's message: a sentence, not JSON."""
    reply = post_chat(gunicorn.url, body, path=UI)

    assert reply.status == 400
    assert reply.headers["Content-Type"].startswith("text/plain")
    assert words in reply.raw.decode()
    assert not reply.raw.startswith(b"{")
    assert upstream.received == []


def test_malformed_json_is_a_400_sentence(gunicorn, upstream):
    reply = post_chat(gunicorn.url, b'{"messages": [', path=UI)
    assert reply.status == 400
    assert reply.raw.decode().startswith("The body is not valid JSON")
    assert upstream.received == []


def test_an_upstream_refusal_keeps_its_status_and_retry_after(gunicorn, upstream):
    upstream.reset(status=429, headers={"Retry-After": "60"})
    reply = post_chat(gunicorn.url, HI, path=UI)

    assert reply.status == 429
    assert reply.headers["Retry-After"] == "60"
    assert reply.raw.decode() == "The model is busy. Please try again shortly."


def test_wrong_method_is_a_405_sentence(gunicorn):
    reply = post_chat(gunicorn.url, None, path=UI, method="GET")
    assert reply.status == 405
    assert reply.headers["Allow"] == "POST"
    assert reply.raw.decode() == "Use POST."


@pytest.fixture
def token_gunicorn(start_gunicorn):
    return start_gunicorn({"CHAT_API_TOKEN": "let-me-in"}, name="token")


def test_a_missing_token_is_a_401_sentence(token_gunicorn, upstream):
    reply = post_chat(token_gunicorn.url, HI, path=UI)
    assert reply.status == 401
    assert reply.raw.decode() == "Send Authorization: Bearer <token>."
    assert upstream.received == []

    reply = post_chat(token_gunicorn.url, HI, path=UI, headers={"Authorization": "Bearer let-me-in"})
    assert reply.status == 200
    first = next(line for line in reply.raw.split(b"\n") if line.startswith(b"data: "))  # after retry: and id:
    assert json.loads(first[6:]) == {"type": "start"}
