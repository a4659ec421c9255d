"""The newcomer's path, end to end: migrate, seed, start web + a real Celery worker with infra/run_local.py
(what `make run` does), upload over HTTP, and watch the worker process verify the version.

Runs against whatever DATABASE_URL / CELERY_BROKER_URL the suite runs with (SQLite + filesystem broker by
default; PostgreSQL + Redis in CI's second pass), in a database and var/ folder of its own."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gatehouse.registry.demo import write_model_folder

from .conftest import free_port, wait_for_http

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(deployment, tmp_path):
    env, manage = deployment["env"], deployment["manage"]
    # The seed's training runs are covered by test_training_workers.py; here they would only add half a minute.
    seed = subprocess.run([*manage, "seed_demo", "--no-training"], env=env, check=True, cwd=ROOT,
                          capture_output=True, text=True)
    assert "alice  / gatehouse-alice" in seed.stdout
    port = free_port()
    log = open(tmp_path / "stack.log", "w")  # a file, not a pipe: a full pipe would block the workers
    server = subprocess.Popen([sys.executable, str(ROOT / "infra" / "run_local.py"), "--port", str(port)],
                              env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deployment["processes"].append(server)
    base = f"http://127.0.0.1:{port}"
    wait_for_http(base + "/api/v1/licenses")
    yield {"base": base, "env": env, "manage": manage, "queue": deployment["queue"], "server": server}
    if server.poll() is None:
        server.send_signal(signal.SIGINT)  # what Ctrl-C does
        server.wait(timeout=20)


def _worker_running(queue: str) -> bool:
    return subprocess.run(["pgrep", "-f", queue], capture_output=True).returncode == 0


def test_upload_is_verified_by_a_real_worker_and_ctrl_c_stops_everything(stack, tmp_path):
    base, env, manage = stack["base"], stack["env"], stack["manage"]
    page = httpx.get(base + "/")
    assert page.status_code == 200 and "aurora-labs/aurora-7b" in page.text
    assert "aurora-labs/aurora-frontier" not in page.text  # closed: invisible to anonymous visitors

    token = subprocess.run([*manage, "create_token", "bob", "--scopes", "read,write"], env=env, check=True,
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()
    folder = write_model_folder(tmp_path / "upload", metadata={"license": "apache-2.0", "pipeline_tag": "text-generation"},
                                body="# E2E model\n\nUploaded by the end-to-end test.\n", seed=7)
    files = [(p.name, (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]
    headers = {"Authorization": f"Bearer {token}"}
    response = httpx.post(base + "/api/v1/models/aurora-labs/e2e-model/versions", files=files,
                          data={"tier": "open"}, headers=headers, timeout=30)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "pending"
    location = base + response.headers["Location"]

    status = "pending"
    for _ in range(240):
        status = httpx.get(location, headers=headers).json()["status"]
        if status != "pending" and status != "verifying":
            break
        time.sleep(0.25)
    assert status == "verified"  # only the worker process verifies uploads
    card = httpx.get(base + "/aurora-labs/e2e-model")
    assert card.status_code == 200 and "Uploaded by the end-to-end test." in card.text
    assert httpx.get(base + "/api/v1/models?q=e2e-model").json()["results"][0]["latest_version"]["commit"] \
        == response.json()["commit"]

    audit = subprocess.run([*manage, "audit_verify"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert audit.returncode == 0 and "audit log intact" in audit.stdout

    assert _worker_running(stack["queue"])
    stack["server"].send_signal(signal.SIGINT)
    assert stack["server"].wait(timeout=20) == 0
    assert not _worker_running(stack["queue"])
    with pytest.raises(httpx.TransportError):
        httpx.get(base + "/", timeout=2)
