"""Generated bodies, valid and invalid, against the app and the recording fake upstream.

Every invalid body is a mutation of a valid one that breaks exactly one rule: a wrong type, a number
out of range, an unknown field, a lone surrogate, deep nesting, a huge value. The properties: no 5xx,
no traceback in the log, no upstream call for an invalid body, and a valid body reaches the upstream
with exactly the messages and parameters it named.
"""

import base64
import http.client
import json
import logging
import math
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import create_app
from fake_upstream import API_KEY
from protocols import PARAMETERS

MODELS = ["gpt-test", "other"]
LIMITS = {  # small, so that every limit is within reach of the generated bodies
    "CHAT_MAX_MESSAGES": 6,
    "CHAT_MAX_IMAGES": 2,
    "CHAT_MAX_IMAGE_BYTES": 64,
    "CHAT_MAX_OUTPUT_TOKENS": 100,
    "CHAT_MAX_BODY_BYTES": 65536,
}
SETTINGS = {**LIMITS, "CHAT_MODELS": ",".join(MODELS), "CHAT_MODEL": MODELS[0], "CHAT_HEARTBEAT_SECONDS": 5}
ROLES = ["system", "developer", "user", "assistant"]
EFFORTS = ["none", "minimal", "low", "medium", "high"]
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "gif": b"GIF89a", "webp": b"RIFF\0\0\0\0WEBP"}

# --- Valid bodies ------------------------------------------------------------------------------

text = st.text(st.characters(codec="utf-8"), max_size=20)  # any Unicode but surrogates
images = st.builds(
    lambda kind, data, detail: {
        "type": "image_url",
        "image_url": {"url": f"data:image/{kind};base64,{base64.b64encode(MAGIC[kind] + data).decode()}", **detail},
    },
    st.sampled_from(sorted(MAGIC)),
    st.binary(max_size=40),
    st.fixed_dictionaries({}, optional={"detail": st.sampled_from(["auto", "low", "high"])}),
)
text_parts = st.builds(lambda t: {"type": "text", "text": t}, text)


@st.composite
def messages(draw):
    role = draw(st.sampled_from(ROLES))
    parts = text_parts | images if role == "user" else text_parts
    message = {"role": role, "content": draw(text | st.lists(parts, min_size=1, max_size=3))}
    if draw(st.booleans()):
        message["name"] = draw(text)
    return message


def image_count(body):
    return sum(
        isinstance(m["content"], list) and sum(part["type"] == "image_url" for part in m["content"])
        for m in body["messages"]
    )


VALID_PARAMETERS = {
    "temperature": st.floats(0, 2) | st.integers(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True) | st.just(1),
    "max_tokens": st.integers(1, 10**30),
    "stop": text | st.lists(text, max_size=4),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2) | st.integers(-2, 2),
    "reasoning_effort": st.sampled_from(EFFORTS),
}
assert VALID_PARAMETERS.keys() == PARAMETERS.keys()  # every parameter the app takes is generated

valid_bodies = st.fixed_dictionaries(
    {"messages": st.lists(messages(), min_size=1, max_size=LIMITS["CHAT_MAX_MESSAGES"])},
    optional={"model": st.sampled_from(MODELS), **VALID_PARAMETERS},
).filter(lambda body: image_count(body) <= LIMITS["CHAT_MAX_IMAGES"])

# --- Invalid bodies: one rule broken ------------------------------------------------------------

LONE = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
wrong_types = (
    st.booleans() | st.none() | st.lists(st.integers(), max_size=2) | st.dictionaries(text, st.integers(), max_size=2)
)
big = st.integers(2**64, 10**400) | st.just(math.inf) | st.just(-math.inf) | st.just(math.nan)


@st.composite
def with_surrogate(draw):
    """A text with one lone surrogate somewhere in it."""
    before, after = draw(text), draw(text)
    return before + draw(LONE) + after


def outside(low, high):
    return st.floats(max_value=low, exclude_max=True) | st.floats(min_value=high, exclude_min=True) | big


BAD_PARAMETERS = {
    "temperature": outside(0, 2) | st.integers(max_value=-1) | st.integers(min_value=3) | wrong_types | text,
    "top_p": st.floats(max_value=0) | outside(0, 1) | st.just(0) | wrong_types | text,
    "max_tokens": st.integers(max_value=0) | st.floats() | wrong_types | text,
    "stop": st.lists(text, min_size=5, max_size=8)
    | st.lists(st.integers() | st.none(), min_size=1, max_size=3)
    | with_surrogate()
    | st.lists(with_surrogate(), min_size=1, max_size=2)
    | st.booleans()
    | st.none()
    | st.integers()
    | st.dictionaries(text, text, max_size=2),
    "seed": st.floats() | st.integers(min_value=2**63) | st.integers(max_value=-(2**63) - 1) | wrong_types | text,
    "presence_penalty": outside(-2, 2) | wrong_types | text,
    "frequency_penalty": outside(-2, 2) | wrong_types | text,
    "reasoning_effort": text.filter(lambda t: t not in EFFORTS) | wrong_types | st.floats(),
}
assert BAD_PARAMETERS.keys() == PARAMETERS.keys()

bad_images = st.sampled_from(
    [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/svg+xml;base64,PHN2Zz4="}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0"}},  # bad padding
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,R0lGODlhAQABAAAAACw="}},  # a GIF
        {"type": "image_url", "image_url": {"url": "data:image/png,raw"}},
        {"type": "image_url", "image_url": "data:image/png;base64,iVBORw0KGgo="},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "max"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "x": 1}},
        {"type": "image_url", "image_url": {}},
        {"type": "image", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(MAGIC["png"] + bytes(60)).decode()},
        },
    ]
)
bad_parts = (
    bad_images
    | text
    | wrong_types
    | st.builds(lambda t: {"type": "text", "text": t}, with_surrogate() | st.integers() | st.none())
    | st.builds(lambda t: {"type": "text", "text": t, "extra": 1}, text)
    | st.builds(lambda t: {"text": t}, text)
    | st.builds(lambda kind: {"type": kind, "text": "x"}, text.filter(lambda t: t not in ("text", "image_url")))
)
bad_content = (
    with_surrogate()
    | st.integers()
    | st.floats()
    | st.booleans()
    | st.none()
    | st.just([])
    | st.dictionaries(text, text, max_size=2)
    | st.builds(
        lambda before, part, after: [*before, part, *after],
        st.lists(text_parts, max_size=2),
        bad_parts,
        st.lists(text_parts, max_size=1),
    )
)


@st.composite
def invalid_bodies(draw):
    """Return (what was broken, the body as bytes, Content-Type): a valid body with one rule broken."""
    body = draw(valid_bodies)
    message = draw(st.sampled_from(body["messages"]))
    how = draw(
        st.sampled_from(
            [
                "parameter",
                "unknown field",
                "unknown message field",
                "role",
                "role missing",
                "content",
                "image in another role",
                "too many images",
                "name",
                "messages",
                "too many messages",
                "message not an object",
                "model",
                "deep nesting",
                "huge body",
                "huge number",
                "truncated",
                "not utf-8",
                "not an object",
                "content type",
            ]
        )
    )
    content_type = "application/json"
    if how == "parameter":
        name = draw(st.sampled_from(sorted(BAD_PARAMETERS)))
        body[name] = draw(BAD_PARAMETERS[name])
    elif how == "unknown field":
        body[draw(text.filter(lambda t: t not in {"messages", "model", *PARAMETERS}))] = draw(text)
    elif how == "unknown message field":
        message[draw(text.filter(lambda t: t not in {"role", "content", "name"}))] = draw(text | wrong_types)
    elif how == "role":
        message["role"] = draw(text.filter(lambda t: t not in ROLES) | wrong_types | st.integers())
    elif how == "role missing":
        del message["role"]
    elif how == "content":
        message["content"] = draw(bad_content)
    elif how == "image in another role":
        message["role"] = draw(st.sampled_from(["system", "developer", "assistant"]))
        message["content"] = [draw(images)]
    elif how == "too many images":
        message["role"], message["content"] = "user", draw(st.lists(images, min_size=3, max_size=4))
    elif how == "name":
        message["name"] = draw(with_surrogate() | wrong_types | st.integers())
    elif how == "messages":
        body["messages"] = draw(st.just([]) | wrong_types.filter(lambda v: v != []) | text)
    elif how == "too many messages":
        body["messages"] = body["messages"] * (LIMITS["CHAT_MAX_MESSAGES"] // len(body["messages"]) + 1)
    elif how == "message not an object":
        body["messages"][draw(st.integers(0, len(body["messages"]) - 1))] = draw(text | st.integers() | st.none())
    elif how == "model":
        body["model"] = draw(text.filter(lambda t: t not in MODELS) | wrong_types | st.integers())
    elif how == "deep nesting":
        depth = draw(st.integers(1, 200_000))
        return how, b'{"messages": [{"role": "user", "content": ' + b"[" * depth + b"]" * depth + b"}]}", content_type
    elif how == "huge body":
        body["messages"][0]["content"] = "x" * (LIMITS["CHAT_MAX_BODY_BYTES"] + draw(st.integers(0, 1000)))
    elif how == "huge number":  # out of range, or past the 4300 digits Python's JSON reader takes
        name = draw(st.sampled_from(sorted(PARAMETERS)))
        digits = 5000 if name == "max_tokens" else draw(st.sampled_from([30, 400, 5000]))
        return how, json.dumps(body)[:-1].encode() + b', "%s": 9%s}' % (name.encode(), b"9" * digits), content_type
    encoded = json.dumps(body, ensure_ascii=draw(st.booleans()) or how in ("content", "name", "parameter"))
    data = encoded.encode("utf-8", "surrogatepass")
    if how == "truncated":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "not utf-8":
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\x80"])) + data[cut:]
    elif how == "not an object":
        data = json.dumps(draw(st.lists(st.integers(), max_size=2) | text | st.integers() | st.none())).encode()
    elif how == "content type":
        content_type = draw(st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]))
    return how, data, content_type


cases = st.one_of(
    valid_bodies.map(lambda body: ("valid", body)),
    invalid_bodies().map(lambda case: ("invalid", case)),
)


def sent_max_tokens(sent):
    return sent.get("max_tokens", sent.get("max_completion_tokens"))


def check_reached_upstream_as_named(body, sent):
    """The upstream got the body's messages, model and parameters, and the server's token cap."""
    assert sent["messages"] == body["messages"]
    assert sent["model"] == body.get("model", MODELS[0])
    for name in PARAMETERS:
        if name != "max_tokens":
            assert sent.get(name) == body.get(name), name
    assert sent_max_tokens(sent) == min(body.get("max_tokens", math.inf), LIMITS["CHAT_MAX_OUTPUT_TOKENS"])


def fuzz(send, upstream, examples):
    """Run `examples` generated cases through `send(data, content_type) -> (status, body bytes)`."""
    counts = Counter()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(cases)
    def run(case):
        kind, payload = case
        before = len(upstream.received)
        if kind == "valid":
            status, reply = send(json.dumps(payload, ensure_ascii=False).encode(), "application/json")
            assert status == 200, reply[:300]
            assert reply.endswith(b"data: [DONE]\n\n"), reply[-300:]
            assert len(upstream.received) == before + 1
            check_reached_upstream_as_named(payload, upstream.received[-1].body)
        else:
            how, data, content_type = payload
            status, reply = send(data, content_type)
            assert 400 <= status < 500, (how, status, reply[:300])
            assert json.loads(reply)["error"]["code"], how
            assert len(upstream.received) == before, how
            counts[how] += 1
        counts[kind] += 1
        counts[status] += 1

    run()
    return counts


def test_generated_bodies_against_the_app(upstream, caplog):
    """Thousands of bodies through Flask's test client, the real SDK and the fake upstream."""
    app = create_app({"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": API_KEY, **SETTINGS})
    client = app.test_client()

    def send(data, content_type):
        with client.post("/api/chat", data=data, headers={"Content-Type": content_type}) as response:
            return response.status_code, response.get_data()  # closing it gives its stream slot back

    with caplog.at_level(logging.INFO):
        counts = fuzz(send, upstream, examples=2000)

    print("fuzz, test client:", dict(counts))
    assert counts["valid"] >= 300 and counts["invalid"] >= 500
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_generated_bodies_against_gunicorn(upstream, start_gunicorn):
    """A smaller sample over real sockets to a gevent worker: no 5xx, no traceback in its log."""
    server = start_gunicorn({k: str(v) for k, v in SETTINGS.items()}, name="fuzz")
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)

    def send(data, content_type):
        connection.request("POST", "/api/chat", body=data, headers={"Content-Type": content_type})
        response = connection.getresponse()
        reply = response.read()
        if response.will_close:
            connection.close()  # it reconnects on the next request
        return response.status, reply

    try:
        counts = fuzz(send, upstream, examples=200)
    finally:
        connection.close()
    log = server.log()

    print("fuzz, gunicorn:", dict(counts))
    assert counts["valid"] >= 20 and counts["invalid"] >= 50
    assert "Traceback" not in log and "[ERROR]" not in log and "relay_error" not in log, log[-3000:]
