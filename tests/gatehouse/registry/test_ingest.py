import json
import struct

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from gatehouse.audit.models import AuditEvent
from gatehouse.core.errors import Conflict, InvalidInput, PermissionDenied
from gatehouse.registry.models import EvaluationResult, Model, ModelFile, ModelRef, ModelVersion
from gatehouse.registry.services.ingest import IncomingFile, files_from_directory, model_version_ingest


def _bytes_file(path: str, data: bytes) -> IncomingFile:
    import io

    return IncomingFile(path=path, size=len(data), open=lambda: io.BytesIO(data))


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _assert_nothing_happened(stored_files):
    assert Model.objects.count() == 0
    assert ModelVersion.objects.count() == 0
    assert ModelFile.objects.count() == 0
    assert AuditEvent.objects.count() == 0
    assert stored_files() == []


def test_ingest_records_files_card_facts_and_queues_verification(aurora, alice, model_folder, django_capture_on_commit_callbacks):
    folder = model_folder(metadata={"license": "apache-2.0", "pipeline_tag": "text-generation", "tags": ["tiny"],
                                    "model-index": [{"name": "m", "results": [{
                                        "task": {"type": "text-generation"},
                                        "dataset": {"type": "hellaswag", "name": "HellaSwag"},
                                        "metrics": [{"type": "acc", "value": 0.5}]}]}]})
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        version = model_version_ingest(organization=aurora, name="tiny", files=files_from_directory(folder), user=alice)
    assert len(callbacks) == 1
    version.refresh_from_db()
    assert version.status == ModelVersion.Status.VERIFIED  # the eager task ran the verification
    assert len(version.commit) == 40
    assert version.license.key == "apache-2.0"
    assert version.architecture == "LlamaForCausalLM"
    assert version.context_length == 256
    paths = list(version.files.values_list("path", flat=True))
    assert paths == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    weights = version.files.get(path="model.safetensors")
    assert weights.sha256 == __import__("hashlib").sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert weights.safetensors["tensors"] == 21
    assert version.parameters == weights.safetensors["parameters"]
    result = EvaluationResult.objects.get()
    assert (result.benchmark.key, result.metric, result.value, result.source) == ("hellaswag", "acc", 0.5, "model-index")
    model = Model.objects.get()
    assert (model.latest_version_id, model.task, model.tags, model.license.key) == (version.pk, "text-generation", ["tiny"], "apache-2.0")
    assert ModelRef.objects.get(name="main").version_id == version.pk
    assert list(AuditEvent.objects.values_list("action", flat=True)) == [
        "model.create", "model_version.ingest", "model_version.verify"]


def test_commit_is_derived_from_content(aurora, alice, model_folder):
    first = model_version_ingest(organization=aurora, name="m", files=files_from_directory(model_folder(seed=1)), user=alice)
    second = model_version_ingest(organization=aurora, name="m", files=files_from_directory(model_folder(seed=2)), user=alice)
    assert first.commit != second.commit
    with pytest.raises(Conflict, match="already has a version with exactly these files"):
        model_version_ingest(organization=aurora, name="m", files=files_from_directory(model_folder(seed=1)), user=alice)
    assert ModelVersion.objects.count() == 2


@pytest.mark.parametrize("path, message", [
    ("../escape.json", "contains '..'"),
    ("a/../../b.json", "contains '..'"),
    ("/etc/passwd", "is absolute"),
    ("C:/weights.safetensors", "is absolute"),
    ("dir\\file.json", "backslashes"),
    ("", "is empty"),
    ("bad\x00name", "control characters"),
    ("pytorch_model.bin", "pickle-based format"),
    ("model.pt", "pickle-based format"),
    ("sub/model.pth", "pickle-based format"),
    ("run.ckpt", "pickle-based format"),
    ("stats.pkl", "pickle-based format"),
])
def test_bad_paths_are_refused_and_nothing_is_written(aurora, alice, stored_files, path, message):
    files = [_bytes_file("config.json", b"{}"), _bytes_file(path, b"x")]
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(")):
        model_version_ingest(organization=aurora, name="m", files=files, user=alice)
    _assert_nothing_happened(stored_files)


def test_pickle_refusal_points_to_safetensors(aurora, alice):
    with pytest.raises(InvalidInput) as info:
        model_version_ingest(organization=aurora, name="m", files=[_bytes_file("pytorch_model.bin", b"x")], user=alice)
    assert "convert it to safetensors" in info.value.message
    assert "pytorch_model.safetensors" in info.value.message


def test_duplicate_paths_after_normalisation_are_refused(aurora, alice, stored_files):
    files = [_bytes_file("a/config.json", b"{}"), _bytes_file("a/./config.json", b"{}")]
    with pytest.raises(InvalidInput, match="duplicates"):
        model_version_ingest(organization=aurora, name="m", files=files, user=alice)
    _assert_nothing_happened(stored_files)


F32_4 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("blob, message", [
    (b"\x01\x02", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 10**12) + b"{}", "more than the"),
    (struct.pack("<Q", 500) + b"{}", "but the file has only"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "not UTF-8 JSON"),
    (_safetensors([], b""), "not a JSON object"),
    (_safetensors({"w": {"dtype": "F99", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 16), "unknown dtype"),
    (_safetensors({"w": {"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}}, b"\0" * 16), "invalid shape"),
    (_safetensors({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}}, b"\0" * 16), "invalid data_offsets"),
    (_safetensors({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, b"\0" * 16), "needs 24 bytes"),
    (_safetensors({"w": F32_4}, b"\0" * 20), "data region is 20 bytes"),
    (_safetensors({"w": F32_4, "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16), "gap or overlap"),
    (_safetensors({"w": {"dtype": "F32", "shape": [4]}}, b"\0" * 16), "exactly dtype, shape and data_offsets"),
    (_safetensors({"__metadata__": {"a": 1}, "w": F32_4}, b"\0" * 16), "__metadata__ must map strings"),
])
def test_bad_safetensors_are_refused_and_nothing_is_written(aurora, alice, stored_files, blob, message):
    files = [_bytes_file("config.json", b"{}"), _bytes_file("model.safetensors", blob)]
    with pytest.raises(InvalidInput, match=message):
        model_version_ingest(organization=aurora, name="m", files=files, user=alice)
    _assert_nothing_happened(stored_files)


def test_valid_handmade_safetensors_is_accepted(aurora, alice):
    blob = _safetensors({"__metadata__": {"format": "pt"}, "w": F32_4,
                         "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}}, b"\0" * 24)
    version = model_version_ingest(organization=aurora, name="m", files=[_bytes_file("model.safetensors", blob)], user=alice)
    assert version.files.get().safetensors == {"tensors": 2, "parameters": 8, "dtypes": ["BF16", "F32"],
                                               "metadata": {"format": "pt"}}


@pytest.mark.parametrize("header_length", [0x280, 0x380, 0x480, 0x580])
def test_safetensors_whose_header_length_starts_like_a_pickle_are_accepted(aurora, alice, header_length):
    """A header of 640 bytes is stored as 80 02 00 …: the bytes of a pickle's protocol-2 marker. Not a pickle."""
    header = {"__metadata__": {"pad": ""}, "w": F32_4}
    header["__metadata__"]["pad"] = " " * (header_length - len(json.dumps(header).encode()))
    blob = _safetensors(header, b"\0" * 16)
    assert blob[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    version = model_version_ingest(organization=aurora, name="m", files=[_bytes_file("model.safetensors", blob)],
                                   user=alice)
    assert version.files.get().safetensors["tensors"] == 1


@pytest.mark.parametrize("metadata, message", [
    ({"license": "not-a-licence"}, "which the registry does not know"),
    ({"datasets": ["aurora/unknown"]}, "is not registered"),
    ({"base_model": "nobody/nothing"}, "not a model you can see here"),
    ({"base_model": "aurora/x", "base_model_relation": "sibling"}, None),
])
def test_card_references_must_resolve(aurora, alice, model_folder, stored_files, metadata, message):
    with pytest.raises(InvalidInput, match=message or "not a model you can see"):
        model_version_ingest(organization=aurora, name="m", files=files_from_directory(model_folder(metadata=metadata)),
                             user=alice)
    _assert_nothing_happened(stored_files)


def test_invalid_card_yaml_and_config_json_are_refused(aurora, alice, stored_files):
    with pytest.raises(InvalidInput, match="YAML metadata is invalid"):
        model_version_ingest(organization=aurora, name="m", user=alice,
                             files=[_bytes_file("README.md", b"---\nlicense: [unclosed\n---\n# x\n")])
    with pytest.raises(InvalidInput, match="config.json is not valid JSON"):
        model_version_ingest(organization=aurora, name="m", user=alice, files=[_bytes_file("config.json", b"{nope")])
    _assert_nothing_happened(stored_files)


def test_failure_after_files_are_stored_removes_them(aurora, alice, model_folder, stored_files, monkeypatch):
    from gatehouse.registry.services import ingest

    def explode(**kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(ingest, "_record_card_evaluations", explode)
    with pytest.raises(RuntimeError):
        model_version_ingest(organization=aurora, name="m", files=files_from_directory(model_folder()), user=alice)
    _assert_nothing_happened(stored_files)


def test_only_maintainers_and_admins_may_ingest(aurora, bob, carol, model_folder, stored_files):
    for user in (bob, carol):
        with pytest.raises(PermissionDenied, match="Only maintainers and admins of aurora"):
            model_version_ingest(organization=aurora, name="m", files=files_from_directory(model_folder()), user=user)
    _assert_nothing_happened(stored_files)


def test_symlinks_in_a_folder_are_refused(tmp_path, model_folder):
    folder = model_folder()
    (folder / "secret").symlink_to("/etc/hostname")
    with pytest.raises(InvalidInput, match="symbolic link"):
        files_from_directory(folder)


def test_register_model_command(aurora, alice, model_folder, capsys):
    folder = model_folder(metadata={"license": "mit"})
    call_command("register_model", str(folder), "--model", "aurora/cli-model", "--user", "alice", "--tier", "api")
    out = capsys.readouterr().out
    version = ModelVersion.objects.get()
    assert f"aurora/cli-model@{version.commit} registered (4 files" in out
    assert Model.objects.get().tier == "api"


@pytest.mark.parametrize("args, message", [
    (["--model", "aurora"], "--model must look like ORG/NAME"),
    (["--model", "ghost/m"], "no organization 'ghost'"),
    (["--model", "aurora/m", "--user", "nobody"], "no user named 'nobody'"),
])
def test_register_model_command_refuses_bad_input(aurora, alice, model_folder, args, message, stored_files):
    folder = model_folder()
    argv = [str(folder), "--user", "alice", *args]
    with pytest.raises(CommandError, match=message):
        call_command("register_model", *argv)
    _assert_nothing_happened(stored_files)


def test_register_model_refuses_pickle_with_one_line(aurora, alice, model_folder, stored_files):
    folder = model_folder()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CommandError, match="pytorch_model.bin is a pickle-based format"):
        call_command("register_model", str(folder), "--model", "aurora/m", "--user", "alice")
    _assert_nothing_happened(stored_files)


def test_a_verified_version_is_immutable(aurora, alice, register):
    version = register(aurora, "m", alice)
    version.message = "rewritten history"
    with pytest.raises(ValueError, match="is verified and immutable"):
        version.save()
    assert ModelVersion.objects.get(pk=version.pk).message == ""


def test_verification_fails_when_stored_bytes_changed(aurora, alice, register, weights_dir):
    from gatehouse.registry.services.versions import model_version_verify

    version = register(aurora, "m", alice, verify=False)
    stored = version.files.get(path="config.json")
    (weights_dir / stored.storage_key).write_text('{"tampered": true}')
    result = model_version_verify(version_id=version.pk)
    assert result.status == "failed"
    assert "config.json: stored" in result.error
    assert Model.objects.get().latest_version is None
    assert ModelRef.objects.count() == 0
    assert model_version_verify(version_id=version.pk).status == "failed"  # idempotent: a redelivery changes nothing
    assert AuditEvent.objects.filter(action="model_version.fail").count() == 1
