"""A local S3 server and a TCP proxy in front of it: what the object-storage tests and
bench.remote run against.

The server is moto's `ThreadedMotoServer` on 127.0.0.1, which keeps its objects in memory, so it
runs in the process that starts it and must outlive the jobs it serves (jobs are subprocesses
pointed at it through the environment). The proxy forwards every connection to the server,
optionally delayed (`latency`, added to each request on its way in: a round trip grows by that
much) or cut (`cut()` closes every open connection and refuses new ones until `restore()`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterator

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "babylm-kd-test", "AWS_SECRET_ACCESS_KEY": "babylm-kd-secret",
               "AWS_DEFAULT_REGION": "eu-west-1"}
"""Made-up credentials: moto accepts any; the tests check that none of them is ever written."""


class Proxy:
    """TCP proxy from 127.0.0.1:<port> to `target`, with added latency and outages."""

    def __init__(self, target: tuple[str, int], *, latency: float = 0.0):
        self.target, self.latency = target, latency
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._cut = threading.Event()
        threading.Thread(target=self._accept, name="proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Close every connection through the proxy and refuse new ones."""
        self._cut.set()
        with self._lock:
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._open.clear()

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, server))
            delayed: queue.Queue = queue.Queue()
            for target, args in ((self._read, (client, delayed)),
                                 (self._send_delayed, (delayed, server)),
                                 (self._pump, (server, client))):
                threading.Thread(target=target, args=args, daemon=True).start()

    def _read(self, source: socket.socket, delayed: queue.Queue) -> None:
        """Client to server: each piece stamped with the time it may leave (a delay line, so
        the latency adds to every request without slowing the bytes behind it)."""
        while data := _recv(source):
            delayed.put((time.monotonic() + self.latency, data))
        delayed.put((0.0, b""))

    def _send_delayed(self, delayed: queue.Queue, sink: socket.socket) -> None:
        while True:
            due, data = delayed.get()
            if not data:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                sink.sendall(data)
            except OSError:
                break
        _close(sink)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while data := _recv(source):
            try:
                sink.sendall(data)
            except OSError:
                break
        _close(sink)


def _recv(conn: socket.socket) -> bytes:
    try:
        return conn.recv(1 << 16)
    except OSError:
        return b""


def _close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
    conn.close()


@dataclass
class ObjectStore:
    """A running S3 server with a proxy in front: `url` reaches it through the proxy, `env` is
    what a job needs in its environment to use it, `bucket` exists."""

    server: object
    proxy: Proxy
    bucket: str

    @property
    def url(self) -> str:
        return self.proxy.url

    @property
    def env(self) -> dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.url}

    def options(self, *, fail_fast: bool = False) -> dict:
        """fsspec storage_options reaching the server through the proxy; fail_fast: one attempt
        per request (s3fs still retries a few times, ~2 s in all) and short timeouts, for tests
        that cut the connection."""
        options: dict = {"endpoint_url": self.url, "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                         "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                         "client_kwargs": {"region_name": CREDENTIALS["AWS_DEFAULT_REGION"]}}
        if fail_fast:
            options.update(config_kwargs={
                "connect_timeout": 2, "read_timeout": 5,
                "retries": {"max_attempts": 1, "mode": "standard"}})
        return options


@contextlib.contextmanager
def object_store(bucket: str = "babylm-kd", *, latency: float = 0.0) -> Iterator[ObjectStore]:
    """Start moto's S3 server on 127.0.0.1 and a proxy in front of it; make `bucket` (the
    servers of one process share their objects: moto keeps them in one place per process)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    proxy = Proxy(server.get_host_and_port(), latency=latency)
    store = ObjectStore(server=server, proxy=proxy, bucket=bucket)
    try:
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True, **store.options())
        fs.makedirs(bucket, exist_ok=True)  # moto's objects are per process, not per server
        yield store
    finally:
        proxy.close()
        server.stop()
