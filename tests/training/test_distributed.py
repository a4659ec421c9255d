"""DDP under torchrun (gloo on CPU) and gradient accumulation compute the same steps as one big batch."""
import subprocess
import sys

import pytest

from training.trainer import train

from .conftest import events, quick_config


def _losses(run):
    return [e["loss"] for e in events(run, "step")]


def test_gradient_accumulation_equals_one_big_batch(tmp_path, data_dir):
    assert train(quick_config(data_dir, tmp_path / "big", batch_size=8, grad_accum=1, max_steps=6)) == 0
    assert train(quick_config(data_dir, tmp_path / "accum", batch_size=4, grad_accum=2, max_steps=6)) == 0
    assert _losses(tmp_path / "accum") == pytest.approx(_losses(tmp_path / "big"), abs=1e-4)


@pytest.mark.e2e
def test_ddp_on_two_processes_matches_one_process(tmp_path, data_dir):
    args = ["--data", str(data_dir), "--preset", "debug", "--seq-len", "64", "--max-steps", "6", "--warmup-steps", "2",
            "--eval-interval", "3", "--eval-batches", "1"]
    one = subprocess.run([sys.executable, "-m", "training", "train", "--out", str(tmp_path / "one"),
                          "--batch-size", "8", *args], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "training", "train", "--out", str(tmp_path / "two"), "--batch-size", "4", *args],
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[:3000] + "\n…\n" + two.stderr[-3000:]
    start = events(tmp_path / "two", "start")
    assert len(start) == 1 and start[0]["world_size"] == 2  # only rank 0 writes events
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-4)
    assert events(tmp_path / "two", "step")[-1]["tokens"] == 6 * 8 * 64
    assert (tmp_path / "two" / "export" / "model.safetensors").exists()
    replicas = events(tmp_path / "two", "replicas")[0]  # two processes, one model: identical weights at the end
    assert replicas["in_sync"] and len(replicas["weights_sha256"]) == 2
    assert replicas["weights_sha256"][0] == replicas["weights_sha256"][1]
