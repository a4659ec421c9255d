"""OpenAI's logit adjustments on our engine: logit_bias, presence_penalty and frequency_penalty change the choice of
each token exactly as the formula says (checked against transformers' logits adjusted by hand), only for the request
that asks, and leave the reported log probabilities the model's own."""
import httpx
import pytest
import torch

from training.engine import Engine, EngineError, SamplingParams
from training.serve import serve_in_thread

PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def engine(trained):
    return Engine(trained / "export", device="cpu", max_batch=4)


def adjusted_greedy(hf, prompt: list[int], steps: int, *, bias: dict, presence: float, frequency: float) -> list[int]:
    """OpenAI's definition, step by step on transformers' logits: logit[j] - count[j] * frequency - (count[j] > 0) *
    presence + bias[j], counts over the tokens generated so far; then the likeliest."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = hf(torch.tensor([prompt + out])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
            logits = logits - counts * frequency - (counts > 0).float() * presence
            for token, value in bias.items():
                logits[token] += value
            out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("presence, frequency, with_bias", [(0.0, 1.5, True), (2.0, 0.0, False), (-1.0, 0.5, False)])
def test_penalties_and_bias_follow_openais_formula_for_the_request_that_asks(engine, hf, presence, frequency,
                                                                            with_bias):
    prompt = engine.encode(PROMPT)
    plain_params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    plain_alone = engine.submit(prompt, plain_params)
    engine.run_until_idle()
    # Ban greedy's first choice and favour another token; penalise repeats hard enough to matter.
    bias = {plain_alone.output_ids[0]: -100, 7: 3.5} if with_bias else {}
    expected = adjusted_greedy(hf, prompt, 16, bias=bias, presence=presence, frequency=frequency)
    # Each adjustment alone changes the answer, so the comparison means something for each term.
    assert expected != plain_alone.output_ids
    assert expected != adjusted_greedy(hf, prompt, 16, bias=bias, presence=0, frequency=frequency) or not presence
    assert expected != adjusted_greedy(hf, prompt, 16, bias=bias, presence=presence, frequency=0) or not frequency
    adjusted = engine.submit(prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=1,
                                                    logit_bias=bias, presence_penalty=presence,
                                                    frequency_penalty=frequency))
    plain = engine.submit(prompt, plain_params)  # batched with it, untouched by it
    engine.run_until_idle()
    assert adjusted.output_ids == expected and plain.output_ids == plain_alone.output_ids
    assert plain_alone.output_ids[0] not in adjusted.output_ids or not with_bias
    # Log probabilities stay the model's: the banned token keeps its probability as the likeliest alternative.
    with torch.no_grad():
        raw = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
    first_logprob, first_top = adjusted.logprobs[0]
    assert first_logprob == pytest.approx(float(raw[expected[0]]), abs=1e-4)
    assert first_top[0][0] == plain_alone.output_ids[0]  # banned or not, still the model's likeliest


def test_a_bias_of_100_forces_a_token_and_minus_100_bans_it_when_sampling_too(engine):
    forced = engine.submit(engine.encode(PROMPT), SamplingParams(max_tokens=6, temperature=1.0, seed=3,
                                                                 ignore_eos=True, logit_bias={42: 100}))
    free = engine.submit(engine.encode(PROMPT), SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True))
    engine.run_until_idle()
    assert forced.output_ids == [42] * 6
    banned = engine.submit(engine.encode(PROMPT), SamplingParams(
        max_tokens=6, temperature=1.0, seed=3, ignore_eos=True, logit_bias={t: -100 for t in set(free.output_ids)}))
    engine.run_until_idle()
    assert not set(banned.output_ids) & set(free.output_ids)


@pytest.mark.parametrize("params, param, message", [
    ({"presence_penalty": 2.5}, "presence_penalty", "from -2 to 2"),
    ({"frequency_penalty": "1"}, "frequency_penalty", "from -2 to 2"),
    ({"logit_bias": {5: 101}}, "logit_bias", "from -100 to 100"),
    ({"logit_bias": {-1: 1}}, "logit_bias", "from -100 to 100"),
    ({"logit_bias": {10 ** 6: 1}}, "logit_bias", "token ids run from 0 to"),
])
def test_bad_adjustments_are_refused_before_anything_is_queued(engine, params, param, message):
    with pytest.raises(EngineError, match=message) as refused:
        engine.submit([1, 2], SamplingParams(**params))
    assert refused.value.param == param and not engine.waiting and not engine.active


def test_the_server_takes_them_as_openai_sends_them(trained):
    server = serve_in_thread(str(trained / "export"), model_id="acme/coder", device="cpu", max_batch=2)
    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        engine = server.engine
        body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
        forced = httpx.post(base + "/completions", json=body | {"logit_bias": {"42": 100}}).json()
        assert forced["choices"][0]["text"] == engine.decode([42, 42, 42])
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
                "frequency_penalty": 2, "presence_penalty": 2}
        assert httpx.post(base + "/chat/completions", json=chat).status_code == 200
        admitted = engine.stats["requests"]
        for bad, param in [({"logit_bias": {"forty-two": 1}}, "logit_bias"), ({"logit_bias": [42]}, "logit_bias"),
                           ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),  # a digit to str.isdigit, not to int()
                           ({"logit_bias": {"42": 500}}, "logit_bias"), ({"presence_penalty": True}, "presence_penalty"),
                           ({"frequency_penalty": -3}, "frequency_penalty")]:
            response = httpx.post(base + "/completions", json=body | bad)
            assert response.status_code == 400 and response.json()["error"]["param"] == param, (bad, response.text)
        assert engine.stats["requests"] == admitted
    finally:
        server.shutdown()
