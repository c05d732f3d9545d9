"""The benchmark's load generator: C concurrent SSE streams over raw sockets, every event parsed.

    python bench/load.py --port 8000 --concurrency 100 --ramp 2 --timeout 60
    python bench/load.py --port 9000 --path /v1/chat/completions --concurrency 50   # the upstream itself

Each stream is one HTTP/1.1 connection and one POST of `{"messages":[{"role":"user","content":"hi"}]}`.
The reply is de-chunked, split into SSE events (LF or CRLF), and every `data:` payload is parsed
as JSON. Content events carry the upstream's send time (`t=<time.time()> `), so added latency is
receive time minus send time, exactly, on one machine. Arrivals are spread evenly over --ramp.

--hold-open N (idle streams): once every stream has its first content event (or the timeout
passes), print `READY <open>` on stdout, keep them open N seconds (the runner samples memory
then), and close them. The figures go to --out as JSON (and to stdout without --out).

--duration N (short replies, S6): a closed loop. Each stream that ends is replaced by a new one
until N seconds have passed, so C requests are always in flight; requests/s is what completed.

--sources N: spread the connections over N loopback addresses (127.1.x.y), as N users would be:
nginx's per-address stream limit then counts each as its own client (S7).

--cut-after K (resume): each stream closes its connection after K content events, keeping its
`X-Stream-Id`, its cookie and the `id:` of its last event; once all are cut, print `CUT <n>`,
wait --pause seconds (the runner samples memory then), and resume every one with
`GET /api/chat/<stream id>` and `Last-Event-ID`, reading each to its end.
"""

import argparse
import asyncio
import json
import resource
import sys
import time
from array import array

try:
    import uvloop
except ImportError:
    uvloop = None

BODY = b'{"messages":[{"role":"user","content":"hi"}]}'


def percentiles(values):
    """p50, p99 and max of a sequence, in milliseconds (None when empty)."""
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    ordered = sorted(values)
    n = len(ordered)
    pick = lambda q: ordered[min(n - 1, int(q * n))] * 1000  # noqa: E731
    return {"p50": pick(0.50), "p99": pick(0.99), "max": ordered[-1] * 1000, "n": n}


class Totals:
    """Figures of all streams together."""

    def __init__(self):
        self.latency = array("d")  # receive - send, seconds, one per content event
        self.gaps = array("d")  # between content events of one stream
        self.ttfe = array("d")  # request start to first content event
        self.events = 0  # content events (they carry a send time)
        self.other_events = 0  # end, [DONE], role chunks...
        self.comments = 0  # ": ping" heartbeats
        self.errors = {}  # kind: count
        self.completed = 0  # ended with [DONE] and no error
        self.first_event_at = None
        self.last_event_at = None
        self.ready = 0  # streams that have had their first content event
        self.ended_early = 0  # streams that ended before it

    def error(self, kind):
        self.errors[kind] = self.errors.get(kind, 0) + 1


class Stream(asyncio.Protocol):
    """One request and its reply, parsed as the bytes arrive."""

    def __init__(self, totals, request, direct, on_ready, on_end):
        self.totals, self.request, self.direct = totals, request, direct
        self.on_ready, self.on_end = on_ready, on_end
        self.transport = None
        self.head = b""  # until the response headers are complete
        self.status = None
        self.chunked = False
        self.raw = b""  # de-chunking buffer
        self.chunk_left = 0
        self.need_crlf = False
        self.sse = b""  # SSE text not yet ended by a blank line
        self.started = time.time()
        self.last = None
        self.done = False  # [DONE] seen
        self.failed = False
        self.ended = False
        self.complete = False  # the last chunk has come
        self.stream_id = self.cookie = self.last_id = None  # what a resume needs (X-Stream-Id, cookie, id:)
        self.content_events = 0
        self.cut_after, self.cut = None, False  # --cut-after: close after that many content events

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data):
        now = time.time()
        if self.status is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end].decode("latin-1"), self.head[end + 4 :]
            self.head = b""
            lines = head.split("\r\n")
            self.status = int(lines[0].split(" ")[1])
            lowered = [line.lower() for line in lines[1:]]
            self.chunked = any(line.startswith("transfer-encoding:") and "chunked" in line for line in lowered)
            for line, low in zip(lines[1:], lowered, strict=True):
                if low.startswith("x-stream-id:"):
                    self.stream_id = line.split(":", 1)[1].strip()
                elif low.startswith("set-cookie:"):
                    self.cookie = line.split(":", 1)[1].split(";", 1)[0].strip()
            if self.status != 200:
                self.fail(f"http_{self.status}")
                return
        if self.chunked:
            data = self.dechunk(data)
        if data:
            self.parse(data, now)
        if self.complete:
            self.finish()

    def dechunk(self, data):
        buf = self.raw + data if self.raw else data
        pos, out, size = 0, [], len(buf)
        while pos < size:
            if self.chunk_left:
                take = min(self.chunk_left, size - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self.chunk_left -= take
                self.need_crlf = self.chunk_left == 0
            elif self.need_crlf:
                if size - pos < 2:
                    break
                pos += 2
                self.need_crlf = False
            else:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    break
                length = int(buf[pos:line_end].split(b";")[0], 16)
                pos = line_end + 2
                if length == 0:  # the last chunk: the reply is complete once what came before is parsed
                    self.complete = True
                    pos = size
                    break
                self.chunk_left = length
        self.raw = buf[pos:]
        return b"".join(out)

    def parse(self, data, now):
        text = self.sse + data
        if b"\r" in text:
            text = text.replace(b"\r\n", b"\n")
        events = text.split(b"\n\n")
        self.sse = events.pop()
        totals = self.totals
        for event in events:
            if self.cut:
                break  # the rest of this read came after the cut
            while event.startswith((b":", b"id:", b"retry:")):  # comments need no blank line of their own
                newline = event.find(b"\n")
                line = event if newline < 0 else event[:newline]
                if line.startswith(b":"):
                    totals.comments += 1
                elif line.startswith(b"id:"):
                    self.last_id = line[3:].strip().decode()
                event = b"" if newline < 0 else event[newline + 1 :]
            if event.startswith(b"data:"):
                payload = event[5:].lstrip(b" ")
                if b"\ndata:" in payload:  # a multi-line event: its data lines, joined by newlines
                    payload = b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n"))
                self.data(payload, now)
            elif event:
                totals.other_events += 1

    def data(self, payload, now):
        totals = self.totals
        if payload == b"[DONE]":
            self.done = True
            totals.other_events += 1
            return
        try:
            obj = json.loads(payload)
        except ValueError:
            self.fail("bad_json")
            return
        if "error" in obj:
            self.fail("error_event")
            return
        if self.direct:  # OpenAI's chunk format: the upstream itself
            choices = obj.get("choices")
            content = choices[0]["delta"].get("content") if choices else None
        else:
            content = obj.get("content")
        if not content or not content.startswith("t="):
            totals.other_events += 1
            return
        sent = float(content[2 : content.index(" ")])
        totals.events += 1
        self.content_events += 1
        totals.latency.append(now - sent)
        if self.last is None:
            totals.ttfe.append(now - self.started)
            totals.ready += 1
            if totals.first_event_at is None:
                totals.first_event_at = now
            self.on_ready()
        else:
            totals.gaps.append(now - self.last)
        self.last = now
        totals.last_event_at = now
        if self.cut_after is not None and self.content_events >= self.cut_after and not self.ended:
            self.cut = self.ended = True  # cut on purpose, mid-reply: not an error
            self.transport.abort()
            self.on_end(self)

    def fail(self, kind):
        if not self.failed:
            self.failed = True
            self.totals.error(kind)
        self.finish()

    def finish(self):
        if self.ended:
            return
        self.ended = True
        if not self.failed:
            if self.done:
                self.totals.completed += 1
            else:
                self.failed = True
                self.totals.error("no_done")
        if self.transport is not None:
            self.transport.close()
        self.on_end(self)

    def eof_received(self):
        if not self.chunked and self.status == 200:
            self.finish()  # a reply without chunking ends when the server closes
        return False

    def connection_lost(self, exc):
        if not self.ended:
            self.fail("connection_lost" if self.status is not None else "no_response")


class Load:
    """One run of the load: C streams ramped in, kept going (--duration), held (--hold-open), or cut and resumed."""

    def __init__(self, opts):
        self.opts, self.loop = opts, asyncio.get_running_loop()
        self.totals, self.resumed = Totals(), Totals()  # resumed streams' figures apart: their backlog is old
        self.streams, self.active, self.cut = [], set(), []
        self.all_ended, self.all_ready = asyncio.Event(), asyncio.Event()
        self.launched = 0
        self.started = time.time()
        self.deadline = self.loop.time() + opts.timeout
        self.ramp_done = None
        self.post = self.request(opts.path, body=opts.body)  # every new stream's request

    def request(self, path, headers=b"", body=b""):
        opts = self.opts
        length = b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body) if body else b""
        return b"%s %s HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\n%s%s\r\n%s" % (
            b"POST" if body else b"GET",
            path.encode(),
            opts.host.encode(),
            opts.port,
            length,
            headers,
            body,
        )

    def settled(self):  # every stream has had its first event, or has ended without one
        if self.totals.ready + self.totals.ended_early >= self.opts.concurrency:
            self.all_ready.set()

    def on_end(self, stream):
        self.active.discard(stream)
        if stream.cut:
            self.cut.append(stream)
        elif stream.last is None:
            self.totals.ended_early += 1
            self.settled()
        if self.opts.duration and time.time() < self.started + self.opts.duration:
            self.launch()  # the closed loop: a new request for each one that ended
        elif self.launched >= self.opts.concurrency and not self.active:
            self.all_ended.set()

    def launch(self, totals=None, request=None):
        """Start one stream (a new connection); return it."""
        index, self.launched = self.launched, self.launched + 1
        totals = totals or self.totals
        request = request or self.post
        direct = self.opts.path != "/api/chat"
        stream = Stream(totals, request, direct, on_ready=self.settled, on_end=self.on_end)
        stream.cut_after = self.opts.cut_after if totals is self.totals else None
        self.streams.append(stream)
        self.active.add(stream)
        asyncio.ensure_future(self.connect(stream, index))
        return stream

    async def connect(self, stream, index):
        sources = self.opts.sources
        local = (f"127.1.{index % sources // 250}.{1 + index % sources % 250}", 0) if sources else None
        try:
            await self.loop.create_connection(lambda: stream, self.opts.host, self.opts.port, local_addr=local)
        except OSError as exc:
            stream.fail(f"connect_{type(exc).__name__}")

    async def ramp(self):
        opts = self.opts
        for i in range(opts.concurrency):
            due = self.started + opts.ramp * i / opts.concurrency
            if (wait := due - time.time()) > 0:
                await asyncio.sleep(wait)
            self.launch()
        self.ramp_done = time.time()
        if not self.active:
            self.all_ended.set()

    async def wait(self, event):
        try:
            await asyncio.wait_for(event.wait(), max(0.1, self.deadline - self.loop.time()))
        except TimeoutError:
            pass

    def close_all(self, abort):
        for stream in list(self.active):
            stream.ended = True  # closed on purpose: not an error
            if stream.transport is not None:
                stream.transport.abort() if abort else stream.transport.close()

    async def hold(self):
        """--hold-open: wait until every stream is open, say READY, hold them, close them."""
        await self.wait(self.all_ready)
        held_open = sum(1 for s in self.streams if s.last is not None and not s.ended)
        ready_after = time.time() - self.started
        print(f"READY {held_open}", flush=True)
        await asyncio.sleep(self.opts.hold_open)
        self.close_all(abort=False)
        return held_open, ready_after

    async def cut_and_resume(self):
        """--cut-after: once every stream is cut (or ended), say CUT, wait, then resume each cut one."""
        print(f"CUT {len(self.cut)}", flush=True)
        await asyncio.sleep(self.opts.pause)
        self.all_ended.clear()
        resumed_at = time.time()
        for stream in list(self.cut):
            if stream.stream_id is None:
                self.resumed.error("no_stream_id")
                continue
            headers = b"Last-Event-ID: %s\r\n" % stream.last_id.encode() if stream.last_id else b""
            if stream.cookie:
                headers += b"Cookie: %s\r\n" % stream.cookie.encode()
            self.launch(self.resumed, self.request(f"{self.opts.path}/{stream.stream_id}", headers))
        if not self.active:
            self.all_ended.set()
        await self.wait(self.all_ended)
        unfinished = len(self.active)
        self.close_all(abort=True)
        return {
            "cut": len(self.cut),
            "resumed_after_s": resumed_at - self.started,
            "completed": self.resumed.completed,
            "errors": self.resumed.errors,
            "events": self.resumed.events,
            "unfinished": unfinished,
            "ttfe_ms": percentiles(self.resumed.ttfe),  # from the resume request to its first content event
        }

    def figures(self, held_open, ready_after, unfinished):
        totals, ended = self.totals, time.time()
        span = (totals.last_event_at or ended) - self.started
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "concurrency": self.opts.concurrency,
            "requests": len([s for s in self.streams if s.totals is totals]),
            "ramp_s": self.ramp_done - self.started,
            "duration_s": ended - self.started,
            "events": totals.events,
            "other_events": totals.other_events,
            "comments": totals.comments,
            "events_per_s": totals.events / span if span > 0 else 0.0,
            "completed": totals.completed,
            "requests_per_s": totals.completed / span if span > 0 else 0.0,
            "errors": totals.errors,
            "error_count": sum(totals.errors.values()),
            "unfinished": unfinished,
            "held_open": held_open,
            "ready_after_s": ready_after,
            "ttfe_ms": percentiles(totals.ttfe),
            "gap_ms": percentiles(totals.gaps),
            "latency_ms": percentiles(totals.latency),
            "loadgen_cpu_s": usage.ru_utime + usage.ru_stime,
        }


async def run(opts):
    load = Load(opts)
    await load.ramp()
    held_open = ready_after = resumed = None
    if opts.hold_open is not None:
        held_open, ready_after = await load.hold()
        unfinished = opts.concurrency - held_open
    else:
        await load.wait(load.all_ended)
        unfinished = len(load.active)
        if opts.cut_after is None:
            load.close_all(abort=True)
        else:
            resumed = await load.cut_and_resume()
    result = load.figures(held_open, ready_after, unfinished)
    if resumed is not None:
        result["resumed"] = resumed
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/api/chat", help="/v1/chat/completions: the upstream's own format")
    parser.add_argument("--concurrency", "-c", type=int, default=50)
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds over which the streams start")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole run, then abort")
    parser.add_argument("--hold-open", type=float, default=None, help="idle mode: seconds to keep streams open")
    parser.add_argument("--duration", type=float, default=0.0, help="closed loop: replace ended streams this long")
    parser.add_argument("--sources", type=int, default=0, help="connect from this many loopback addresses")
    parser.add_argument("--cut-after", type=int, default=None, help="resume mode: cut after this many events")
    parser.add_argument("--pause", type=float, default=1.0, help="resume mode: seconds between the cut and resume")
    parser.add_argument("--out", help="write the JSON figures here")
    opts = parser.parse_args(argv)
    opts.body = BODY
    if opts.path != "/api/chat":  # the upstream itself: ask it as the SDKs would
        opts.body = b'{"model":"gpt-4","messages":[{"role":"user","content":"hi"}],"stream":true}'
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 200_000)), hard))
    if uvloop is not None:
        uvloop.install()
    result = asyncio.run(run(opts))
    text = json.dumps(result)
    if opts.out:
        with open(opts.out, "w") as out:
            out.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
