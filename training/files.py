"""Small file helpers shared by data preparation, checkpoints and exports."""
import hashlib
import json
import shutil
from pathlib import Path

import torch

from training.config import ConfigError


def read_json_object(path: Path) -> dict:
    """A JSON object from a model folder's file (config.json and the like); one line naming the file when it is not."""
    try:
        value = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return value


def check_replaceable(directory: Path, *, earlier: str, is_earlier, error: type[Exception], label: str = "") -> None:
    """Only a new or empty folder, or one holding an earlier output of the same kind (is_earlier(its manifest.json)),
    may be replaced whole by replace_folder: an --out naming anything else (a project folder, another kind of output)
    must not be wiped. Refusals raise `error`, naming the folder as `label` (its path by default)."""
    label = label or str(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise error(f"{label} is a file: give an empty or new folder")
    if not any(directory.iterdir()):
        return
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = None
    if not (isinstance(manifest, dict) and is_earlier(manifest)):
        raise error(f"{label} is not empty and holds no earlier {earlier}: give an empty or new folder (nothing was "
                    "written)")


def replace_folder(new: Path, target: Path) -> None:
    """Put the finished folder `new` in place of `target` (a checkpoint, an export, a prepared dataset). What was
    there is set aside as TARGET.old, not deleted, until the new one is in place: a rename that fails puts it back,
    and a crash between the two renames leaves both whole (recover_checkpoint takes the newest)."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    try:
        new.rename(target)
    except OSError:
        if old.exists():
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def unshared_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): keep each storage once."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out
