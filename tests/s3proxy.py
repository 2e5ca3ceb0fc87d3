"""A counting, delaying HTTP proxy in front of an S3 server (moto), for tests and bench.

Every request that passes is counted by method (``GET``, ``HEAD``...) and by kind (a
``LIST`` is a GET with ``list-type`` or a bucket-only path), and held ``delay`` seconds
before it is forwarded: the round trip of a real S3 region, which moto on loopback lacks.
It parses just enough HTTP/1.1 (request line, headers, ``Content-Length`` bodies) to find
where each request ends; responses are passed back untouched, so keep-alive works.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
import time


class CountingProxy:
    """``http://127.0.0.1:{port}`` forwarding to ``upstream`` (host, port)."""

    def __init__(self, upstream: tuple[str, int], delay: float = 0.0) -> None:
        self.upstream, self.delay = upstream, delay
        self.counts: collections.Counter[str] = collections.Counter()
        self.paths: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True, name="s3proxy").start()

    @property
    def total(self) -> int:
        """Requests forwarded since the last ``reset``."""
        with self._lock:
            return sum(self.counts.values())

    def reset(self) -> None:
        """Forget the counts so far."""
        with self._lock:
            self.counts.clear()
            self.paths.clear()

    def opened(self, name_part: str) -> int:
        """Requests for object keys containing ``name_part`` (a file's name)."""
        with self._lock:
            return sum(n for p, n in self.paths.items() if name_part in p)

    def close(self) -> None:
        """Stop accepting connections (open ones end with their clients)."""
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _count(self, head: bytes) -> None:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, target = [*line.split(" "), "", ""][:2]
        path, _, query = target.partition("?")
        kind = method
        if method == "GET" and ("list-type" in query or path.strip("/").count("/") == 0):
            kind = "LIST"
        with self._lock:
            self.counts[kind] += 1
            self.paths[path] += 1

    def _requests(self, src: socket.socket, dst: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = src.recv(1 << 16)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for header in head.split(b"\r\n")[1:]:
                    name, _, value = header.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                while len(buffer) < length:
                    chunk = src.recv(1 << 16)
                    if not chunk:
                        return
                    buffer += chunk
                body, buffer = buffer[:length], buffer[length:]
                self._count(head)
                if self.delay:
                    time.sleep(self.delay)
                dst.sendall(head + b"\r\n\r\n" + body)
        except OSError:
            pass
        finally:
            self._close(src, dst)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(1 << 16):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            self._close(src, dst)

    @staticmethod
    def _close(*sockets: socket.socket) -> None:
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
