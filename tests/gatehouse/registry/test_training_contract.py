"""The contract between training/ and the registry is a folder: an export registers and verifies as is."""
import json

from django.core.management import call_command

from gatehouse.registry.models import EvaluationResult, Model, ModelVersion


def test_a_training_export_registers_with_its_facts(aurora, alice, tmp_path, django_capture_on_commit_callbacks):
    import shutil
    import sysconfig
    from pathlib import Path

    from training.config import TrainConfig
    from training.data import prepare
    from training.trainer import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:6]:
        shutil.copy(path, corpus / path.name)
    prepare([corpus], tmp_path / "data", vocab_size=400, license="PSF-2.0")
    cfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), max_steps=4, warmup_steps=1,
                      batch_size=4, seq_len=32, eval_interval=2, eval_batches=1)
    assert train(cfg) == 0
    export = tmp_path / "run" / "export"

    with django_capture_on_commit_callbacks(execute=True):
        call_command("register_model", str(export), "--model", "aurora/stdlib-debug", "--user", "alice", "--tier", "open")
    version = ModelVersion.objects.get()
    assert version.status == "verified"
    assert version.license.key == "PSF-2.0"
    assert version.architecture == "LlamaForCausalLM"
    manifest = json.loads((export / "manifest.json").read_text())
    assert version.parameters == manifest["parameters"]
    files = {f.path: f.sha256 for f in version.files.all()}
    assert {k: v["sha256"] for k, v in manifest["files"].items()} == {k: v for k, v in files.items() if k != "manifest.json"}
    tasks = sorted(EvaluationResult.objects.values_list("benchmark__key", "metric"))
    assert ("gatehouse-copy", "acc") in tasks and ("validation", "perplexity") in tasks
    assert Model.objects.get().task == "text-generation"
