"""The stock `huggingface_hub` and `transformers` clients against a live Gatehouse server (its own database
and var/ folder): downloads where allowed, the clients' own exceptions where not, access requests driven
by HfApi's reviewer methods, and a second snapshot_download that downloads nothing."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import free_port, wait_for_http

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def tiny_hf_folder(directory: Path) -> Path:
    """A real Llama checkpoint with a tokenizer, written by our training module (no download)."""
    import torch

    from training.config import preset
    from training.export import export
    from training.model import Transformer
    from training.tokenizer import save_tokenizer, train_tokenizer

    texts = [f"def f{i}(x):\n    return x + {i}\n" for i in range(200)]
    tokenizer_dir = directory / "tok"
    save_tokenizer(train_tokenizer(texts, 300), tokenizer_dir, model_max_length=64)
    torch.manual_seed(0)
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    model = Transformer(preset("debug", vocab_size=len(vocab) + 2, max_seq_len=64))
    out = export(model, directory / "model", tokenizer_dir=tokenizer_dir, manifest={"run_id": "e2e"},
                 card="---\nlicense: apache-2.0\npipeline_tag: text-generation\n---\n# Tiny\n\nFor tests.\n")
    (out / "extra").mkdir()
    (out / "extra" / "notes.txt").write_text("a file in a folder\n")
    return out


@pytest.fixture
def hub_server(deployment, tmp_path):
    return start_hub(deployment, tmp_path)


def start_hub(deployment, tmp_path, extra_env: dict | None = None) -> dict:
    deployment["env"].update(extra_env or {})
    env, manage = deployment["env"], deployment["manage"]
    folder = tiny_hf_folder(tmp_path / "src")
    setup = subprocess.run([*manage, "shell", "-c", (ROOT / "tests" / "e2e" / "hub_setup.py").read_text()],
                           env=env | {"HUB_SETUP_FOLDER": str(folder)}, cwd=ROOT, capture_output=True, text=True)
    assert setup.returncode == 0, setup.stderr
    tokens = json.loads(setup.stdout.split("TOKENS ", 1)[1])
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([*manage, "runserver", f"127.0.0.1:{port}", "--noreload"], env=env, cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT)
    deployment["processes"].append(server)
    base = f"http://127.0.0.1:{port}"
    wait_for_http(base + "/api/models")

    def downloads() -> int:
        out = subprocess.run([*manage, "shell", "-c", "from releases.models import Download; "
                              "print(Download.objects.count())"], env=env, cwd=ROOT, capture_output=True, text=True)
        return int(out.stdout.strip().splitlines()[-1])  # shell may print its auto-imports first

    return {"base": base, "tokens": tokens, "folder": folder, "downloads": downloads, "env": env}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_stock_hub_client_downloads_lists_and_gets_its_own_errors(hub_server, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    base, tokens, folder = hub_server["base"], hub_server["tokens"], hub_server["folder"]
    cache = tmp_path / "cache"
    expected = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    # Open public: anonymous snapshot of every file, byte for byte; a second snapshot downloads nothing.
    before = hub_server["downloads"]()
    local = Path(snapshot_download("aurora/tiny-open", endpoint=base, token=False, cache_dir=cache))
    assert sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()) == expected
    assert all(sha256(local / name) == sha256(folder / name) for name in expected)
    after_first = hub_server["downloads"]()
    assert after_first - before == len(expected)
    snapshot_download("aurora/tiny-open", endpoint=base, token=False, cache_dir=cache)
    assert hub_server["downloads"]() == after_first

    anonymous = HfApi(endpoint=base, token=False)
    info = anonymous.model_info("aurora/tiny-open")
    assert info.id == "aurora/tiny-open" and len(info.sha) == 40 and info.gated is False
    assert sorted(anonymous.list_repo_files("aurora/tiny-open")) == expected
    assert {m.id for m in anonymous.list_models(author="aurora")} == {
        "aurora/tiny-open", "aurora/tiny-gated", "aurora/tiny-served"}
    alice = HfApi(endpoint=base, token=tokens["alice"])
    assert "aurora/tiny-secret" in {m.id for m in alice.list_models(author="aurora")}
    assert [m.id for m in anonymous.list_models(search="gated", limit=5)] == ["aurora/tiny-gated"]
    assert alice.whoami()["name"] == "alice"

    with pytest.raises(EntryNotFoundError):
        hf_hub_download("aurora/tiny-open", "nope.bin", endpoint=base, token=False, cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("aurora/tiny-open", "config.json", revision="v9", endpoint=base, token=False, cache_dir=cache)

    # Closed: it does not exist for outsiders, and works for members.
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("aurora/tiny-secret", "config.json", endpoint=base, token=tokens["carol"], cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=base, token=tokens["carol"]).model_info("aurora/tiny-secret")
    assert Path(hf_hub_download("aurora/tiny-secret", "config.json", endpoint=base, token=tokens["alice"],
                                cache_dir=tmp_path / "alice")).exists()

    # API-only: the card, never the weights.
    card = hf_hub_download("aurora/tiny-served", "README.md", endpoint=base, token=tokens["carol"], cache_dir=cache)
    assert Path(card).read_text().startswith("---")
    with pytest.raises(GatedRepoError, match="API-only"):
        hf_hub_download("aurora/tiny-served", "model.safetensors", endpoint=base, token=tokens["carol"],
                        cache_dir=cache)


def test_gated_model_access_is_reviewed_with_hfapi_methods(hub_server, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import GatedRepoError

    base, tokens = hub_server["base"], hub_server["tokens"]
    repo = "aurora/tiny-gated"

    attempts = iter(range(100))

    def fetch(user):  # a fresh cache each time, so every call asks the server
        return hf_hub_download(repo, "model.safetensors", endpoint=base, token=tokens[user],
                               cache_dir=tmp_path / f"cache-{user}-{next(attempts)}")

    with pytest.raises(GatedRepoError, match="request access at"):
        fetch("carol")
    with pytest.raises(GatedRepoError, match="pass a Gatehouse token"):
        hf_hub_download(repo, "model.safetensors", endpoint=base, token=False, cache_dir=tmp_path / "anon")
    for user in ("carol", "dave"):  # people ask through our REST API (or the web form)
        made = httpx.post(f"{base}/api/v1/models/{repo}/access-requests", json={"accept_license": True},
                          headers={"Authorization": f"Bearer {tokens[user]}"})
        assert made.status_code == 201 and made.json()["status"] == "pending", made.text
    with pytest.raises(GatedRepoError, match="pending review since"):
        fetch("carol")

    reviewer = HfApi(endpoint=base, token=tokens["alice"])
    assert sorted(r.username for r in reviewer.list_pending_access_requests(repo)) == ["carol", "dave"]
    reviewer.accept_access_request(repo, "carol")
    reviewer.reject_access_request(repo, "dave", rejection_reason="Tell us your affiliation")
    assert [r.username for r in reviewer.list_accepted_access_requests(repo)] == ["carol"]
    assert [r.username for r in reviewer.list_rejected_access_requests(repo)] == ["dave"]
    assert sha256(fetch("carol")) == sha256(hub_server["folder"] / "model.safetensors")
    with pytest.raises(GatedRepoError, match="Tell us your affiliation"):
        fetch("dave")

    reviewer.grant_access(repo, "dave")
    assert Path(fetch("dave")).exists()
    reviewer.cancel_access_request(repo, "carol")  # back to pending: the grant goes at once
    with pytest.raises(GatedRepoError, match="pending review"):
        fetch("carol")
    outsider = HfApi(endpoint=base, token=tokens["carol"])
    with pytest.raises(Exception, match="403"):
        list(outsider.list_pending_access_requests(repo))  # the client pages lazily


def test_transformers_loads_a_gatehouse_model_through_hf_endpoint(hub_server, tmp_path):
    """In a fresh process, as a user would: HF_ENDPOINT and HF_TOKEN in the environment, nothing else."""
    script = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
remote = AutoModelForCausalLM.from_pretrained("aurora/tiny-open", dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained("aurora/tiny-open")
local = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True, dtype=torch.float32).eval()
ids = tokenizer("def f(x):", return_tensors="pt").input_ids
with torch.no_grad():
    diff = (remote(ids).logits - local(ids).logits).abs().max().item()
print("OK", ids.shape[1], diff)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": hub_server["base"], "HF_TOKEN": hub_server["tokens"]["carol"],
            "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    out = subprocess.run([sys.executable, "-c", script, str(hub_server["folder"])], env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    status, tokens, diff = out.stdout.strip().splitlines()[-1].split()
    assert status == "OK" and int(tokens) > 0 and float(diff) == 0.0


@pytest.fixture
def s3_server(deployment):
    """moto's S3 server as its own process on another port: a different origin, like real object storage."""
    import boto3

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deployment["processes"].append(server)
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_http(endpoint + "/")
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_S3_REGION_NAME": "us-east-1",
                   "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="weights")
    return credentials | {"GATEHOUSE_STORAGE": "s3", "AWS_STORAGE_BUCKET_NAME": "weights",
                          "AWS_S3_ENDPOINT_URL": endpoint}


def test_s3_storage_answers_with_a_presigned_redirect_the_client_follows(deployment, s3_server, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    hub = start_hub(deployment, tmp_path, s3_server)
    base, folder = hub["base"], hub["folder"]
    head = httpx.head(f"{base}/aurora/tiny-open/resolve/main/model.safetensors")
    assert head.status_code == 302 and head.headers["Location"].startswith(s3_server["AWS_S3_ENDPOINT_URL"])
    assert "X-Amz-Signature=" in head.headers["Location"] and len(head.headers["X-Repo-Commit"]) == 40
    assert head.headers["X-Linked-Size"] == str((folder / "model.safetensors").stat().st_size)
    local = Path(snapshot_download("aurora/tiny-open", endpoint=base, token=False, cache_dir=tmp_path / "c"))
    assert sha256(local / "model.safetensors") == sha256(folder / "model.safetensors")
    assert sha256(local / "extra" / "notes.txt") == sha256(folder / "extra" / "notes.txt")
    # The gate still decides before any redirect: no URL for an outsider of a gated model.
    from huggingface_hub.errors import GatedRepoError

    with pytest.raises(GatedRepoError):
        hf_hub_download("aurora/tiny-gated", "model.safetensors", endpoint=base, token=hub["tokens"]["carol"],
                        cache_dir=tmp_path / "d")
    refused = httpx.get(f"{base}/aurora/tiny-gated/resolve/main/model.safetensors",
                        headers={"Authorization": f"Bearer {hub['tokens']['carol']}"})
    assert refused.status_code == 403 and "Location" not in refused.headers
