#!/usr/bin/env python
"""CI's smoke suite against the production-like stack (infra/stack.py): train a tiny model through the API,
release it open-gated through the release workflow, request and approve access, snapshot_download it through
nginx with the stock huggingface_hub client, and chat with it through the openai client. Prints each step's
time; any failure is one line on stderr and exit status 1.

    python infra/smoke.py
"""
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import ROOT, Stack  # noqa: E402

BOOTSTRAP = """
from gatehouse.accounts.models import Membership, User
from gatehouse.accounts.services import api_token_create, organization_create
from gatehouse.registry.models import Dataset, DatasetVersion, License
maintainer = User.objects.create_user("mia", "mia@example.org", "pw")
approver = User.objects.create_user("ada", "ada@example.org", "pw")
outsider = User.objects.create_user("oz", "oz@example.net", "pw")
org = organization_create(slug="acme", name="Acme", owner=maintainer)
Membership.objects.create(user=approver, organization=org, role=Membership.Role.APPROVER)
dataset = Dataset.objects.create(organization=org, name="stdlib", provenance="licensed", summary="Python sources")
dataset.licenses.set(License.objects.filter(key="PSF-2.0"))
DatasetVersion.objects.create(dataset=dataset, version="v1", source_uri="builtin:python-stdlib")
tokens = {
    "mia": api_token_create(user=maintainer, name="smoke", scopes=["read", "write"]).secret,
    "ada": api_token_create(user=approver, name="smoke", scopes=["read", "write", "admin"]).secret,
    "oz": api_token_create(user=outsider, name="smoke", scopes=["read", "gated-read", "inference"]).secret,
}
print("TOKENS " + json.dumps(tokens))
"""
CARD = ("\n## Intended use\nSmoke tests.\n\n## Limitations\nA tiny model.\n\n## Training data\nThe Python standard "
        "library.\n\n## Evaluation\nBuilt-in tasks.\n")


def bootstrap(stack: Stack) -> tuple[dict, dict]:
    """The smoke suite's people (mia maintains acme, ada approves, oz is an outsider): their tokens, and an API
    client for each."""
    tokens = json.loads(stack.manage_shell("import json\n" + BOOTSTRAP).split("TOKENS ", 1)[1])
    clients = {who: httpx.Client(base_url=stack.url, timeout=60, headers={"Authorization": f"Bearer {secret}"})
               for who, secret in tokens.items()}
    return tokens, clients


def timed(name: str, fn, timings: list | None = None, width: int = 55):
    """Run one step, print how long it took (and note it in `timings`); returns what the step returned."""
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    if timings is not None:
        timings.append((name, seconds))
    print(f"  {name:{width}} {seconds:6.1f} s", flush=True)
    return result


def main() -> int:
    if not shutil.which("nginx"):
        print("error: nginx is not installed (apt-get install -y nginx)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gatehouse-stack-"))
    stack, timings = Stack(work), []

    def step(name, fn):
        return timed(name, fn, timings)

    try:
        print(f"production-like stack in {work}", flush=True)
        step("start PostgreSQL db, S3, gunicorn, nginx, workers, beat, engines", stack.start)
        tokens, api = bootstrap(stack)
        step("train a tiny model through the API (Celery gpu worker)", lambda: train(api["mia"]))
        step("release it open-gated (card, risk, request, approval)", lambda: release(api["mia"], api["ada"]))
        step("request access and approve it (REST + HfApi)", lambda: grant(stack.url, api["oz"], tokens["mia"]))
        step("snapshot_download through nginx (302 to S3)", lambda: download(stack.url, tokens["oz"], work))
        step("chat through the openai client (engine started by the platform)", lambda: chat(stack, tokens["oz"]))
        print(json.dumps({"smoke": "production-stack", "seconds": {name: round(t, 1) for name, t in timings}}))
        return 0
    except Exception as exc:  # one line for CI's log, the detail in the stack's logs
        print(f"error: smoke suite failed: {exc.__class__.__name__}: {exc} (logs in {work})", file=sys.stderr)
        return 1
    finally:
        stack.stop()


def wait(fn, timeout: float, what: str):
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.5)
    raise RuntimeError(f"timed out: {what}")


def train(mia, *, max_steps: int = 40, batch_size: int = 8, max_bytes: int = 200000) -> None:
    created = mia.post("/api/v1/training-runs", json={
        "organization": "acme", "model": "smoke-coder", "preset": "debug", "max_steps": max_steps, "tier": "closed",
        "datasets": [{"dataset": "acme/stdlib"}],
        "options": {"seq_len": 64, "batch_size": batch_size, "eval_interval": 1000, "eval_batches": 1,
                    "max_bytes": max_bytes, "tokenizer_vocab_size": 400}})
    assert created.status_code == 201, created.text
    run_url = f"/api/v1/training-runs/{created.json()['id']}"
    run = wait(lambda: (r := mia.get(run_url).json())["status"] in ("succeeded", "failed") and r, 300, "training")
    assert run["status"] == "succeeded", run.get("error")
    wait(lambda: mia.get("/api/v1/models/acme/smoke-coder/versions").json()["results"][0]["status"] == "verified",
         120, "verification")


def release(mia, ada) -> None:
    model = "/api/v1/models/acme/smoke-coder"
    card = mia.get(model).json().get("card") or ""
    assert mia.put(model + "/card", json={"card": card + CARD}).status_code == 200
    frameworks = mia.get("/api/v1/risk-frameworks").json()
    frameworks = frameworks["results"] if isinstance(frameworks, dict) else frameworks
    framework = next(f for f in frameworks if f["key"] == "openai-preparedness")
    for domain in framework["domains"]:
        if domain.get("category") != "tracked":
            continue
        posted = mia.post(model + "/risk-assessments", json={
            "framework": framework["key"], "domain": domain["key"], "threshold": "high", "outcome": "below",
            "mitigation": "pre", "evaluator": "smoke red team"})
        assert posted.status_code == 201, posted.text
    made = mia.post("/api/v1/release-requests", json={"model": "acme/smoke-coder", "stages": [{"tier": "open"}],
                                                      "audience": "gated-manual"})
    assert made.status_code == 201, made.text
    submitted = mia.post(f"/api/v1/release-requests/{made.json()['id']}/submit")
    assert submitted.json().get("status") == "submitted", submitted.text
    approved = ada.post(f"/api/v1/release-requests/{made.json()['id']}/decisions", json={"decision": "approve"})
    assert approved.json().get("status") == "approved", approved.text
    assert mia.get(model).json()["tier"] == "open"


def grant(url, oz, reviewer_token) -> None:
    from huggingface_hub import HfApi

    asked = oz.post("/api/v1/models/acme/smoke-coder/access-requests", json={"accept_license": True})
    assert asked.status_code == 201 and asked.json()["status"] == "pending", asked.text
    reviewer = HfApi(endpoint=url, token=reviewer_token)  # the organization's admin reviews access
    assert [r.username for r in reviewer.list_pending_access_requests("acme/smoke-coder")] == ["oz"]
    reviewer.accept_access_request("acme/smoke-coder", "oz")


def download(url, token, work) -> None:
    from huggingface_hub import snapshot_download

    head = httpx.head(f"{url}/acme/smoke-coder/resolve/main/model.safetensors",
                      headers={"Authorization": f"Bearer {token}"})
    assert head.status_code == 302 and head.headers["location"].startswith("http://127.0.0.1:"), head.headers
    local = Path(snapshot_download("acme/smoke-coder", endpoint=url, token=token, cache_dir=work / "hf-cache"))
    assert (local / "model.safetensors").stat().st_size > 0 and (local / "tokenizer.json").exists()


def chat(stack, token) -> None:
    from openai import OpenAI

    stack.manage_shell("from gatehouse.registry.models import Model\nfrom releases.models import InferenceBackend\n"
                       "InferenceBackend.objects.create(model=Model.objects.get(name='smoke-coder'), kind='local')")
    client = OpenAI(base_url=stack.url + "/v1", api_key=token, max_retries=0)

    def answer():
        try:
            return client.chat.completions.create(model="acme/smoke-coder", max_tokens=8, temperature=0,
                                                  messages=[{"role": "user", "content": "def"}])
        except Exception:  # 503 until serve_engines has the engine up
            return None
    reply = wait(answer, 180, "the engine to answer")
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 0
    stream = client.chat.completions.create(model="acme/smoke-coder", max_tokens=8, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": "def"}],
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None  # streamed through nginx, unbuffered


if __name__ == "__main__":
    sys.exit(main())
