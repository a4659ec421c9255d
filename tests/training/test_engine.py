"""The generation engine: greedy output equals transformers' generate token for token, batched equals
unbatched, and sampling controls, stop sequences, limits and cancellation behave."""
import contextlib
import json
import shutil

import pytest
import torch

from training.engine import Engine, EngineError, SamplingParams

PROMPTS = ["def add(a, b):\n    return", "import os\nimport", "class Foo:\n    def __init__(self", "x = [1, 2,"]


@pytest.fixture(scope="module")
def export_dir(trained):
    return trained / "export"


@pytest.fixture(scope="module")
def engine(export_dir):
    return Engine(export_dir, device="cpu", max_batch=8)


def generate_alone(engine, prompt, stream=False, **params):
    request = engine.submit(engine.encode(prompt), SamplingParams(**params), stream=stream)
    engine.run_until_idle()
    return request


def test_greedy_equals_transformers_generate_token_for_token(engine, export_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(export_dir), local_files_only=True, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        with torch.no_grad():
            expected = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, len(ids):].tolist()
        ours = generate_alone(engine, prompt, max_tokens=24, temperature=0)
        stop = next((i for i, t in enumerate(expected) if t in engine.eos_ids), len(expected))
        assert ours.output_ids == expected[:stop], prompt


def test_batched_results_equal_unbatched(engine):
    alone = [generate_alone(engine, p, max_tokens=20, temperature=0).output_ids for p in PROMPTS]
    streamed = [generate_alone(engine, p, stream=True, max_tokens=20, temperature=0) for p in PROMPTS]
    assert [r.output_ids for r in streamed] == alone
    assert ["".join(d.text for d in iter(r.deltas.get, None)) for r in streamed] == [r.text for r in streamed]
    # Staggered: two start together, the others join between decode steps (continuous batching).
    first = [engine.submit(engine.encode(p), SamplingParams(max_tokens=20, temperature=0)) for p in PROMPTS[:2]]
    engine.step()
    engine.step()
    later = [engine.submit(engine.encode(p), SamplingParams(max_tokens=20, temperature=0)) for p in PROMPTS[2:]]
    engine.run_until_idle()
    assert [r.output_ids for r in first + later] == alone


def test_a_burst_is_prefilled_in_padded_groups_into_scattered_slots_and_equals_unbatched(engine, monkeypatch):
    alone = [generate_alone(engine, p, max_tokens=20, temperature=0).output_ids for p in PROMPTS]
    prefills = []
    forward = engine._forward

    def recording(tokens, slots, last=None, **kwargs):
        if tokens.shape[1] > 1:
            prefills.append((tokens.shape, list(slots)))
        return forward(tokens, slots, last, **kwargs)
    monkeypatch.setattr(engine, "_forward", recording)
    monkeypatch.setattr(engine, "prefix_cache", False)  # slots in order, whole prompts (these were just seen)
    # Slots 0-2 taken, then slot 1 freed: the burst lands in slots 1, 3, 4, 5 — not one block.
    long_a, short, long_b = [engine.submit(engine.encode(p), SamplingParams(max_tokens=n, temperature=0))
                             for p, n in [(PROMPTS[0], 20), (PROMPTS[1], 1), (PROMPTS[2], 20)]]
    engine.step()
    assert short.finish_reason == "length" and sorted(engine.active) == [0, 2]
    monkeypatch.setattr(engine, "prefill_tokens", 2 * max(len(engine.encode(p)) for p in PROMPTS))
    burst = [engine.submit(engine.encode(p), SamplingParams(max_tokens=20, temperature=0)) for p in PROMPTS]
    engine.run_until_idle()
    assert [r.output_ids for r in burst] == alone
    assert long_a.output_ids == alone[0] and long_b.output_ids == alone[2]
    groups = prefills[1:]  # after the first three
    assert [slots for _, slots in groups] == [[1, 3], [4, 5]]  # two per group: the budget holds two prompts
    assert all(shape[0] * shape[1] <= engine.prefill_tokens for shape, _ in groups)


def test_rows_of_different_lengths_in_scattered_slots_decode_over_a_view_and_equal_unbatched(engine, monkeypatch):
    alone = [generate_alone(engine, p, max_tokens=24, temperature=0).output_ids for p in PROMPTS]
    placed = []
    index_copy = torch.Tensor.index_copy_

    def spying(self, dim, index, source):  # the decode step placing its rows' queries at their slots in the view
        placed.append(index.tolist())
        return index_copy(self, dim, index, source)
    monkeypatch.setattr(torch.Tensor, "index_copy_", spying)
    monkeypatch.setattr(engine, "prefix_cache", False)  # slots in order (these prompts were just seen)
    # Four rows, the second done after two tokens: slots 0, 2 and 3 then decode at different lengths around a free
    # slot, until a fifth request takes it while the others go on.
    first = [engine.submit(engine.encode(p), SamplingParams(max_tokens=n, temperature=0))
             for p, n in zip(PROMPTS, (24, 2, 24, 24))]
    for _ in range(4):
        engine.step()
    assert sorted(engine.active) == [0, 2, 3] and placed and placed[-1] == [0, 2, 3]
    late = engine.submit(engine.encode(PROMPTS[1]), SamplingParams(max_tokens=24, temperature=0))
    engine.run_until_idle()
    assert [first[0].output_ids, first[2].output_ids, first[3].output_ids, late.output_ids] == \
        [alone[0], alone[2], alone[3], alone[1]]
    assert first[1].output_ids == alone[1][:2]


def test_a_random_schedule_of_arrivals_and_cancellations_equals_each_request_alone(export_dir):
    """Requests of many prompt and answer lengths arriving between steps, some cancelled mid-way, over slots that
    free up in any order: every request that finishes gets exactly the tokens it gets alone (seeded schedule)."""
    import random

    engine = Engine(export_dir, device="cpu", max_batch=6)
    rng = random.Random(7)
    text = engine.encode("".join(PROMPTS) * 4)
    work = [(text[rng.randrange(20):][:rng.randint(1, 40)], rng.randint(1, 30)) for _ in range(24)]
    alone = []
    for prompt, answer in work:
        request = engine.submit(prompt, SamplingParams(max_tokens=answer, temperature=0, ignore_eos=True))
        engine.run_until_idle()
        alone.append(request.output_ids)
    pending, live, done, cancelled = list(enumerate(work)), [], {}, set()
    while pending or live:
        for _ in range(rng.randint(0, 3)):  # zero to three arrivals before each step
            if pending:
                i, (prompt, answer) = pending.pop(0)
                live.append((i, engine.submit(prompt, SamplingParams(max_tokens=answer, temperature=0,
                                                                     ignore_eos=True))))
        if live and rng.random() < 0.08:
            i, request = live[rng.randrange(len(live))]
            request.cancel()
            cancelled.add(i)
        engine.step()
        for i, request in [(i, r) for i, r in live if r.done.is_set()]:
            done[i] = request
        live = [(i, r) for i, r in live if not r.done.is_set()]
    finished = [i for i in done if i not in cancelled]
    assert len(finished) >= 18 and cancelled  # the schedule did what it is meant to exercise
    for i in finished:
        assert done[i].output_ids == alone[i], i
    for i in cancelled:  # a cancelled request stops where it was, its tokens so far the right ones
        request = done[i]
        assert request.finish_reason in ("cancelled", "length")
        assert request.output_ids == alone[i][:len(request.output_ids)]
    assert not engine.active and not engine.waiting


def test_the_fixed_shape_decode_step_equals_the_dynamic_one(engine, export_dir):
    """The step CUDA graphs capture, run eagerly here: padded batch, masked context, scattered slots."""
    fixed = Engine(export_dir, device="cpu", max_batch=8, decode="static")
    alone = [generate_alone(engine, p, max_tokens=20, temperature=0).output_ids for p in PROMPTS]
    assert [generate_alone(fixed, p, max_tokens=20, temperature=0).output_ids for p in PROMPTS] == alone
    short = fixed.submit(fixed.encode(PROMPTS[1]), SamplingParams(max_tokens=2, temperature=0))
    first = fixed.submit(fixed.encode(PROMPTS[0]), SamplingParams(max_tokens=20, temperature=0))
    fixed.step()
    fixed.step()
    later = [fixed.submit(fixed.encode(p), SamplingParams(max_tokens=20, temperature=0)) for p in PROMPTS[1:]]
    fixed.run_until_idle()  # slots 1, 0, 2, 3; once `first` is done, three rows padded to four (a scratch row)
    assert [r.output_ids for r in [first] + later] == alone and short.output_ids == alone[1][:2]
    assert set(fixed._graph_inputs) >= {1, 2, 4}
    with pytest.raises(Exception, match="graphs needs a CUDA device"):
        Engine(export_dir, device="cpu", decode="graphs")


def test_the_compiled_decode_step_equals_the_eager_one(export_dir, tmp_path):
    """decode=compiled (the CUDA default, there captured as graphs) runs here as torch.compile made it, each
    shape compiled by warm_up, scattered slots and padding rows included (the first request ends a step before
    the other three: three rows padded to four; one request alone runs as two rows). The model's context is
    stretched to 256 positions, so the answers cross from the 64-key bucket into the 128-key one."""
    from torch._dynamo.utils import counters

    longer = tmp_path / "longer"
    shutil.copytree(export_dir, longer)
    config = json.loads((longer / "config.json").read_text())
    (longer / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 256}))
    dynamic = Engine(longer, device="cpu", max_batch=4)
    alone = [generate_alone(dynamic, p, max_tokens=70, temperature=0, ignore_eos=True).output_ids for p in PROMPTS]
    torch._dynamo.reset()
    counters.clear()
    compiled = Engine(longer, device="cpu", max_batch=4, decode="compiled")
    assert compiled.warm_up() == 2 * 3  # batches 2 and 4 x 64, 128 and 256 keys, compiled before serving
    # Each region (embeddings, a layer, the head) compiled once for every batch and context: a GPU's warm-up of the
    # 124M step ran out of time when shapes compiled anew.
    assert counters["stats"]["unique_graphs"] == 3
    params = SamplingParams(max_tokens=70, temperature=0, ignore_eos=True)
    first = compiled.submit(compiled.encode(PROMPTS[0]), params)
    compiled.step()
    later = [compiled.submit(compiled.encode(p), params) for p in PROMPTS[1:]]
    compiled.run_until_idle()
    assert [r.output_ids for r in [first] + later] == alone and all(len(a) == 70 for a in alone)
    assert counters["stats"]["unique_graphs"] == 3  # nothing compiled while serving
    assert compiled.decode_mode == "compiled" and not compiled._graphs  # no graphs on a CPU


def test_a_failed_graph_capture_falls_back_to_the_eager_step(engine, export_dir, monkeypatch, capsys):
    alone = generate_alone(engine, PROMPTS[0], max_tokens=12, temperature=0).output_ids
    fixed = Engine(export_dir, device="cpu", max_batch=4, decode="static")
    fixed.decode_mode, fixed._use_graphs = "graphs", True  # as on a GPU; the capture cannot run here, so make it fail

    def capture(batch, context):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(fixed, "_capture", capture)
    assert generate_alone(fixed, PROMPTS[0], max_tokens=12, temperature=0).output_ids == alone
    assert fixed.decode_mode == "static" and not fixed._graphs and not fixed._use_graphs
    assert "CUDA graph capture failed" in capsys.readouterr().err


def test_warm_up_captures_every_shape_before_serving_with_padding_in_the_scratch_slot(export_dir, monkeypatch):
    fixed = Engine(export_dir, device="cpu", max_batch=6, decode="static")
    assert fixed.warm_up() == 0  # nothing to capture without graphs
    fixed.max_seq_len = 200  # as for a longer model (the captures below are recorded, not run)
    fixed.decode_mode, fixed._use_graphs = "graphs", True  # as on a GPU; record the captures instead
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    captured = []

    def capture(batch, context):
        slots = fixed._graph_inputs[batch][1]
        assert slots.tolist() == [fixed.scratch_slot] * batch  # the capture's first run writes no live slot
        captured.append((batch, context))
        return type("Graph", (), {"replay": lambda self: None})(), torch.zeros(batch, 8)
    monkeypatch.setattr(fixed, "_capture", capture)
    assert fixed.warm_up() == 4 * 3
    assert sorted(captured) == [(b, c) for b in (1, 2, 4, 6) for c in (64, 128, 200)]  # buckets, capped at the limits
    assert fixed.warm_up() == 12 and len(captured) == 12  # each shape once

    failing = Engine(export_dir, device="cpu", max_batch=4, decode="static")
    failing.decode_mode, failing._use_graphs = "graphs", True
    attempts = []

    def refuse(batch, context):
        attempts.append((batch, context))
        raise RuntimeError("capture not permitted")
    monkeypatch.setattr(failing, "_capture", refuse)
    assert failing.warm_up() == 0 and attempts == [(1, 64)] and failing.decode_mode == "static"


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(engine):
    a = generate_alone(engine, PROMPTS[0], max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    b = generate_alone(engine, PROMPTS[0], max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    assert a.output_ids == b.output_ids and len(a.output_ids) > 0
    greedy = generate_alone(engine, PROMPTS[1], max_tokens=12, temperature=0)
    top1 = generate_alone(engine, PROMPTS[1], max_tokens=12, temperature=0.7, top_k=1, seed=1)
    assert top1.output_ids == greedy.output_ids


def test_stop_sequences_cut_the_text_and_stream_never_leaks_them(engine):
    free = generate_alone(engine, PROMPTS[0], max_tokens=24, temperature=0)
    assert free.finish_reason == "length" and len(free.text) > 4
    stop = free.text[2:4]
    cut = engine.submit(engine.encode(PROMPTS[0]), SamplingParams(max_tokens=24, temperature=0, stop=(stop,)),
                        stream=True)
    engine.run_until_idle()
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.find(stop)]
    streamed = []
    while (delta := cut.deltas.get()) is not None:
        streamed.append(delta.text)
    assert "".join(streamed) == cut.text


def test_limits_and_bad_parameters_are_refused_with_a_reason(engine):
    with pytest.raises(EngineError, match="context is 64 tokens") as too_long:
        engine.submit(engine.encode("x " * 40), SamplingParams(max_tokens=60))
    assert too_long.value.code == "context_length_exceeded"
    for params, name in [({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
                         ({"top_k": -1}, "top_k"), ({"stop": ("",)}, "stop")]:
        with pytest.raises(EngineError) as bad:
            engine.submit([1, 2], SamplingParams(**params))
        assert bad.value.param == name
    with pytest.raises(EngineError, match="empty"):
        engine.submit([], SamplingParams())
    assert not engine.waiting and not engine.active


def test_cancelled_requests_free_their_slot(engine):
    request = engine.submit(engine.encode(PROMPTS[0]), SamplingParams(max_tokens=40, temperature=0))
    engine.step()
    assert request.slot in engine.active
    request.cancel()
    engine.step()
    assert request.finish_reason == "cancelled" and not engine.active and request.done.is_set()


def test_a_full_queue_refuses_and_a_cancelled_waiter_leaves_it(engine, monkeypatch):
    monkeypatch.setattr(engine, "max_waiting", 1)
    first = engine.submit(engine.encode(PROMPTS[0]), SamplingParams(max_tokens=4, temperature=0))
    with pytest.raises(EngineError, match="at capacity") as full:
        engine.submit(engine.encode(PROMPTS[1]), SamplingParams(max_tokens=4, temperature=0))
    assert (full.value.status, full.value.retry_after, list(engine.waiting)) == (503, 1, [first])
    first.cancel()  # its client left before it got a slot: it must not keep holding the place
    with monkeypatch.context() as busy:
        busy.setattr(engine, "_admit", lambda: ([], []))  # as if every slot were taken: only the purge can remove it
        engine.step()
    assert first.finish_reason == "cancelled" and first.done.is_set() and not engine.waiting
    second = engine.submit(engine.encode(PROMPTS[1]), SamplingParams(max_tokens=4, temperature=0))
    engine.run_until_idle()
    assert second.finish_reason == "length"


def test_no_max_tokens_means_the_rest_of_the_context(engine):
    prompt = engine.encode(PROMPTS[0])
    request = engine.submit(prompt, SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))
    engine.run_until_idle()
    assert len(prompt) + len(request.output_ids) == engine.max_seq_len and request.finish_reason == "length"
    with pytest.raises(EngineError, match="leaving none") as full:
        engine.submit(list(range(engine.max_seq_len)), SamplingParams(max_tokens=None))
    assert full.value.code == "context_length_exceeded"


def test_chat_template_renders_roles_and_refuses_bad_messages(engine):
    text = engine.render_chat([{"role": "user", "content": "hi"}])
    assert text.startswith("<|user|>\nhi") and text.endswith("<|assistant|>\n")
    with pytest.raises(EngineError):
        engine.render_chat([{"role": "robot", "content": "hi"}])


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 32])
@pytest.mark.parametrize("bias", [False, True])
def test_a_projection_gives_the_same_whichever_weight_layout_it_reads(rows, bias):
    from training.engine import _Linear

    torch.manual_seed(0)
    weights, biases = [torch.randn(24, 16), torch.randn(8, 16)], [torch.randn(24), torch.randn(8)] if bias else [None, None]
    cpu, gpu_like = (_Linear.of(weights, biases, transposed=t) for t in (True, False))
    x = torch.randn(1, rows, 16)
    expected = torch.nn.functional.linear(x, torch.cat(weights), torch.cat(biases) if bias else None)
    assert gpu_like.blocks is None and cpu.blocks.shape[0] * cpu.blocks.shape[2] == 32
    assert torch.allclose(cpu(x), expected, atol=1e-5) and cpu(x).shape == (1, rows, 32)
    assert torch.equal(gpu_like(x), expected)


def test_a_cpu_engine_keeps_the_weight_blocks_only_where_they_read_faster(export_dir, monkeypatch):
    """Which layout serves steps of a few rows is timed when the engine starts (it differs between CPUs): made
    slow on purpose, each one loses, and the tokens are the same either way."""
    import time

    import torch.nn.functional as F

    import training.engine as engine_module

    real_linear, real_bmm = F.linear, torch.bmm
    monkeypatch.setattr(engine_module, "_BLOCKS_FASTER", {})  # no choice made before this test
    monkeypatch.setattr(F, "linear", lambda *args: time.sleep(0.001) or real_linear(*args))
    blocks = Engine(export_dir, device="cpu", max_batch=2)
    monkeypatch.setattr(F, "linear", real_linear)
    assert blocks.few_row_layout == "blocks" and blocks.lm_head.blocks is not None
    assert Engine(export_dir, device="cpu", max_batch=2).few_row_layout == "blocks"  # chosen once per process
    # Not for a compiled step: the blocks' few-rows branch would compile each region again for more rows.
    assert Engine(export_dir, device="cpu", max_batch=2, decode="compiled").few_row_layout == "weight"

    engine_module._BLOCKS_FASTER.clear()
    monkeypatch.setattr(torch, "bmm", lambda *args: time.sleep(0.001) or real_bmm(*args))
    weights = Engine(export_dir, device="cpu", max_batch=2)
    monkeypatch.setattr(torch, "bmm", real_bmm)
    assert weights.few_row_layout == "weight" and weights.lm_head.blocks is None
    assert all(w.qkv.blocks is None and w.down.blocks is None for w in weights.layers)  # their memory is freed

    outputs = []
    for each in (blocks, weights):
        request = each.submit(each.encode(PROMPTS[0]), SamplingParams(max_tokens=16, temperature=0))
        each.run_until_idle()
        outputs.append(request.output_ids)
    assert outputs[0] == outputs[1] and outputs[0]
