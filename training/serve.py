"""The engine as a process speaking OpenAI-compatible HTTP on loopback, so the platform's gateway can talk to
it exactly as it talks to a vLLM server:

    python -m training serve --model runs/r1/export --model-id aurora/coder --port 8100

GET /v1/models, /v1/models/{id}, /health, /metrics; POST /v1/completions and /v1/chat/completions (with
`"stream": true` as server-sent events, `stream_options.include_usage` adding a usage chunk, and
`continuous_usage_stats` too, as vLLM, usage in every chunk; log probabilities and echo streamed too, each
token's entry in a chunk; `n` choices generated together, streamed by index). Errors use
OpenAI's shape. A client that goes away cancels its request at the next decode step, streaming or not; when
`max_waiting` requests already wait for a slot, a new one is refused with 503 and Retry-After instead of queued.
"""
import dataclasses
import json
import os
import queue
import select
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

from training.config import ConfigError
from training.engine import SEED_RANGE, Engine, EngineError, Request, SamplingParams

MAX_BODY_BYTES = 4 * 1024 * 1024
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
GET_PATHS = ("/health", "/metrics", "/v1/models")  # and /v1/models/{id}
# Requests waiting for a slot before new ones are refused: past a few hundred, a client would wait minutes.
MAX_WAITING = 256
# How often a handler waiting on the engine checks whether its client has gone (a cancel frees the slot).
POLL_SECONDS = 0.1
# Choices one request may ask for (prompts x n): a batch of prompts, as lm-evaluation-harness sends, queues them all.
MAX_CHOICES = 256


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sampling_from(body: dict, *, chat: bool) -> SamplingParams:
    def number(name, default, kind=float):
        value = body.get(name, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise ApiError(400, f"{name} must be a{'n integer' if kind is int else ' number'}.", code="invalid_value",
                           param=name)
        return kind(value)
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)):
        raise ApiError(400, "stop must be a string or a list of strings.", code="invalid_value", param="stop")
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: generate exactly max_tokens (benchmarks)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "ignore_eos must be true or false.", code="invalid_value", param="ignore_eos")
    # Log probabilities: completions ask with logprobs=n (alternatives per token) and echo for the prompt's too;
    # chats with logprobs=true and top_logprobs=n.
    if chat:
        wanted = body.get("logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise ApiError(400, "logprobs must be true or false.", code="invalid_value", param="logprobs")
        if body.get("top_logprobs") and wanted is not True:  # 0 asks for nothing
            raise ApiError(400, "top_logprobs needs logprobs: true; set both, or leave top_logprobs out.",
                           code="invalid_value", param="top_logprobs")
        logprobs = number("top_logprobs", 0, int) if wanted else None
    else:
        logprobs = number("logprobs", None, int)
    echo = body.get("echo", False)
    if not isinstance(echo, bool) or (chat and echo):
        raise ApiError(400, "echo is a completions option: true or false.", code="invalid_value", param="echo")
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict) or not all(isinstance(t, str) and t.isascii() and t.isdigit() for t in bias):
        raise ApiError(400, 'logit_bias maps token ids to a bias from -100 to 100, e.g. {"50256": -100}.',
                       code="invalid_value", param="logit_bias")
    top_k = number("top_k", 0, int)
    top_k = 0 if top_k == -1 else top_k  # vLLM's way to say no top-k, which some clients send
    limit = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    # Without a limit a chat may use the rest of the context (the engine computes it), as vLLM does; a fixed
    # default would refuse every chat on a model whose context is shorter. Completions keep OpenAI's 16.
    return SamplingParams(max_tokens=number(limit, None if chat else 16, int), temperature=number("temperature", 1.0),
                          top_p=number("top_p", 1.0), top_k=top_k, stop=tuple(stop),
                          seed=number("seed", None, int), ignore_eos=ignore_eos, logprobs=logprobs,
                          prompt_logprobs=echo and logprobs is not None, logit_bias={int(t): b for t, b in bias.items()},
                          presence_penalty=number("presence_penalty", 0.0),
                          frequency_penalty=number("frequency_penalty", 0.0))


def _choice_seed(seed, index: int):
    """Choice i's seed: seed + i, past the largest seed round to the smallest (an out-of-range seed is left for the
    engine to refuse)."""
    if not isinstance(seed, int) or not index:
        return seed
    low, high = SEED_RANGE
    return seed + index if seed + index <= high or seed > high else seed + index - (high - low + 1)


def _is_token(value, vocab_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size


class EngineServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default listen backlog of 5 reset connections when 50 clients arrived at once

    def __init__(self, address, engine: Engine, model_id: str):
        super().__init__(address, Handler)
        self.engine, self.model_id, self.created = engine, model_id, int(time.time())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY each keep-alive response waits ~40 ms
    # for the client's delayed ACK.
    disable_nagle_algorithm = True
    server: EngineServer

    def log_message(self, format, *args):  # one line per request is the gateway's job
        pass

    # --- plumbing -------------------------------------------------------------------------------------------
    def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _send(self, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self._body_unread():
            # Answered before its body was read (a wrong route, a body too large): on a kept-alive connection the
            # rest of it would be taken for the next request.
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def parse_request(self) -> bool:
        self._body_read = False  # per request: a kept-alive connection reuses this handler
        return super().parse_request()

    def _body_unread(self) -> bool:
        if self._body_read:
            return False
        return self.headers.get("Content-Length", "0") != "0" or "chunked" in self._transfer_encoding()

    def _transfer_encoding(self) -> str:
        return self.headers.get("Transfer-Encoding", "").lower()

    def _guard(self, handler) -> None:
        self._streaming = False  # once an event stream has begun, an error can no longer be a JSON response
        try:
            handler()
        except ApiError as exc:
            self._json(exc.status, exc.body)
        except EngineError as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
            self._json(exc.status, {"error": {"message": str(exc), "param": exc.param, "code": exc.code,
                                              "type": "invalid_request_error" if exc.status < 500 else "server_error"}},
                       headers)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:
            # A bug: answer it as one. A dropped connection would read as "engine down" to the gateway (503) and
            # be retried by the openai client; a 500 with OpenAI's shape says what happened.
            print(f"engine: {self.command} {self.path} failed", file=sys.stderr, flush=True)
            traceback.print_exc()
            self.close_connection = True  # the body may be unread, or a stream half sent
            if self._streaming:
                return
            try:
                self._json(500, {"error": {"message": "The engine server failed on this request (a bug, logged on "
                                                      "the server); retrying will not help until it is fixed.",
                                           "type": "server_error", "param": None, "code": "internal_error"}})
            except OSError:
                pass

    def _client_gone(self) -> bool:
        """Whether the client has closed its connection: readable with nothing to read is end of file. (A client
        that sends more while it waits, a pipelined request, is still there.)"""
        try:
            poller = select.poll()  # not select.select: it cannot watch descriptors past 1023, which a busy server has
            poller.register(self.connection, select.POLLIN)
            return bool(poller.poll(0)) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:  # reset, or already closed
            return True

    def _body(self) -> dict:
        too_large = ApiError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.", code="request_too_large")
        if "chunked" in self._transfer_encoding():
            raw = self._chunked_body(too_large)
        else:
            declared = self.headers.get("Content-Length") or "0"
            if not declared.isdigit():
                raise ApiError(400, f"Content-Length must be a number of bytes, not {declared[:40]!r}.",
                               code="invalid_value")
            if int(declared) > MAX_BODY_BYTES:
                raise too_large
            raw = self.rfile.read(int(declared))
        self._body_read = True
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise ApiError(400, "The body must be JSON.", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The body must be a JSON object.", code="invalid_json")
        return body

    def _chunked_body(self, too_large: "ApiError") -> bytes:
        """A body sent in chunks (Transfer-Encoding: chunked), which vLLM's server takes too; at most MAX_BODY_BYTES."""
        parts, size = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                length = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ApiError(400, "The chunked request body is malformed.", code="invalid_body") from None
            if length == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailer fields, if any
                    pass
                return b"".join(parts)
            size += length
            if size > MAX_BODY_BYTES:
                raise too_large
            parts.append(self.rfile.read(length))
            self.rfile.readline(1024)  # the line end after the chunk

    def _model_object(self) -> dict:
        return {"id": self.server.model_id, "object": "model", "created": self.server.created, "owned_by": "gatehouse",
                "root": self.server.model_id, "parent": None, "max_model_len": self.server.engine.max_seq_len}

    # --- routes ---------------------------------------------------------------------------------------------
    def do_GET(self):
        self._guard(self._get)

    do_HEAD = do_GET  # a load balancer's check: the GET's status and headers, no body (see _send)

    def _not_allowed(self):
        """Any other method: OpenAI's error shape, not the standard library's HTML page (a 404 off every route)."""
        path = unquote(self.path.split("?", 1)[0])
        allowed = "POST" if path in GENERATION_PATHS else "GET, HEAD" if (
            path in GET_PATHS or path.startswith("/v1/models/")) else None
        if allowed is None:
            return self._no_route(path)
        self._json(405, {"error": {"message": f"{self.command} is not allowed on {path}; use {allowed}.",
                                   "type": "invalid_request_error", "param": None, "code": "method_not_allowed"}},
                   {"Allow": allowed})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _no_route(self, path: str) -> None:
        self._json(404, {"error": {"message": f"No route {path}.", "type": "invalid_request_error", "param": None,
                                   "code": "not_found"}})

    def _get(self):
        path = unquote(self.path.split("?", 1)[0])
        engine = self.server.engine
        if path == "/health":
            if engine.failure:
                return self._json(503, {"status": "failed", "model": self.server.model_id, "error": engine.failure})
            return self._json(200, {"status": "ok", "model": self.server.model_id, "active": len(engine.active),
                                    "waiting": len(engine.waiting), "decode": engine.decode_mode})
        if path == "/metrics":
            lines = [f"# TYPE engine_{k}_total counter\nengine_{k}_total {v}" for k, v in engine.stats.items()]
            lines += [f"engine_active_requests {len(engine.active)}", f"engine_waiting_requests {len(engine.waiting)}"]
            return self._send(200, ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4")
        if path == "/v1/models":
            return self._json(200, {"object": "list", "data": [self._model_object()]})
        if path == f"/v1/models/{self.server.model_id}":
            return self._json(200, self._model_object())
        if path in GENERATION_PATHS:
            return self._not_allowed()
        self._no_route(path)

    def do_POST(self):
        path = unquote(self.path.split("?", 1)[0])
        if path == "/v1/completions":
            return self._guard(lambda: self._generate(chat=False))
        if path == "/v1/chat/completions":
            return self._guard(lambda: self._generate(chat=True))
        self._not_allowed()

    def _generate(self, *, chat: bool) -> None:
        body = self._body()
        engine = self.server.engine
        if body.get("model") not in (None, self.server.model_id):
            raise ApiError(404, f"The model {body.get('model')!r} does not exist here; this server serves "
                                f"{self.server.model_id!r}.", code="model_not_found", param="model")
        n = body.get("n", 1) if body.get("n") is not None else 1
        # The choices are decoded together, and wait in the queue together first (--max-waiting may be the smaller).
        most = min(engine.max_batch, engine.max_waiting or engine.max_batch)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= most:
            raise ApiError(400, f"n must be an integer from 1 to {most} (the choices are generated together).",
                           code="invalid_value", param="n")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "messages must be a non-empty list.", code="invalid_value", param="messages")
            prompts, echoes = [engine.encode_chat(messages)], [None]
        else:
            prompts, echoes = self._completion_prompts(body.get("prompt"), n, echo=body.get("echo") is True)
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):  # checked before anything is queued
            raise ApiError(400, 'stream_options must be an object, e.g. {"include_usage": true}.',
                           code="invalid_value", param="stream_options")
        if body.get("stream") is not None and not isinstance(body["stream"], bool):  # "false" is a true value
            raise ApiError(400, "stream must be true or false.", code="invalid_value", param="stream")
        params, stream = sampling_from(body, chat=chat), bool(body.get("stream"))
        # The n choices of each prompt: n requests of it, each its own sample (a seed gives choice i seed + i, so
        # seeded choices differ from one another and repeat from call to call); choice k * n + i is prompt k's i-th,
        # as OpenAI numbers them. One event wakes their reader.
        wake, requests = threading.Event(), []
        echoes = [echo for echo in echoes for _ in range(n)]
        try:
            for prompt_ids in prompts:
                for i in range(n):
                    requests.append(engine.submit(prompt_ids, dataclasses.replace(
                        params, seed=_choice_seed(params.seed, i)), stream=stream, wake=wake))
        except BaseException:
            for request in requests:  # all the choices or none
                request.cancel()
            raise
        ident = ("chatcmpl-" if chat else "cmpl-") + requests[0].id
        if stream:
            include_usage = bool(options.get("include_usage"))
            # vLLM's continuous_usage_stats: usage in every chunk, so whoever meters a client that leaves early
            # knows the prompt it paid for, not only the tokens it saw.
            continuous = include_usage and bool(options.get("continuous_usage_stats"))
            return self._stream(requests, n, wake, ident, chat=chat, include_usage=include_usage,
                                continuous=continuous, echoes=echoes)
        for request in requests:
            while not request.done.wait(timeout=POLL_SECONDS):
                if self._client_gone():  # nobody will read the answer: free the slots at the next step
                    for each in requests:
                        each.cancel()
                    self.close_connection = True
                    return
        if any(request.finish_reason == "error" for request in requests):
            raise EngineError(f"The engine failed while generating ({engine.failure}); retry shortly.",
                              code="engine_failed", status=503)
        self._json(200, self._final(requests, n, ident, chat=chat, echoes=echoes))

    def _completion_prompts(self, prompt, n: int, *, echo: bool) -> tuple[list[list[int]], list[str | None]]:
        """A completions prompt as OpenAI takes it: a string, token ids (as lm-evaluation-harness sends them: used as
        they are), or a list of either; and each one's echoed text."""
        engine = self.server.engine
        many = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)
        # Every choice waits in the engine's queue at once: more than it holds could never be admitted.
        most = min(MAX_CHOICES, engine.max_waiting or MAX_CHOICES)
        if many and len(prompt) * n > most:  # before encoding any of them
            raise ApiError(400, f"{len(prompt)} prompts x n={n} asks for {len(prompt) * n} choices; at most {most} "
                                "in one request: split the prompts.", code="invalid_value", param="prompt")
        prompts, echoes = [], []
        for one in (prompt if many else [prompt]):
            if isinstance(one, str):
                prompts.append(engine.encode(one))  # with the BOS the tokenizer adds, if it adds one
                echoes.append(one if echo else None)
            elif isinstance(one, list) and one and all(_is_token(t, engine.config.vocab_size) for t in one):
                prompts.append(list(one))
                echoes.append(engine.decode(one) if echo else None)
            else:
                raise ApiError(400, f"prompt must be a string, a list of token ids (0 to "
                                    f"{engine.config.vocab_size - 1}) or a list of either.", code="invalid_value",
                               param="prompt")
        return prompts, echoes

    def _usage(self, requests: list[Request], n: int) -> dict:
        """Each prompt counted once, as OpenAI counts it for n choices; how much of them the prefix cache held, as
        OpenAI reports it (prompt_tokens_details.cached_tokens)."""
        firsts = requests[::n]
        prompt, completion = sum(len(r.prompt_ids) for r in firsts), sum(len(r.output_ids) for r in requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in firsts)}}

    def _final(self, requests: list[Request], n: int, ident: str, *, chat: bool, echoes: list) -> dict:
        created, model = int(requests[0].created), self.server.model_id
        wanted = requests[0].params.logprobs is not None
        choices = []
        for index, request in enumerate(requests):
            if chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": request.text},
                                "finish_reason": request.finish_reason,
                                "logprobs": self._chat_logprobs(request.output_ids, request.logprobs) if wanted
                                else None})
                continue
            logprobs, echoed = None, echoes[index]
            if wanted:
                echo = echoed is not None
                ids = (request.prompt_ids if echo else []) + request.output_ids
                # With echo the prompt's tokens come first, the very first without a probability (nothing precedes).
                entries = ([(None, None)] + request.prompt_logprobs if echo else []) + request.logprobs
                logprobs, _ = self._completion_logprobs(ids, entries)
            choices.append({"index": index, "text": (echoed or "") + request.text,
                            "finish_reason": request.finish_reason, "logprobs": logprobs})
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model, "choices": choices, "usage": self._usage(requests, n)}

    def _completion_logprobs(self, ids: list[int], entries: list, offset: int = 0) -> tuple[dict, int]:
        """The legacy completions shape (as OpenAI and vLLM): per token its text, log probability, likeliest
        alternatives and offset in the returned text (a stream's chunks continue from `offset`); and the offset
        after the last token."""
        token = self.server.engine.token_text
        tokens, offsets = [], []
        for token_id in ids:
            tokens.append(token(token_id))
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [logprob for logprob, _ in entries],
                "top_logprobs": [None if top is None else {token(t): value for t, value in top} for _, top in entries],
                "text_offset": offsets}, offset

    def _chat_logprobs(self, ids: list[int], entries: list) -> dict:
        token = self.server.engine.token_text

        def entry(token_id, logprob):
            text = token(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return {"content": [entry(t, logprob) | {"top_logprobs": [entry(a, value) for a, value in top]}
                            for t, (logprob, top) in zip(ids, entries)]}

    def _stream(self, requests: list[Request], n: int, wake: threading.Event, ident: str, *, chat: bool,
                include_usage: bool, continuous: bool, echoes: list) -> None:
        created, model = int(requests[0].created), self.server.model_id
        kind = "chat.completion.chunk" if chat else "text_completion"
        wanted = requests[0].params.logprobs is not None
        offsets = [0] * len(requests)  # completions' text_offset runs on across each choice's chunks

        def chunk(choices, **extra):
            if continuous and choices:
                extra.setdefault("usage", self._usage(requests, n))
            event = {"id": ident, "object": kind, "created": created, "model": model, "choices": choices, **extra}
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            self.wfile.flush()

        def text_chunk(index, text, ids, entries):
            logprobs = None
            if chat:
                if wanted:
                    logprobs = self._chat_logprobs(ids, entries)
                return chunk([{"index": index, "delta": {"content": text}, "logprobs": logprobs,
                               "finish_reason": None}])
            if wanted:
                logprobs, offsets[index] = self._completion_logprobs(ids, entries, offsets[index])
            chunk([{"index": index, "text": text, "finish_reason": None, "logprobs": logprobs}])

        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # the body ends when the connection does
            self.end_headers()
            self.close_connection = True
            self._streaming = True
            if chat:
                for index in range(len(requests)):
                    chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            unechoed = {index for index, echoed in enumerate(echoes) if echoed is not None}
            open_choices = list(range(len(requests)))
            while open_choices:
                wake.clear()  # before looking: a delta put after this sets it again, so no wake-up is lost
                moved = False
                for index in list(open_choices):
                    request = requests[index]
                    try:
                        delta = request.deltas.get_nowait()
                    except queue.Empty:
                        continue
                    moved = True
                    if request.finish_reason == "error":
                        open_choices = []
                        break
                    if index in unechoed:  # the prompt first, once prefilled (its log probabilities come from it)
                        text_chunk(index, echoes[index], request.prompt_ids, [(None, None)] + request.prompt_logprobs)
                        unechoed.discard(index)
                    if delta is not None:
                        text_chunk(index, delta.text, delta.token_ids, delta.logprobs)
                        continue
                    open_choices.remove(index)
                    final = {"index": index, "delta": {}, "finish_reason": request.finish_reason} if chat else \
                        {"index": index, "text": "", "finish_reason": request.finish_reason, "logprobs": None}
                    chunk([final])
                # Nothing to write (the requests wait for slots, say), so a write cannot tell us the client left:
                # look at the socket.
                if not moved and not wake.wait(timeout=POLL_SECONDS) and self._client_gone():
                    for request in requests:
                        request.cancel()
                    return
            if any(request.finish_reason == "error" for request in requests):
                for request in requests:
                    request.cancel()
                # The stream's status is sent: say so in the stream, as vLLM does.
                error = {"message": f"The engine failed while generating ({self.server.engine.failure}).",
                         "type": "server_error", "param": None, "code": "engine_failed"}
                self.wfile.write(b"data: " + json.dumps({"error": error}).encode() + b"\n\n")
                self.wfile.flush()
                return
            if include_usage:
                chunk([], usage=self._usage(requests, n))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except BaseException as exc:
            for request in requests:  # the client went away, or the stream broke: nobody will read them
                request.cancel()  # the slots are freed at the next step
            if not isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                raise

def serve(model_dir: str, *, model_id: str, host: str = "127.0.0.1", port: int = 8100, max_batch: int = 32,
          device: str = "auto", decode: str = "auto", max_waiting: int = MAX_WAITING, max_seq_len: int | None = None,
          prefix_cache: bool = True, port_file: str | None = None, ready=None) -> None:
    engine = Engine(model_dir, device=device, max_batch=max_batch, decode=decode, max_waiting=max_waiting,
                    max_seq_len=max_seq_len, prefix_cache=prefix_cache)
    # Before the port opens: the supervisor marks the engine ready only once /health answers.
    started = time.perf_counter()
    if shapes := engine.warm_up():
        print(f"engine: prepared {shapes} decode shapes ({engine.decode_mode}) in {time.perf_counter() - started:.0f} s",
              flush=True)
    try:
        server = EngineServer((host, port), engine, model_id)
    except OSError as exc:  # the port is taken, say
        raise ConfigError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    # A failed engine ends the process, and the platform's supervisor restarts it; the second lets the callers it
    # failed get their 503 first.
    engine.on_failure = lambda: threading.Timer(1.0, server.shutdown).start()
    engine.start()
    print(f"engine serving {model_id} from {model_dir} on http://{host}:{server.server_address[1]}/v1 "
          f"(device {engine.device}, batch {max_batch}, context {engine.max_seq_len}, decode {engine.decode_mode})", flush=True)
    if ready is not None:
        ready(server)
    try:
        if port_file:  # with port 0 the system chose it, and whoever started us learns it here: no port to race for
            _write_atomically(Path(port_file), f"{server.server_address[1]}\n")
        server.serve_forever()
    finally:
        engine.stop()
        server.server_close()
    if engine.failure:
        raise EngineError(f"the engine failed: {engine.failure}")


def _write_atomically(path: Path, text: str) -> None:
    """Whoever reads `path` finds it whole or not at all."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as exc:  # a full disk, a folder in its place: nothing half-written left, and the path asked for named
        partial.unlink(missing_ok=True)
        raise OSError(exc.errno, f"cannot write it: {exc.strerror}", str(path)) from None


def serve_in_thread(model_dir: str, *, model_id: str, **kwargs) -> EngineServer:
    """For tests and benchmarks: an engine server on a free port, in this process."""
    started = threading.Event()
    holder = {}

    def ready(server):
        holder["server"] = server
        started.set()

    def run():
        try:
            serve(model_dir, model_id=model_id, port=0, ready=ready, **kwargs)
        except EngineError:
            pass  # the engine failed: `server.engine.failure` says why (a process would exit here)
    threading.Thread(target=run, daemon=True).start()
    started.wait(timeout=120)
    return holder["server"]
