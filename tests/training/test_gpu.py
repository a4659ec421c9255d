"""Checks that need CUDA; skipped elsewhere. tests/bench/gpu_check.sh runs them on a lent GPU."""
import json

import pytest
import torch

from training.trainer import train

from .conftest import events, quick_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_bf16_compiled_training_on_cuda_learns_and_exports(tmp_path, data_dir):
    out = tmp_path / "gpu-run"
    assert train(quick_config(data_dir, out, device="cuda", max_steps=60, batch_size=16, seq_len=128)) == 0
    start = events(out, "start")[0]
    assert start["bf16"] is True and start["compiled"] is True and start["device"].startswith("cuda")
    assert start["peak_source"].endswith("bf16 dense datasheet")
    steps = events(out, "step")
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    assert steps[-1]["mfu"] is not None and steps[-1]["memory_bytes"] > 0
    from transformers import AutoModelForCausalLM

    from training.export import load_exported

    hf = AutoModelForCausalLM.from_pretrained(str(out / "export"), local_files_only=True, dtype=torch.float32).eval()
    ours, _ = load_exported(out / "export")
    ids = torch.randint(0, ours.config.vocab_size, (2, 64))
    with torch.no_grad():
        assert (hf(ids).logits - ours.eval()(ids)[0]).abs().max().item() < 1e-4
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["hardware"]["type"] == "cuda"


def test_cuda_graph_decoding_replays_exactly_the_fixed_shape_step(trained):
    """Replayed graphs must give what the same step gives run eagerly (the CPU suite checks that step against
    the dynamic one), and so must graphs of the torch.compile'd step, captured up front by warm_up as a server
    does (the same greedy tokens in fp32); staggered arrivals exercise several batch and context buckets."""
    from training.engine import Engine, SamplingParams

    prompts = ["def add(a, b):\n    return", "import os\nimport", "class Foo:\n    def __init__(self", "x = [1, 2,"]
    outputs = {}
    for mode in ("static", "graphs", "compiled"):
        engine = Engine(trained / "export", device="cuda", dtype="float32", max_batch=8, decode=mode)
        if mode == "compiled":
            assert engine.warm_up() == len(engine._graphs) == 3  # batches 2, 4, 8 (one request: two rows) x one context
        first = [engine.submit(engine.encode(p), SamplingParams(max_tokens=40, temperature=0)) for p in prompts[:2]]
        engine.step()
        engine.step()
        later = [engine.submit(engine.encode(p), SamplingParams(max_tokens=40, temperature=0)) for p in prompts[2:]]
        engine.run_until_idle()
        outputs[mode] = [r.output_ids for r in first + later]
        if mode != "static":
            assert engine.decode_mode == mode and len(engine._graphs) >= 2  # captured per shape, then replayed
        if mode == "compiled":
            assert len(engine._graphs) == 3  # nothing was captured while serving
    assert outputs["graphs"] == outputs["static"] and all(outputs["static"])
    assert outputs["compiled"] == outputs["static"]


def test_grouped_query_decoding_on_cuda_equals_generate_in_every_mode(tmp_path, data_dir):
    """The grouped-query decode step (each key head read once for its group, in place in the cache) on CUDA: rows of
    different lengths joining while others decode, in each decode mode, equal transformers' generate alone."""
    from training.engine import Engine, SamplingParams

    from .test_public_checkpoints import _hf_checkpoint

    hf = _hf_checkpoint(tmp_path, data_dir, rope_scaling=None).to("cuda")
    ids = torch.randint(0, 512, (4, 90), generator=torch.Generator().manual_seed(2))
    lengths = [90, 17, 55, 40]
    with torch.no_grad():
        expected = [hf.generate(ids[row:row + 1, :n].cuda(), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, n:].tolist() for row, n in enumerate(lengths)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for mode in ("dynamic", "static", "graphs", "compiled"):
        engine = Engine(tmp_path, device="cuda", dtype="float32", max_batch=4, decode=mode)
        requests = [engine.submit(ids[0, :lengths[0]].tolist(), params)]
        engine.step()
        requests += [engine.submit(ids[row, :n].tolist(), params) for row, n in enumerate(lengths[1:], 1)]
        engine.run_until_idle()
        assert [r.output_ids for r in requests] == expected, mode


def test_fused_and_triton_head_losses_on_cuda_equal_the_plain_one_in_bf16():
    """HeadLoss compiled, and TritonHeadLoss (training.kernels, autotuned on its first call) compiled and eager."""
    from training.config import preset
    from training.model import Transformer

    torch.manual_seed(0)
    model = Transformer(preset("debug", vocab_size=4096)).cuda()
    compiled = torch.compile(model)
    idx = torch.randint(0, 4096, (8, 128), device="cuda")
    targets = idx.roll(-1, dims=1)
    targets[:, :5] = -100  # ignored rows
    results = {}
    for kind, forward in (("plain", compiled), ("fused", compiled), ("triton", compiled), ("triton eager", model)):
        model.head_loss = kind.removesuffix(" eager")
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = forward(idx, targets)
        loss.backward()
        results[kind] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}
    from training import kernels

    assert kernels._head_loss_rows_tuned.best_config is not None  # the Triton runs took the autotuned kernel
    for kind in ("fused", "triton", "triton eager"):
        assert results[kind][0] == pytest.approx(results["plain"][0], rel=1e-3), kind
        for name, grad in results["plain"][1].items():
            torch.testing.assert_close(results[kind][1][name], grad, rtol=5e-2, atol=1e-4, msg=f"{kind}: {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_launch_config_of_the_triton_head_loss_gives_cross_entropy(dtype):
    """The autotuner keeps whichever config is fastest, so each must be right: a GPT-2 vocabulary (a partial last
    block after full ones), more rows than a persistent grid has programs, ignored rows."""
    import torch.nn.functional as F

    from training import kernels

    torch.manual_seed(0)
    logits = (torch.randn(3000, 50257, device="cuda") * 4).to(dtype)
    targets = torch.randint(0, 50257, (3000,), device="cuda")
    targets[::7] = -100
    valid = targets != -100
    reference = logits.float().clone().requires_grad_()
    loss = F.cross_entropy(reference, targets, ignore_index=-100)
    loss.backward()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for config in kernels._CONFIGS:
        grad = torch.full_like(logits, float("nan"))
        row_loss = torch.full((3000,), float("nan"), device="cuda")
        per_sm = config.kwargs["PER_SM"]
        kernels._head_loss_rows[(min(3000, sms * per_sm) if per_sm else 3000,)](
            logits, grad, row_loss, torch.where(valid, targets, 0), valid / valid.sum(), 3000, 50257,
            **config.all_kwargs())  # as the autotuner launches it: block, programs per SM, warps, register cap
        torch.testing.assert_close(row_loss.sum(), loss.detach(), rtol=1e-5, atol=1e-5, msg=str(config))
        torch.testing.assert_close(grad.float(), reference.grad, rtol=0, atol=1e-7 if dtype == torch.float32 else 1e-5,
                                   msg=str(config))


def test_cuda_graph_compile_mode_and_the_compiled_optimizer_train_like_the_default(tmp_path, data_dir):
    """--compile-mode reduce-overhead replays the step as CUDA graphs: each step's loss is read after the next is
    queued, so the loop must have copied it out of the graph's output before that replay. --compile-optimizer yes
    on top compiles the optimizer once, not once per new lr."""
    from torch._dynamo.utils import counters

    losses, graphs = {}, {}
    for mode, optimizer in (("default", "no"), ("reduce-overhead", "no"), ("reduce-overhead", "yes")):
        out = tmp_path / f"{mode}-{optimizer}"
        torch._dynamo.reset()  # each run compiles from scratch, so its graphs are its own
        counters.clear()
        assert train(quick_config(data_dir, out, device="cuda", compile_mode=mode, compile_optimizer=optimizer,
                                  max_steps=30, batch_size=16, seq_len=128)) == 0
        losses[mode, optimizer] = [e["loss"] for e in events(out, "step")]
        graphs[mode, optimizer] = counters["stats"]["unique_graphs"]
        if mode == "reduce-overhead":  # the graphs ran: inductor did not fall back to launches
            assert counters["inductor"]["cudagraph_skips"] == 0
    for run in (("reduce-overhead", "no"), ("reduce-overhead", "yes")):
        assert losses[run][-1] < losses[run][0] - 0.5
        assert losses[run] == pytest.approx(losses["default", "no"], rel=2e-2)
    # The clipping's graph and AdamW's (torch.optim's step breaks the graph; 2 on a CPU), whatever the lr: a
    # recompilation per lr would add one a step.
    assert 1 <= graphs["reduce-overhead", "yes"] - graphs["reduce-overhead", "no"] <= 3, graphs

