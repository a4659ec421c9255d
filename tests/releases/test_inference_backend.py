"""The gateway's HTTP client to its backends (releases/inference/backend.py), against real HTTP servers: chunked
streams (vLLM's framing; our engine's, until the connection closes, is covered through the gateway) come line by
line as they arrive, and plain calls reuse one kept-alive connection."""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from releases.inference import backend
from releases.inference.backend import BackendError, backend_post, line_batches, read_whole


@pytest.fixture
def server():
    """Handler behaviour is set per test on `state`; the server records each request's client port and body."""
    state = {"seen": [], "ports": [], "auth": [], "first_read": threading.Event(), "mode": "json"}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            state["seen"].append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            state["ports"].append(self.client_address[1])
            state["auth"].append(self.headers.get("Authorization"))
            if state["mode"] == "chunked":
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self._chunk(b"data: one\n\n")
                # The rest only once the client has the first event: a client that waited for more would hang here.
                assert state["first_read"].wait(10)
                for piece in (b"da", b"ta: two\r\n", b"\r\ndata: [DONE]"):  # a line split across chunks, CRLF, no end
                    self._chunk(piece)
                self._chunk(b"")
                return
            body = json.dumps({"ok": True}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body) + (5 if state["mode"] == "cut" else 0)))
            self.end_headers()
            self.wfile.write(body)
            if state["mode"] == "cut":
                self.close_connection = True

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/v1/completions"
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_a_chunked_stream_comes_line_by_line_as_it_arrives(server):
    server["mode"] = "chunked"
    response = backend_post(server["url"], {"model": "m", "stream": True})
    received = []
    for batch in line_batches(response):
        received += batch
        if "data: one" in batch:
            server["first_read"].set()
    response.close()
    assert response.status == 200
    assert received == ["data: one", "", "data: two", "", "data: [DONE]"]


def test_plain_calls_reuse_one_kept_alive_connection_and_send_the_body_as_json(server):
    for n in range(3):
        response = backend_post(server["url"], {"model": "m", "prompt": "é", "n": n}, api_key="k")
        assert json.loads(read_whole(response)) == {"ok": True}
    assert server["seen"] == [{"model": "m", "prompt": "é", "n": n} for n in range(3)]
    assert server["auth"] == ["Bearer k"] * 3
    assert len(set(server["ports"])) == 1, server["ports"]


def test_a_body_cut_short_is_a_backend_error(server):
    server["mode"] = "cut"
    response = backend_post(server["url"], {"model": "m"})
    with pytest.raises(BackendError):
        read_whole(response)


def test_a_backend_that_is_not_listening_is_a_backend_error(server):
    with pytest.raises(BackendError):
        backend_post("http://127.0.0.1:9/v1/completions", {"model": "m"})


def test_a_large_prompt_to_a_backend_slow_to_read_it_is_sent_under_the_read_timeout(monkeypatch):
    """Connecting has its short timeout; sending the body does not: a busy backend reads it late."""
    monkeypatch.setattr(backend, "CONNECT_TIMEOUT_SECONDS", 0.3)
    monkeypatch.setattr(backend, "_pools", None)  # a manager with that timeout, for this test only
    listener = socket.create_server(("127.0.0.1", 0))
    received = []

    def slow_backend():
        conn, _ = listener.accept()
        with conn:
            time.sleep(1.0)  # busy: the body waits in the socket buffers, which it overflows
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(body) < length:
                body += conn.recv(1 << 20)
            received.append(len(body))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")

    thread = threading.Thread(target=slow_backend, daemon=True)
    thread.start()
    prompt = "x" * (16 << 20)  # past what loopback's buffers hold
    response = backend_post(f"http://127.0.0.1:{listener.getsockname()[1]}/v1/completions", {"prompt": prompt})
    assert (response.status, read_whole(response)) == (200, b"{}")
    thread.join(10)
    listener.close()
    assert received and received[0] > len(prompt)


class _Reads:
    """A response whose body arrives in the given pieces."""

    def __init__(self, pieces):
        self.pieces = list(pieces)

    def read1(self, amount):
        return self.pieces.pop(0) if self.pieces else b""


def test_lines_are_whole_however_the_reads_cut_them_and_a_long_one_costs_its_length():
    text = b"data: one\r\n\ndata: " + b"y" * 100 + b"\n\ndata: [DONE]"
    for size in (1, 3, 7, 64):
        batches = list(line_batches(_Reads(text[i:i + size] for i in range(0, len(text), size))))
        assert [line for batch in batches for line in batch] == ["data: one", "", "data: " + "y" * 100, "",
                                                                  "data: [DONE]"]
    # 16 MiB in one line, read 16 KiB at a time: split anew on every read, that took 9.5 s.
    piece = b"z" * (16 << 10)
    started = time.perf_counter()
    batches = list(line_batches(_Reads([b"data: "] + [piece] * 1024 + [b"\n"])))
    assert time.perf_counter() - started < 3 and len(batches) == 1 and len(batches[0][0]) == 6 + (16 << 20)
