"""Prefix caching: a prompt starting with tokens a slot still holds (a chat's history, a shared system prompt) is
prefilled from there, in that slot or after copying them from a running request's, and answers exactly as an
engine without the cache does; rows prefilled together never run past the context."""
import random

import httpx
import pytest

from training.engine import Engine, SamplingParams
from training.serve import serve_in_thread

from .test_engine import PROMPTS


@pytest.fixture(scope="module")
def cached(trained):
    return Engine(trained / "export", device="cpu", max_batch=6)


@pytest.fixture(scope="module")
def plain(trained):
    return Engine(trained / "export", device="cpu", max_batch=6, prefix_cache=False)


def answer(engine, prompt, tokens, **params):
    request = engine.submit(prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, **params))
    engine.run_until_idle()
    return request


def test_the_next_turn_of_a_conversation_reuses_its_slot(cached, plain):
    first = answer(cached, cached.encode(PROMPTS[0]), 8)
    follow_up = first.prompt_ids + first.output_ids + cached.encode(" x =", add_special_tokens=False)
    second = answer(cached, follow_up, 8)
    # The slot holds the prompt and every answer token but the last (never fed back): all reused, none copied.
    assert second.slot == first.slot and second.cached_tokens == len(first.prompt_ids) + 7
    assert second.output_ids == answer(plain, follow_up, 8).output_ids
    assert plain.stats["cached_prompt_tokens"] == 0


def test_each_conversation_keeps_its_history_while_others_come_and_go(trained):
    engine = Engine(trained / "export", device="cpu", max_batch=4)
    a, b = (answer(engine, engine.encode(p), 6) for p in PROMPTS[:2])
    follow = engine.encode(" y", add_special_tokens=False)
    b_next = answer(engine, b.prompt_ids + b.output_ids + follow, 6)  # b's slot, not the first free one
    stranger = answer(engine, engine.encode(PROMPTS[3]), 6)  # an empty slot, not a slot holding a history
    a_next = answer(engine, a.prompt_ids + a.output_ids + follow, 6)
    assert (b_next.slot, a_next.slot) == (b.slot, a.slot) and stranger.slot not in (a.slot, b.slot)
    assert b_next.cached_tokens == len(b.prompt_ids) + 5 and a_next.cached_tokens == len(a.prompt_ids) + 5


def test_a_new_conversation_takes_an_empty_slot_not_a_history_sharing_its_first_tokens(trained):
    # Every prompt starts with the same few tokens (a BOS, a chat template's header): overwriting a history to save
    # them would cost that conversation its whole history at its next turn.
    engine = Engine(trained / "export", device="cpu", max_batch=8)
    header = engine.encode("<|user|>\n", add_special_tokens=False)[:3]
    first_turns = [answer(engine, header + engine.encode(p, add_special_tokens=False), 6) for p in PROMPTS[:3]]
    assert len({r.slot for r in first_turns}) == 3
    for turn in first_turns:
        follow = answer(engine, turn.prompt_ids + turn.output_ids + [9], 4)
        assert follow.cached_tokens == len(turn.prompt_ids) + 5 and follow.slot == turn.slot


def test_choices_of_one_prompt_arriving_together_prefill_it_once(cached, plain):
    prompt = cached.encode(PROMPTS[3] + PROMPTS[0])[:40]
    choices = [cached.submit(prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)) for _ in range(4)]
    cached.step()  # one step: the first prefilled whole, the others after it from a copy of its keys and values
    assert all(len(c.output_ids) == 1 for c in choices) and choices[0].cached_tokens == 0
    assert len(prompt) > 16 and [c.cached_tokens for c in choices[1:]] == [len(prompt) - 1] * 3
    cached.run_until_idle()
    assert all(c.output_ids == answer(plain, prompt, 5).output_ids for c in choices)


def test_a_shared_prefix_is_copied_from_a_running_request(cached, plain):
    stem = cached.encode(PROMPTS[1] + PROMPTS[2] + PROMPTS[3])[:30]
    assert len(stem) == 30
    running = cached.submit(stem + [5, 6], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    for _ in range(3):
        cached.step()
    joining = cached.submit(stem + [7], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    cached.step()
    assert joining.slot != running.slot and joining.cached_tokens == 30 and running.finish_reason is None
    cached.run_until_idle()
    assert running.output_ids == answer(plain, stem + [5, 6], 20).output_ids
    assert joining.output_ids == answer(plain, stem + [7], 10).output_ids


def test_log_probabilities_of_a_cached_prompt_are_computed_whole(cached, plain):
    prompt = cached.encode(PROMPTS[0])
    answer(cached, prompt, 2)
    scored = answer(cached, prompt, 2, logprobs=1, prompt_logprobs=True)
    assert scored.cached_tokens == 0 and len(scored.prompt_logprobs) == len(prompt) - 1
    expected = answer(plain, prompt, 2, logprobs=1, prompt_logprobs=True)
    assert [lp for lp, _ in scored.prompt_logprobs] == pytest.approx([lp for lp, _ in expected.prompt_logprobs],
                                                                     abs=1e-5)


def test_rows_prefilled_together_never_pass_the_context(cached, plain):
    # One row holds 49 positions and prefills 1; another prefills 40 from the start. Padded to 40 together the
    # first would write positions 49-88 of a 64-position cache: they go in separate steps.
    assert cached.max_seq_len == 64
    long = (cached.encode(PROMPTS[2]) * 4)[:50]
    answer(cached, long, 1)
    fresh = (cached.encode(PROMPTS[3]) * 4)[1:41]
    near_end = cached.submit(long[:49] + [3], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    from_start = cached.submit(fresh, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    cached.step()
    assert near_end.cached_tokens == 49 and near_end.output_ids and not from_start.output_ids
    cached.run_until_idle()
    assert near_end.output_ids == answer(plain, long[:49] + [3], 4).output_ids
    assert from_start.output_ids == answer(plain, fresh, 4).output_ids


def test_a_random_schedule_of_conversations_equals_the_engine_without_the_cache(cached, plain):
    """Prompts from a few shared stems and follow-ups of earlier answers, arriving between steps over slots that
    free up in any order: every answer equals the uncached engine's, and the cache was used."""
    rng = random.Random(11)
    stems = [cached.encode(p)[:rng.randint(8, 24)] for p in PROMPTS]
    before = cached.stats["cached_prompt_tokens"]
    history, live, checked = [], [], 0
    for step in range(120):
        for _ in range(rng.randint(0, 2)):
            if history and rng.random() < 0.4:  # a follow-up: an earlier prompt, its answer, and more
                earlier = rng.choice(history)
                prompt = (earlier.prompt_ids + earlier.output_ids + [rng.randrange(100, 400)])[:40]
            else:
                prompt = rng.choice(stems) + [rng.randrange(100, 400) for _ in range(rng.randint(1, 12))]
            live.append(cached.submit(prompt, SamplingParams(max_tokens=rng.randint(1, 16), temperature=0,
                                                             ignore_eos=True)))
        cached.step()
        for request in [r for r in live if r.done.is_set()]:
            live.remove(request)
            history.append(request)
            expected = answer(plain, request.prompt_ids, request.params.max_tokens)
            assert request.output_ids == expected.output_ids, request.prompt_ids
            checked += 1
    cached.run_until_idle()
    assert checked >= 60 and cached.stats["cached_prompt_tokens"] - before > 300
    # What the engine believes each slot holds is exactly as long as what it has written there.
    assert [len(tokens) for tokens in cached.held] == cached.lengths


def test_the_server_reports_cached_tokens_as_openai_does(trained):
    server = serve_in_thread(str(trained / "export"), model_id="acme/coder", device="cpu", max_batch=2)
    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        body = {"messages": [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "hi"}],
                "max_tokens": 4, "temperature": 0}
        first = httpx.post(base + "/chat/completions", json=body).json()
        again = httpx.post(base + "/chat/completions", json=body).json()
        assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
        assert again["choices"] == first["choices"]
        assert "engine_cached_prompt_tokens_total" in httpx.get(base.removesuffix("/v1") + "/metrics").text
    finally:
        server.shutdown()
    server = serve_in_thread(str(trained / "export"), model_id="acme/coder", device="cpu", max_batch=2,
                             prefix_cache=False)  # serve --no-prefix-cache
    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        for _ in range(2):
            usage = httpx.post(base + "/chat/completions", json=body).json()["usage"]
            assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    finally:
        server.shutdown()


def test_the_shared_length_search_equals_a_plain_loop():
    from training.engine import _common_prefix

    rng = random.Random(0)
    for _ in range(3000):
        shared = [rng.randrange(3) for _ in range(rng.randint(0, 300))]
        a = shared + [rng.randrange(3) for _ in range(rng.randint(0, 200))]
        b = shared + [rng.randrange(3) for _ in range(rng.randint(0, 200))]
        limit = rng.randint(-1, 500)
        expected = 0
        while expected < min(len(a), len(b), limit) and a[expected] == b[expected]:
            expected += 1
        assert _common_prefix(a, b, limit) == expected, (a, b, limit)
