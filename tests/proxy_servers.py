"""The real Caddy, HAProxy and Apache, each running the config the README gives for it (its ```caddyfile,
```haproxy and ```apache block, read from README.md as .ci/run reads the test command), with only its
addresses, certificate and log paths replaced, as nginx_server.py does for nginx.conf."""

import os
import re
import shutil
import signal
from pathlib import Path

from live_servers import ROOT, Servers, free_port, unavailable

APP = "127.0.0.1:8000"  # where the README's configs send requests: gunicorn's default bind
DOMAIN = "chat.example.com"


def readme_config(kind):
    """The README's one ```<kind> block: the config an operator copies is the one tested."""
    blocks = re.findall(rf"^```{kind}\n(.*?)^```$", (ROOT / "README.md").read_text(), re.M | re.S)
    assert len(blocks) == 1, f"README.md should have exactly one ```{kind} block, not {len(blocks)}"
    return blocks[0]


def with_directive(text, old, new):
    """One replacement in a config: a directive as it is written, and what a test wants instead."""
    assert old in text, f"the config no longer contains {old!r}"
    return text.replace(old, new)


def replaced(text, pairs):
    for old, new in pairs:
        text = with_directive(text, old, new)
    return text


def binary(name, package):
    """Return a program's path (Debian keeps some in /usr/sbin, only on root's PATH); a missing one skips
    on a developer's machine and fails in CI."""
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()), None)
    if path is None:
        unavailable(f"{name} is not installed (apt-get install {package}; .ci/run does)")
    return path


class Proxy:
    """What a test needs of a running proxy: its URLs, its log, and the server itself (a LiveServer)."""

    def __init__(self, server, tls_port, http_port=None):
        self.server, self.tls_port, self.http_port = server, tls_port, http_port
        self.https = f"https://127.0.0.1:{tls_port}/" if tls_port else None
        self.http = f"http://127.0.0.1:{http_port}/" if http_port else None

    def log(self):
        return self.server.log()


class Proxies(Servers):
    """Caddy, HAProxy or Apache in the foreground on free ports, config and logs in a directory of its own.

    `start_<proxy>(name, app, certificate, config=None, replace=())`: `app` a live server (or `host:port`),
    the README's config unless `config` (a naive one) is given, with `replace`'s (old, new) pairs;
    `certificate` (cert, key), or None for a config without TLS. Each returns a Proxy.
    """

    def start_caddy(self, name, app, certificate, config=None, replace=()):
        caddy = binary("caddy", "caddy")
        directory, tls_port = self.tmp_path_factory.mktemp(name), free_port()
        text = replaced(config or readme_config("caddyfile"), replace)
        site = f"https://127.0.0.1:{tls_port} {{\n\tbind 127.0.0.1\n\ttls {certificate[0]} {certificate[1]}"
        # No admin endpoint (its default port would clash between tests) and no redirect listener on :80.
        options = f"admin off\n\tauto_https disable_redirects\n\thttp_port {free_port()}"
        text = replaced(text, [(f"{DOMAIN} {{", site), ("email you@example.com", options), (APP, address(app))])
        path = directory / "Caddyfile"
        path.write_text(text)
        command = [caddy, "run", "--config", str(path), "--adapter", "caddyfile"]
        env = {**os.environ, "HOME": str(directory), "XDG_DATA_HOME": str(directory), "XDG_CONFIG_HOME": str(directory)}
        # SIGQUIT: Caddy's quick exit; on SIGTERM it would wait for the open streams.
        server = self.run(
            name, command, tls_port, log_dir=directory, env=env, ready_path=None, stop_signal=signal.SIGQUIT
        )
        return Proxy(server, tls_port)

    def start_haproxy(self, name, app, certificate, config=None, replace=()):
        haproxy = binary("haproxy", "haproxy")
        directory, http_port = self.tmp_path_factory.mktemp(name), free_port()
        text = replaced(config or readme_config("haproxy"), replace)
        pairs = [("log /dev/log local0", "log stderr format raw local0"), ("bind :80", f"bind 127.0.0.1:{http_port}")]
        pairs.append((APP, address(app)))
        if "user haproxy" in text:  # a test runs it without dropping root, or as a user who cannot
            pairs += [("    user haproxy\n", ""), ("    group haproxy\n", "")]
        if "maxconn 20000" in text:  # 2 descriptors per connection: more than this machine's hard limit allows
            pairs.append(("maxconn 20000", "maxconn 2000"))
        tls_port = None
        if certificate:
            tls_port, pem = free_port(), directory / "chat.pem"
            pem.write_bytes(Path(certificate[0]).read_bytes() + Path(certificate[1]).read_bytes())
            pairs.append(("bind :443 ssl crt /etc/haproxy/chat.pem", f"bind 127.0.0.1:{tls_port} ssl crt {pem}"))
        path = directory / "haproxy.cfg"
        path.write_text(replaced(text, pairs))
        command = [haproxy, "-db", "-f", str(path)]  # -db: in the foreground, logging to stderr
        server = self.run(name, command, http_port, log_dir=directory, ready_path=None)
        return Proxy(server, tls_port, http_port)

    def start_apache(self, name, app, certificate, config=None, replace=()):
        apache = binary("apache2", "apache2")
        directory, http_port = self.tmp_path_factory.mktemp(name), free_port()
        text = replaced(config or readme_config("apache"), replace)
        pairs = [("<VirtualHost *:80>", f"<VirtualHost 127.0.0.1:{http_port}>"), (APP, address(app))]
        tls_port = None
        if certificate:
            tls_port = free_port()
            pairs += [
                ("<VirtualHost *:443>", f"<VirtualHost 127.0.0.1:{tls_port}>"),
                (f"https://{DOMAIN}/", f"https://127.0.0.1:{tls_port}/"),
                (f"/etc/letsencrypt/live/{DOMAIN}/fullchain.pem", str(certificate[0])),
                (f"/etc/letsencrypt/live/{DOMAIN}/privkey.pem", str(certificate[1])),
            ]
        site = directory / "site.conf"
        site.write_text(replaced(text, pairs).replace(f"ServerName {DOMAIN}", "ServerName 127.0.0.1"))
        conf = directory / "apache2.conf"
        conf.write_text(apache_main_config(directory, [http_port, tls_port], site))
        command = [apache, "-f", str(conf), "-DFOREGROUND"]
        server = self.run(name, command, http_port, log_dir=directory, ready_path=None, logs=[directory / "error.log"])
        return Proxy(server, tls_port, http_port)


def address(app):
    return getattr(app, "address", app)


# The modules Debian's apache2 package enables, plus the README's `a2enmod proxy proxy_http http2 ssl headers`.
APACHE_MODULES = [
    "mpm_event", "authz_core", "authz_host", "mime", "filter", "deflate", "env", "setenvif", "alias",
    "proxy", "proxy_http", "http2", "ssl", "socache_shmcb", "headers",
]  # fmt: skip


def apache_main_config(directory, ports, site):
    """What Debian's /etc/apache2/apache2.conf and its enabled modules give a site file, in `directory`."""
    modules = "".join(f"LoadModule {m}_module /usr/lib/apache2/modules/mod_{m}.so\n" for m in APACHE_MODULES)
    listen = "".join(f"Listen 127.0.0.1:{port}\n" for port in ports if port)
    # www-data cannot enter pytest's private temp dir; the workers need nothing from it once started.
    user = "User nobody\nGroup nogroup\n" if os.geteuid() == 0 else ""
    return f"""ServerName 127.0.0.1
{listen}PidFile {directory}/apache2.pid
ErrorLog {directory}/error.log
DefaultRuntimeDir {directory}
Mutex file:{directory} default
{user}{modules}TypesConfig /etc/mime.types
# Debian's apache2.conf and mods-enabled/deflate.conf:
Timeout 300
KeepAlive On
KeepAliveTimeout 5
AddOutputFilterByType DEFLATE text/html text/plain text/xml text/css text/javascript application/javascript
SSLSessionCache shmcb:{directory}/ssl_scache(512000)
Include {site}
"""
