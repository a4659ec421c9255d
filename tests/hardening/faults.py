"""Fault injection for the drills (tests/hardening/test_faults.py, tests/e2e/test_fault_drills.py).

- `TcpProxy`: a TCP proxy between a process and PostgreSQL or Redis that can be cut (every connection through
  it closed, new ones refused: what clients see while the service restarts) and restored, so a drill takes a
  dependency down without disturbing the shared servers.
- `WebhookReceiver`: a local HTTP receiver that counts what it received and acknowledged, and can hold the
  first request open (so a drill can kill the worker in the middle of delivering it).
- `python tests/hardening/faults.py worker <celery worker args>`: a Celery worker whose local weight storage
  stalls forever on `open` while the file named by $FAULTS_STALL_FLAG exists (after touching
  `$FAULTS_STALL_FLAG.reached`): a worker to `kill -9` in the middle of verifying a version.
- `sql(database_url, query)`: read a deployment's database directly (SQLite or PostgreSQL).
"""
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class TcpProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = 0
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._listener: socket.socket | None = None
        self._closed = False
        self.connections = 0  # accepted since start
        self._listen()

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:  # the listener was closed: cut or close
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            pair = (client, upstream)
            with self._lock:
                self._pairs.add(pair)
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        self._drop(pair)

    def _drop(self, pair) -> None:
        with self._lock:
            self._pairs.discard(pair)
        for sock in pair:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def cut(self) -> None:
        """The service goes away: new connections are refused and every open one is closed."""
        with self._lock:
            listener, self._listener = self._listener, None
            pairs = list(self._pairs)
        if listener is not None:
            listener.close()
        for pair in pairs:
            self._drop(pair)

    def restore(self) -> None:
        """The service is back, on the same port."""
        with self._lock:
            if self._listener is not None or self._closed:
                return
        deadline = time.time() + 10
        while True:
            try:
                self._listen()
                return
            except OSError:  # the port is still in TIME_WAIT somewhere: retry briefly
                if time.time() > deadline:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        self._closed = True
        self.cut()

    def url(self, template: str) -> str:
        """`template` with {port} replaced, e.g. "postgres://postgres@127.0.0.1:{port}/db"."""
        return template.format(port=self.port)


class WebhookReceiver:
    """Counts deliveries: `received` (every request, with its delivery id and body) and `acknowledged` (answered
    2xx). With hold_first, the first request is held without an answer until `release()`."""

    def __init__(self, *, hold_first: bool = False):
        self.received: list[dict] = []
        self.acknowledged: list[dict] = []
        self.first_arrived = threading.Event()
        self._release = threading.Event()
        self._hold_first = hold_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
                seen = {"delivery": self.headers.get("X-Gatehouse-Delivery"), "body": body,
                        "event": self.headers.get("X-Gatehouse-Event")}
                receiver.received.append(seen)
                if len(receiver.received) == 1 and receiver._hold_first:
                    receiver.first_arrived.set()
                    receiver._release.wait(60)
                    return  # the sender is gone by now; answer nothing
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                receiver.acknowledged.append(seen)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


def sql(database_url: str, query: str, params: tuple = ()) -> list[tuple]:
    if database_url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(database_url.removeprefix("sqlite:///"), timeout=30) as conn:
            return conn.execute(query.replace("%s", "?"), params).fetchall()
    import psycopg

    with psycopg.connect(database_url, connect_timeout=5) as conn:
        return conn.execute(query, params).fetchall()


def wait_until(predicate, *, timeout: float, what: str, interval: float = 0.25):
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    last = json.dumps(last, default=str)[:500]
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last})")


def _install_storage_stall() -> None:
    flag = os.environ.get("FAULTS_STALL_FLAG")
    if not flag:
        return
    from django.core.files.storage import FileSystemStorage

    original = FileSystemStorage.open

    def stalling_open(self, name, mode="rb"):
        if os.path.exists(flag):
            Path(flag + ".reached").write_text(name)
            while True:  # hold the task (and its unacknowledged message) until the drill kills this process
                time.sleep(1)
        return original(self, name, mode)

    FileSystemStorage.open = stalling_open


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _install_storage_stall()
    from celery.__main__ import main

    sys.argv = ["celery", "-A", "gatehouse", *sys.argv[1:]]
    sys.exit(main())
