"""The engine's HTTP server: OpenAI shapes, errors, and a client that leaves cancelling its request."""
import json
import time

import httpx
import pytest

from training.serve import serve_in_thread


@pytest.fixture(scope="module")
def server(trained):
    server = serve_in_thread(str(trained / "export"), model_id="acme/coder", device="cpu", max_batch=4)
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()


def test_models_health_metrics_and_errors(server):
    base, _ = server
    assert httpx.get(base + "/v1/models").json()["data"][0]["id"] == "acme/coder"
    assert httpx.get(base + "/v1/models/acme%2Fcoder").json()["id"] == "acme/coder"  # ids with / arrive encoded
    assert httpx.get(base + "/health").json() | {"active": 0} == {"status": "ok", "model": "acme/coder", "active": 0,
                                                                   "waiting": 0, "decode": "dynamic"}
    assert "engine_completion_tokens_total" in httpx.get(base + "/metrics").text
    for body, status, code in [({"model": "other", "prompt": "x"}, 404, "model_not_found"),
                               ({"prompt": 3}, 400, "invalid_value"),
                               ({"prompt": "x", "max_tokens": "many"}, 400, "invalid_value"),
                               ({"prompt": "x", "n": 2}, 400, "invalid_value"),
                               ({"prompt": "x", "max_tokens": 10_000}, 400, "context_length_exceeded")]:
        response = httpx.post(base + "/v1/completions", json=body)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), body
    bad = httpx.post(base + "/v1/completions", content=b"{nope", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_a_client_that_goes_away_cancels_its_request(server):
    base, engine_server = server
    engine = engine_server.engine
    before = engine.stats["completion_tokens"]
    with httpx.stream("POST", base + "/v1/completions", json={"prompt": "def", "max_tokens": 60, "temperature": 0,
                                                              "stream": True}) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ") and json.loads(first[6:])["object"] == "text_completion"
    # The engine notices at its next write, frees the slot and stops generating for it.
    for _ in range(100):
        if not engine.active:
            break
        time.sleep(0.05)
    assert not engine.active and engine.stats["completion_tokens"] - before < 60


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
