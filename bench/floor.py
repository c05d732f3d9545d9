"""The floor: what relaying POST /api/chat costs in Python + gevent with nothing else, a benchmark subject.

    OPENAI_BASE_URL=http://127.0.0.1:9000/v1 PORT=8002 .venv/bin/python bench/floor.py

A bare gevent StreamServer, one greenlet per stream, no gunicorn, Flask or SDK. It does the
service's per-event work and nothing more: a plain HTTP/1.1 request to the upstream, chunked
decoding of its body, SSE lines split, `json.loads` of each chunk, `{"content": ...}` encoded as
JSON and framed as SSE, and a chunked HTTP/1.1 reply with one write per upstream read. It skips
what the service does per request (validation, the SDK, logs) and has no heartbeats or deadlines
but one: a write that cannot proceed for CHAT_SEND_TIMEOUT seconds (default 30) ends the stream.
One request per connection, one upstream connection per stream. Not a server to deploy.
"""

import json
import os
from urllib.parse import urlsplit

from gevent import socket
from gevent.server import StreamServer

BASE = urlsplit(os.environ["OPENAI_BASE_URL"])
REQUEST = b"POST %s/chat/completions HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n" % (
    BASE.path.rstrip("/").encode(),
    BASE.netloc.encode(),
    os.environ.get("OPENAI_API_KEY", "").encode(),
)
MODEL = os.environ.get("CHAT_MODEL", "gpt-4")
SEND_TIMEOUT = float(os.environ.get("CHAT_SEND_TIMEOUT", 30))
HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"X-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
)
to_json = json.JSONEncoder(ensure_ascii=False).encode  # the service's encoder, made once


def chunk(data):
    """Frame bytes as one HTTP/1.1 chunk."""
    return b"%X\r\n%s\r\n" % (len(data), data)


def read_message(sock):
    """Read an HTTP/1.1 request or response head; return (head, the bytes after it)."""
    data = b""
    while (end := data.find(b"\r\n\r\n")) < 0:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("closed before the end of the head")
        data += more
    return data[:end].lower(), data[end + 4 :]


def body_reads(sock, buf):
    """Yield a chunked body's decoded bytes, one piece per network read; stop after its last chunk."""
    left = skip = 0  # data bytes still to come in the current chunk; CRLF bytes after it to skip
    while True:
        out, pos = [], 0
        while pos < len(buf):
            if left:
                out.append(buf[pos : pos + left])
                taken = min(left, len(buf) - pos)
                pos, left = pos + taken, left - taken
                skip = 0 if left else 2
            elif skip:
                taken = min(skip, len(buf) - pos)
                pos, skip = pos + taken, skip - taken
            elif (end := buf.find(b"\r\n", pos)) >= 0:
                left, pos = int(buf[pos:end].split(b";")[0], 16), end + 2
                if not left:  # the last chunk
                    yield b"".join(out)
                    return
            else:
                break  # half a size line: wait for the rest
        yield b"".join(out)
        more = sock.recv(16384)  # as cheap per event as 64 KB reads; a stalled client pins less
        if not more:
            raise ConnectionError("the upstream closed in the middle of the body")
        buf = buf[pos:] + more


def relay(client, address):
    """Answer one POST /api/chat: the upstream's deltas as SSE events, as they arrive."""
    upstream = None
    try:
        head, body = read_message(client)
        length = int(next((line[15:] for line in head.split(b"\r\n") if line.startswith(b"content-length:")), 0))
        while len(body) < length:
            body += client.recv(65536)
        messages = json.loads(body)["messages"]
        request = to_json(
            {"model": MODEL, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        )
        upstream = socket.create_connection((BASE.hostname, BASE.port or 80))
        data = request.encode()
        upstream.sendall(
            REQUEST + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
        )
        head, rest = read_message(upstream)
        if not head.startswith(b"http/1.1 200") or b"transfer-encoding: chunked" not in head:
            raise ValueError(head.split(b"\r\n")[0])
        client.settimeout(SEND_TIMEOUT)  # sendall raises socket.timeout when the client stops reading
        client.sendall(HEAD + chunk(b": ok\n\n"))
        pending, finish_reason, usage = b"", None, None
        for data in body_reads(upstream, rest):
            lines = (pending + data).split(b"\n")
            pending = lines.pop()  # an unfinished last line waits for the rest
            out = []
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    end = {"content": "", "finish_reason": finish_reason, "usage": usage}
                    out += [b"data: " + to_json(end).encode() + b"\n\n", b"data: [DONE]\n\n"]
                    client.sendall(chunk(b"".join(out)) + b"0\r\n\r\n")
                    return
                event = json.loads(payload)
                usage = event.get("usage") or usage
                for choice in event.get("choices") or ():
                    finish_reason = choice.get("finish_reason") or finish_reason
                    if content := (choice.get("delta") or {}).get("content"):
                        out.append(b"data: " + to_json({"content": content}).encode() + b"\n\n")
            if out:
                client.sendall(chunk(b"".join(out)))  # one write for what one read brought
    except Exception:  # the client left or stalled, a bad request or reply: the stream ends here
        pass
    finally:
        if upstream is not None:
            upstream.close()
        client.close()


if __name__ == "__main__":
    address = (os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", 8002)))
    StreamServer(address, relay, backlog=2048).serve_forever()
