import json
import subprocess
import sys

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from training.adapt import apply_method
from training.config import ConfigError
from training.export import load_exported
from training.trainer import train

from .conftest import quick_config


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, data_dir, trained):
    out = tmp_path_factory.mktemp("lora") / "lora-run"
    cfg = quick_config(data_dir, out, init_from=str(trained / "export"), method="lora", lora_rank=4, lora_alpha=8.0,
                       lora_targets=("q_proj", "v_proj", "down_proj"), max_steps=15, lr=1e-2, min_lr=1e-3)
    assert train(cfg) == 0
    return out


def test_lora_adapter_loads_with_peft_and_matches(lora_run, trained):
    adapter = lora_run / "export"
    assert sorted(p.name for p in adapter.iterdir() if p.name.startswith("adapter")) == [
        "adapter_config.json", "adapter_model.safetensors"]
    base_export = str(trained / "export")
    plain = AutoModelForCausalLM.from_pretrained(base_export, local_files_only=True, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_export, local_files_only=True, dtype=torch.float32), str(adapter)).eval()
    ours, _ = load_exported(trained / "export")
    apply_method(ours, "lora", lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj", "v_proj", "down_proj"))
    state = {k.removeprefix("base_model.model.").replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B"): v
             for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    assert ours.load_state_dict(state, strict=False).unexpected_keys == []
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits, peft_logits, plain_logits = ours.eval()(ids)[0], peft(ids).logits, plain(ids).logits
    assert (ours_logits - peft_logits).abs().max().item() < 1e-4
    assert (peft_logits - plain_logits).abs().max().item() > 1e-3  # the adapter really changes the model


def test_lora_manifest_records_base_method_and_trainable_count(lora_run, trained):
    manifest = json.loads((lora_run / "export" / "manifest.json").read_text())
    base = json.loads((trained / "export" / "manifest.json").read_text())
    assert manifest["method"] == "lora" and manifest["adapter"] is True
    assert manifest["base"]["path"] == str(trained / "export") and manifest["base"]["run_id"] == base["run_id"]
    assert manifest["base"]["files"]["model.safetensors"] == base["files"]["model.safetensors"]
    # rank 4 on q (64→64), v (64→32) and down (176→64) in 2 layers
    assert manifest["trainable_parameters"] == 2 * (4 * (64 + 64) + 4 * (64 + 32) + 4 * (176 + 64))
    card = (lora_run / "export" / "README.md").read_text()
    assert "library_name: peft" in card and "Base model: base-run." in card  # the base run's name
    # A local folder is no repository id (a Hub or the registry would refuse it): metadata only with --base-model-id.
    assert "base_model:" not in card
    from training.export import card_text

    card = card_text(name="x", license="mit", datasets=[], base_model="aurora/base", base_label="base-run",
                     method="lora", evaluations=[], metrics={}, description="", adapter=True)
    assert "base_model: aurora/base\nbase_model_relation: adapter" in card and "Base model: aurora/base." in card


def test_merged_adapter_equals_base_plus_adapter(lora_run, trained, tmp_path):
    merged = tmp_path / "merged"
    out = subprocess.run([sys.executable, "-m", "training", "merge", str(lora_run / "export"), "--base",
                          str(trained / "export"), "--out", str(merged)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        str(trained / "export"), local_files_only=True, dtype=torch.float32), str(lora_run / "export")).eval()
    full = AutoModelForCausalLM.from_pretrained(str(merged), local_files_only=True, dtype=torch.float32).eval()
    ids = torch.randint(0, 500, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (peft(ids).logits - full(ids).logits).abs().max().item() < 1e-4
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["method"] == "lora-merged" and manifest["parameters"] == full.num_parameters()
    metadata = yaml.safe_load((merged / "README.md").read_text().split("---\n")[1])
    assert metadata["library_name"] == "transformers" and "lora" not in metadata["tags"]
    # The merge is a model of the base's shape too: as a base, it is not the one the adapter was trained on.
    again = subprocess.run([sys.executable, "-m", "training", "merge", str(lora_run / "export"), "--base",
                            str(merged), "--out", str(tmp_path / "wrong")], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert f"{merged} is not the model {lora_run / 'export'} was trained on" in again.stderr
    assert not (tmp_path / "wrong").exists()


def test_last_layer_trains_only_the_last_block_and_head(tmp_path, data_dir, trained):
    out = tmp_path / "last"
    assert train(quick_config(data_dir, out, init_from=str(trained / "export"), method="last-layer", max_steps=5)) == 0
    before = load_file(str(trained / "export" / "model.safetensors"))
    after = load_file(str(out / "export" / "model.safetensors"))
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.startswith(("model.layers.1.", "model.norm.", "lm_head.")) for k in changed)
    assert not any(k.startswith(("model.layers.0.", "model.embed_tokens")) for k in changed)


def test_bias_method_needs_biases_and_trains_only_them(tmp_path, data_dir, trained):
    with pytest.raises(ConfigError, match="needs a model with biases"):
        train(quick_config(data_dir, tmp_path / "nobias", init_from=str(trained / "export"), method="bias", max_steps=3))
    assert not (tmp_path / "nobias" / "checkpoint").exists()

    # A base with biases: export one, then BitFit it.
    from training.config import preset
    from training.export import export
    from training.model import Transformer

    torch.manual_seed(0)
    base_dir = tmp_path / "biased-base"
    biased = Transformer(preset("debug", vocab_size=512, attention_bias=True, mlp_bias=True, max_seq_len=64))
    export(biased, base_dir, tokenizer_dir=data_dir, manifest={"run_id": "biased"}, card="---\nlicense: mit\n---\n")
    out = tmp_path / "bitfit"
    assert train(quick_config(data_dir, out, init_from=str(base_dir), method="bias", max_steps=5, lr=1e-2)) == 0
    before, after = load_file(str(base_dir / "model.safetensors")), load_file(str(out / "export" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".bias") for k in changed)
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["trainable_parameters"] == sum(v.numel() for k, v in before.items() if k.endswith(".bias"))
