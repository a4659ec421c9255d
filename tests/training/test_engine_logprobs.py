"""Log probabilities: each generated token's and the prompt's (echo) equal transformers' log-softmax of its own
logits on the same checkpoint, batched or alone; the server answers them in OpenAI's completions and chat shapes,
takes token-id prompts (as lm-evaluation-harness sends them) and refuses what it cannot answer."""
import json

import httpx
import pytest
import torch

from training.engine import Engine, EngineError, SamplingParams
from training.serve import serve_in_thread

PROMPTS = ["def add(a, b):\n    return", "import os\nimport"]


@pytest.fixture(scope="module")
def engine(trained):
    return Engine(trained / "export", device="cpu", max_batch=4)


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every position of ids: row p is the distribution of token p + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_generated_and_prompt_logprobs_equal_transformers_batched_or_alone(engine, hf):
    params = dict(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=True)
    together = [engine.submit(engine.encode(p), SamplingParams(**params)) for p in PROMPTS]
    engine.run_until_idle()
    for prompt, request in zip(PROMPTS, together):
        alone = engine.submit(engine.encode(prompt), SamplingParams(**params))
        engine.run_until_idle()
        ids = request.prompt_ids + request.output_ids
        table = hf_logprobs(hf, ids)
        assert len(request.prompt_logprobs) == len(request.prompt_ids) - 1
        assert len(request.logprobs) == len(request.output_ids) == 8
        for position, (logprob, top) in enumerate(request.prompt_logprobs + request.logprobs):
            expected = table[position]
            assert logprob == pytest.approx(float(expected[ids[position + 1]]), abs=1e-4)
            assert [t for t, _ in top] == torch.topk(expected, 3).indices.tolist()
            assert [v for _, v in top] == pytest.approx(torch.topk(expected, 3).values.tolist(), abs=1e-4)
        # Greedy: the chosen token is the likeliest alternative; batched equals alone.
        assert all(top[0][0] == token for token, (_, top) in zip(request.output_ids, request.logprobs))
        for (a, top_a), (b, top_b) in zip(request.prompt_logprobs + request.logprobs,
                                          alone.prompt_logprobs + alone.logprobs):
            assert a == pytest.approx(b, abs=1e-5) and [t for t, _ in top_a] == [t for t, _ in top_b]


def test_a_stream_carries_every_tokens_logprobs_once_in_order(engine):
    # A stop sequence holds text back while its tokens' entries are already known: the deltas still add up.
    free = engine.submit(engine.encode(PROMPTS[0]), SamplingParams(max_tokens=12, temperature=0, logprobs=2))
    engine.run_until_idle()
    stop = free.text[5:7]
    for params in (dict(max_tokens=12), dict(max_tokens=12, stop=(stop,))):
        alone = engine.submit(engine.encode(PROMPTS[0]), SamplingParams(temperature=0, logprobs=2, **params))
        streamed = engine.submit(engine.encode(PROMPTS[0]), SamplingParams(temperature=0, logprobs=2, **params),
                                 stream=True)
        engine.run_until_idle()
        deltas = list(iter(streamed.deltas.get, None))
        assert len(deltas) > 1 and "".join(d.text for d in deltas) == streamed.text == alone.text
        assert [t for d in deltas for t in d.token_ids] == streamed.output_ids == alone.output_ids
        assert [e for d in deltas for e in d.logprobs] == streamed.logprobs
        assert [lp for lp, _ in streamed.logprobs] == pytest.approx([lp for lp, _ in alone.logprobs], abs=1e-5)
    assert streamed.finish_reason == "stop" and stop not in streamed.text
    plain = engine.submit(engine.encode(PROMPTS[0]), SamplingParams(max_tokens=4, temperature=0), stream=True)
    engine.run_until_idle()
    assert all(d.token_ids == [] and d.logprobs == [] for d in iter(plain.deltas.get, None))


def test_no_logprobs_unless_asked_and_bad_counts_refused(engine):
    request = engine.submit(engine.encode(PROMPTS[0]), SamplingParams(max_tokens=3, temperature=0))
    engine.run_until_idle()
    assert request.logprobs == [] and request.prompt_logprobs == []
    for bad in (-1, 21, "3"):
        with pytest.raises(EngineError, match="logprobs must be an integer from 0 to 20"):
            engine.submit([1, 2], SamplingParams(logprobs=bad))


@pytest.fixture(scope="module")
def server(trained):
    server = serve_in_thread(str(trained / "export"), model_id="acme/coder", device="cpu", max_batch=4)
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", server
    server.shutdown()


def test_completions_echo_logprobs_as_openai_shapes_them(server, hf):
    base, running = server
    engine = running.engine
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True, "ignore_eos": True}
    choice = httpx.post(base + "/completions", json=body).json()["choices"][0]
    ids = engine.encode(PROMPTS[0])
    logprobs = choice["logprobs"]
    assert choice["text"].startswith(PROMPTS[0]) and len(logprobs["tokens"]) == len(ids) + 4
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(isinstance(v, float) for v in logprobs["token_logprobs"][1:])
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"][1:])
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    # The same prompt as token ids (lm-evaluation-harness's way): the same numbers.
    by_ids = httpx.post(base + "/completions", json=body | {"prompt": ids}).json()["choices"][0]["logprobs"]
    assert by_ids["token_logprobs"][0] is None
    assert by_ids["token_logprobs"][1:] == pytest.approx(logprobs["token_logprobs"][1:], abs=1e-5)
    table = hf_logprobs(hf, ids)
    assert logprobs["token_logprobs"][1] == pytest.approx(float(table[0][ids[1]]), abs=1e-4)
    plain = httpx.post(base + "/completions", json={"prompt": PROMPTS[0], "max_tokens": 2}).json()["choices"][0]
    assert plain["logprobs"] is None
    # max_tokens 0: the prompt scored, nothing generated (the legacy API's way to ask for a text's likelihood).
    scored = httpx.post(base + "/completions", json=body | {"max_tokens": 0}).json()
    assert scored["choices"][0]["text"] == PROMPTS[0] and scored["usage"]["completion_tokens"] == 0
    assert scored["choices"][0]["logprobs"]["token_logprobs"] == logprobs["token_logprobs"][:len(ids)]


def test_a_one_token_prompt_is_scored_with_echo_and_the_engine_serves_on(server):
    # Its prompt has no token to score (the first has no logprob): this was an empty index that stopped the engine.
    base, running = server
    body = {"prompt": [running.engine.encode("x")[-1]], "max_tokens": 2, "temperature": 0, "logprobs": 1,
            "echo": True}
    for stream in (False, True):
        response = httpx.post(base + "/completions", json=body | {"stream": stream})
        assert response.status_code == 200, response.text
    logprobs = httpx.post(base + "/completions", json=body).json()["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][0] is None and len(logprobs["token_logprobs"]) == 3
    assert running.engine.failure is None
    assert httpx.post(base + "/completions", json={"prompt": "def", "max_tokens": 2}).status_code == 200


def test_top_logprobs_needs_logprobs_true(server):
    base, _ = server
    for extra in ({}, {"logprobs": False}):
        response = httpx.post(base + "/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "top_logprobs": 2, **extra})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "top_logprobs"


def test_chat_logprobs_as_openai_shapes_them(server):
    base, _ = server
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
            "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    choice = httpx.post(base + "/chat/completions", json=body).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 3
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"} and item["bytes"] == list(item["token"].encode())
        assert len(item["top_logprobs"]) == 2 and item["top_logprobs"][0]["token"] == item["token"]  # greedy
    assert "".join(item["token"] for item in content) == choice["message"]["content"]


def sse(base: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", base + path, json=body | {"stream": True}) as response:
        assert response.status_code == 200
        lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_streamed_logprobs_and_echo_add_up_to_the_whole_answer(server):
    base, _ = server
    body = {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True, "ignore_eos": True}
    whole = httpx.post(base + "/completions", json=body).json()["choices"][0]
    chunks = [c["choices"][0] for c in sse(base, "/completions", body)]
    assert chunks[0]["text"] == PROMPTS[1] and chunks[0]["logprobs"]["token_logprobs"][0] is None  # the echo first
    assert "".join(c["text"] for c in chunks) == whole["text"] and chunks[-1]["finish_reason"] == "length"
    streamed = {key: [v for c in chunks if c["logprobs"] for v in c["logprobs"][key]] for key in whole["logprobs"]}
    assert streamed["tokens"] == whole["logprobs"]["tokens"]
    assert streamed["text_offset"] == whole["logprobs"]["text_offset"]  # offsets run on across chunks
    assert streamed["token_logprobs"][1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:], abs=1e-5)
    assert [list(top) for top in streamed["top_logprobs"][1:]] == [list(top) for top in whole["logprobs"]["top_logprobs"][1:]]
    # Scoring a prompt as a stream: the echo, then the end.
    scored = [c["choices"][0] for c in sse(base, "/completions", body | {"max_tokens": 0})]
    assert [c["text"] for c in scored] == [PROMPTS[1], ""] and scored[1]["finish_reason"] == "length"
    assert scored[0]["logprobs"]["tokens"] == whole["logprobs"]["tokens"][:-6]
    # Echo without log probabilities streams the prompt as text alone.
    echoed = [c["choices"][0] for c in sse(base, "/completions", {"prompt": PROMPTS[1], "max_tokens": 2, "echo": True})]
    assert echoed[0]["text"] == PROMPTS[1] and all(c["logprobs"] is None for c in echoed)

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0, "logprobs": True,
            "top_logprobs": 2, "ignore_eos": True}
    whole = httpx.post(base + "/chat/completions", json=chat).json()["choices"][0]
    chunks = [c["choices"][0] for c in sse(base, "/chat/completions", chat)]
    assert "".join(c["delta"].get("content", "") for c in chunks) == whole["message"]["content"]
    content = [item for c in chunks if c.get("logprobs") for item in c["logprobs"]["content"]]
    assert [item["token"] for item in content] == [item["token"] for item in whole["logprobs"]["content"]]
    assert [item["logprob"] for item in content] == pytest.approx(
        [item["logprob"] for item in whole["logprobs"]["content"]], abs=1e-5)


@pytest.mark.parametrize("path, body, param", [
    ("/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),  # 0 only to score a prompt
    ("/completions", {"prompt": "x", "max_tokens": 0, "echo": True}, "max_tokens"),
    ("/completions", {"prompt": [1, 2, 10 ** 9]}, "prompt"),
    ("/completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("/completions", {"prompt": ["x", 3]}, "prompt"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
])
def test_what_the_server_cannot_answer_is_a_400_naming_the_parameter(server, path, body, param):
    base, running = server
    admitted = running.engine.stats["requests"]
    response = httpx.post(base + path, json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert running.engine.stats["requests"] == admitted
