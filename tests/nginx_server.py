"""The real nginx, running the shipped nginx.conf with only its addresses and paths replaced."""

import os
import re
import shutil
import subprocess
from pathlib import Path

from live_servers import ROOT, Servers, free_port, unavailable

CONF = ROOT / "nginx.conf"


def nginx_binary():
    """Return nginx's path; a missing nginx skips on a developer's machine and fails in CI."""
    # Debian puts it in /usr/sbin, which only root's PATH has.
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if path is None:
        unavailable("nginx is not installed (apt-get install nginx; .ci/run does)")
    return path


def with_directive(old, new):
    """One replacement for `render`: a directive as nginx.conf has it, and what a test wants instead."""
    assert old in CONF.read_text(), f"nginx.conf no longer contains {old!r}"
    return (old, new)


def render(directory, port, app_servers, replace=()):
    """Write nginx.conf into `directory` listening on `port`, proxying to `app_servers`; return its path."""
    text = CONF.read_text()
    server_line = re.search(r"^(\s*)server 127\.0\.0\.1:8000( [^;\n]*)?;$", text, re.M)
    assert server_line, "nginx.conf has no `server 127.0.0.1:8000 ...;` line in its upstream block"
    indent, params = server_line.group(1), server_line.group(2) or ""
    servers = "\n".join(f"{indent}server {address}{params};" for address in app_servers)
    temp_paths = "".join(
        f"\n    {kind}_temp_path {directory}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    pairs = [
        (server_line.group(0), servers),
        ("listen 80;", f"listen 127.0.0.1:{port};"),
        ("/srv/chat/static", str(ROOT / "static")),
        ("/var/log/nginx/", f"{directory}/"),
        ("/run/nginx.pid", f"{directory}/nginx.pid"),
        # www-data cannot enter pytest's private temp dir; as non-root, `user` would only warn.
        ("user www-data;", "user root;" if os.geteuid() == 0 else ""),
        ("\nhttp {", "\nhttp {" + temp_paths),  # the compiled-in temp paths need root
        *replace,
    ]
    for old, new in pairs:
        assert old in text, f"nginx.conf no longer contains {old!r}"
        text = text.replace(old, new)
    path = Path(directory) / "nginx.conf"
    path.write_text(text)
    return path


def nginx_check(conf, directory):
    """Run `nginx -t` on `conf`, with its logs in `directory`."""
    command = [nginx_binary(), "-t", "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


class Nginxes(Servers):
    """nginx in the foreground on a free port, its config, logs and temp files in a directory of its own."""

    def start(self, name, app_servers, replace=()):
        """`app_servers`: live servers or `host:port` addresses; `replace`: `with_directive` pairs."""
        binary = nginx_binary()  # skip or fail before making a directory
        directory = self.tmp_path_factory.mktemp(name)
        port = free_port()
        addresses = [getattr(server, "address", server) for server in app_servers]
        conf = render(directory, port, addresses, replace)
        error_log = directory / "error.log"
        command = [binary, "-p", str(directory), "-e", str(error_log), "-c", str(conf), "-g", "daemon off;"]
        # Ready when the port accepts: no URL of the config under test is assumed to work.
        return self.run(name, command, port, log_dir=directory, ready_path=None, logs=[error_log])
