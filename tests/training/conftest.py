"""Tiny corpora and models made on the spot: nothing is downloaded."""
import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from training.config import TrainConfig
from training.data import prepare
from training.trainer import train


def stdlib_slice(directory: Path, limit: int = 250_000) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if total > limit:
            break
        shutil.copy(path, directory / path.name)
        total += path.stat().st_size
    return directory


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return stdlib_slice(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare([corpus], out, vocab_size=512, license="PSF-2.0", description="stdlib slice")
    return out


def quick_config(data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(data=str(data), out=str(out), preset="debug", batch_size=8, seq_len=64, max_steps=30,
                  warmup_steps=3, eval_interval=15, eval_batches=2, checkpoint_interval=1000, lr=3e-3, min_lr=3e-4)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_dir) -> Path:
    """A debug model trained for a few steps and exported; returns the run folder."""
    out = tmp_path_factory.mktemp("run") / "base-run"
    assert train(quick_config(data_dir, out, max_steps=40)) == 0
    return out


@pytest.fixture(scope="module")
def hf(trained):
    """transformers' own model of the trained export, in float32: the reference our engine is held to."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(trained / "export"), local_files_only=True,
                                                dtype=torch.float32).eval()


def events(run: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "events.jsonl").read_text().splitlines()) if e["event"] == kind]
