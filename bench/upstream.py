"""A fast fake OpenAI-compatible upstream for the benchmark: one process, one event loop.

POST /v1/chat/completions answers with chunked `text/event-stream` in OpenAI's chunk format: a
role chunk, one content chunk per token, a finish chunk, a usage chunk (`choices: []`) when the
request asks for `stream_options.include_usage`, then `data: [DONE]`. Each token's content is
`"t=<time.time() at send> "`, so a client on this machine computes added latency exactly.

The pace is set per process (one upstream per scenario), as the peers are unmodified:

    python bench/upstream.py --port 9000 --tokens 2000 --interval 0          # as fast as possible
    python bench/upstream.py --port 9000 --tokens 500 --interval 0.02        # 50 tokens/s per stream
    python bench/upstream.py --port 9000 --tokens 2 --hold 60                # one token, then silence

Tokens are timed by absolute deadlines (start + hold + i * interval) with loop.call_at, no task per
stream. With --interval 0 the upstream writes --batch tokens per write and stops while the
socket's buffer is full (flow control). On SIGTERM it prints its own figures as one JSON line.
"""

import argparse
import asyncio
import json
import resource
import signal
import sys
import time

try:
    import uvloop
except ImportError:  # the stdlib loop works too, only slower
    uvloop = None

HEAD_OK = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"x-request-id: req_bench\r\n"
)


def chunk(event):
    """Frame one SSE event (bytes) as one HTTP/1.1 chunk."""
    return b"%X\r\n%s\r\n" % (len(event), event)


class Figures:
    """What the upstream did, for the runner: proof that it kept its schedule."""

    def __init__(self):
        self.streams = self.finished = self.cut = self.tokens = 0
        self.late = 0  # tokens sent more than 5 ms after their deadline
        self.max_late = 0.0

    def as_dict(self):
        return dict(vars(self))


class Upstream(asyncio.Protocol):
    """One client connection; requests one after another (keep-alive), one stream at a time."""

    def __init__(self, opts, figures):
        self.opts, self.figures = opts, figures
        self.loop = asyncio.get_running_loop()
        self.transport = None
        self.buffer = b""
        self.streaming = False
        self.paused = False
        self.handle = None

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024)

    def data_received(self, data):
        self.buffer += data
        if not self.streaming:
            self.next_request()

    def connection_lost(self, exc):
        if self.streaming:
            self.figures.cut += 1
        self.streaming = False
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self.streaming and self.handle is None and self.fast(self.sent):
            self.handle = self.loop.call_soon(self.step)

    # --- requests -----------------------------------------------------------------------------

    def next_request(self):
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = self.buffer[:end].decode("latin-1").split("\r\n")
        method, path = lines[0].split(" ")[:2]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length") or 0)
        if len(self.buffer) < end + 4 + length:
            return  # the body is not all here yet
        body = self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        self.close_after = headers.get("connection", "").lower() == "close"
        if method == "POST" and path.rstrip("/").endswith("/chat/completions"):
            self.start_stream(json.loads(body or b"{}"))
        else:
            status = b"200 OK" if path == "/healthz" else b"404 Not Found"
            payload = b'{"status": "ok"}' if path == "/healthz" else b'{"error": {"message": "not found"}}'
            self.transport.write(
                b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (status, len(payload), payload)
            )
            self.finish_request()

    def finish_request(self):
        if self.close_after:
            self.transport.close()
        elif self.buffer:
            self.next_request()

    # --- one stream ---------------------------------------------------------------------------

    def start_stream(self, body):
        opts = self.opts
        self.streaming = True
        self.figures.streams += 1
        if self.figures.streams <= opts.warmup:  # the runner's warm-up requests: answered at once
            self.tokens, self.interval, self.hold = 3, 0.0, 0.0
        else:
            self.tokens, self.interval, self.hold = opts.tokens, opts.interval, opts.hold
        model = str(body.get("model", "gpt-bench")).encode()
        self.usage = bool((body.get("stream_options") or {}).get("include_usage"))
        usage_field = b',"usage":null' if self.usage else b""
        # The fields a real OpenAI chunk has, so the peers parse what they would parse in production.
        self.prefix = (
            b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":%d,"model":"%s",'
            b'"system_fingerprint":"fp_bench","choices":[{"index":0,"delta":' % (int(time.time()), model)
        )
        self.suffix = b',"logprobs":null,"finish_reason":null}]%s}\n\n' % usage_field
        self.model = model
        self.sent = 0
        self.started = self.loop.time()
        role = self.prefix + b'{"role":"assistant","content":"","refusal":null}' + self.suffix
        self.transport.write(HEAD_OK + b"\r\n" + chunk(role))
        self.step()  # the first token goes at once

    def token_event(self, now_wall):
        return self.prefix + b'{"content":"t=%.6f "}' % now_wall + self.suffix

    def deadline(self, i):
        """When token i (0-based) is due: the first at once, the second after the hold, then every interval."""
        if i == 0:
            return self.started
        return self.started + self.hold + (i - 1) * self.interval

    def fast(self, i):
        """Whether token i goes as fast as possible: --interval 0, and not the one that ends the hold."""
        return self.interval == 0 and i > 0 and not (i == 1 and self.hold > 0)

    def step(self):
        self.handle = None
        if not self.streaming:
            return
        figures = self.figures
        if self.fast(self.sent):  # a batch per write, until the socket's buffer is full
            n = min(self.opts.batch, self.tokens - self.sent)
            event = chunk(self.token_event(time.time()))
            self.transport.write(event * n)  # one send time for the batch: they leave together
        else:
            n = 1
            late = self.loop.time() - self.deadline(self.sent)
            if late > 0.005:
                figures.late += 1
                figures.max_late = max(figures.max_late, late)
            self.transport.write(chunk(self.token_event(time.time())))
        self.sent += n
        figures.tokens += n
        if self.sent >= self.tokens:
            self.end_stream()
        elif not self.fast(self.sent):
            self.handle = self.loop.call_at(self.deadline(self.sent), self.step)
        elif not self.paused:
            self.handle = self.loop.call_soon(self.step)

    def end_stream(self):
        finish = self.prefix + b"{}" + self.suffix.replace(b'"finish_reason":null', b'"finish_reason":"stop"')
        out = [chunk(finish)]
        if self.usage:
            usage = b'{"prompt_tokens":9,"completion_tokens":%d,"total_tokens":%d}' % (self.sent, self.sent + 9)
            event = self.prefix[: self.prefix.index(b'"choices":')] + b'"choices":[],"usage":%s}\n\n' % usage
            out.append(chunk(event))
        out.append(chunk(b"data: [DONE]\n\n"))
        out.append(b"0\r\n\r\n")
        self.transport.write(b"".join(out))
        self.streaming = False
        self.figures.finished += 1
        self.finish_request()


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, 200_000))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def serve(opts):
    loop = asyncio.get_running_loop()
    figures = Figures()
    server = await loop.create_server(
        lambda: Upstream(opts, figures), opts.host, opts.port, backlog=opts.backlog, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"upstream listening on {opts.host}:{opts.port}", file=sys.stderr, flush=True)
    await stop.wait()
    server.close()
    print(json.dumps({"upstream": figures.as_dict()}), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--tokens", type=int, default=2000, help="content tokens per stream")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between tokens; 0: as fast as possible")
    parser.add_argument("--hold", type=float, default=0.0, help="seconds of silence after the first token")
    parser.add_argument("--batch", type=int, default=8, help="tokens per write when --interval is 0")
    parser.add_argument("--backlog", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=0, help="the first N streams get 3 tokens at once")
    opts = parser.parse_args(argv)
    raise_fd_limit()
    if uvloop is not None:
        uvloop.install()
    asyncio.run(serve(opts))


if __name__ == "__main__":
    main()
