"""A TCP proxy on 127.0.0.1 between a client and a live server, to do to a stream what networks do.

It can pass the server's bytes on one at a time (every multi-byte character and every line then
arrives in pieces), keep a copy of what the server sent, and cut every connection at once, then
refuse new ones for a while, as a network that goes away and comes back.
"""

import socket
import struct
import threading
import time


class TcpProxy:
    """Forward 127.0.0.1:<its port> to 127.0.0.1:`port`; `split`: pass the server's bytes one by one."""

    def __init__(self, port, split=False, pause=0.0005):
        self.port, self.split, self.pause = port, split, pause
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent = bytearray()  # everything the server sent, through every connection
        self.open = set()
        self.lock = threading.Lock()
        self.down_until = 0.0
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed by stop()
                return
            if time.monotonic() < self.down_until:
                reset(client)
                continue
            server = socket.create_connection(("127.0.0.1", self.port))
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.open.update((client, server))
            threading.Thread(target=self.pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self.pipe, args=(server, client, True), daemon=True).start()

    def pipe(self, source, target, downstream):
        """Copy until either side closes, then close both (HTTP clients never half-close)."""
        try:
            while data := source.recv(65536):
                if downstream:
                    with self.lock:
                        self.sent += data
                if not (downstream and self.split):
                    target.sendall(data)
                    continue
                for i in range(len(data)):
                    target.sendall(data[i : i + 1])
                    time.sleep(self.pause)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
                with self.lock:
                    self.open.discard(sock)

    def cut(self, down_for=0.0):
        """Reset every open connection, and refuse new ones for `down_for` seconds."""
        self.down_until = time.monotonic() + down_for
        with self.lock:
            cut, self.open = self.open, set()
        for sock in cut:
            reset(sock)

    def stop(self):
        self.listener.close()
        self.cut()


def reset(sock):
    """Close with a TCP reset, as a dropped network path looks to both ends."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
