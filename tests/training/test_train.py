import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from training.checkpoint import CheckpointError
from training.config import ConfigError
from training.trainer import EXIT_STOPPED, lr_at, train

from .conftest import events, quick_config


def test_loss_falls_and_events_carry_the_facts(trained):
    steps = events(trained, "step")
    assert len(steps) == 40
    first, last = sum(s["loss"] for s in steps[:5]) / 5, sum(s["loss"] for s in steps[-5:]) / 5
    assert last < first - 0.5
    evals = events(trained, "eval")
    assert [e["step"] for e in evals] == [15, 30, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    start = events(trained, "start")[0]
    assert start["flops_per_token"] == 6 * start["matmul_parameters"] + 12 * 2 * 4 * 16 * 64
    assert start["peak_source"] == "measured fp32 matmul on this CPU" and start["peak_flops"] > 1e9
    assert start["attention_kernel"] == "flash_attention"  # PyTorch's CPU flash kernel (SDPA's own choice)
    assert start["optimizer"] == "AdamW, fused"  # --compile-optimizer auto: compiled only with a compiled model
    step = steps[-1]
    assert step["tokens"] == 40 * 8 * 64
    assert step["flops"] == pytest.approx(start["flops_per_token"] * step["tokens"])
    assert 0 < step["mfu"] < 1 and step["tokens_per_s"] > 0 and step["memory_bytes"] > 0
    assert step["energy_j"] is None  # no NVML on a CPU


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = quick_config("d", "o", max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def _train_cmd(data_dir, out, steps):
    return [sys.executable, "-m", "training", "train", "--data", str(data_dir), "--out", str(out),
            "--preset", "debug", "--batch-size", "4", "--seq-len", "64", "--max-steps", str(steps),
            "--warmup-steps", "5", "--eval-interval", "1000", "--eval-batches", "1", "--checkpoint-interval", "1000"]


def _stopped_by_sigterm(cmd: list[str], out, *, after_steps: int, wait: float = 60) -> dict:
    """Starts a training run, sends it SIGTERM once it has logged after_steps steps; its "stopped" event."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    log = out / "events.jsonl"
    deadline = time.time() + wait
    while time.time() < deadline and not (log.exists() and log.read_text().count('"event": "step"') >= after_steps):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_STOPPED, proc.stderr.read()
    return events(out, "stopped")[0]


def test_sigterm_checkpoints_and_a_resumed_run_matches_an_uninterrupted_one(tmp_path, data_dir):
    steps = 250
    straight = tmp_path / "straight"
    assert subprocess.run(_train_cmd(data_dir, straight, steps), capture_output=True).returncode == 0

    interrupted = tmp_path / "interrupted"
    stopped = _stopped_by_sigterm(_train_cmd(data_dir, interrupted, steps), interrupted, after_steps=20)
    assert stopped["signal"] == "SIGTERM" and stopped["resumable"] is True
    assert 20 <= stopped["step"] < steps
    assert not (interrupted / "export").exists()

    assert subprocess.run(_train_cmd(data_dir, interrupted, steps), capture_output=True).returncode == 0
    resumed_start = events(interrupted, "start")[1]
    assert resumed_start["resumed_from_step"] == stopped["step"]
    assert [(e["step"], e["loss"]) for e in events(interrupted, "step")] == \
        [(e["step"], e["loss"]) for e in events(straight, "step")]
    straight_export = json.loads((straight / "export" / "manifest.json").read_text())
    resumed_export = json.loads((interrupted / "export" / "manifest.json").read_text())
    assert resumed_export["files"]["model.safetensors"] == straight_export["files"]["model.safetensors"]
    assert resumed_export["tokens"] == straight_export["tokens"] == steps * 4 * 64


def test_corrupt_checkpoint_is_refused_clearly(tmp_path, data_dir):
    out = tmp_path / "run"
    assert train(quick_config(data_dir, out, max_steps=4)) == 0
    weights = out / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt \\(sha256 does not match"):
        train(quick_config(data_dir, out, max_steps=8))
    (out / "checkpoint" / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="checkpoint.json is corrupt"):
        train(quick_config(data_dir, out, max_steps=8))


def test_checkpoint_of_another_shape_is_refused(tmp_path, data_dir):
    out = tmp_path / "run"
    assert train(quick_config(data_dir, out, max_steps=3)) == 0
    with pytest.raises(ConfigError, match="was written for a different model or method"):
        train(quick_config(data_dir, out, max_steps=4, preset="tiny"))


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "error: --batch-size must be positive, not 0"),
    (["--lr", "0.001", "--min-lr", "0.01"], "error: --min-lr must be positive and at most --lr (0.001)"),
    (["--compile-mode", "max-autotune"],
     "error: --compile-mode must be one of default, reduce-overhead, max-autotune-no-cudagraphs, not 'max-autotune'"),
    (["--compile-mode", "reduce-overhead", "--grad-accum", "2"],
     "error: --compile-mode reduce-overhead replays graphs whose outputs are the gradients, which a second "
     "micro-batch would overwrite: use --grad-accum 1 or another compile mode"),
    (["--attention", "fa3"], "error: --attention must be one of auto, cudnn, flash, efficient, math, not 'fa3'"),
    (["--residual-dtype", "float16"], "error: --residual-dtype must be float32 or bfloat16, not 'float16'"),
    (["--residual-dtype", "bfloat16", "--dtype", "float32"],
     "error: --residual-dtype bfloat16 needs bf16 training: drop --dtype float32"),
    (["--residual-dtype", "bfloat16", "--device", "cpu"],
     "error: --residual-dtype bfloat16 needs bf16 training (--dtype bfloat16, or auto on CUDA)"),
    (["--compile-optimizer", "maybe"], "error: --compile-optimizer must be auto, yes or no, not 'maybe'"),
    (["--method", "bias"], "error: --method bias adapts an existing model: give --init-from EXPORT_DIR"),
    (["--method", "lora", "--init-from", "/nonexistent"], "error: /nonexistent is not a model folder (no config.json)"),
])
def test_cli_rejects_bad_configs_with_one_line(tmp_path, data_dir, args, message):
    cmd = [sys.executable, "-m", "training", "train", "--data", str(data_dir), "--out", str(tmp_path / "r"),
           "--max-steps", "2", "--warmup-steps", "0", "--seq-len", "64", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == message
    assert not (tmp_path / "r" / "checkpoint").exists()


def test_missing_data_fails_clearly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "training", "train", "--data", str(tmp_path / "none"), "--out",
                          str(tmp_path / "r")], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {tmp_path / 'none' / 'manifest.json'} not found: run `python -m training prepare` first"


def test_cli_end_to_end_on_the_stdlib_demo_corpus(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    prep = subprocess.run([sys.executable, "-m", "training", "prepare", "--demo-corpus", "stdlib", "--max-bytes",
                           "150000", "--vocab-size", "400", "--out", str(data)], capture_output=True, text=True)
    assert prep.returncode == 0, prep.stderr
    assert json.loads(prep.stdout)["tokens"] > 10_000
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["license"] == "PSF-2.0" and all(s["license"] == "PSF-2.0" for s in manifest["sources"])
    trained = subprocess.run([sys.executable, "-m", "training", "train", "--data", str(data), "--out", str(run),
                              "--max-steps", "6", "--warmup-steps", "1", "--seq-len", "64", "--batch-size", "4",
                              "--datasets", "aurora/stdlib,aurora/extra"], capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    card = (run / "export" / "README.md").read_text()
    assert "license: PSF-2.0" in card and "- aurora/stdlib\n- aurora/extra" in card
    scored = subprocess.run([sys.executable, "-m", "training", "eval", str(run / "export")], capture_output=True,
                            text=True)
    assert scored.returncode == 0
    assert [r["task"] for r in json.loads(scored.stdout)] == ["copy", "count", "brackets"]


def test_step_clock_on_an_async_device_reports_each_step_once_one_step_behind(monkeypatch):
    """On CUDA a step's loss is read only after the next step is queued, by waiting on an event recorded after that
    step (not on the whole stream, which holds the next step too); a flush reads the rest, in order."""
    from types import SimpleNamespace

    import torch

    from training.trainer import _StepClock

    waited = []

    class Event:  # torch.cuda.Event's part the clock uses, recording which step's event was waited on
        made = 0

        def __init__(self):
            Event.made += 1
            self.number = Event.made

        def record(self):
            pass

        def synchronize(self):
            waited.append(self.number)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    emitted = []
    events = SimpleNamespace(emit=lambda kind, **fields: emitted.append(fields))
    env = SimpleNamespace(device=SimpleNamespace(type="cuda"), world=1)
    clock = _StepClock(events, SimpleNamespace(joules=lambda: None), env, tokens_per_step=100, flops_per_token=10.0,
                       peak=0.0, totals=(1000, 5.0, 2.0))
    monkeypatch.setattr("training.trainer._memory_bytes", lambda device: 7)
    clock.queued(1, torch.tensor(3.0), 0.1)
    assert emitted == []
    clock.queued(2, torch.tensor(2.0), 0.2)
    assert [e["step"] for e in emitted] == [1] and waited == [1]
    clock.flush()
    assert waited == [1, 2]
    assert [(e["step"], e["loss"], e["lr"], e["tokens"]) for e in emitted] == [(1, 3.0, 0.1, 1100), (2, 2.0, 0.2, 1200)]
    assert clock.tokens == 1200 and clock.flops == 5.0 + 2 * 100 * 10.0 and clock.last_loss == 2.0
    assert all(e["tokens_per_s"] > 0 and e["mfu"] is None and e["memory_bytes"] == 7 for e in emitted)


def test_attention_choice_puts_that_kernel_first_and_restores_pytorchs_order():
    from torch.nn.attention import SDPBackend

    from training.trainer import attention_kernels

    before = torch._C._get_sdp_priority_order()
    with attention_kernels("cudnn"):
        assert torch._C._get_sdp_priority_order()[0] == SDPBackend.CUDNN_ATTENTION.value
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()  # fallbacks stay
    assert torch._C._get_sdp_priority_order() == before
    with attention_kernels("auto"):
        assert torch._C._get_sdp_priority_order() == before


def test_bf16_residual_stream_trains_and_carries_bf16_between_blocks(tmp_path, data_dir):
    from training.model import Transformer
    from training.config import preset

    model = Transformer(preset("debug", vocab_size=512))
    seen = []
    model.model.layers[1].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].dtype))
    idx = torch.randint(0, 512, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx, idx)
        model.residual_dtype = torch.bfloat16
        model(idx, idx)
    assert seen == [torch.float32, torch.bfloat16]  # fp32 between blocks by default, bf16 when asked

    out = tmp_path / "r"
    assert train(quick_config(data_dir, out, dtype="bfloat16", residual_dtype="bfloat16", max_steps=30)) == 0
    losses = [e["loss"] for e in events(out, "step")]
    assert losses[-1] < losses[0] - 0.5
    assert events(out, "start")[0]["train_config"]["residual_dtype"] == "bfloat16"


def test_a_resumed_run_uses_this_runs_optimizer_flags_not_the_checkpoints(tmp_path, data_dir, monkeypatch):
    """A checkpoint written by an unfused AdamW (before CPUs got the fused one) resumes fused."""
    import training.trainer as trainer

    from training.files import sha256_file

    out = tmp_path / "r"

    def rewrite_saved_groups(**flags):  # as another trainer (or device) wrote them
        saved = torch.load(out / "checkpoint" / "optimizer.pt", weights_only=True)
        for group in saved["optimizer"]["param_groups"]:
            group.update(flags)
        torch.save(saved, out / "checkpoint" / "optimizer.pt")
        meta = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
        meta["sha256"]["optimizer.pt"] = sha256_file(out / "checkpoint" / "optimizer.pt")
        (out / "checkpoint" / "checkpoint.json").write_text(json.dumps(meta))

    def run(max_steps, **overrides):
        assert train(quick_config(data_dir, out, max_steps=max_steps, warmup_steps=1, checkpoint_interval=2,
                                  eval_interval=2, **overrides)) == 0

    optimizers = []
    load = trainer.load_checkpoint

    def load_and_keep(directory, *, model, optimizer):
        optimizers.append(optimizer)
        return load(directory, model=model, optimizer=optimizer)

    monkeypatch.setattr(trainer, "load_checkpoint", load_and_keep)
    run(2)
    rewrite_saved_groups(fused=False)
    run(4)
    assert [e["resumed_from_step"] for e in events(out, "start")] == [None, 2]
    assert all(group["fused"] for group in optimizers[0].param_groups)
    # A fused run's checkpoint resumes under the compiled optimizer, its lr turned into the tensor that one fills; on
    # a CPU through the single-tensor path, the one that takes a tensor lr and can also run eagerly there.
    run(6, compile_optimizer="yes")
    assert [e["resumed_from_step"] for e in events(out, "start")] == [None, 2, 4]
    assert all(not (g["fused"] or g["foreach"] or g["capturable"]) and isinstance(g["lr"], torch.Tensor)
               for g in optimizers[1].param_groups)
    last_lr = lr_at(5, quick_config(data_dir, out, max_steps=6, warmup_steps=1))
    assert float(optimizers[1].param_groups[0]["lr"]) == pytest.approx(last_lr)
    # And back, from a compiled run's checkpoint as CUDA writes it (foreach, capturable): fused, none of those left.
    rewrite_saved_groups(foreach=True, capturable=True, fused=None)
    run(8, compile_optimizer="no")
    assert all(g["fused"] and not g["foreach"] and not g["capturable"] and isinstance(g["lr"], float)
               for g in optimizers[2].param_groups)
    saved = torch.load(out / "checkpoint" / "optimizer.pt", weights_only=True)["optimizer"]["param_groups"]
    # Flags AdamW accepts together: fused with foreach or capturable left over would not be.
    torch.optim.AdamW([torch.zeros(1)], **{k: saved[0][k] for k in ("lr", "fused", "foreach", "capturable")})


def test_the_cuda_graph_compile_mode_trains_where_there_are_no_graphs(tmp_path, data_dir):
    """On a CPU reduce-overhead compiles as the default mode does (CUDA graphs need a GPU; test_gpu covers that)."""
    out = tmp_path / "r"
    assert train(quick_config(data_dir, out, compile="yes", compile_mode="reduce-overhead", max_steps=20)) == 0
    losses = [e["loss"] for e in events(out, "step")]
    assert losses[-1] < losses[0] - 0.5
    start = events(out, "start")[0]
    assert start["compile_mode"] == "reduce-overhead"
    assert start["optimizer"] == "AdamW and clipping compiled"  # auto, with the model
    assert start["train_config"]["head_loss"] == "auto" and start["head_loss"] == "fused"  # compiled too


def test_the_compiled_optimizer_follows_the_fused_one_and_resumes_exactly(tmp_path, data_dir):
    steps = 40
    runs = {flag: tmp_path / flag for flag in ("no", "yes")}
    for flag, out in runs.items():
        done = subprocess.run(_train_cmd(data_dir, out, steps) + ["--compile-optimizer", flag], capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
    assert events(runs["no"], "start")[0]["optimizer"] == "AdamW, fused"
    assert events(runs["yes"], "start")[0]["optimizer"] == "AdamW and clipping compiled"
    # The same update and clipping, summed in another order: equal up to rounding, step after step.
    assert [e["loss"] for e in events(runs["yes"], "step")] == \
        pytest.approx([e["loss"] for e in events(runs["no"], "step")], rel=2e-3)

    interrupted = tmp_path / "interrupted"
    cmd = _train_cmd(data_dir, interrupted, steps) + ["--compile-optimizer", "yes"]
    stopped = _stopped_by_sigterm(cmd, interrupted, after_steps=10, wait=120)["step"]  # the first compiles
    assert 10 <= stopped < steps
    # The lr lives in a tensor the schedule fills: the checkpoint carries it, and the resumed run goes on exactly.
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert events(interrupted, "start")[1]["resumed_from_step"] == stopped
    assert [(e["step"], e["loss"]) for e in events(interrupted, "step")] == \
        [(e["step"], e["loss"]) for e in events(runs["yes"], "step")]


def test_train_help_explains_every_option_with_its_default():
    from dataclasses import fields

    from training.cli import TRAIN_HELP
    from training.config import TrainConfig

    assert set(TRAIN_HELP) == {f.name for f in fields(TrainConfig)} - {"extra"}  # a new field needs its line
    shown = subprocess.run([sys.executable, "-m", "training", "train", "--help"], capture_output=True, text=True)
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())  # argparse wraps lines
    assert "--compile-optimizer COMPILE_OPTIMIZER torch.compile the clipping and AdamW: auto (with the model) | yes | " \
           "no (default auto)" in text
    assert "--lora-targets LORA_TARGETS the projections LoRA adapts (default q_proj,v_proj); comma-separated" in text
    # And every argument of every command says what it is.
    from training.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert set(commands) == {"prepare", "train", "merge", "eval", "serve"}
    unexplained = [f"{name} {action.dest}" for name, command in commands.items() for action in command._actions
                   if action.dest != "help" and not action.help]
    assert unexplained == []


def test_the_compiled_optimizer_compiles_once_whatever_the_lr_and_survives_dynamos_eager_fallback(tmp_path, data_dir):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    assert train(quick_config(data_dir, tmp_path / "r", compile_optimizer="yes", max_steps=12, warmup_steps=4)) == 0
    # torch.optim's step breaks the graph: the clipping is one graph and AdamW's update another, for every lr the
    # schedule sets (a recompilation per lr would add one a step).
    assert counters["stats"]["unique_graphs"] == 2
    # Past dynamo's recompile limit (a process that trains again and again) the step runs eagerly, and still trains.
    with torch._dynamo.config.patch(recompile_limit=1):
        assert train(quick_config(data_dir, tmp_path / "again", compile_optimizer="yes", max_steps=4)) == 0
    torch._dynamo.reset()
