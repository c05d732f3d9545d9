"""A real redis-server (Debian's package), on a free port, with nothing saved to disk."""

import shutil
from pathlib import Path

from live_servers import Servers, free_port, unavailable


def redis_binary():
    """Return redis-server's path; a missing one skips on a developer's machine and fails in CI."""
    path = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if path is None:
        unavailable("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    return path


class Redises(Servers):
    """redis-server in the foreground on 127.0.0.1, its (empty) working directory its own."""

    def start(self, name="redis"):
        binary = redis_binary()
        directory = self.tmp_path_factory.mktemp(name)
        port = free_port()
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", str(directory), "--daemonize", "no"]
        server = self.run(name, command, port, log_dir=directory, ready_path=None)
        server.redis_url = f"redis://127.0.0.1:{port}/0"
        return server
