"""The engine's HTTP server: OpenAI shapes, errors (4xx, 500, 503 when full), and a client that leaves cancelling
its request, streaming or not."""
import json
import subprocess
import sys
import time

import httpx
import pytest

from training.engine import EngineError
from training.serve import serve_in_thread


@pytest.fixture(scope="module")
def server(trained):
    server = serve_in_thread(str(trained / "export"), model_id="acme/coder", device="cpu", max_batch=4)
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()


def test_models_health_metrics_and_errors(server):
    base, running = server
    admitted = running.engine.stats["requests"]
    assert httpx.get(base + "/v1/models").json()["data"][0]["id"] == "acme/coder"
    assert httpx.get(base + "/v1/models/acme%2Fcoder").json()["id"] == "acme/coder"  # ids with / arrive encoded
    assert httpx.get(base + "/health").json() | {"active": 0} == {"status": "ok", "model": "acme/coder", "active": 0,
                                                                   "waiting": 0, "decode": "dynamic"}
    assert "engine_completion_tokens_total" in httpx.get(base + "/metrics").text
    for body, status, code in [({"model": "other", "prompt": "x"}, 404, "model_not_found"),
                               ({"prompt": 3}, 400, "invalid_value"),
                               ({"prompt": "x", "max_tokens": "many"}, 400, "invalid_value"),
                               ({"prompt": "x", "n": 5}, 400, "invalid_value"),  # more than its 4 slots
                               ({"prompt": "x", "n": 0}, 400, "invalid_value"),
                               ({"prompt": "x", "n": "2"}, 400, "invalid_value"),
                               ({"prompt": "x", "ignore_eos": "yes"}, 400, "invalid_value"),
                               ({"prompt": "x", "stream": True, "stream_options": "usage"}, 400, "invalid_value"),
                               ({"prompt": "x", "max_tokens": 10_000}, 400, "context_length_exceeded")]:
        response = httpx.post(base + "/v1/completions", json=body)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), body
    time.sleep(0.3)  # the engine's thread admits within a step: none of them was queued
    assert running.engine.stats["requests"] == admitted and not running.engine.waiting
    bad = httpx.post(base + "/v1/completions", content=b"{nope", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def slow_and_recorded(engine, monkeypatch) -> list:
    """Each decode step takes 20 ms more (a 60-token answer takes over a second, so the client surely leaves first),
    and the requests submitted are recorded, to see how they ended."""
    submitted = []
    submit, advance = engine.submit, engine._advance

    def recording(*args, **kwargs):
        submitted.append(submit(*args, **kwargs))
        return submitted[-1]

    def slow(*args):
        time.sleep(0.02)
        return advance(*args)
    monkeypatch.setattr(engine, "submit", recording)
    monkeypatch.setattr(engine, "_advance", slow)
    return submitted


def assert_cancelled(request) -> None:
    assert request.done.wait(timeout=10), "the request was never ended"
    assert request.finish_reason == "cancelled" and len(request.output_ids) < 60


def test_a_streaming_client_that_goes_away_cancels_its_request(server, monkeypatch):
    base, engine_server = server
    submitted = slow_and_recorded(engine_server.engine, monkeypatch)
    # ignore_eos: the request cannot end by itself before the client leaves
    with httpx.stream("POST", base + "/v1/completions", json={"prompt": "def", "max_tokens": 60, "temperature": 0,
                                                              "ignore_eos": True, "stream": True}) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ") and json.loads(first[6:])["object"] == "text_completion"
    assert_cancelled(submitted[0])  # noticed at the next write; the slot is freed at the next step


def test_a_non_streaming_client_that_goes_away_cancels_its_request(server, monkeypatch):
    base, engine_server = server
    submitted = slow_and_recorded(engine_server.engine, monkeypatch)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(base + "/v1/chat/completions", timeout=0.3, json={
            "messages": [{"role": "user", "content": "def"}], "max_tokens": 50, "temperature": 0, "ignore_eos": True})
    assert_cancelled(submitted[0])  # noticed by polling the socket while the answer is generated
    for _ in range(100):
        if not engine_server.engine.active:
            break
        time.sleep(0.05)
    assert not engine_server.engine.active


def test_a_full_queue_answers_503_with_retry_after_and_queues_nothing(server, monkeypatch):
    base, engine_server = server
    engine = engine_server.engine
    before = dict(engine.stats)
    monkeypatch.setattr(engine, "max_waiting", 0)  # as if the queue were full
    response = httpx.post(base + "/v1/completions", json={"prompt": "def", "max_tokens": 4})
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "engine_overloaded") and "retry" in error["message"]
    assert engine.stats == before and not engine.waiting


def test_an_unexpected_error_is_a_500_in_openai_shape_and_logged(server, monkeypatch, capsys):
    base, engine_server = server

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the engine")
    monkeypatch.setattr(engine_server.engine, "encode_chat", broken)
    response = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 500, response.text
    assert response.json()["error"]["type"] == "server_error" and response.json()["error"]["code"] == "internal_error"
    assert "RuntimeError: a bug in the engine" in capsys.readouterr().err
    assert httpx.get(base + "/health").json()["status"] == "ok"  # the server goes on serving


def test_a_chat_without_max_tokens_may_use_the_rest_of_the_context(server):
    base, engine_server = server
    context = engine_server.engine.max_seq_len  # 64 here: a fixed default of 256 refused every such chat
    response = httpx.post(base + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "def"}], "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["total_tokens"] == context
    assert response.json()["choices"][0]["finish_reason"] == "length"
    too_long = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x " * 80}]})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"


def test_a_failed_engine_answers_503_and_stops_serving(trained):
    server = serve_in_thread(str(trained / "export"), model_id="acme/coder", device="cpu", max_batch=4)
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")
    server.engine._forward = out_of_memory
    response = httpx.post(base + "/v1/completions", json={"prompt": "def", "max_tokens": 4}, timeout=10)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "engine_failed" and "out of memory" in response.json()["error"]["message"]
    health = httpx.get(base + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "failed"
    deadline = time.time() + 10
    while time.time() < deadline:  # the server shuts down, so the platform's supervisor restarts the engine
        try:
            httpx.get(base + "/health", timeout=1)
        except httpx.TransportError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the server kept serving after its engine failed")


def test_the_served_context_can_be_shorter_than_the_models(trained):
    # A public checkpoint says 131,072 positions; the KV cache holds max_batch x the served context.
    server = serve_in_thread(str(trained / "export"), model_id="short", device="cpu", max_batch=2, max_seq_len=40)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        response = httpx.post(base + "/v1/completions", json={"prompt": "x = 1", "max_tokens": 39})
        error = response.json()["error"]
        assert response.status_code == 400 and error["code"] == "context_length_exceeded"
        assert "context is 40 tokens" in error["message"]
        assert httpx.post(base + "/v1/completions", json={"prompt": "x = 1", "max_tokens": 8}).status_code == 200
    finally:
        server.shutdown()


def test_continuous_usage_stats_put_usage_in_every_chunk(server):
    base, _ = server

    def chunks(options):
        with httpx.stream("POST", base + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": options}) as response:
            lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return [json.loads(line) for line in lines[:-1]]

    every = chunks({"include_usage": True, "continuous_usage_stats": True})
    prompt = every[-1]["usage"]["prompt_tokens"]
    assert prompt > 0 and all(c["usage"]["prompt_tokens"] == prompt for c in every)
    completions = [c["usage"]["completion_tokens"] for c in every]
    assert completions == sorted(completions) and completions[-1] == 5  # grows as the answer does
    plain = chunks({"include_usage": True})
    assert [("usage" in c) for c in plain] == [False] * (len(plain) - 1) + [True]  # only the closing usage chunk


def sse(base: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", base + path, json=body | {"stream": True}) as response:
        assert response.status_code == 200, response.read()
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_n_choices_sampled_each_as_alone_with_seed_plus_index_streamed_or_not(server):
    base, _ = server
    body = {"prompt": "def add(a, b):", "max_tokens": 6, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    answer = httpx.post(base + "/v1/completions", json=body | {"n": 3}).json()
    alone = [httpx.post(base + "/v1/completions", json=body | {"seed": 7 + i}).json()["choices"][0]["text"]
             for i in range(3)]
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    # The largest seed: the next choice's goes round to the smallest (a seed out of range is a 400, nothing queued).
    top = httpx.post(base + "/v1/completions", json=body | {"n": 2, "seed": 2 ** 64 - 1})
    assert top.status_code == 200 and len(top.json()["choices"]) == 2
    bottom = httpx.post(base + "/v1/completions", json=body | {"seed": -(2 ** 63)}).json()["choices"][0]["text"]
    assert top.json()["choices"][1]["text"] == bottom
    refused = httpx.post(base + "/v1/completions", json=body | {"seed": 2 ** 64})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "seed"
    assert [c["text"] for c in answer["choices"]] == alone and len(set(alone)) > 1  # each its own sample
    single = httpx.post(base + "/v1/completions", json=body).json()["usage"]
    usage = {k: answer["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert usage == {"prompt_tokens": single["prompt_tokens"], "completion_tokens": 18,
                     "total_tokens": single["prompt_tokens"] + 18}  # the prompt counted once

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "n": 2, "logprobs": True, "stream_options": {"include_usage": True}}
    whole = httpx.post(base + "/v1/chat/completions", json=chat).json()
    events = sse(base, "/v1/chat/completions", chat)
    assert all(len(e["choices"]) == 1 for e in events[:-1]) and events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"] == 10
    for index in (0, 1):
        mine = [e["choices"][0] for e in events[:-1] if e["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""} and mine[-1]["finish_reason"] == "length"
        text = "".join(c["delta"].get("content", "") for c in mine)
        assert text == whole["choices"][index]["message"]["content"]
        tokens = [t["token"] for c in mine if c.get("logprobs") for t in c["logprobs"]["content"]]
        assert tokens == [t["token"] for t in whole["choices"][index]["logprobs"]["content"]]


def test_a_client_leaving_an_n_choice_stream_cancels_every_choice(server, monkeypatch):
    base, engine_server = server
    submitted = slow_and_recorded(engine_server.engine, monkeypatch)
    with httpx.stream("POST", base + "/v1/completions", json={"prompt": "def", "max_tokens": 60, "temperature": 0,
                                                              "ignore_eos": True, "stream": True, "n": 2}) as response:
        next(response.iter_lines())
    assert len(submitted) == 2
    for request in submitted:
        assert_cancelled(request)


def test_a_choice_refused_by_a_full_queue_takes_the_others_back(server, monkeypatch):
    base, engine_server = server
    engine, submitted = engine_server.engine, []
    submit = engine.submit

    def second_refused(*args, **kwargs):
        if submitted:
            raise EngineError("The engine is at capacity; retry shortly.", code="engine_overloaded", status=503,
                              retry_after=1)
        submitted.append(submit(*args, **kwargs))
        return submitted[-1]
    monkeypatch.setattr(engine, "submit", second_refused)
    response = httpx.post(base + "/v1/completions", json={"prompt": "def", "max_tokens": 40, "n": 2})
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_overloaded"
    assert_cancelled(submitted[0])


def test_a_list_of_prompts_gets_n_choices_each_numbered_as_openai_does(server):
    base, running = server
    prompts = ["def add(a, b):", "import os", "class A:"]
    body = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}
    alone = [httpx.post(base + "/v1/completions", json=body | {"prompt": p}).json() for p in prompts]
    both = httpx.post(base + "/v1/completions", json=body | {"prompt": prompts, "n": 2}).json()
    # Choice k * n + i is prompt k's i-th (greedy: both the same), each as the prompt alone gets it.
    assert [c["index"] for c in both["choices"]] == list(range(6))
    assert [c["text"] for c in both["choices"]] == [a["choices"][0]["text"] for a in alone for _ in range(2)]
    assert both["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)  # each prompt once
    assert both["usage"]["completion_tokens"] == 30
    # lm-evaluation-harness's batched scoring: several token-id prompts, echo, log probabilities, nothing generated.
    ids = [running.engine.encode(p) for p in prompts]
    score = {"max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    batch = httpx.post(base + "/v1/completions", json=score | {"prompt": ids}).json()["choices"]
    for choice, one in zip(batch, ids):
        single = httpx.post(base + "/v1/completions", json=score | {"prompt": one}).json()["choices"][0]
        assert choice["text"] == single["text"] and choice["logprobs"]["tokens"] == single["logprobs"]["tokens"]
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(single["logprobs"]["token_logprobs"][1:],
                                                                         abs=1e-5)
    # Streamed: every choice's text, in chunks carrying its index.
    events = sse(base, "/v1/completions", body | {"prompt": prompts, "echo": True})
    for index, prompt in enumerate(prompts):
        text = "".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == index)
        assert text == prompt + alone[index]["choices"][0]["text"]
    too_many = httpx.post(base + "/v1/completions", json=body | {"prompt": ["x"] * 200, "n": 2})
    assert too_many.status_code == 400 and "at most 256" in too_many.json()["error"]["message"]


def test_more_choices_than_the_queue_holds_and_invalid_text_are_400s(server, monkeypatch):
    base, running = server
    engine = running.engine
    admitted = engine.stats["requests"]
    monkeypatch.setattr(engine, "max_waiting", 4)  # serve --max-waiting 4: six choices could never all wait
    response = httpx.post(base + "/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2})
    assert response.status_code == 400 and "at most 4" in response.json()["error"]["message"]
    # One prompt, a chat's too: n within --max-batch (4) but above what may wait is a 400 (not a 503 to retry: it
    # never fits).
    monkeypatch.setattr(engine, "max_waiting", 3)
    response = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                "n": 4, "max_tokens": 2})
    error = response.json()["error"]
    assert response.status_code == 400 and (error["param"], error["message"]) == (
        "n", "n must be an integer from 1 to 3 (the choices are generated together).")
    # JSON allows an unpaired surrogate; no tokenizer takes it.
    for path, body, param in [("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
                              ("/v1/completions", {"prompt": ["ok", "a\ud800b"]}, "prompt"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]},
                               "messages")]:
        response = httpx.post(base + path, content=json.dumps({"max_tokens": 2} | body),  # escaped: \\ud800
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    time.sleep(0.3)
    assert engine.stats["requests"] == admitted and not engine.waiting


def _raw(base: str, request: bytes) -> list[bytes]:
    """Send bytes as they are on one connection and return every response read back before it closes."""
    import socket

    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return [part for part in data.split(b"HTTP/1.1 ")[1:]]


def test_a_kept_alive_connection_survives_answers_given_before_the_body_was_read(server):
    base, _ = server
    # A POST to another route is answered without reading its body: the connection is closed, not left holding it.
    body = b'{"input": "x"}'
    answers = _raw(base, b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                   + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(answers) == 1 and answers[0].startswith(b"404") and b"Connection: close" in answers[0]
    with httpx.Client(base_url=base) as client:  # the openai client's way: one pool, the next call works
        assert client.post("/v1/embeddings", json={"input": "x"}).json()["error"]["code"] == "not_found"
        assert client.post("/v1/completions", json={"prompt": "def", "max_tokens": 2}).status_code == 200
        too_large = client.post("/v1/completions", content=b"x" * (5 * 1024 * 1024),
                                headers={"Content-Type": "application/json"})
        assert too_large.status_code == 413 and too_large.headers["Connection"] == "close"
        assert client.post("/v1/completions", json={"prompt": "def", "max_tokens": 2}).status_code == 200
    bad_length = _raw(base, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    assert len(bad_length) == 1 and bad_length[0].startswith(b"400") and b"Content-Length must be" in bad_length[0]


def test_a_chunked_body_is_read_as_vllm_reads_it(server):
    base, _ = server
    body = json.dumps({"prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0}).encode()
    chunked = httpx.post(base + "/v1/completions", content=iter([body[:7], body[7:]]),
                         headers={"Content-Type": "application/json"})
    sized = httpx.post(base + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert chunked.status_code == 200 and chunked.json()["choices"] == sized.json()["choices"]


def test_other_methods_are_405s_in_openai_shape_and_head_checks_health(server):
    base, _ = server
    for method, path, allowed in [("PUT", "/v1/completions", "POST"), ("DELETE", "/health", "GET, HEAD"),
                                  ("GET", "/v1/chat/completions", "POST"), ("POST", "/v1/models", "GET, HEAD"),
                                  ("OPTIONS", "/metrics", "GET, HEAD")]:
        response = httpx.request(method, base + path)
        assert response.status_code == 405 and response.headers["Allow"] == allowed, (method, path)
        assert response.json()["error"]["code"] == "method_not_allowed"
    head = httpx.head(base + "/health")
    assert head.status_code == 200 and head.content == b"" and int(head.headers["Content-Length"]) > 0


def test_vllm_habits_top_k_minus_one_and_typed_stream_and_the_prompt_named_when_it_fills_the_context(server):
    base, running = server
    greedy = {"prompt": "def", "max_tokens": 3, "temperature": 0}
    assert httpx.post(base + "/v1/completions", json=greedy | {"top_k": -1}).json()["choices"] == \
        httpx.post(base + "/v1/completions", json=greedy).json()["choices"]
    refused = httpx.post(base + "/v1/completions", json=greedy | {"stream": "false"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream"
    long = [1] * running.engine.max_seq_len
    refused = httpx.post(base + "/v1/completions", json={"prompt": long, "max_tokens": 1})
    error = refused.json()["error"]
    assert (refused.status_code, error["code"], error["param"]) == (400, "context_length_exceeded", "prompt")
    model = httpx.get(base + "/v1/models").json()["data"][0]
    assert model["root"] == "acme/coder" and model["max_model_len"] == running.engine.max_seq_len


def test_an_engine_on_port_0_writes_the_port_it_bound_whole_once_it_serves(trained, tmp_path):
    (tmp_path / "run").mkdir()
    port_file = tmp_path / "run" / "engine.port"
    process = subprocess.Popen([sys.executable, "-m", "training", "serve", "--model", str(trained / "export"),
                                "--model-id", "acme/coder", "--device", "cpu", "--port", "0", "--port-file",
                                str(port_file)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        port = int(port_file.read_text())
        assert 0 < port < 65536 and [p.name for p in port_file.parent.iterdir()] == ["engine.port"]  # no partial file left
        answer = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        assert answer["status"] == "ok" and answer["model"] == "acme/coder"
    finally:
        process.terminate()
        print(process.communicate(timeout=30)[0])


def test_a_port_file_that_cannot_be_written_stops_the_engine_in_one_line_and_leaves_nothing(trained, tmp_path):
    port_file = tmp_path / "run" / "engine.port"
    port_file.mkdir(parents=True)  # a folder where the file should go: os.replace refuses
    done = subprocess.run([sys.executable, "-m", "training", "serve", "--model", str(trained / "export"), "--device",
                           "cpu", "--port", "0", "--port-file", str(port_file)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr == f"error: {port_file}: cannot write it: Is a directory\n"
    assert sorted(p.name for p in port_file.parent.iterdir()) == ["engine.port"] and port_file.is_dir()
