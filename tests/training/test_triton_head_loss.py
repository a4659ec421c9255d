"""--head-loss triton: training.kernels' Triton kernel computes the plain path's loss and gradients.

Here Triton's interpreter runs the kernel on a CPU. It must be switched on (TRITON_INTERPRET=1) before the kernel is
defined, so these checks run in a child process. On a GPU, tests/training/test_gpu.py runs the compiled kernel,
autotuned, against the plain path in bf16.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from training.config import ConfigError
from training.trainer import train

from .conftest import events, quick_config

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is in the dev extra on Linux x86-64 (and comes with CUDA builds of torch)")


def run_interpreted(code: str, *args: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@needs_triton
def test_the_kernel_gives_cross_entropys_loss_and_gradient():
    """Rows past the number of programs (the persistent loop), a vocabulary ending in a partial block, ignored rows,
    large logits, a row of equal logits, float32 and bf16, and no rows at all."""
    out = run_interpreted("""
        import torch
        import torch.nn.functional as F
        from training import kernels
        from training.kernels import head_loss_grad

        assert kernels.INTERPRETED and 10 > kernels.INTERPRETED_PROGRAMS and 600 % kernels.INTERPRETED_BLOCK
        torch.manual_seed(0)
        logits = torch.randn(10, 600) * 30
        logits[4] = 7.0
        targets = torch.randint(0, 600, (10,))
        targets[[0, 7]] = -100
        valid = targets != -100
        for dtype, rtol, atol in ((torch.float32, 1e-5, 1e-7), (torch.bfloat16, 0, 4e-3)):
            x = logits.to(dtype)
            grad, row_loss = head_loss_grad(x, torch.where(valid, targets, 0), valid / valid.sum())
            reference = x.float().clone().requires_grad_()  # a copy: float() of a float32 x is x
            loss = F.cross_entropy(reference, targets, ignore_index=-100)
            loss.backward()
            assert grad.dtype == dtype and row_loss.dtype == torch.float32 and row_loss.shape == (10,)
            torch.testing.assert_close(row_loss.sum(), loss.detach(), rtol=1e-6, atol=1e-5)
            assert row_loss[[0, 7]].tolist() == [0.0, 0.0] and grad[[0, 7]].abs().max() == 0
            torch.testing.assert_close(grad.float(), reference.grad, rtol=rtol, atol=atol)
        # An ignored row's target is not read: -100 or far past the end would read outside the logits.
        unread = torch.where(valid, targets, torch.tensor([-100, 10**12] * 5))
        again, again_loss = head_loss_grad(logits, unread, valid / valid.sum())
        assert torch.equal(again, head_loss_grad(logits, torch.where(valid, targets, 0), valid / valid.sum())[0])
        grad, row_loss = head_loss_grad(torch.empty(0, 600), torch.empty(0, dtype=torch.long), torch.empty(0))
        assert grad.shape == (0, 600) and row_loss.shape == (0,)
        print("ok")
    """)
    assert out.strip() == "ok"


@needs_triton
def test_the_triton_head_loss_equals_the_plain_one_eager_and_compiled():
    out = run_interpreted("""
        import json
        import torch
        from torch._dynamo.utils import counters
        from training import kernels
        from training.config import preset
        from training.model import Transformer

        launches = []
        kernel = kernels._head_loss_rows

        class Counted:  # the op looks the kernel up when it runs: count its launches, compiled or not
            def __getitem__(self, grid):
                launches.append(grid)
                return kernel[grid]

        kernels._head_loss_rows = Counted()
        torch.manual_seed(0)
        model = Transformer(preset("debug", vocab_size=512))
        idx = torch.randint(0, 512, (3, 24))
        targets = torch.randint(0, 512, (3, 24))
        targets[0, :5] = -100

        def run(kind, forward, autocast=False):
            model.zero_grad(set_to_none=True)
            model.head_loss = kind
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                _, loss = forward(idx, targets)
            (loss * 0.5).backward()
            return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

        compared = []
        for autocast, tolerance in ((False, 1e-5), (True, 2e-2)):
            plain_loss, plain = run("plain", model, autocast)
            # compiled in float32 only: one compilation (it is the slow part of this test)
            for name, forward in (("eager", model), ("compiled", torch.compile(model)))[:1 if autocast else 2]:
                launched = len(launches)
                loss, grads = run("triton", forward, autocast)
                assert len(launches) == launched + 1, name  # the Triton kernel made this loss, once
                torch.testing.assert_close(loss, plain_loss, rtol=tolerance / 10, atol=tolerance / 10)
                assert grads.keys() == plain.keys() and "lm_head.weight" in grads
                for key in plain:
                    torch.testing.assert_close(grads[key], plain[key], rtol=tolerance, atol=tolerance / 100, msg=key)
                compared.append(name + (" bf16" if autocast else ""))
        assert not counters["graph_break"]  # the custom op is one call in the compiled graph
        print(json.dumps(compared))
    """)
    assert json.loads(out) == ["eager", "compiled", "eager bf16"]


@needs_triton
def test_training_with_the_triton_head_loss_follows_the_fused_run(tmp_path, data_dir):
    small = dict(batch_size=2, seq_len=32, max_steps=5, warmup_steps=1, eval_interval=5, eval_batches=1)
    assert train(quick_config(data_dir, tmp_path / "fused", head_loss="fused", **small)) == 0
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in small.items()]
    run_interpreted("""
        import sys
        from training.cli import main
        sys.exit(main(sys.argv[1:]))
    """, "train", "--data", str(data_dir), "--out", str(tmp_path / "triton"), "--preset", "debug", "--lr", "3e-3",
        "--min-lr", "3e-4", "--checkpoint-interval", "1000", "--head-loss", "triton", *flags)
    start = events(tmp_path / "triton", "start")[0]
    assert start["head_loss"] == "triton" and start["train_config"]["head_loss"] == "triton"
    fused, triton = ([e["loss"] for e in events(tmp_path / run, "step")] for run in ("fused", "triton"))
    assert len(triton) == 5 and triton == pytest.approx(fused, rel=1e-5)
    assert (tmp_path / "triton" / "export" / "model.safetensors").exists()


def test_the_triton_head_loss_is_refused_on_a_cpu_and_without_triton(tmp_path, data_dir, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match=r"^--head-loss triton is a CUDA kernel: train on a GPU, or use --head-loss "
                                          r"fused$"):
        train(quick_config(data_dir, tmp_path / "cpu", head_loss="triton", device="cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "triton", None)  # as on an install without Triton: importing it fails
    with pytest.raises(ConfigError, match=r"^--head-loss triton needs Triton \(CUDA builds of torch install it\): "):
        train(quick_config(data_dir, tmp_path / "missing", head_loss="triton", device="cpu"))
    assert not (tmp_path / "cpu").exists() and not (tmp_path / "missing").exists()
