"""The log of a stream: what lets a reply outlive the connection that asked for it.

A generation writes every event it sends to its stream's log; the response that asked for it is
only its first reader. Another reader attaches by cursor (the `id:` of the last event it has) and
reads the same bytes in the same order, then follows live, then the same ending. This module
offers the log and nothing of HTTP: app.py's views and relay use it.

- new_owner(), owner_key(): who may read a stream (the API token's or the cookie's hash).
- event_id(), parse_event_id(): an event's id names its stream and its position in the log.
- FileLogs: one VM, no extra server. Each stream is a file in a directory every worker of the
  gunicorn master shares (gunicorn.conf.py makes it fresh at each start), mapped into memory:
  a header (owner, state, producer's pid and heartbeat, stop flag, reader slots) and a ring of
  CHAT_RESUME_MAX_BYTES. Its writer appends once per upstream read, a copy into shared memory
  and no system call. A reader in the same worker wakes on an in-process event. Each worker has
  a bell, a Unix datagram socket in the same directory: a reader in another worker asks the
  producer's worker to ring its bell after each write (one datagram per write per following
  worker, only while followed; measured: 0.7 ms median added latency, against 5-10 ms for a
  20 ms poll of the length), and a stop asked of another worker reaches the producer the same way.
- RedisLogs (CHAT_RESUME_REDIS_URL): the same log as a Redis Stream, for several VMs.

A Writer offers add(events) -> the events with their `id:` lines (and logs them), beat(),
`stopping`, readers(), finish(). A Reader offers read(timeout) -> bytes (b"" when nothing came),
`finished`, `lost` and close(). Refusals are LogRefusal(status, code, message).
"""

import collections
import fcntl
import hashlib
import hmac
import logging
import mmap
import os
import re
import secrets
import socket
import struct
import tempfile
import threading
import time

log = logging.getLogger("chat")

RETRY = b"retry: 1000\n"  # once per response, in the first event's block: a reconnect waits 1 s
TAIL_SECONDS = 0.25  # a reader in another worker looks for more this often, in case the producer's ring was lost
MAX_READERS = 16  # slots in a log's header; CHAT_RESUME_READERS may be at most this


class LogRefusal(Exception):
    """A resume or stop the log cannot serve: the HTTP status, the code and the sentence for the client."""

    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code = status, code


NOT_FOUND = (404, "stream_not_found", "No such stream: it is unknown, expired, or not yours.")
UNAVAILABLE = (409, "resume_unavailable", "That part of the reply is no longer kept; send the message again.")
BUSY = (429, "too_many_readers", "This stream has as many readers as it may have.")


# --- Ids: a capability, an owner, a position ----------------------------------------------------------

EVENT_ID = re.compile(r"([A-Za-z0-9_-]{24})\.(\d{10})")
ID_LINE = len(b"id: ") + 24 + 1 + 10 + 1  # every id line has this length: a position is known before it is written


def new_stream_id():
    """Return a stream id: 144 random bits, the capability to read the stream (with its owner's key)."""
    return secrets.token_urlsafe(18)


def file_name(stream_id):
    """The stream's name wherever it is stored or logged beside its log: a hash, never the id in clear."""
    return hashlib.sha256(b"chat stream " + stream_id.encode()).hexdigest()[:32]


def new_owner():
    """Return a new owner secret, for the cookie that binds streams to the browser that started them."""
    return secrets.token_urlsafe(24)


def owner_key(secret):
    """Return what a log keeps of its owner's secret (the API token, or the cookie): its hash."""
    return hashlib.sha256(b"chat owner " + secret.encode()).digest()


def chat_key(owner, chat_id):
    """Name an AI SDK chat (useChat's `id`) of one owner: two owners' chats of the same id never meet."""
    return hashlib.sha256(b"chat " + owner + chat_id.encode()).hexdigest()[:32]


def event_id(stream_id, position):
    return f"{stream_id}.{position:010d}"


def parse_event_id(text):
    """Return (stream id, position) of an event id, or None for anything else."""
    found = EVENT_ID.fullmatch(text.strip()) if isinstance(text, str) else None
    return (found.group(1), int(found.group(2))) if found else None


def with_ids(prefix, position, encoded):
    """Give each event of `encoded` (complete `data:` events) its `id:` line; return (bytes, new position).

    `prefix` is the stream's `id: <stream id>.`, as bytes.
    """
    if encoded.find(b"\n\n") == len(encoded) - 2:  # one event: what most upstream reads give
        position += ID_LINE + len(encoded)
        return b"%s%010d\n%s" % (prefix, position, encoded), position
    out = []
    for event in encoded.split(b"\n\n")[:-1]:  # every event ends with a blank line
        position += ID_LINE + len(event) + 2
        out.append(b"%s%010d\n%s\n\n" % (prefix, position, event))
    return b"".join(out), position


# --- One VM: a file per stream, mapped into every worker that touches it ------------------------------
#
# The header, at the start of the file. `length` is the position of the log's end: bytes ever
# appended, of which the ring keeps the last `cap`. Written only by the producer, after the bytes;
# read by everyone. `beat` is the producer's last sign of life (wall clock, as workers compare it).

HEADER = struct.Struct(f"<8s32siBBxxQQdd{MAX_READERS}i24s")  # the stream's id is in its events' ids anyway
HEADER_SIZE = 256
MAGIC = b"chatlog1"
RUNNING, DONE = 0, 1
END = struct.Struct("<Qd")  # length and beat, side by side
STOP_FLAG = 45  # the offset of the stop flag, read at every write
OFFSETS = {"state": 44, "stop": STOP_FLAG, "cap": 48, "length": 56, "beat": 64, "finished_at": 72, "readers": 80}


class FileLog:
    """One stream's file, mapped: its header's fields and its ring of bytes."""

    def __init__(self, path, create=None):
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                stream_id, owner, cap = create
                os.ftruncate(fd, HEADER_SIZE + cap)  # sparse: only the pages written take room
                fields = (MAGIC, owner, os.getpid(), RUNNING, 0, cap, 0, time.time(), 0.0, *[0] * MAX_READERS)
                header = HEADER.pack(*fields, stream_id.encode())
                os.pwrite(fd, header, 0)
            self.map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self.path, self.following = path, False  # following: a reader of it here is rung by its producer
        magic, self.owner, self.pid, *_, stream_id = HEADER.unpack_from(self.map, 0)
        self.stream_id = stream_id.decode("ascii", "replace")
        self.cap = self.field("cap")
        if magic != MAGIC or len(self.map) != HEADER_SIZE + self.cap:
            self.map.close()
            raise OSError(f"not a stream log: {path}")

    def field(self, name, kind="<Q"):
        return struct.unpack_from(kind, self.map, OFFSETS[name])[0]

    def set(self, name, value, kind="<Q"):
        struct.pack_into(kind, self.map, OFFSETS[name], value)

    @property
    def length(self):
        return self.field("length")

    @property
    def finished(self):
        return self.field("state", "<B") == DONE

    def append(self, data, length):
        """Copy `data` into the ring at position `length` (its last `cap` bytes, if longer), then publish the end.

        The producer's one write per upstream read: a copy into shared memory, no system call.
        """
        cap, size = self.cap, len(data)
        if size > cap:
            data, length, size = data[-cap:], length + size - cap, cap
        start = HEADER_SIZE + length % cap
        if start + size <= HEADER_SIZE + cap:
            self.map[start : start + size] = data
        else:
            first = HEADER_SIZE + cap - start
            self.map[start:] = data[:first]
            self.map[HEADER_SIZE : HEADER_SIZE + size - first] = data[first:]
        END.pack_into(self.map, OFFSETS["length"], length + size, time.time())  # the new end, and a heartbeat

    def read(self, cursor, limit=256 * 1024):
        """Return the bytes from `cursor` to the end (at most `limit`); LogRefusal if they are no longer kept."""
        length, cap = self.length, self.cap
        if cursor < length - cap:
            raise LogRefusal(*UNAVAILABLE)
        size = min(length, cursor + limit) - cursor
        if size <= 0:
            return b""
        start = cursor % cap
        first = min(size, cap - start)
        data = self.map[HEADER_SIZE + start : HEADER_SIZE + start + first]
        if first < size:
            data += self.map[HEADER_SIZE : HEADER_SIZE + size - first]
        if cursor < self.length - cap:  # the producer (another process) overwrote it while we copied
            raise LogRefusal(*UNAVAILABLE)
        return data

    def ends_an_event(self, cursor):
        """Tell whether `cursor` is a position a reader may resume from: the start, or just after an event."""
        if cursor < self.length - self.cap:
            raise LogRefusal(*UNAVAILABLE)
        return cursor == 0 or (2 <= cursor <= self.length and self.read(cursor - 2, 2) == b"\n\n")

    def producer_alive(self, lost_after):
        """Tell whether the producer still runs: its process exists and it beat within `lost_after` seconds."""
        return pid_alive(self.pid) and time.time() - self.field("beat", "<d") < lost_after

    def claim_reader_slot(self, most):
        """Take one of `most` reader slots (they hold the reader's pid); return its index, or None if all are taken."""
        with self.locked():
            for slot in range(most):
                pid = self.reader_pid(slot)
                if pid == 0 or not pid_alive(pid):
                    self.set_reader_pid(slot, os.getpid())
                    return slot
        return None

    def release_reader_slot(self, slot):
        with self.locked():
            self.set_reader_pid(slot, 0)

    def readers(self):
        """Count the readers attached to this log now, in any worker."""
        pids = [self.reader_pid(slot) for slot in range(MAX_READERS)]
        return sum(1 for pid in pids if pid and (pid == os.getpid() or pid_alive(pid)))

    def reader_pid(self, slot):
        return struct.unpack_from("<i", self.map, OFFSETS["readers"] + 4 * slot)[0]

    def set_reader_pid(self, slot, pid):
        struct.pack_into("<i", self.map, OFFSETS["readers"] + 4 * slot, pid)

    def locked(self):
        return FileLock(self.path)

    def close(self):
        self.map.close()


class FileLock:
    """flock() on a log's file, for the few read-modify-writes of its header that two workers may race on."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc_info):
        os.close(self.fd)  # closing releases the lock


def pid_alive(pid):
    """Tell whether process `pid` runs (as this user: another user's with that pid is not ours, reused)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class FileWriter:
    """The producer's side of one stream's FileLog: ids, appends, heartbeat, stop, finish."""

    def __init__(self, logs, stream_id, name, file):
        self.logs, self.stream_id, self.name, self.file = logs, stream_id, name, file
        self.position, self.prefix, self.cap = 0, f"id: {stream_id}.".encode(), file.cap
        self.stopping = False  # a stop was asked for: the relay ends the reply with finish_reason "stop"
        self.on_stop = None  # called (once) when a stop is asked for: the relay closes its upstream
        self.waiting = []  # events of readers in this worker waiting for more
        self.followers = set()  # pids of other workers with readers of this stream: rung after each write
        self.over_cap = self.done = False

    def add(self, encoded):
        """Return `encoded` (complete data events) with their `id:` lines, written to the log."""
        data, self.position = with_ids(self.prefix, self.position, encoded)
        self.file.append(data, self.position - len(data))
        if self.position > self.cap and not self.over_cap:
            self.over_cap = True
            log.warning("stream log %s over CHAT_RESUME_MAX_BYTES: earlier events can no longer be resumed", self.name)
        if self.waiting:
            for event in self.waiting:
                event.set()
        if self.followers:
            self.logs.ring_followers(self)
        if self.file.map[STOP_FLAG] and not self.stopping:  # a stop whose ring was lost (a full bell)
            self.stop()
        return data

    def beat(self):
        """Tell readers the producer is alive (a reader that sees no beat for a while ends with stream_lost)."""
        if self.done:
            return
        self.file.set("beat", time.time(), "<d")
        if not self.stopping and self.file.field("stop", "<B"):  # a stop whose bell did not ring
            self.stop()

    def readers(self):
        return 0 if self.done else self.file.readers()

    def stop(self):
        """Ask for a stop: the relay's next look at `stopping` ends the reply; on_stop closes its upstream now."""
        if self.done:
            return
        self.file.set("stop", 1, "<B")
        if not self.stopping:
            self.stopping = True
            if self.on_stop:
                self.on_stop()

    def finish(self):
        """The log is complete: readers end once they reach its end; it is kept CHAT_RESUME_KEEP_SECONDS."""
        self.file.set("finished_at", time.time(), "<d")
        self.file.set("state", DONE, "<B")
        self.done = True
        for event in self.waiting:
            event.set()
        self.logs.ring_followers(self)
        self.logs.finished(self)


class FileReader:
    """One reader of a FileLog, from a cursor: read(timeout) waits for more, at most `timeout` seconds."""

    def __init__(self, logs, file, cursor, slot, writer):
        self.logs, self.file, self.cursor, self.slot, self.writer = logs, file, cursor, slot, writer
        self.stream_id = file.stream_id
        self.finished = self.lost = False

    def last_id_line(self):
        """The `id:` line of the last event read (for an event of the reader's own, such as stream_lost)."""
        return f"id: {event_id(self.stream_id, self.cursor)}\n".encode()

    def read(self, timeout):
        data = self.file.read(self.cursor)
        if not data:
            if self.file.finished:
                self.finished = True
                return b""
            if not self.file.producer_alive(self.logs.lost_after):
                self.lost = True
                return b""
            self.wait(timeout)
            data = self.file.read(self.cursor)
        self.cursor += len(data)
        return data

    def wait(self, timeout):
        """Wait until the producer writes more, or `timeout` seconds.

        In the producer's worker, it wakes this reader itself. In another worker, it rings this
        worker's bell after each write once asked to (follow), and the reader also looks at the
        length every TAIL_SECONDS, in case a ring was lost (a full socket buffer drops it).
        """
        length, deadline = self.file.length, time.monotonic() + max(timeout, 0)
        waiting = self.writer.waiting if self.writer is not None else self.logs.follow(self.file)
        event = threading.Event()
        waiting.append(event)
        try:
            while self.file.length == length and not self.file.finished and time.monotonic() < deadline:
                left = deadline - time.monotonic()
                if event.wait(max(left, 0) if self.writer is not None else min(TAIL_SECONDS, max(left, 0))):
                    break
        finally:
            waiting.remove(event)

    def close(self):
        if self.slot is not None:
            self.file.release_reader_slot(self.slot)
            self.slot = None
        self.logs.unfollow(self.file)
        self.file.close()


class FileLogs:
    """The logs of one VM, in `directory` (shared by the master's workers); one FileLogs per worker.

    It keeps no list of other workers' logs: a stream is found by its name, never by a scan. Of its
    own it keeps the finished ones in order, to remove them after CHAT_RESUME_KEEP_SECONDS, or
    sooner, oldest first, when this worker's logs pass CHAT_RESUME_WORKER_BYTES.
    """

    def __init__(self, directory, config):  # directory: "" for one of this process's own
        self.given_directory, self.made_directory = directory, None
        self.cap, self.keep = config["CHAT_RESUME_MAX_BYTES"], config["CHAT_RESUME_KEEP_SECONDS"]
        self.budget, self.most_readers = config["CHAT_RESUME_WORKER_BYTES"], config["CHAT_RESUME_READERS"]
        self.lost_after = 3 * config["CHAT_HEARTBEAT_SECONDS"] + 2  # the producer beats at every heartbeat
        self.producing = {}  # name: FileWriter, the streams this worker generates now
        self.kept = collections.OrderedDict()  # name: (finished at, bytes), this worker's finished logs, oldest first
        self.used = 0  # bytes of this worker's logs: a running one counts its header until it finishes
        self.bell = self.ringer = None
        self.followed = {}  # name: events of readers here of a stream another worker generates
        self.followers_here = collections.Counter()  # name: readers here of it, waiting or not
        self.lock = threading.Lock()

    @property
    def directory(self):
        """CHAT_RESUME_DIR, or else a directory of this process's own, made when first needed."""
        if not self.given_directory and self.made_directory is None:
            self.made_directory = tempfile.mkdtemp(prefix="chat-resume-")
        return self.given_directory or self.made_directory

    def path(self, name):
        return os.path.join(self.directory, name + ".log")

    # The producer's side

    def create(self, owner, chat=None):
        """Start a stream's log; return its FileWriter, or None when this worker's budget is spent.

        `chat`: the AI SDK's chat this stream answers (owner and chat id, hashed): its pointer is moved here.
        """
        self.ring_bell()
        with self.lock:
            self.drop_expired()
            while self.used + self.cap > self.budget and self.kept:
                self.remove(next(iter(self.kept)))
            if self.used + HEADER_SIZE > self.budget:
                return None
            self.used += HEADER_SIZE
        stream_id = new_stream_id()
        name = file_name(stream_id)
        try:
            file = FileLog(self.path(name), create=(stream_id, owner, self.cap))
        except OSError as exc:  # a full disk, a missing directory: the stream goes out, unresumable
            log.warning("stream logs unavailable, streams go out unresumable: %s", exc)
            with self.lock:
                self.used -= HEADER_SIZE
            return None
        writer = FileWriter(self, stream_id, name, file)
        self.producing[name] = writer
        if chat is not None:
            self.point(chat, name)
        return writer

    def finished(self, writer):
        size = HEADER_SIZE + min(writer.position, self.cap)
        with self.lock:
            self.producing.pop(writer.name, None)
            self.kept[writer.name] = (time.monotonic(), size)
            self.used += size - HEADER_SIZE
        writer.file.close()

    def drop_expired(self):
        now = time.monotonic()
        while self.kept:
            name, (finished_at, _) = next(iter(self.kept.items()))
            if now - finished_at < self.keep:
                break
            self.remove(name)

    def remove(self, name):
        _, size = self.kept.pop(name)
        self.used -= size
        try:
            os.remove(self.path(name))
        except FileNotFoundError:
            pass

    # The readers' side

    def open(self, stream_id, owner, cursor):
        """Return a FileReader of the stream from `cursor`, or raise LogRefusal (404, 409, 429)."""
        return self.open_named(file_name(stream_id), owner, cursor)

    def open_named(self, name, owner, cursor):
        file = self.find(name, owner)  # a mapping of the reader's own: the writer closes its own when done
        try:
            if not file.ends_an_event(cursor):
                raise LogRefusal(*UNAVAILABLE)
            slot = file.claim_reader_slot(self.most_readers)
            if slot is None:
                raise LogRefusal(*BUSY)
        except LogRefusal:
            file.close()
            raise
        return FileReader(self, file, cursor, slot, self.producing.get(name))

    def find(self, name, owner):
        """Open the named log if it exists, is the owner's and has not expired; else the one 404."""
        try:
            file = FileLog(self.path(name))
        except (FileNotFoundError, OSError, ValueError):
            raise LogRefusal(*NOT_FOUND) from None
        expired = file.finished and time.time() - file.field("finished_at", "<d") > self.keep
        if expired or not hmac.compare_digest(file.owner, owner):
            file.close()
            raise LogRefusal(*NOT_FOUND)
        return file

    def stop(self, stream_id, owner):
        """Stop the stream (idempotent: a finished or lost one is stopped already); 404 if it is not the owner's."""
        self.stop_named(file_name(stream_id), owner)

    def stop_named(self, name, owner):
        file = self.find(name, owner)
        try:
            if file.finished:
                return
            writer = self.producing.get(name)
            if writer is not None:
                writer.stop()
                return
            file.set("stop", 1, "<B")
            self.send_bell(file.pid, b"stop " + name.encode())
        finally:
            file.close()

    # The AI SDK's chats: a pointer from (owner, chat id) to its latest stream

    def chat_path(self, chat):
        return os.path.join(self.directory, chat + ".chat")

    def point(self, chat, name):
        """Point the chat at its new stream; stop the stream it pointed at (a new message supersedes it)."""
        previous = self.pointed(chat)
        temporary = self.chat_path(chat) + f".{os.getpid()}"
        with open(temporary, "w") as pointer:
            pointer.write(name)
        os.replace(temporary, self.chat_path(chat))
        if previous:
            try:
                file = FileLog(self.path(previous))
            except (FileNotFoundError, OSError):
                return
            owner = file.owner
            file.close()
            try:
                self.stop_named(previous, owner)
            except LogRefusal:
                pass

    def pointed(self, chat):
        try:
            with open(self.chat_path(chat)) as pointer:
                return pointer.read().strip()
        except FileNotFoundError:
            return None

    # The bell: how a stop asked of another worker reaches the producer at once

    def bell_path(self, pid):
        return os.path.join(self.directory, f"bell-{pid}")

    def ring_bell(self):
        """Listen on this worker's bell (once, lazily: after gunicorn forked the worker)."""
        if self.bell is not None:
            return
        with self.lock:
            if self.bell is not None:
                return
            path = self.bell_path(os.getpid())
            self.bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                if os.path.exists(path):
                    os.remove(path)  # a dead worker's, with the same pid
                self.bell.bind(path)
            except OSError as exc:  # e.g. a path over the 108 bytes a Unix socket may have
                log.warning("no bell for this worker's streams (stops and followers then wait for a look): %s", exc)
                return
        threading.Thread(target=self.answer_bell, name="chat-resume-bell", daemon=True).start()

    def answer_bell(self):
        """Answer rings: `stop <name>` and `follow <name> <pid>` for a stream of ours, `more <name>` for one we read."""
        while True:
            what, _, name = self.bell.recv(128).decode("ascii", "replace").partition(" ")
            name, _, pid = name.partition(" ")
            if what == "more":
                for event in self.followed.get(name, ()):
                    event.set()
            elif (writer := self.producing.get(name)) is not None:
                if what == "stop":
                    writer.stop()
                elif what == "follow" and pid.isdigit():
                    writer.followers.add(int(pid))

    def follow(self, file):
        """Return the list in which this worker's readers of another worker's stream wait; ask once to be rung."""
        name = os.path.basename(file.path).removesuffix(".log")
        if name not in self.followed:
            self.ring_bell()
            self.followed[name] = []
            self.send_bell(file.pid, f"follow {name} {os.getpid()}".encode())
        if not file.following:
            file.following = True
            self.followers_here[name] += 1
        return self.followed[name]

    def unfollow(self, file):
        """A reader here is done: once none is left, rings for that stream are ignored (its producer rings on)."""
        name = os.path.basename(file.path).removesuffix(".log")
        if file.following:
            self.followers_here[name] -= 1
            if not self.followers_here[name]:
                del self.followers_here[name], self.followed[name]

    def ring_followers(self, writer):
        """Ring the bells of the workers that read this stream: there is more, or it ended."""
        ring = b"more " + writer.name.encode()
        for pid in list(writer.followers):
            if not self.send_bell(pid, ring):
                writer.followers.discard(pid)

    def send_bell(self, pid, message):
        """Ring another worker's bell, never waiting; tell whether it rang (False: that worker is gone)."""
        if self.ringer is None:
            self.ringer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.ringer.setblocking(False)
        try:
            self.ringer.sendto(message, self.bell_path(pid))
        except BlockingIOError:  # its bell is full: the reader's next look (TAIL_SECONDS) finds what came
            return True
        except OSError:  # no such worker any more: a stop then has nothing to stop, a ring nobody to wake
            return False
        return True


# --- Several VMs: the same log as a Redis Stream ----------------------------------------------------------
#
# Per stream (by its name): `<key>:log`, a Stream whose entry ids are `<end position>-0`, so that
# XREAD from `<cursor>-0` returns exactly the entries that hold what follows the cursor (a last
# entry `<end>-1` marks the end); `<key>:meta`, a hash (owner, state, the producer's heartbeat,
# the stop flag, its worker's bell); `<key>:readers`, a sorted set of readers by expiry. The producer
# refreshes their TTL while it runs, and sets CHAT_RESUME_KEEP_SECONDS once it is done. A stop is
# one XADD to the producing worker's bell, a Stream too: no pub/sub anywhere.

REDIS_DOWN_SECONDS = 5.0  # after Redis failed, streams go out unresumable this long before it is tried again


class RedisLogs:
    """The logs of several VMs in one Redis (CHAT_RESUME_REDIS_URL): the same offer as FileLogs."""

    def __init__(self, url, config):
        import redis  # only when the setting is set: redis-py is then needed, and only then
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.errors = redis.RedisError
        self.heartbeat = config["CHAT_HEARTBEAT_SECONDS"]
        # redis-py 8 defaults to RESP3, a 5 s socket timeout and 3 retries with backoff: say all three. The
        # timeout is longer than a reader's block; no retry, so a Redis that is down costs a stream no wait.
        self.redis = redis.Redis.from_url(
            url, protocol=2, socket_timeout=self.heartbeat + 10, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        self.cap, self.keep = config["CHAT_RESUME_MAX_BYTES"], config["CHAT_RESUME_KEEP_SECONDS"]
        self.most_readers = config["CHAT_RESUME_READERS"]
        self.lost_after = 3 * self.heartbeat + 2
        self.running_ttl = int(self.lost_after * 2) + 1  # a producer that dies leaves keys that expire on their own
        self.producing = {}  # name: RedisWriter, the streams this worker generates now
        self.bell = f"chat:resume:bell:{secrets.token_hex(8)}"  # this worker's
        self.down_until = 0.0
        self.listening = False

    def key(self, name):
        return f"chat:resume:{name}"

    def failed(self, exc):
        """Note that Redis failed: one warning, then streams go out unresumable for REDIS_DOWN_SECONDS."""
        if time.monotonic() >= self.down_until:
            log.warning("Redis unavailable, streams go out unresumable for now: %s", exc)
        self.down_until = time.monotonic() + REDIS_DOWN_SECONDS

    def create(self, owner, chat=None):
        if time.monotonic() < self.down_until:
            return None
        stream_id = new_stream_id()
        name, key = file_name(stream_id), self.key(file_name(stream_id))
        meta = {"owner": owner, "id": stream_id, "state": "running", "beat": time.time(), "stop": 0, "bell": self.bell}
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(f"{key}:meta", mapping=meta)
            pipe.expire(f"{key}:meta", self.running_ttl)
            if chat is not None:
                pipe.set(f"chat:resume:chat:{chat}", name, get=True, ex=self.running_ttl + int(self.keep))
            replies = pipe.execute()
        except self.errors as exc:
            self.failed(exc)
            return None
        self.listen()
        writer = self.producing[name] = RedisWriter(self, stream_id, name)
        if chat is not None and replies[2]:  # a new message supersedes the chat's previous stream
            self.stop_named(replies[2].decode(), owner, missing_ok=True)
        return writer

    def find(self, name, owner):
        try:
            meta = self.redis.hgetall(f"{self.key(name)}:meta")
        except self.errors as exc:
            self.failed(exc)
            raise LogRefusal(*UNAVAILABLE) from None
        if not meta or not hmac.compare_digest(meta.get(b"owner", b""), owner):
            raise LogRefusal(*NOT_FOUND)
        return meta

    def open(self, stream_id, owner, cursor):
        return self.open_named(file_name(stream_id), owner, cursor)

    def open_named(self, name, owner, cursor):
        meta = self.find(name, owner)
        key = self.key(name)
        try:
            if not self.resumable_from(key, cursor):
                raise LogRefusal(*UNAVAILABLE)
            pipe = self.redis.pipeline(transaction=False)
            pipe.zremrangebyscore(f"{key}:readers", "-inf", time.time())
            pipe.zcard(f"{key}:readers")
            if pipe.execute()[1] >= self.most_readers:
                raise LogRefusal(*BUSY)
            reader = RedisReader(self, key, meta[b"id"].decode(), cursor)
            reader.attend()
        except self.errors as exc:
            self.failed(exc)
            raise LogRefusal(*UNAVAILABLE) from None
        return reader

    def resumable_from(self, key, cursor):
        """Tell whether `cursor` is the start or an event's end, and still kept."""
        entries = self.redis.xrange(f"{key}:log", f"{cursor}-0", "+", count=1)
        if not entries:  # nothing at or after it: the start of a log with nothing in it yet, or beyond the end
            return cursor == 0
        entry_id, fields = entries[0]
        if b"d" not in fields:  # the end marker
            return int(entry_id.split(b"-")[0]) == cursor
        end = int(entry_id.split(b"-")[0])
        start = end - len(fields[b"d"])
        return start <= cursor and (cursor == end or cursor == start or fields[b"d"][: cursor - start][-2:] == b"\n\n")

    def stop(self, stream_id, owner):
        self.stop_named(file_name(stream_id), owner)

    def stop_named(self, name, owner, missing_ok=False):
        try:
            meta = self.find(name, owner)
        except LogRefusal:
            if missing_ok:
                return
            raise
        if meta.get(b"state") == b"done":
            return
        writer = self.producing.get(name)
        if writer is not None:
            writer.stop()
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(f"{self.key(name)}:meta", "stop", 1)
            pipe.xadd(meta[b"bell"].decode(), {"n": name}, maxlen=1000)
            pipe.expire(meta[b"bell"].decode(), 86400)
            pipe.execute()
        except self.errors as exc:
            self.failed(exc)

    def pointed(self, chat):
        try:
            name = self.redis.get(f"chat:resume:chat:{chat}")
        except self.errors as exc:
            self.failed(exc)
            return None
        return name.decode() if name else None

    def listen(self):
        """Answer this worker's bell (a stop asked on another VM or worker), once, lazily."""
        if not self.listening:
            self.listening = True
            threading.Thread(target=self.answer_bell, name="chat-resume-bell", daemon=True).start()

    def answer_bell(self):
        last = "$"
        while True:
            try:
                rung = self.redis.xread({self.bell: last}, block=int(self.heartbeat * 1000), count=100)
            except self.errors:
                time.sleep(1)
                continue
            for _, entries in rung or ():
                for entry_id, fields in entries:
                    last = entry_id
                    writer = self.producing.get(fields.get(b"n", b"").decode())
                    if writer is not None:
                        writer.stop()


class RedisWriter:
    """The producer's side of one stream in Redis: one XADD per upstream read."""

    def __init__(self, logs, stream_id, name):
        self.logs, self.stream_id, self.name, self.key = logs, stream_id, name, logs.key(name)
        self.position, self.next_beat, self.prefix = 0, 0.0, f"id: {stream_id}.".encode()
        self.stopping = self.done = self.broken = False
        self.on_stop = None

    def add(self, encoded):
        data, self.position = with_ids(self.prefix, self.position, encoded)
        if self.broken:
            return data
        cap = self.logs.cap
        trim = self.position - cap if self.position > cap else None  # keep the last CHAT_RESUME_MAX_BYTES
        try:
            pipe = self.logs.redis.pipeline(transaction=False)
            # An entry holds what one read brought, at most its last CHAT_RESUME_MAX_BYTES (its start is end - size).
            pipe.xadd(f"{self.key}:log", {"d": data[-cap:]}, id=f"{self.position}-0", minid=trim, approximate=False)
            if time.monotonic() >= self.next_beat:
                self.queue_beat(pipe)
            replies = pipe.execute()
        except self.logs.errors as exc:
            self.broke(exc)
            return data
        if len(replies) > 1 and replies[-1] == b"1":
            self.stop()
        return data

    def queue_beat(self, pipe):
        """Queue the heartbeat: the time, every key's TTL refreshed, and a look at the stop flag (last)."""
        self.next_beat = time.monotonic() + 1.0
        pipe.hset(f"{self.key}:meta", "beat", time.time())
        for part in ("log", "meta", "readers"):
            pipe.expire(f"{self.key}:{part}", self.logs.running_ttl)
        pipe.hget(f"{self.key}:meta", "stop")

    def beat(self):
        if self.done or self.broken:
            return
        try:
            pipe = self.logs.redis.pipeline(transaction=False)
            self.queue_beat(pipe)
            stop = pipe.execute()[-1]
        except self.logs.errors as exc:
            self.broke(exc)
            return
        if stop == b"1":
            self.stop()

    def broke(self, exc):
        """Redis failed mid-stream: the stream goes on live, unlogged (its readers elsewhere end with stream_lost)."""
        self.broken = True
        self.logs.failed(exc)

    def readers(self):
        if self.done or self.broken:
            return 0
        try:
            return self.logs.redis.zcount(f"{self.key}:readers", time.time(), "+inf")
        except self.logs.errors as exc:
            self.broke(exc)
            return 0

    def stop(self):
        if not self.stopping and not self.done:
            self.stopping = True
            if self.on_stop:
                self.on_stop()

    def finish(self):
        self.done = True
        self.logs.producing.pop(self.name, None)
        if self.broken:
            return
        keep = int(self.logs.keep) + 1
        try:
            pipe = self.logs.redis.pipeline(transaction=False)
            pipe.xadd(f"{self.key}:log", {"end": 1}, id=f"{self.position}-1")
            pipe.hset(f"{self.key}:meta", mapping={"state": "done", "finished_at": time.time()})
            for part in ("log", "meta", "readers"):
                pipe.expire(f"{self.key}:{part}", keep)
            pipe.execute()
        except self.logs.errors as exc:
            self.logs.failed(exc)


class RedisReader:
    """One reader of a stream in Redis, from a cursor: XREAD BLOCK, a heartbeat's wait at most."""

    def __init__(self, logs, key, stream_id, cursor):
        self.logs, self.key, self.stream_id, self.cursor = logs, key, stream_id, cursor
        self.last_id = f"{cursor}-0"
        self.me = secrets.token_hex(8)
        self.finished = self.lost = False
        self.next_attend = 0.0

    def attend(self):
        """Hold this reader's place among the stream's readers, for two heartbeats at a time."""
        self.next_attend = time.monotonic() + self.logs.heartbeat
        self.logs.redis.zadd(f"{self.key}:readers", {self.me: time.time() + 2 * self.logs.heartbeat + 1})

    def read(self, timeout):
        try:
            if time.monotonic() >= self.next_attend:
                self.attend()
            block = max(1, int(timeout * 1000))
            found = self.logs.redis.xread({f"{self.key}:log": self.last_id}, block=block, count=256)
            if not found:
                self.check_producer()
                return b""
        except self.logs.errors:
            self.lost = True  # Redis went away: nobody can tell how this stream goes on
            return b""
        out = []
        for entry_id, fields in found[0][1]:
            self.last_id = entry_id
            if b"d" not in fields:
                self.finished = True
                break
            data = fields[b"d"]
            end = int(entry_id.split(b"-")[0])
            start = end - len(data)
            if start > self.cursor:  # trimmed away before we read it: this reader fell too far behind
                raise LogRefusal(*UNAVAILABLE)
            out.append(data[self.cursor - start :])
            self.cursor = end
        return b"".join(out)

    def check_producer(self):
        meta = self.logs.redis.hmget(f"{self.key}:meta", "state", "beat")
        if meta[0] == b"done":
            self.finished = True
        elif meta[0] is None or time.time() - float(meta[1] or 0) > self.logs.lost_after:
            self.lost = True

    def last_id_line(self):
        return f"id: {event_id(self.stream_id, self.cursor)}\n".encode()

    def close(self):
        try:
            self.logs.redis.zrem(f"{self.key}:readers", self.me)
        except self.logs.errors:
            pass
