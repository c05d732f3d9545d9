"""The pieces that read a model's reply, fed canned bytes: the chunked decoder, the line splitter, the dialects.

No servers: each piece is pure, and the socket reader gets a real socket pair. Every test splits its bytes
at every position, or lets hypothesis choose the splits and the bytes.
"""

import json
import signal
import socket
import time
from contextlib import contextmanager
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import ResponseStreamEvent

from fake_upstream import Script, responses_events
from upstream import (
    MAX_LINE_BYTES,
    ChatChunks,
    ChunkedDecoder,
    LineSplitter,
    ModelStream,
    ResponsesEvents,
    SocketBody,
    UpstreamError,
)


def chunked(*pieces):
    """The chunked framing of `pieces` (one chunk each), with the last chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


def splits(data):
    """`data` cut in two at every position, and one byte at a time."""
    yield from ([data[:i], data[i:]] for i in range(len(data) + 1))
    yield [data[i : i + 1] for i in range(len(data))]


def decode(pieces):
    decoder = ChunkedDecoder()
    return b"".join(decoder.feed(piece) for piece in pieces), decoder


# --- The chunked decoder ---------------------------------------------------------------------------

BODY = chunked(b"data: one\n\n", b"x" * 300, b"\r\n", b"last")


@pytest.mark.parametrize("pieces", list(splits(BODY)), ids=lambda _: "")
def test_the_decoder_gives_the_body_however_the_reads_split_it(pieces):
    body, decoder = decode(pieces)
    assert body == b"data: one\n\n" + b"x" * 300 + b"\r\n" + b"last"
    assert decoder.ended


@pytest.mark.parametrize(
    "framing",
    [
        b"4;name=value\r\nabcd\r\n0\r\n\r\n",  # an extension
        b'4 \t;a;b="q"\r\nabcd\r\n0\r\n\r\n',  # whitespace before extensions, and several
        b"4\r\nabcd\r\n0\r\nTrailer: yes\r\nOther: 1\r\n\r\n",  # trailers
        b"0004\r\nabcd\r\n0\r\n\r\n",  # leading zeros
        b"4\r\nabcd\r\n000\r\n\r\n",
    ],
)
def test_the_decoder_takes_what_rfc_9112_allows(framing):
    for pieces in splits(framing):
        body, decoder = decode(pieces)
        assert (body, decoder.ended) == (b"abcd", True)


BAD_SIZE_LINES = [b"-6", b"-ff", b" -6", b"+6", b"0x6", b"6_0", b"6 ", b"", b"g", b"1" * 17, b"6\x00", b"6\n", b"\xff"]


@pytest.mark.parametrize("size_line", BAD_SIZE_LINES)
def test_a_bad_size_line_is_malformed_however_it_arrives(size_line):
    framing = chunked(b"before")[:-5] + size_line + b"\r\nhello\r\n" + b"0\r\n\r\n"
    for pieces in splits(framing):
        decoder = ChunkedDecoder()
        with pytest.raises(UpstreamError) as raised:
            for piece in pieces:
                decoder.feed(piece)
                if decoder.failure:
                    raise decoder.failure
        assert raised.value.error_code == "upstream_malformed"


@pytest.mark.parametrize(
    "framing",
    [
        b"3\r\nabcXY",  # no CRLF after the chunk's data
        b"3\r\nabc\n\n",
        b"1" * 2000,  # a size line that never ends
        b"3\r\nabc\r\n0\r\n" + b"Trailer: x" * 200,  # trailers that never end
    ],
    ids=["no-crlf", "lf", "endless-size", "endless-trailers"],
)
def test_broken_framing_is_malformed(framing):
    decoder = ChunkedDecoder()
    with pytest.raises(UpstreamError, match="malformed"):
        decoder.feed(framing)
        raise decoder.failure


def test_the_body_before_a_bad_size_line_still_comes_out():
    decoder = ChunkedDecoder()
    assert decoder.feed(b"5\r\nhello\r\n-6\r\nworld\r\n") == b"hello"
    assert decoder.failure.error_code == "upstream_malformed"


def test_a_huge_chunk_size_is_only_a_long_wait():
    decoder = ChunkedDecoder()
    assert decoder.feed(b"ffffffffffffffff\r\nabc") == b"abc"
    assert not decoder.ended and decoder.failure is None


# --- The line splitter -----------------------------------------------------------------------------

LINES = b"event: a\ndata: {}\r\n\n: ping\ndata: \xc3\xb6\n\nunfinished"


@pytest.mark.parametrize("pieces", list(splits(LINES)), ids=lambda _: "")
def test_the_splitter_gives_whole_lines_however_the_reads_split_them(pieces):
    splitter = LineSplitter()
    lines = [line for piece in pieces for line in splitter.split(piece)]
    assert lines == [b"event: a", b"data: {}\r", b"", b": ping", b"data: \xc3\xb6", b""]


@pytest.mark.parametrize("piece", [4, 1024, 65536, MAX_LINE_BYTES])
def test_a_line_is_cut_off_past_the_cap_whatever_the_read_size(piece):
    splitter = LineSplitter()
    for _ in range(0, MAX_LINE_BYTES, piece):
        splitter.split(b"x" * piece)  # exactly the cap: still a line
    assert splitter.split(b"\n") == [b"x" * MAX_LINE_BYTES]
    splitter.split(b"x" * MAX_LINE_BYTES)
    with pytest.raises(UpstreamError, match="too long"):
        splitter.split(b"x")


def test_a_long_tail_after_a_newline_counts_too():
    with pytest.raises(UpstreamError, match="too long"):
        LineSplitter().split(b"a\n" + b"x" * (MAX_LINE_BYTES + 1))


# --- The chat.completions dialect ------------------------------------------------------------------


def chunk(delta=None, finish_reason=None, **fields):
    choice = {"index": 0, "delta": delta or {}, "finish_reason": finish_reason}
    return b"data: " + json.dumps({"object": "chat.completion.chunk", "choices": [choice], **fields}).encode()


def parse(dialect, lines):
    deltas = []
    dialect.parse(lines, deltas)
    return deltas


def test_chat_chunks_give_content_reasoning_finish_and_usage():
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    dialect = ChatChunks()
    lines = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "hm"}),
        chunk({"reasoning": "so"}),
        b"",
        b": comment",
        chunk({"content": "Hi"}),
        chunk({}, "stop"),
        b'data: {"choices": [], "usage": ' + json.dumps(usage).encode() + b"}\r",
        b"data: [DONE]",
    ]
    assert parse(dialect, lines) == [("reasoning", "hm"), ("reasoning", "so"), ("content", "Hi")]
    assert (dialect.done, dialect.finish_reason, dialect.usage) == (True, "stop", usage)


@pytest.mark.parametrize(
    "line, code",
    [
        (b"data: {not json", "upstream_malformed"),
        (b"data: " + b"[" * 100_000 + b"]" * 100_000, "upstream_malformed"),  # RecursionError, not our bug
        (b'data: {"error": {"message": "overloaded"}}', "upstream_error"),
        (b'data: {"error": "plain"}', "upstream_error"),
    ],
    ids=["not-json", "nested", "error", "error-text"],
)
def test_a_bad_or_failing_chunk_ends_the_reply(line, code):
    with pytest.raises(UpstreamError) as raised:
        parse(ChatChunks(), [line])
    assert raised.value.error_code == code


# --- The whole reader over a real socket: whatever the bytes, it ends, and fast ---------------------


class Looping(Exception):
    pass


@contextmanager
def at_most(seconds):
    """Raise Looping in the block if it runs longer than `seconds`: a loop in pure Python would never return."""

    def interrupt(*_):
        raise Looping(f"a read took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read_through(pieces, dialect=ChatChunks):
    """Send `pieces` over a socket pair, a read after each, then hang up; return (deltas, ending, slowest read)."""
    ours, theirs = socket.socketpair()
    stream = ModelStream(SocketBody(ours), dialect())
    deltas, slowest = [], 0.0
    try:
        for piece in [*filter(None, pieces), None, None, None]:  # None: the upstream has hung up
            if piece is None:
                theirs.close()
            else:
                theirs.sendall(piece)
            started = time.monotonic()
            try:
                with at_most(1.0):
                    deltas += stream.read(0.05)
            except UpstreamError as exc:
                return deltas, exc.error_code, slowest
            finally:
                slowest = max(slowest, time.monotonic() - started)
            if stream.finished:
                return deltas, "finished", slowest
        return deltas, "still reading", slowest
    finally:
        ours.close()
        theirs.close()


REPLY_CHUNKS = [
    b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n',
    b'data: {"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n',
]
REPLY = chunked(*REPLY_CHUNKS)
FIRST_CHUNK = chunked(REPLY_CHUNKS[0])[:-5]  # the next bytes are a size line


@given(st.lists(st.integers(0, len(REPLY)), max_size=6))
def test_a_reply_split_anywhere_reads_whole(cuts):
    cuts = sorted(cuts)
    pieces = [REPLY[a:b] for a, b in zip([0, *cuts], [*cuts, len(REPLY)], strict=True)]
    deltas, ending, _ = read_through(pieces)
    assert ending == "finished"
    assert "".join(text for _, text in deltas) == "Hello"


FRAGMENTS = [b"\r\n", b"\n", b"-", b"0", b"6", b"ff", b";", b" ", b"data: ", b"[DONE]", b'{"choices":', b"[", b"\xff"]
SIZE_LINES = st.from_regex(rb"\A[-+ 0-9a-fA-FxX_;=\t]{0,5}\r\n\Z")  # most of them wrong
HOSTILE = st.lists(SIZE_LINES | st.sampled_from(FRAGMENTS) | st.binary(max_size=12), max_size=40).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"", FIRST_CHUNK, REPLY[:9]]), st.lists(HOSTILE, min_size=1, max_size=5))
def test_whatever_follows_the_head_the_reader_ends_and_never_hangs(start, pieces):
    """No loop and no slow read, whatever the bytes; and an ending: the reply, or an error of the upstream's."""
    _, ending, slowest = read_through([start, *pieces])
    assert ending in {"finished", "upstream_malformed", "upstream_cut", "upstream_incomplete", "upstream_error"}
    assert slowest < 0.5  # a read waits 0.05 s at most for bytes; the rest is parsing a few hundred bytes


# --- The Responses dialect, fed the fake upstream's events (checked against the SDK's own types) -----

# The SDK's event classes by their `type`: validating against the one class says exactly what is wrong.
EVENT_TYPES = {
    get_args(kind.model_fields["type"].annotation)[0]: kind for kind in get_args(get_args(ResponseStreamEvent)[0])
}
REQUEST = {"model": "gpt-test", "input": [{"role": "user", "content": "Hi there"}]}
SCRIPTS = {
    "summaries": Script(summary_parts=[["Think", "ing."], ["Then ", "more."]], tokens=["Hel", "lo"]),
    "reasoning-text": Script(reasoning_text=["step ", "one"], tokens=["ok"]),
    "incomplete": Script(ending="incomplete", incomplete_reason="content_filter"),
    "failed": Script(ending="failed"),
    "error": Script(ending="error"),
    "tool-call": Script(tool_call=True),
    "refusal": Script(refusal=["No."]),
}


def responses_wire(script):
    """The bytes of the fake upstream's Responses stream for `script`, chunked, as they reach the reader."""
    events = [
        b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode())
        for e in responses_events(script, REQUEST)
    ]
    return chunked(*events)


@pytest.mark.parametrize("script", SCRIPTS.values(), ids=SCRIPTS.keys())
def test_the_fake_upstream_speaks_the_sdk_types(script):
    """Published examples leave out fields the types require (created_at, tools, logprobs): ours may not."""
    events = list(responses_events(script, REQUEST))
    for event in events:
        EVENT_TYPES[event["type"]].model_validate(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_a_responses_stream_split_at_every_byte_reads_whole():
    wire = responses_wire(SCRIPTS["summaries"])
    for cut in range(len(wire) + 1):
        deltas, ending, _ = read_through([wire[:cut], wire[cut:]], ResponsesEvents)
        assert ending == "finished", cut
        assert deltas == [
            ("reasoning", "Think"),
            ("reasoning", "ing."),
            ("reasoning", "\n\nThen "),  # a new summary part: a paragraph of its own
            ("reasoning", "more."),
            ("content", "Hel"),
            ("content", "lo"),
        ]


def test_responses_usage_and_finish_in_chat_words():
    dialect = ResponsesEvents()
    stream = ModelStream(ListBody(responses_wire(SCRIPTS["reasoning-text"])), dialect)
    assert stream.read(0) == [("reasoning", "step "), ("reasoning", "one"), ("content", "ok")]
    assert stream.finished and dialect.finish_reason == "stop"
    assert dialect.usage == {
        "prompt_tokens": 9,
        "completion_tokens": 5,
        "total_tokens": 14,
        "completion_tokens_details": {"reasoning_tokens": 3},
    }


class ListBody:
    """A body that gives all its bytes at the first read, de-chunked: for the dialect alone."""

    name = "list"

    def __init__(self, wire):
        self.data, self.ended = ChunkedDecoder().feed(wire), False

    def read(self, timeout):
        data, self.data, self.ended = self.data, b"", True
        return data


@pytest.mark.parametrize(
    "reason, finish_reason",
    [("max_output_tokens", "length"), ("content_filter", "content_filter"), ("steered", "other"), (None, "other")],
)
def test_an_incomplete_response_ends_with_its_reason(reason, finish_reason):
    stream = ModelStream(
        ListBody(responses_wire(Script(ending="incomplete", incomplete_reason=reason))), ResponsesEvents()
    )
    assert "".join(text for _, text in stream.read(0)) == "tok0 tok1 tok2 tok3 tok4 "
    assert stream.finished and stream.finish_reason == finish_reason


@pytest.mark.parametrize(
    "script, code", [("failed", "upstream_error"), ("error", "upstream_error"), ("tool-call", "unsupported_output")]
)
def test_a_failed_response_is_an_error_of_ours(script, code):
    stream = ModelStream(ListBody(responses_wire(SCRIPTS[script])), ResponsesEvents())
    with pytest.raises(UpstreamError) as raised:
        while not stream.finished:
            stream.read(0)
    assert raised.value.error_code == code
    assert str(raised.value) in (
        "The model stopped with an error.",
        "The model answered with something this service cannot show.",
    )


@pytest.mark.parametrize("tail", [b"data: [DONE]\n\n", b""], ids=["gateway-done", "openai"])
def test_done_or_not_the_reply_ends(tail):
    wire = responses_wire(SCRIPTS["summaries"])[:-5] + chunked(tail)
    deltas, ending, _ = read_through([wire], ResponsesEvents)
    assert ending == "finished"


ODD_RESPONSES_EVENTS = [
    [1],
    {"type": ["response.output_text.delta"], "delta": "x"},
    {"type": "response.output_text.delta", "delta": 5},
    {"type": "response.reasoning_summary_text.delta", "delta": None, "summary_index": []},
    {"type": "response.output_item.added", "item": {"type": "message"}},
    {"type": "response.output_item.added", "item": {"type": "reasoning"}},
    {"type": "response.completed", "response": "done", "usage": 1},
]


def test_responses_events_of_odd_shapes_are_skipped():
    lines = [b"data: " + json.dumps(event).encode() for event in ODD_RESPONSES_EVENTS]
    dialect = ResponsesEvents()
    assert parse(dialect, [b"event: x", *lines]) == []
    assert dialect.done and dialect.finish_reason == "stop" and dialect.usage is None
