"""Checkpoints that resume exactly: weights (safetensors), optimizer and RNG state, a JSON state with the
step and data cursor, and the sha256 of each file so a corrupt checkpoint is refused with a clear message."""
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.files import replace_folder, sha256_file, unshared_state

FORMAT_VERSION = 1
FILES = ("model.safetensors", "optimizer.pt")
# What resuming reads of checkpoint.json (the trainer's state, as save_checkpoint writes it).
REQUIRED = ("sha256", "step", "cursor", "run_id", "tokens", "flops", "device_seconds", "model_config", "method")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def save_checkpoint(directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write to a temporary folder, then swap it in, so a crash never leaves half a checkpoint."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(unshared_state(model.state_dict()), str(tmp / "model.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp / "optimizer.pt")
    meta = {"format_version": FORMAT_VERSION, **state, "sha256": {name: sha256_file(tmp / name) for name in FILES}}
    (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2))
    replace_folder(tmp, directory)


def recover_checkpoint(directory: Path) -> None:
    """After a crash in save_checkpoint: a crash between its two renames leaves no checkpoint, the new one complete
    in .tmp (checkpoint.json is written last) and the previous one in .old; take the newest complete one. With a
    checkpoint in place, leftovers are removed, so that deleting the checkpoint never brings back a stale one."""
    directory = Path(directory)
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    if not directory.exists():
        for candidate in (tmp, old):
            if (candidate / "checkpoint.json").exists():
                os.replace(candidate, directory)
                break
    if directory.exists():
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)


def read_checkpoint_meta(directory: Path) -> dict:
    directory = Path(directory)
    meta_path = directory / "checkpoint.json"
    if not meta_path.exists():
        raise CheckpointError(f"{directory} is not a checkpoint (no checkpoint.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{meta_path} is corrupt (not JSON); delete the checkpoint to start over") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} is corrupt (not a JSON object); delete the checkpoint to start over")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory} has checkpoint format {meta.get('format_version')!r}; this trainer "
                              f"reads format {FORMAT_VERSION}")
    missing = [key for key in REQUIRED if key not in meta]
    if missing or not isinstance(meta["sha256"], dict):
        raise CheckpointError(f"{meta_path} is incomplete (no {', '.join(missing) or 'sha256 table'}); delete the "
                              "checkpoint to start over")
    for name in FILES:
        path = directory / name
        if not path.exists():
            raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
        if sha256_file(path) != meta["sha256"].get(name):
            raise CheckpointError(f"{path} is corrupt (sha256 does not match checkpoint.json); delete the "
                                  "checkpoint or restore it")
    return meta


def load_checkpoint(directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    meta = read_checkpoint_meta(directory)
    directory = Path(directory)
    weights = load_file(str(directory / "model.safetensors"), device=str(next(model.parameters()).device))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{directory}/model.safetensors does not fit this model (missing "
                              f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    extra = torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu")
    try:
        optimizer.load_state_dict(extra["optimizer"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{directory}/optimizer.pt does not fit this run's optimizer: {exc}") from None
    torch.set_rng_state(extra["rng"]["cpu"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
    return meta
