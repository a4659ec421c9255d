"""DDP under torchrun (gloo on CPU) and gradient accumulation compute the same steps as one big batch."""
import json
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


def _worker(agent_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker process of this rank (from its environment), or None yet."""
    from pathlib import Path

    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != agent_pid:
                continue
            if f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except OSError:  # gone meanwhile
            continue
    return None


@pytest.mark.e2e
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_checkpointed_step(tmp_path, data_dir):
    import os
    import signal
    import time

    out = tmp_path / "two"
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "training", "train", "--out", str(out), "--data", str(data_dir), "--preset",
                              "debug", "--seq-len", "64", "--batch-size", "4", "--max-steps", "5000",
                              "--warmup-steps", "2", "--eval-interval", "100000", "--checkpoint-interval", "100000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "events.jsonl").exists() and
                                              (out / "events.jsonl").read_text().count('"event": "step"') >= 5):
            time.sleep(0.1)
        rank1 = _worker(agent.pid, 1)
        assert rank1, "torchrun's rank-1 worker not found"
        os.kill(rank1, signal.SIGTERM)  # rank 1 only: rank 0 learns it with the next step's all-reduce
        agent.wait(timeout=120)  # no rank waits forever in a collective the other left
    finally:
        agent.kill()
    stopped = events(out, "stopped")
    assert len(stopped) == 1 and stopped[0]["signal"] == "another rank's" and stopped[0]["resumable"]
    checkpoint = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert checkpoint["step"] == stopped[0]["step"] and 5 <= checkpoint["step"] < 5000
    assert not (out / "export").exists()


@pytest.mark.e2e
def test_cuda_graph_compile_mode_is_refused_under_torchrun_before_anything_is_written(tmp_path, data_dir):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "training", "train", "--out", str(tmp_path / "two"), "--data", str(data_dir),
                          "--preset", "debug", "--compile-mode", "reduce-overhead"], capture_output=True, text=True)
    assert run.returncode != 0
    assert "error: --compile-mode reduce-overhead runs in one process: drop it under torchrun" in run.stderr
    assert not (tmp_path / "two").exists()
