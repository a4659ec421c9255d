"""Export a standard Hugging Face folder (or a PEFT adapter) plus manifest.json, and read exports back."""
import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from training.adapt import lora_modules, lora_state_for_peft
from training.config import ConfigError, ModelConfig
from training.files import check_replaceable, read_json_object, replace_folder, sha256_file, unshared_state
from training.model import Transformer
from training.tokenizer import EOS, TOKENIZER_FILES

FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def save_weights(state: dict[str, torch.Tensor], directory: Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 prefix: str = "model") -> list[str]:
    """model.safetensors, or model-0000k-of-0000n.safetensors + index when larger than max_shard_bytes."""
    state = {k: v.detach().cpu().contiguous() for k, v in unshared_state(state).items()}
    shards, current, size = [], {}, 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = state[name]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(directory / f"{prefix}.safetensors"), metadata={"format": "pt"})
        return [f"{prefix}.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / f"{prefix}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names + [f"{prefix}.safetensors.index.json"]


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise ConfigError(f"{directory / shard} is missing: model.safetensors.index.json lists it")
            state.update(load_file(str(directory / shard)))
        return state
    single = directory / "model.safetensors"
    if not single.exists():
        pickled = " (PyTorch .bin weights are not read: save them as safetensors)" \
            if any(directory.glob("*.bin")) else ""
        raise ConfigError(f"{directory} has no model.safetensors (nor a sharded index){pickled}")
    return load_file(str(single))


def load_exported(directory: Path, *, device="cpu") -> tuple[Transformer, dict]:
    """A model from any Llama-architecture Hugging Face folder; returns (model, config.json dict)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise ConfigError(f"{directory} is not a model folder (no config.json)")
    hf_config = read_json_object(config_path)
    model = Transformer(ModelConfig.from_hf(hf_config))
    try:
        state = load_weights(directory)
    except ConfigError:
        raise
    except (SafetensorError, ValueError, KeyError) as exc:
        raise ConfigError(f"{directory}: the weights cannot be read, the files may be truncated or corrupt "
                          f"({exc.__class__.__name__}: {exc})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape than config.json says
        raise ConfigError(f"{directory}: weights do not match config.json ({str(exc).splitlines()[-1].strip()})") from None
    allowed_missing = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise ConfigError(f"{directory}: weights do not match config.json (missing {sorted(set(missing))[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]})")
    return model.to(device), hf_config


def card_text(*, name: str, license: str, datasets: list[str], base_model: str | None, method: str,
              evaluations: list[dict], metrics: dict, description: str, adapter: bool, base_label: str = "") -> str:
    """base_model: the base's repository id (org/name), the card's metadata; base_label: how the text names a base
    known only as a local folder (a Hub or registry would refuse an id that names nothing there)."""
    metadata = {"license": license or "other", "library_name": "peft" if adapter else "transformers",
                "pipeline_tag": "text-generation", "tags": ["gatehouse", "llama"] + (["lora"] if adapter else [])}
    if datasets:
        metadata["datasets"] = datasets
    if base_model:
        metadata["base_model"] = base_model
        metadata["base_model_relation"] = "adapter" if adapter else "finetune"
    results = [{"task": {"type": "text-generation"},
                "dataset": {"type": f"gatehouse-{e['task']}", "name": f"Generated {e['task']} task"},
                "metrics": [{"type": e["metric"], "value": round(e["value"], 4)}]} for e in evaluations]
    if "val_loss" in metrics:
        results.append({"task": {"type": "text-generation"}, "dataset": {"type": "validation", "name": "Held-out split"},
                        "metrics": [{"type": "loss", "value": round(metrics["val_loss"], 4)},
                                    {"type": "perplexity", "value": round(metrics["val_perplexity"], 4)}]})
    if results:
        metadata["model-index"] = [{"name": name, "results": results}]
    rows = "\n".join(f"| {e['task']} | {e['metric']} | {e['value']:.3f} | {e['samples']} |" for e in evaluations)
    base = base_model or base_label
    body = (f"# {name}\n\n{description or 'Trained with the Gatehouse training module.'}\n\n"
            f"## Training\n\nMethod: {method}.{' Base model: ' + base + '.' if base else ''}\n\n"
            f"## Evaluation\n\n| task | metric | value | samples |\n|---|---|---|---|\n{rows}\n")
    if "val_loss" in metrics:
        body += f"\nValidation loss {metrics['val_loss']:.4f} (perplexity {metrics['val_perplexity']:.2f}).\n"
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n\n" + body


def check_export_target(directory: Path) -> None:
    """Only an empty folder or an earlier export may be replaced: --out pointing at a project folder must not wipe it."""
    check_replaceable(directory, earlier="export", is_earlier=lambda m: "format_version" in m and "files" in m,
                      error=ConfigError)


def check_adapter_base(adapter_dir: Path, base_dir: Path) -> None:
    """An adapter's manifest records the sha256 of its base's weight files: merged onto another model of the same
    shape, it would load without complaint and be wrong. Adapters without that record are taken on trust."""
    try:
        recorded = json.loads((Path(adapter_dir) / "manifest.json").read_text()).get("base") or {}
        weights = {name: entry["sha256"] for name, entry in (recorded.get("files") or {}).items()
                   if name.endswith(".safetensors")}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return
    for name, digest in weights.items():
        path = Path(base_dir) / name
        if not path.is_file() or sha256_file(path) != digest:
            raise ConfigError(f"{base_dir} is not the model {adapter_dir} was trained on: its {name} differs from the "
                              f"base recorded in the adapter's manifest ({recorded.get('path') or 'path unknown'}); "
                              "give that base")


def merged_card(card: str) -> str:
    """An adapter's card, for the full model its merge writes: a transformers model, fine-tuned from the base."""
    if not card.startswith("---\n"):  # an adapter from elsewhere, its card without metadata
        return card
    front, _, body = card.removeprefix("---\n").partition("\n---\n")
    metadata = yaml.safe_load(front) or {}
    metadata["library_name"] = "transformers"
    metadata["tags"] = [tag for tag in metadata.get("tags") or [] if tag != "lora"]
    if metadata.get("base_model_relation") == "adapter":
        metadata["base_model_relation"] = "finetune"
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n" + body


def export(model: Transformer, directory: Path, *, tokenizer_dir: Path, manifest: dict, card: str,
           adapter: bool = False, base_model_path: str = "", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write the folder, then manifest.json with the sha256 of every other file in it. An earlier export there is
    replaced whole; anything else there is refused, untouched."""
    directory = Path(directory)
    check_export_target(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_export(model, directory, tmp, tokenizer_dir=tokenizer_dir, manifest=manifest, card=card,
                      adapter=adapter, base_model_path=base_model_path, max_shard_bytes=max_shard_bytes)
    finally:  # whatever stopped it, no complete-looking export may stay beside the target
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _write_export(model, directory: Path, tmp: Path, *, tokenizer_dir, manifest, card, adapter, base_model_path,
                  max_shard_bytes) -> None:
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).exists():
            shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
    if (tmp / "tokenizer_config.json").exists():  # the longest input the model takes: its context, not the data's
        tokenizer_config = json.loads((tmp / "tokenizer_config.json").read_text())
        tokenizer_config["model_max_length"] = model.config.max_seq_len
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    eos = json.loads((tmp / "tokenizer.json").read_text())["added_tokens"]
    eos_id = next((t["id"] for t in eos if t["content"] == EOS), None)
    if adapter:
        modules = lora_modules(model)
        if not modules:
            raise ConfigError("adapter export needs a model with LoRA modules")
        first = next(iter(modules.values()))
        targets = sorted({name.rsplit(".", 1)[-1] for name in modules})
        (tmp / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.rank, "lora_alpha": first.alpha,
            "lora_dropout": 0.0, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "base_model_name_or_path": base_model_path, "init_lora_weights": True,
            "modules_to_save": None, "use_rslora": False, "use_dora": False,
        }, indent=2))
        save_file(lora_state_for_peft(model), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf(bos_token_id=eos_id, eos_token_id=eos_id), indent=2))
        save_weights(model.state_dict(), tmp, max_shard_bytes=max_shard_bytes)
    (tmp / "generation_config.json").write_text(json.dumps({
        "bos_token_id": eos_id, "eos_token_id": eos_id, "max_new_tokens": 256, "do_sample": True,
        "temperature": 0.8, "top_p": 0.95}, indent=2))
    (tmp / "README.md").write_text(card)
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **manifest, "files": files},
                                                  indent=2, default=str))
    replace_folder(tmp, directory)
