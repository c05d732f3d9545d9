"""A streaming HTTP client for /api/chat that records when each read arrived."""

import http.client
import json
import socket
import time
from dataclasses import dataclass


@dataclass
class Reply:
    status: int
    headers: dict
    raw: bytes  # the body exactly as it arrived (de-chunked)
    arrivals: list  # (monotonic time, bytes) per read
    started: float

    @property
    def data(self):
        """The `data:` payloads, parsed where they are JSON (every event of ours is one `data:` line)."""
        out = []
        for line in self.raw.decode().split("\n"):
            if line.startswith("data: "):
                payload = line[6:]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
        return out

    @property
    def text(self):
        """Rebuild the reply as a classic fetch + ReadableStream client does: append every content."""
        return "".join(d.get("content", "") for d in self.data if isinstance(d, dict))

    def first_time(self, marker=b'data: {"content": "'):
        """Seconds from the request to the first read that held `marker`."""
        seen = b""
        for when, chunk in self.arrivals:
            seen += chunk
            if marker in seen:
                return when - self.started
        return None


def open_chat(base_url, body, headers=None, timeout=30, path="/api/chat", method="POST"):
    """POST /api/chat (or `path`) and return (connection, response) once the status line and headers are in."""
    address, _, prefix = base_url.split("//")[1].partition("/")
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    payload = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    connection.request(
        method,
        f"/{prefix}{path}".replace("//", "/"),
        body=payload,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    return connection, connection.getresponse()


def hang_up(connection, response):
    """Close our end of the connection for real (the response holds the socket open too)."""
    response.close()
    connection.close()


def post_chat(base_url, body, headers=None, timeout=30, until=None, path="/api/chat", method="POST"):
    """POST /api/chat (or `path`) and read the reply as it arrives; with `until`, hang up once those bytes arrived."""
    started = time.monotonic()
    connection, response = open_chat(base_url, body, headers, timeout, path, method)
    arrivals, raw = [], b""
    while chunk := response.read1(65536):
        arrivals.append((time.monotonic(), chunk))
        raw += chunk
        if until is not None and until in raw:
            break
    hang_up(connection, response)
    return Reply(response.status, dict(response.getheaders()), raw, arrivals, started)


FLOOD = [f"{i:06d} " + "x" * 90 for i in range(30_000)]  # ~3 MB of tokens, for an upstream as fast as it can


def stalled_client(port, body=None):
    """POST and then never read, with a receive buffer as small as the kernel allows."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # before connect: the window stays small
    client.connect(("127.0.0.1", port))
    payload = json.dumps(body or {"messages": [{"role": "user", "content": "Hi"}]}).encode()
    client.sendall(
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    return client
