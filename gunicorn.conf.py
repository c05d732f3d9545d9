"""gunicorn settings for long-lived SSE streams: `gunicorn -c gunicorn.conf.py app:app`.

Every setting can be overridden from the environment (names below) or the command line
(`-b 0.0.0.0:8000`, `-w 4`); GUNICORN_CMD_ARGS works too. Do not import the app here: gevent
must patch the standard library before `ssl` and the openai SDK are imported, which the gevent
worker does after it forks.
"""

import os

# Where to listen. nginx proxies to this address; keep it on loopback unless nginx runs elsewhere.
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")

# gevent: each open stream is a greenlet of a few KB, not a thread, so one worker holds thousands.
# A sync or gthread worker holds one stream per thread and stops streaming when they run out.
worker_class = "gevent"

# One worker per core: a worker is one process on one core, whatever its number of streams.
# (WEB_CONCURRENCY is the conventional name, read by gunicorn itself too.)
workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 1))

# Concurrent connections (open streams plus idle keep-alive sockets) per worker. Range 100-10000.
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", 1000))

# Never set preload_app = True: the app (and the openai SDK, and ssl) would be imported in the
# master before gevent patches them, and streams would block each other.
preload_app = False

# gunicorn's control socket ($HOME/.gunicorn/gunicorn.ctl) is one path per user: two instances on
# one machine would fight over it. Turn it back on if you use gunicornc.
control_socket_disable = True

# Send the application's "chat" log (one line per stream) to stderr with gunicorn's own lines.
logconfig_dict = {
    "root": {"level": "INFO", "handlers": ["error_console"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "propagate": True},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
        "httpx2": {"level": "WARNING"},  # the SDK's HTTP client logs every request at INFO
    },
}
