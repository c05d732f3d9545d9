"""gunicorn.conf.py as shipped, plus a look inside the worker for bench/inside.py: not for production.

    gunicorn -c bench/inside_conf.py 'app:create_app()' -w 1      (INSIDE_DIR=<a directory>)

Once the worker has loaded the app it starts tracemalloc (so only what comes after the start is
traced) and a greenlet that looks in INSIDE_DIR every 0.1 s for `<name>.want`: it then writes
`<name>.snapshot` (tracemalloc's, after a gc), `<name>.json` (RSS and its parts, the number of
live objects per type, every greenlet's saved stack) and removes the `.want`.
"""

import gc
import json
import os
import pathlib
import sys
import tracemalloc

exec(compile(pathlib.Path("gunicorn.conf.py").read_text(), "gunicorn.conf.py", "exec"))  # noqa: S102
shipped_post_worker_init = globals().get("post_worker_init")


def look(directory, name):
    """What this worker holds now: a tracemalloc snapshot and a JSON of its RSS, objects and greenlets."""
    from greenlet import greenlet

    gc.collect()
    tracemalloc.take_snapshot().dump(str(directory / f"{name}.snapshot"))
    objects = gc.get_objects()
    types = {}
    for obj in objects:
        kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
        types[kind] = types.get(kind, 0) + 1
    # type(), not isinstance(): the latter asks an object its __class__, which makes the openai
    # package's lazy module proxies (openai.beta, ...) import tens of MB of models.
    stacks = [g._stack_saved for g in objects if issubclass(type(g), greenlet)]
    status = {}
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmData"):
            status[key] = int(value.split()[0])
    traced, _ = tracemalloc.get_traced_memory()
    report = {"status_kb": status, "traced": traced, "types": types, "greenlet_stacks": stacks}
    report["modules"] = sorted(sys.modules)
    (directory / f"{name}.json").write_text(json.dumps(report))


def post_worker_init(worker):
    import gevent

    if shipped_post_worker_init:
        shipped_post_worker_init(worker)

    directory = pathlib.Path(os.environ["INSIDE_DIR"])
    tracemalloc.start(int(os.environ.get("INSIDE_FRAMES", 12)))

    def watch():
        while True:
            for want in directory.glob("*.want"):
                look(directory, want.stem)
                want.unlink()
            gevent.sleep(0.1)

    gevent.spawn(watch)
