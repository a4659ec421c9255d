"""Bad inputs, changed settings and interrupted runs: each is refused with one clear line, or recovered, and
nothing that was there is lost."""
import json
import os
import random
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from training.config import ConfigError, ModelConfig
from training.data import prepare, stdlib_corpus
from training.evaluate import TASKS
from training.export import check_export_target
from training.trainer import EXIT_STOPPED, train

from .conftest import events, quick_config


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "training", *map(str, args)], capture_output=True, text=True)


def _strict_json(path: Path):
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_export_replaces_only_an_earlier_export(tmp_path, trained):
    check_export_target(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_export_target(tmp_path / "empty")
    check_export_target(trained / "export")
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty and holds no earlier export"):
        check_export_target(project)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_export_target(tmp_path / "file")


def test_signal_during_validation_still_checkpoints_the_step_it_stops_at(tmp_path, data_dir, monkeypatch):
    import training.trainer as trainer

    real = trainer.validation_loss

    def validation_then_sigterm(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # lands while the step's stop decision has been taken
        return result

    monkeypatch.setattr(trainer, "validation_loss", validation_then_sigterm)
    out = tmp_path / "run"
    assert train(quick_config(data_dir, out, max_steps=30, eval_interval=10)) == EXIT_STOPPED
    stopped = events(out, "stopped")[0]
    checkpoint = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert checkpoint["step"] == stopped["step"] == 11  # the step after the evaluation, checkpointed first
    assert [e["step"] for e in events(out, "checkpoint")] == [11]


def test_resuming_with_other_settings_is_refused_and_touches_nothing(tmp_path, data_dir):
    out = tmp_path / "run"
    assert train(quick_config(data_dir, out, max_steps=3)) == 0
    before = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    log = (out / "events.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"other settings \(batch_size 8 -> 4, seed 1337 -> 5\).*same settings"):
        train(quick_config(data_dir, out, max_steps=6, batch_size=4, seed=5))
    assert {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()} == before
    assert (out / "events.jsonl").read_text() == log


def test_rerunning_a_finished_run_exports_what_it_measured(tmp_path, data_dir):
    out = tmp_path / "run"
    assert train(quick_config(data_dir, out, max_steps=4, eval_interval=2)) == 0
    first = _strict_json(out / "export" / "manifest.json")
    assert train(quick_config(data_dir, out, max_steps=4, eval_interval=2)) == 0
    again = _strict_json(out / "export" / "manifest.json")
    assert again["metrics"] == first["metrics"] and "val_loss" in again["metrics"]
    assert again["files"]["model.safetensors"] == first["files"]["model.safetensors"]
    assert "Validation loss" in (out / "export" / "README.md").read_text()


def test_a_crash_inside_save_checkpoint_resumes_from_the_newest_complete_copy(tmp_path, data_dir):
    import shutil

    out = tmp_path / "run"
    assert train(quick_config(data_dir, out, max_steps=3)) == 0
    shutil.copytree(out / "checkpoint", out / "step3")
    assert train(quick_config(data_dir, out, max_steps=5)) == 0
    # The crash between save_checkpoint's two renames: the new checkpoint complete in .tmp, the previous in .old.
    os.replace(out / "checkpoint", out / "checkpoint.tmp")
    os.replace(out / "step3", out / "checkpoint.old")
    assert train(quick_config(data_dir, out, max_steps=6)) == 0
    assert events(out, "start")[-1]["resumed_from_step"] == 5
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint.old").exists()
    # Only the previous one survived (the new one was still being written): that one.
    os.replace(out / "checkpoint", out / "checkpoint.old")
    (out / "checkpoint.tmp").mkdir()
    (out / "checkpoint.tmp" / "model.safetensors").write_bytes(b"half")
    assert train(quick_config(data_dir, out, max_steps=7)) == 0
    assert events(out, "start")[-1]["resumed_from_step"] == 6


def test_leftovers_beside_a_checkpoint_are_removed_so_deleting_it_starts_over(tmp_path, data_dir):
    import shutil

    out = tmp_path / "run"
    assert train(quick_config(data_dir, out, max_steps=3)) == 0
    shutil.copytree(out / "checkpoint", out / "checkpoint.old")
    assert train(quick_config(data_dir, out, max_steps=4)) == 0
    assert not (out / "checkpoint.old").exists()
    shutil.rmtree(out / "checkpoint")  # what the refusals advise: delete the checkpoint to start over
    assert train(quick_config(data_dir, out, max_steps=4)) == 0
    assert events(out, "start")[-1]["resumed_from_step"] is None


def test_a_checkpoint_from_before_newer_fields_still_resumes(tmp_path, data_dir):
    out = tmp_path / "run"
    assert train(quick_config(data_dir, out, max_steps=3)) == 0
    meta_path = out / "checkpoint" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    del meta["model_config"]["rope_scaling"], meta["run"], meta["metrics"], meta["train_loss"]
    meta_path.write_text(json.dumps(meta))  # as the trainer of the previous release wrote it
    assert train(quick_config(data_dir, out, max_steps=5)) == 0
    assert events(out, "start")[-1]["resumed_from_step"] == 3


def test_init_from_refuses_data_tokenized_with_another_tokenizer(tmp_path, data_dir, trained, corpus):
    other = tmp_path / "other-data"
    prepare([corpus], other, vocab_size=400, license="PSF-2.0")  # fewer tokens, so the vocabulary size alone passes
    with pytest.raises(ConfigError, match=f"prepare it with --tokenizer-from {trained / 'export'}"):
        train(quick_config(other, tmp_path / "ft", init_from=str(trained / "export"), max_steps=4))
    assert not (tmp_path / "ft" / "checkpoint").exists()


def test_merge_never_overwrites_a_folder_that_is_not_an_export(tmp_path, trained):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    base_manifest = (trained / "export" / "manifest.json").read_text()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    out = _cli("merge", adapter, "--base", trained / "export", "--out", project)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "is not empty and holds no earlier export" in out.stderr
    assert (project / "notes.txt").read_text() == "mine"
    out = _cli("merge", adapter, "--base", trained / "export", "--out", trained / "export")
    assert out.returncode == 2 and "not the base model or the adapter" in out.stderr
    assert (trained / "export" / "manifest.json").read_text() == base_manifest
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    out = _cli("merge", adapter, "--base", trained / "export", "--out", tmp_path / "merged")
    assert out.returncode == 2 and "needs r, lora_alpha, target_modules" in out.stderr
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
     "the weights cannot be read, the files may be truncated or corrupt"),
    (lambda d: (d / "tokenizer.json").write_text("{broken"), "tokenizer.json is not a readable tokenizer"),
    (lambda d: (d / "config.json").write_text("{broken"), "config.json is not valid JSON"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64})),
     "config.json lacks num_attention_heads, intermediate_size, num_hidden_layers, vocab_size"),
])
def test_eval_of_a_damaged_export_fails_with_one_line(tmp_path, trained, damage, message):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained / "export", copy)
    damage(copy)
    out = _cli("eval", copy)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_an_out_that_is_a_file_fails_with_one_line(tmp_path, data_dir):
    (tmp_path / "taken").write_text("x")
    out = _cli("train", "--data", data_dir, "--out", tmp_path / "taken", "--max-steps", "1", "--warmup-steps", "0",
               "--seq-len", "64")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and str(tmp_path / "taken") in out.stderr
    assert (tmp_path / "taken").read_text() == "x"


def test_a_config_with_another_activation_is_refused():
    config = json.loads(json.dumps(ModelConfig().to_hf()))
    config["hidden_act"] = "gelu"
    with pytest.raises(ConfigError, match="hidden_act 'gelu' is not supported"):
        ModelConfig.from_hf(config)


def test_the_stdlib_demo_corpus_leaves_out_installed_packages():
    entries, license = stdlib_corpus()
    root = Path(sysconfig.get_paths()["stdlib"])
    installed = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    assert license == "PSF-2.0" and root / "json" in entries and root / "os.py" in entries
    assert not any(e.name in ("site-packages", "dist-packages") or e.resolve() in installed for e in entries)


def test_bracket_items_are_half_balanced_and_wrong_copies_keep_the_length():
    answers = [right for _, right, _ in TASKS["brackets"](random.Random("0-brackets"))]
    assert answers.count(" yes") == answers.count(" no") == len(answers) // 2  # always "no" scores 0.5
    for _, right, wrong in TASKS["copy"](random.Random(1)):
        assert len(right) == len(wrong) and right != wrong


def test_argparse_mistakes_are_one_line_too():
    out = _cli("train", "--no-such-flag")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr == "error: python -m training: unrecognized arguments: --no-such-flag (see --help)\n"
    out = _cli("train", "--batch-size", "many")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--batch-size: invalid int value" in out.stderr


@pytest.mark.parametrize("overrides, message", [
    (dict(lora_alpha=0.0), "--lora-alpha must be positive, not 0.0"),
    (dict(lora_targets=()), "--lora-targets is empty: name the projections to adapt"),
])
def test_lora_settings_that_cannot_train_are_refused(tmp_path, overrides, message):
    config = quick_config(tmp_path, tmp_path / "r", method="lora", init_from=str(tmp_path), **overrides)
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_an_interrupted_prepare_leaves_the_earlier_dataset_whole_and_nothing_beside_it(tmp_path, corpus,
                                                                                         monkeypatch):
    import training.data as data

    out = tmp_path / "data"
    prepare([corpus], out, vocab_size=300, license="PSF-2.0")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed while the shards are being rewritten

    monkeypatch.setattr(data, "_write_split", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare([corpus], out, vocab_size=320, license="PSF-2.0")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "weights"]  # no temporary folder left


@pytest.mark.parametrize("flag, message", [("--max-seq-len", "--max-seq-len must be at least 2, not 1"),
                                           ("--max-waiting", "--max-waiting must be at least 1, not 0")])
def test_serve_settings_that_cannot_serve_are_one_line(trained, flag, message):
    out = _cli("serve", "--model", trained / "export", flag, "1" if flag == "--max-seq-len" else "0")
    assert out.returncode == 2 and out.stderr == f"error: {message}\n"


def test_a_port_file_in_a_missing_folder_is_one_line_before_the_model_loads(tmp_path):
    port_file = tmp_path / "nowhere" / "engine.port"
    out = _cli("serve", "--model", tmp_path / "no-model", "--port", "0", "--port-file", port_file)
    assert out.returncode == 2
    assert out.stderr == f"error: --port-file {port_file}: the folder {port_file.parent} does not exist\n"
    assert not port_file.parent.exists()


def test_code_version_says_when_the_files_differ_from_the_commit(tmp_path):
    from training.trainer import code_version

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert code_version(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) == head + "+dirty"
    assert code_version(tmp_path.parent / "nowhere") == "unknown"


@pytest.mark.parametrize("overrides, message", [
    (dict(lr=float("inf")), "--lr must be a finite number"),
    (dict(lr=float("nan"), min_lr=float("nan")), "must be a finite number"),
    (dict(seq_len=300), "--seq-len 300 is longer than preset debug's context of 256 tokens"),
])
def test_settings_that_cannot_train_a_sound_model_are_refused_before_anything_runs(tmp_path, data_dir, overrides,
                                                                                   message):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        train(quick_config(data_dir, out, max_steps=3, **overrides))
    assert not (out / "events.jsonl").exists() and not (out / "checkpoint").exists()


def test_a_diverging_run_stops_with_one_line_and_exports_nothing(tmp_path, data_dir):
    out = tmp_path / "run"
    result = _cli("train", "--data", data_dir, "--out", out, "--preset", "debug", "--seq-len", "64", "--max-steps",
                  "6", "--warmup-steps", "0", "--lr", "1e30", "--min-lr", "1")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "training diverged and nothing was exported" in result.stderr
    assert not (out / "export").exists()
    log = [json.loads(line, parse_constant=lambda c: pytest.fail(f"events.jsonl holds {c}"))
           for line in (out / "events.jsonl").read_text().splitlines()]
    diverged = [e for e in log if e["event"] == "diverged"]
    assert len(diverged) == 1 and diverged[0]["loss"] is None  # strict JSON: a NaN is written as null
    assert [e["event"] for e in log][-1] == "diverged"


def test_an_occupied_export_folder_is_refused_before_the_run_spends_anything(tmp_path, data_dir):
    out = tmp_path / "run"
    (out / "export").mkdir(parents=True)
    (out / "export" / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="is not empty and holds no earlier export"):
        train(quick_config(data_dir, out, max_steps=3))
    assert not (out / "events.jsonl").exists() and not (out / "checkpoint").exists()
    assert (out / "export" / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("meta, message", [({"format_version": 1}, "is incomplete"), ([1], "not a JSON object")])
def test_a_checkpoint_json_without_the_runs_state_is_refused_with_one_line(tmp_path, data_dir, meta, message):
    out = tmp_path / "run"
    assert train(quick_config(data_dir, out, max_steps=3)) == 0
    (out / "checkpoint" / "checkpoint.json").write_text(json.dumps(meta))
    result = _cli("train", "--data", data_dir, "--out", out, "--preset", "debug", "--seq-len", "64", "--max-steps",
                  "5", "--warmup-steps", "3", "--batch-size", "8")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_an_export_whose_last_rename_fails_leaves_the_earlier_export_and_nothing_beside_it(tmp_path, trained,
                                                                                            monkeypatch):
    import shutil

    from training.export import export, load_exported

    target = tmp_path / "runs" / "export"
    shutil.copytree(trained / "export", target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    model, _ = load_exported(target)
    rename = Path.rename

    def failing(self, destination):
        if Path(destination) == target and self.name == "export.tmp":
            raise OSError(1, "Operation not permitted", str(target))
        return rename(self, destination)
    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError):
        export(model, target, tokenizer_dir=target, manifest={"name": "again"}, card="---\n{}\n---\n")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["export"]  # no export.tmp, no export.old


def test_eval_scores_the_suite_the_card_reports_and_the_tokenizer_knows_the_context(trained):
    result = _cli("eval", trained / "export")
    assert result.returncode == 0, result.stderr
    manifest = _strict_json(trained / "export" / "manifest.json")
    assert json.loads(result.stdout) == manifest["evaluations"]
    config = _strict_json(trained / "export" / "config.json")
    tokenizer_config = _strict_json(trained / "export" / "tokenizer_config.json")
    assert tokenizer_config["model_max_length"] == config["max_position_embeddings"] == 64


def test_ctrl_c_outside_the_training_loop_is_one_line_and_exit_130(monkeypatch, capsys):
    from training import cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_run", interrupted)
    assert cli.main(["eval", "some/export"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted: eval stopped")
