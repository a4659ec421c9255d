"""The fused head loss (--head-loss fused: model.HeadLoss compiled, model.HeadLossInBlocks eager) computes the plain
path's loss and gradients."""
from contextlib import nullcontext

import pytest
import torch

from training.config import ConfigError, preset
from training.model import HeadLossInBlocks, Transformer
from training.trainer import train

from .conftest import events, quick_config


def _loss_and_grads(model, idx, targets, fused, autocast=False):
    model.zero_grad(set_to_none=True)
    model.head_loss = "fused" if fused else "plain"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, loss = model(idx, targets)
    (loss * 0.5).backward()  # a scaled loss, as gradient accumulation makes, reaches the head's gradients too
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def batch():
    torch.manual_seed(0)
    model = Transformer(preset("debug", vocab_size=512))
    idx = torch.randint(0, 512, (3, 24))
    targets = torch.randint(0, 512, (3, 24))
    targets[0, :5] = -100  # ignored positions, as cross_entropy's ignore_index
    targets[2, -3:] = -100
    return model, idx, targets


# The batch's 72 rows as one block (the default for this vocabulary), and as blocks of 64 rows and of 8 (the last one
# partial, an ignored row in the first).
@pytest.fixture(params=[None, 1], ids=["one_block", "blocks_of_64_and_8"])
def blocks(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(HeadLossInBlocks, "BLOCK_ELEMENTS", request.param)
    return request.param


def test_fused_equals_plain_in_float32(batch, blocks):
    model, idx, targets = batch
    plain_loss, plain = _loss_and_grads(model, idx, targets, fused=False)
    fused_loss, fused = _loss_and_grads(model, idx, targets, fused=True)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert fused.keys() == plain.keys() and "lm_head.weight" in fused and "model.norm.weight" in fused
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_fused_equals_plain_under_bf16_autocast(batch, blocks):
    """The head's matmuls run in bf16 either way; the gradients keep the parameters' float32."""
    model, idx, targets = batch
    plain_loss, plain = _loss_and_grads(model, idx, targets, fused=False, autocast=True)
    fused_loss, fused = _loss_and_grads(model, idx, targets, fused=True, autocast=True)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-3, atol=1e-3)
    for name in plain:
        assert fused[name].dtype == torch.float32
        torch.testing.assert_close(fused[name], plain[name], rtol=2e-2, atol=2e-4, msg=name)


def test_compiled_fused_equals_eager_plain(batch, monkeypatch):
    model, idx, targets = batch
    plain_loss, plain = _loss_and_grads(model, idx, targets, fused=False)

    def eager_only(*args):
        raise AssertionError("a compiled step takes HeadLoss, whose pointwise work inductor fuses")
    monkeypatch.setattr(HeadLossInBlocks, "forward", staticmethod(eager_only))
    compiled = torch.compile(model)
    model.head_loss = "fused"
    model.zero_grad(set_to_none=True)
    _, loss = compiled(idx, targets)
    loss.backward()
    torch.testing.assert_close(loss.detach(), plain_loss, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * plain[name], rtol=1e-4, atol=1e-6, msg=name)  # plain's loss was halved


def test_eager_fused_runs_in_blocks_in_place(batch, monkeypatch):
    """Eager, no tensor of the whole tokens x vocab logits is made: the largest is one block's."""
    model, idx, targets = batch
    monkeypatch.setattr(HeadLossInBlocks, "BLOCK_ELEMENTS", 1)  # blocks of 64 rows
    model.head_loss = "fused"
    largest = []

    class Sizes(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == 512:
                largest.append(out.shape[0])
            return out
    with Sizes():
        _, loss = model(idx, targets)
    loss.backward()
    assert largest and max(largest) == 64  # 72 rows, vocabulary 512


def test_a_frozen_head_gets_no_gradient_and_the_rest_does(batch, blocks):
    model, idx, targets = batch
    model.lm_head.weight.requires_grad_(False)  # as --method bias or lora leave it
    _, grads = _loss_and_grads(model, idx, targets, fused=True)
    assert "lm_head.weight" not in grads and grads["model.norm.weight"].abs().sum() > 0


def test_training_with_the_fused_head_loss_follows_the_plain_run(tmp_path, data_dir):
    runs = {}
    for kind in ("plain", "fused"):
        assert train(quick_config(data_dir, tmp_path / kind, head_loss=kind, max_steps=12)) == 0
        runs[kind] = [e["loss"] for e in events(tmp_path / kind, "step")]
    assert runs["fused"] == pytest.approx(runs["plain"], rel=1e-4)
    assert runs["fused"][-1] < runs["fused"][0] - 0.5
    assert events(tmp_path / "fused", "start")[0]["head_loss"] == "fused"
    assert events(tmp_path / "plain", "start")[0]["head_loss"] == "plain"


def test_auto_fuses_the_head_loss_eager(tmp_path, data_dir):
    """Compiled, test_train's reduce-overhead run checks the same (a compiled run costs ~40 s of compiling here)."""
    assert train(quick_config(data_dir, tmp_path / "r", compile="no", max_steps=2, warmup_steps=1)) == 0
    start = events(tmp_path / "r", "start")[0]
    assert start["train_config"]["head_loss"] == "auto"
    assert start["head_loss"] == "fused"


def test_an_unknown_head_loss_is_refused_in_one_line(tmp_path, data_dir):
    with pytest.raises(ConfigError, match=r"^--head-loss must be auto, plain, fused or triton, not 'chunked'$"):
        train(quick_config(data_dir, tmp_path / "r", head_loss="chunked"))
    assert not (tmp_path / "r" / "events.jsonl").exists()


def test_validation_keeps_no_graph_and_skips_the_fused_gradient(batch, monkeypatch, data_dir):
    from training.data import TokenStream
    from training.evaluate import validation_loss
    from training.model import HeadLoss

    model, idx, targets = batch
    model.head_loss = "fused"
    applied, grad_modes = [], []
    original = HeadLoss.apply
    monkeypatch.setattr(HeadLoss, "apply", lambda *args: applied.append(1) or original(*args))
    model.register_forward_pre_hook(lambda module, inputs: grad_modes.append(torch.is_grad_enabled()))
    stream = TokenStream(data_dir, "val", 24, seed=0, shuffle=False)
    metrics = validation_loss(model, stream, batches=2, batch_size=2, device="cpu", autocast=nullcontext)
    assert grad_modes == [False, False] and applied == []
    assert metrics["val_loss"] > 0


def test_the_compiled_head_loss_has_the_shape_inductors_online_softmax_matches():
    """On a GPU inductor finds the max and the sum of exponentials in one pass over the logits when the graph holds
    softmax's exact shape (amax, subtract, exp, sum); logsumexp's masked_fill broke it, and the kernel read the
    (tokens x vocab) logits three times. That rewrite only fires on CUDA, so the same pattern is matched here on a
    copy of the compiled forward graph, through inductor's own pattern and replacement functions."""
    import copy

    from torch._inductor import config
    from torch._inductor.fx_passes import post_grad
    from torch._inductor.pattern_matcher import PatternMatcherPass, fwd_only, register_replacement

    probe = PatternMatcherPass()
    register_replacement(post_grad.prepare_softmax_pattern, post_grad.prepare_softmax_replacement,
                         [torch.empty(4, 8)], scalar_workaround=dict(dim=-1), trace_fn=fwd_only, pass_dicts=probe,
                         extra_check=lambda match: True)
    matches = []
    torch._dynamo.reset()
    model = Transformer(preset("debug", vocab_size=512))
    model.head_loss = "fused"
    idx = torch.randint(0, 512, (2, 16))
    probed = lambda graph: matches.append(probe.apply(copy.deepcopy(graph.owning_module).graph))  # noqa: E731
    with config.patch(post_grad_custom_pre_pass=probed), torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = torch.compile(model)(idx, idx)
        loss.backward()
    torch._dynamo.reset()  # nothing compiled under the probe is reused
    assert matches == [1, 0]  # the forward graph's head loss; the backward graph holds no softmax
