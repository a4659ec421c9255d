"""An OpenAI-compatible backend stand-in for the gateway's tests (tests/releases/test_inference.py and
tests/e2e/test_inference_clients.py): a real HTTP server in a thread that records every request it receives and
answers what the test set. The engine itself is tested in tests/training and, behind the gateway, in e2e."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMPLETION = {"id": "cmpl-1", "object": "text_completion", "model": "m",
              "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def chat_chunk(content: str | None = None, *, finish: str | None = None, usage: dict | None = None) -> str:
    """One streamed chat event's `data:` payload, as our engine and vLLM send them."""
    choices = [] if usage else [{"index": 0, "delta": {} if content is None else {"content": content},
                                 "finish_reason": finish}]
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
                       "choices": choices, **({"usage": usage} if usage else {})})


class FakeUpstream:
    """By default every call gets COMPLETION. Set `status`, `body` (bytes) and `headers` for another answer, or
    `events` (the `data:` payloads, "[DONE]" included or not) to stream them, `gap` seconds apart. With `cut`, the
    answer promises more bytes than it sends: the connection breaks in the middle of the body. `hung_up` is set when
    the gateway closed a stream before its last event (a write to it failed): what cancels the engine's generation."""

    def __init__(self):
        self.requests: list[dict] = []
        self.status, self.body, self.headers = 200, None, {}
        self.events: list[str] | None = None
        self.gap = 0.0
        self.cut = False
        self.hung_up = threading.Event()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                upstream.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                if upstream.events is not None:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    if upstream.cut:
                        self.send_header("Content-Length", "1000000")
                    self.end_headers()  # else (HTTP/1.0) the body ends when the connection closes
                    try:
                        for index, event in enumerate(upstream.events):
                            if index and upstream.gap:
                                time.sleep(upstream.gap)
                            self.wfile.write(f"data: {event}\n\n".encode())
                            self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        upstream.hung_up.set()
                    return
                body = upstream.body if upstream.body is not None else json.dumps(COMPLETION).encode()
                self.send_response(upstream.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) + (1000 if upstream.cut else 0)))
                for key, value in upstream.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
