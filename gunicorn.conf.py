"""gunicorn settings for long-lived SSE streams: `gunicorn -c gunicorn.conf.py 'app:create_app()'`.

Every setting can be overridden from the environment (names below) or the command line
(`-b 0.0.0.0:8000`, `-w 4`); GUNICORN_CMD_ARGS works too. Do not import the app here: gevent
must patch the standard library before `ssl` and the openai SDK are imported, which the gevent
worker does after it forks.

Laid out like gunicorn's own example_config.py: each setting with why, and its safe range.
Reference: https://gunicorn.org/reference/settings/
"""

import ctypes.util
import os
import shutil
import tempfile

#
# Server socket
#
#   bind - Where to listen. nginx proxies to this address: keep it on loopback unless nginx runs on
#       another machine (then the private address, e.g. 0.0.0.0:8000 behind a firewall, and set
#       FORWARDED_ALLOW_IPS below to nginx's address).
#
#   backlog - Connections the kernel queues before a worker accepts them. A deploy or a burst of
#       new chats arrives all at once; past the backlog, clients get refused. The kernel caps it at
#       net.core.somaxconn (4096 since Linux 5.4, 128 before): raise that too on an old kernel.
#       Range 64-8192.
#

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
backlog = int(os.environ.get("GUNICORN_BACKLOG", 2048))

#
# Worker processes
#
#   worker_class - gevent: each open stream is a greenlet of a few KB, not a thread, so one worker
#       holds thousands. A sync or gthread worker holds one stream per thread and stops streaming
#       when they run out.
#
#   workers - One per core: a worker is one process on one core, whatever its number of streams.
#       WEB_CONCURRENCY is the conventional name (gunicorn reads it too). Range 1 to 2 x cores.
#
#   worker_connections - Connections one worker holds at once: open streams plus idle keep-alive
#       connections from nginx. Past it, the worker stops accepting until one closes, so keep the
#       app's CHAT_MAX_STREAMS below it (by nginx's `keepalive`, 32 per nginx worker) for its 503
#       to answer first. Each stream costs 3 file descriptors (the client's socket, the one to the
#       model, and its resume log's mapping: Python's mmap keeps a descriptor of its own), so the
#       process's descriptor limit (systemd LimitNOFILE, `ulimit -n`) must exceed 3 x
#       worker_connections plus slack (~100 for logs, the listening socket, the SDK's pool); the
#       README's unit sets 65536. Range 100-10000 per worker.
#
#   timeout - NOT the length of a request. For gevent workers it is the worker process's heartbeat:
#       the master kills a worker that has not checked in for this many seconds, i.e. one whose
#       event loop is blocked (CPU-bound code, a call gevent did not patch). A stream of any length
#       is fine; raising this only delays the restart of a stuck worker. Range 10-120.
#
#   graceful_timeout - On SIGTERM (`systemctl restart`) and for the old workers of a reload (HUP,
#       `systemctl reload`), workers stop accepting and give running streams this long to finish
#       before they are killed. A long reply from a slow model
#       takes one to two minutes, so 120 s lets it end normally instead of being cut mid-sentence.
#       The systemd unit's TimeoutStopSec must be above it (the README's says 150). Range 30-600.
#
#   keepalive - Seconds an idle connection from nginx stays open for the next request. Behind nginx
#       it must outlast nginx's own upstream `keepalive_timeout` (4 s in nginx.conf), so that nginx,
#       not gunicorn, closes idle connections and a POST never lands on one gunicorn is closing
#       (nginx does not resend a POST). Keep it short all the same: on SIGTERM a worker waits for
#       its idle connections as for running streams, so this delays the end of a deploy.
#       Range 2 (no proxy in front) to 75; always above the proxy's idle timeout.
#

worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 1))
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", 1000))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", 30))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", 120))
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", 5))

#
# Loading the application
#
#   preload_app - Never True: the app (and the openai SDK, and ssl) would be imported in the master
#       before gevent patches them, and streams would block each other.
#

preload_app = False

#
# Behind a proxy
#
#   forwarded_allow_ips - Addresses whose X-Forwarded-Proto (and the like) gunicorn believes, so
#       the app sees `https` when nginx terminated TLS. Only nginx: anyone else could claim https.
#       The same machine by default; nginx's address when it runs elsewhere. Never "*" on a port
#       others can reach.
#

forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")

#
# Logging
#
#   access_log_format - One line per request when it ends; for a stream that is when the stream
#       ends, so %(M)s (milliseconds) is the stream's whole duration. %(h)s is nginx's address,
#       %({x-forwarded-for}i)s the browser's, %({x-request-id}i)s the id in nginx's own log line.
#
#   logconfig_dict - Send the application's "chat" log (one line per stream) to stderr with
#       gunicorn's own lines, and the access log to stdout; journald keeps both. (Setting it turns
#       the access log on, so `accesslog` is not needed.)
#
#   control_socket_disable - gunicorn's control socket ($HOME/.gunicorn/gunicorn.ctl) is one path
#       per user: two instances on one machine would fight over it. Turn it back on if you use
#       gunicornc.
#

access_log_format = '%(h)s %({x-forwarded-for}i)s "%(r)s" %(s)s %(B)s %(M)sms rid=%({x-request-id}i)s "%(a)s"'

logconfig_dict = {
    "root": {"level": "INFO", "handlers": ["error_console"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "propagate": True},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
        "httpx2": {"level": "WARNING"},  # the SDK's HTTP client logs every request at INFO
    },
}

control_socket_disable = True

#
# Metrics, the doctor and resumable streams
#
#   on_starting - Give the workers one directory to share, new and empty for each start of the
#       master: prometheus_client's multiprocess mode (CHAT_METRICS) keeps each worker's figures in
#       files there, and /metrics adds up all of them whichever worker answers; the diagnostic
#       stream leaves there how it ended, for the doctor's next request. prometheus_client reads
#       its name from PROMETHEUS_MULTIPROC_DIR, which the workers inherit. Unset: a new temporary
#       directory (private to the service under the README's systemd unit), removed on exit. Set:
#       that directory, emptied of the last run's files (stale counts would be added in), e.g.
#       /run/chat with RuntimeDirectory=chat in the unit. Never a directory two masters share.
#       Its `resume` directory (CHAT_RESUME_DIR, unless set) holds the log of every stream (resume.py),
#       so that a reader who comes back finds its stream whichever worker it lands on; emptied too.
#
#   child_exit - A worker exited or was killed: its open-streams gauge must go, or /metrics would
#       count its streams as open for ever. (Its counters stay: totals never go down.) Only a worker
#       that kept metrics left files to drop, so the master imports prometheus_client only then.
#
#   on_exit - Remove the temporary directory on_starting made.
#


def on_starting(server):
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    path = given or tempfile.mkdtemp(prefix="chat-")
    os.makedirs(path, exist_ok=True)
    for entry in os.scandir(path):
        if entry.name.endswith(".db") or entry.name.startswith("diagnostic-"):
            os.remove(entry.path)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    server.made_metrics_dir = None if given else path
    logs = os.environ.get("CHAT_RESUME_DIR") or os.path.join(path, "resume")
    os.makedirs(logs, exist_ok=True)
    for entry in os.scandir(logs):
        if entry.name.endswith((".log", ".chat")) or entry.name.startswith("bell-"):
            os.remove(entry.path)
    os.environ["CHAT_RESUME_DIR"] = logs


def child_exit(server, worker):
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if any(entry.name.endswith(f"_{worker.pid}.db") for entry in os.scandir(path)):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid, path)


def on_exit(server):
    if getattr(server, "made_metrics_dir", None):
        shutil.rmtree(server.made_metrics_dir, ignore_errors=True)


#
# Memory
#
#   post_worker_init - Every TRIM_SECONDS (GUNICORN_TRIM_SECONDS, 60; 0: never), hand the heap glibc
#       has freed back to the system (malloc_trim). A flood of bodies trickled in and cut with 408,
#       or of streams that hang up, frees its memory, but in pieces glibc keeps: a worker's RSS grew
#       61 -> 84, 98, 104, 112 MB over four rounds of 900 such bodies, though Python's own objects
#       (tracemalloc) stayed flat. Trimmed, it levels off after the first round. It runs in a
#       greenlet of its own, so between requests, never inside one; a trim of 65 MB takes ~2 ms.
#       Only with glibc (Debian, Ubuntu, Fedora); elsewhere nothing is done.
#

trim_seconds = float(os.environ.get("GUNICORN_TRIM_SECONDS", 60))


def post_worker_init(worker):
    libc = ctypes.util.find_library("c")
    malloc_trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim_seconds > 0 and malloc_trim is not None:
        import gevent  # the worker's: gevent has patched the standard library by now

        def trim_now_and_then():
            while True:
                gevent.sleep(trim_seconds)
                malloc_trim(0)

        gevent.spawn(trim_now_and_then)
