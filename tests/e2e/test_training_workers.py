"""Training runs on real Celery workers: a run survives `kill -9` of its worker (requeued, resumed from its
checkpoint, registered once), and cancel stops a running run. Filesystem broker by default, Redis in CI."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import free_port, wait_for_http

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

SETUP = """
from gatehouse.accounts.models import User
from gatehouse.accounts.services import organization_create, api_token_create
from gatehouse.registry.models import Dataset, DatasetVersion, License
alice = User.objects.create_user("alice", password="x")
org = organization_create(slug="aurora", name="Aurora", owner=alice)
dataset = Dataset.objects.create(organization=org, name="stdlib", provenance="licensed")
dataset.licenses.set(License.objects.filter(key="PSF-2.0"))
DatasetVersion.objects.create(dataset=dataset, version="v1", source_uri="builtin:python-stdlib")
print("TOKEN", api_token_create(user=alice, name="e2e", scopes=["read", "write"]).secret)
"""

OPTIONS = {"seq_len": 64, "batch_size": 8, "checkpoint_interval": 20, "eval_interval": 1000, "eval_batches": 1,
           "max_bytes": 200000, "tokenizer_vocab_size": 400}


def _worker(deployment, queue: str, *extra) -> subprocess.Popen:
    log = open(deployment["var"].parent / f"worker-{queue}-{time.time():.0f}.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "gatehouse", "worker", "-Q", queue, "--pool", "solo",
                             "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"{queue}-{time.time()}@e2e",
                             *extra], env=deployment["env"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deployment["processes"].append(proc)
    return proc


def _wait(client, url, predicate, timeout, what):
    deadline, body = time.time() + timeout, None
    while time.time() < deadline:
        body = client.get(url).json()
        if predicate(body):
            return body
        time.sleep(0.3)
    brief = {key: body.get(key) for key in ("status", "attempt", "step", "error")} if isinstance(body, dict) else body
    pytest.fail(f"timed out waiting for {what}; last state: {json.dumps(brief)[:800]}")


@pytest.fixture
def platform(deployment):
    env = deployment["env"]
    env.update(TRAINING_HEARTBEAT_STALE_SECONDS="4", TRAINING_REAPER_INTERVAL_SECONDS="1")
    out = subprocess.run([*deployment["manage"], "shell", "-c", SETUP], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    token = next(line.split()[1] for line in out.splitlines() if line.startswith("TOKEN"))
    port = free_port()
    web = subprocess.Popen([*deployment["manage"], "runserver", f"127.0.0.1:{port}", "--noreload"], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deployment["processes"].append(web)
    _worker(deployment, deployment["queue"], "-B", "-s", str(deployment["var"] / "beat-schedule"))
    wait_for_http(f"http://127.0.0.1:{port}/api/v1/licenses")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    return {"client": client, "deployment": deployment, "train_queue": env["GATEHOUSE_TRAINING_QUEUE"]}


def _launch(client, model, steps):
    response = client.post("/api/v1/training-runs", json={
        "organization": "aurora", "model": model, "preset": "debug", "max_steps": steps, "tier": "open",
        "datasets": [{"dataset": "aurora/stdlib"}], "options": OPTIONS})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_kill_9_of_the_worker_resumes_from_the_checkpoint_and_registers_once(platform):
    client, deployment = platform["client"], platform["deployment"]
    worker = _worker(deployment, platform["train_queue"])
    run_id = _launch(client, "survivor", 500)
    url = f"/api/v1/training-runs/{run_id}"
    _wait(client, url, lambda r: r["status"] == "running" and r["step"] >= 45, 120, "the run to pass step 45")

    os.kill(worker.pid, signal.SIGKILL)  # no warm shutdown, no ack: the worker is simply gone
    worker.wait(timeout=10)
    events = deployment["var"] / "training" / str(run_id) / "train" / "events.jsonl"
    _wait(client, url, lambda r: r["status"] == "queued" and r["attempt"] == 1, 60, "the reaper to requeue the run")
    stopped = [json.loads(line) for line in events.read_text().splitlines() if '"stopped"' in line]
    assert stopped and stopped[0]["signal"] == "SIGTERM"  # the orphaned trainer checkpointed and left

    _worker(deployment, platform["train_queue"])
    run = _wait(client, url, lambda r: r["status"] in ("succeeded", "failed"), 180, "the resumed run to finish")
    assert run["status"] == "succeeded", run["error"]
    assert run["attempt"] == 1 and run["step"] == 500 and run["tokens"] == 500 * 8 * 64
    starts = [json.loads(line) for line in events.read_text().splitlines() if '"event": "start"' in line]
    assert len(starts) == 2 and starts[1]["resumed_from_step"] == stopped[0]["step"] >= 40
    versions = _wait(client, "/api/v1/models/aurora/survivor/versions",
                     lambda v: v["results"] and v["results"][0]["status"] == "verified", 60, "the worker to verify it")
    assert versions["count"] == 1 and versions["results"][0]["commit"] == run["result_version"]
    compute = client.get("/api/v1/models/aurora/survivor/compute").json()
    assert compute["records"][0]["tokens"] == 500 * 8 * 64
    metrics = client.get(f"{url}/metrics").json()
    assert [m["step"] for m in metrics["steps"]] == list(range(1, 501))  # each point once, across both attempts


def test_cancel_stops_a_running_run(platform):
    client, deployment = platform["client"], platform["deployment"]
    _worker(deployment, platform["train_queue"])
    run_id = _launch(client, "cancelled", 100000)
    url = f"/api/v1/training-runs/{run_id}"
    _wait(client, url, lambda r: r["status"] == "running" and r["step"] >= 5, 120, "the run to start")
    response = client.post(f"{url}/cancel")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    run = _wait(client, url, lambda r: r["status"] != "running", 60, "the run to stop")
    assert run["status"] == "cancelled" and run["result_version"] is None and run["step"] < 100000
    assert client.get("/api/v1/models/aurora/cancelled").status_code == 404
