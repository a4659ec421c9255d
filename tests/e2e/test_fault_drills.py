"""Fault drills against real processes (web server, Celery workers, beat), through tests/hardening/faults.py:

- a worker killed (-9) in the middle of verifying a version, then in the middle of delivering a webhook: the work
  is done once when a worker is back (verified once; the delivery row delivered, the receiver acknowledging one
  delivery id). Both brokers: Redis redelivers the unacked message, the filesystem broker forgets it and the
  stranded-work sweep (beat) queues it again.
- the database restarted under load (PostgreSQL only): 503 with Retry-After, never a 500 or a hang, and the same
  web process serves again once the database is back.
- Redis down (Redis broker only): liveness stays 200, readiness says degraded and which part, reads and uploads
  keep working, and the upload is verified once Redis is back.
"""
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from tests.hardening.faults import TcpProxy, WebhookReceiver, sql, wait_until

from .conftest import free_port, scratch_database, stop_processes, wait_for_http

ROOT = Path(__file__).resolve().parents[2]
FAULTS = ROOT / "tests" / "hardening" / "faults.py"
pytestmark = pytest.mark.e2e
ON_POSTGRES = os.environ.get("DATABASE_URL", "").startswith("postgres")
ON_REDIS = os.environ.get("CELERY_BROKER_URL", "").startswith("redis")

SETUP = """
from gatehouse.accounts.models import User
from gatehouse.accounts.services import organization_create, api_token_create
from gatehouse.registry.demo import write_model_folder
from gatehouse.registry.services.ingest import files_from_directory, model_version_ingest
alice = User.objects.create_user("alice", password="x")
org = organization_create(slug="aurora", name="Aurora", owner=alice)
folder = write_model_folder(__import__("pathlib").Path("{var}") / "seed-model", seed=1)
model_version_ingest(organization=org, name="m", files=files_from_directory(folder), user=alice, tier="open")
print("TOKEN", api_token_create(user=alice, name="drill", scopes=["read", "write"]).secret)
"""

INGEST = """
from gatehouse.accounts.models import Organization, User
from gatehouse.registry.demo import write_model_folder
from gatehouse.registry.services.ingest import files_from_directory, model_version_ingest
folder = write_model_folder(__import__("pathlib").Path("{folder}"), seed={seed})
version = model_version_ingest(organization=Organization.objects.get(slug="aurora"), name="{name}",
                               files=files_from_directory(folder), user=User.objects.get(username="alice"))
print("VERSION", version.pk)
"""

EMIT = """
from django.db import transaction
from gatehouse.accounts.models import Organization
from gatehouse.webhooks.models import WebhookEndpoint
from gatehouse.webhooks.services import webhook_emit
org = Organization.objects.get(slug="aurora")
WebhookEndpoint.objects.create(organization=org, url="{url}", secret="drill-secret", events=["*"])
with transaction.atomic():
    print("DELIVERY", webhook_emit(organization=org, event="drill.ping", data={{"n": 1}})[0].pk)
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory, migrated_template):
    """One migrated deployment for the module (each drill starts its own processes against it)."""
    tmp = tmp_path_factory.mktemp("faults")
    with scratch_database(migrated_template, tmp, "gatehouse_faults") as database_url:
        yield from _site(tmp, database_url)


def _site(tmp, database_url):
    env = dict(os.environ, GATEHOUSE_VAR_DIR=str(tmp / "var"), DATABASE_URL=database_url,
               PYTHONPATH=f"{ROOT / 'platform'}{os.pathsep}{ROOT}", PYTHONUNBUFFERED="1",
               GATEHOUSE_DEFAULT_QUEUE=f"faults-{uuid.uuid4().hex[:8]}", GATEHOUSE_WEBHOOK_ALLOW_PRIVATE_URLS="1",
               GATEHOUSE_BROKER_VISIBILITY_TIMEOUT="3", GATEHOUSE_REDELIVERY_INTERVAL_SECONDS="1",
               GATEHOUSE_STRANDED_WORK_SECONDS="3", GATEHOUSE_DB_CONNECT_TIMEOUT="2")
    env.pop("CELERY_TASK_ALWAYS_EAGER", None)
    if env.get("CELERY_BROKER_URL", "").startswith("redis"):
        # With a 3 s visibility timeout these workers put back every message left unacknowledged 3 s in their Redis
        # database, whoever sent it: the drills get a database of their own, so no deployment of another file running
        # beside them (pytest-xdist) has its long training tasks delivered twice.
        env["CELERY_BROKER_URL"] = urlunsplit(urlsplit(env["CELERY_BROKER_URL"])._replace(path="/13"))
    manage = [sys.executable, str(ROOT / "manage.py")]
    out = _shell({"env": env, "manage": manage}, SETUP.format(var=tmp), CELERY_TASK_ALWAYS_EAGER="1")
    processes: list[subprocess.Popen] = []
    try:
        yield {"env": env, "manage": manage, "tmp": tmp, "token": out["TOKEN"], "processes": processes}
    finally:
        stop_processes(processes)


def _shell(site, script, **env) -> dict:
    done = subprocess.run([*site["manage"], "shell", "-c", script], env=site["env"] | env, cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return {line.split()[0]: line.split()[1] for line in done.stdout.splitlines() if len(line.split()) == 2}


def _start(site, command, name, **env) -> subprocess.Popen:
    log = open(site["tmp"] / f"{name}.log", "a")
    proc = subprocess.Popen(command, env=site["env"] | env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    site["processes"].append(proc)
    return proc


def _worker(site, name, *, stall_flag: Path | None = None, **env) -> subprocess.Popen:
    args = ["worker", "-Q", (site["env"] | env)["GATEHOUSE_DEFAULT_QUEUE"], "--pool", "solo", "--without-gossip",
            "--without-mingle", "--without-heartbeat", "-n", f"{name}-{uuid.uuid4().hex[:6]}@faults",
            "--loglevel", "INFO"]
    if stall_flag is not None:
        return _start(site, [sys.executable, str(FAULTS), *args], name, FAULTS_STALL_FLAG=str(stall_flag), **env)
    return _start(site, [sys.executable, "-m", "celery", "-A", "gatehouse", *args], name, **env)


def _beat(site, name, **env) -> subprocess.Popen:
    return _start(site, [sys.executable, "-m", "celery", "-A", "gatehouse", "beat", "--loglevel", "WARNING",
                         "-s", str(site["tmp"] / f"{name}-schedule")], name, **env)


def _web(site, **env) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = _start(site, [*site["manage"], "runserver", f"127.0.0.1:{port}", "--noreload"], "web", **env)
    wait_for_http(f"http://127.0.0.1:{port}/healthz")
    return proc, f"http://127.0.0.1:{port}"


def _kill_9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # no warm shutdown, no ack, no requeue on the way out
    proc.wait(timeout=10)


def test_a_worker_killed_mid_verification_and_mid_webhook_delivery_finishes_each_once(site):
    db, queue = site["env"]["DATABASE_URL"], f"faults-kill-{uuid.uuid4().hex[:6]}"
    env = {"GATEHOUSE_DEFAULT_QUEUE": queue}
    flag = site["tmp"] / "stall"
    flag.touch()
    version = int(_shell(site, INGEST.format(folder=site["tmp"] / "kill-model", seed=7, name="kill"), **env)["VERSION"])
    first = _worker(site, "w1", stall_flag=flag, **env)
    wait_until(lambda: Path(f"{flag}.reached").exists(), timeout=40, what="the worker to start verifying")
    assert sql(db, "SELECT status FROM registry_modelversion WHERE id = %s", (version,)) == [("verifying",)]
    _kill_9(first)
    flag.unlink()

    _beat(site, "beat-kill", **env)
    second = _worker(site, "w2", **env)
    status = "SELECT status FROM registry_modelversion WHERE id = %s"
    wait_until(lambda: sql(db, status, (version,))[0][0] == "verified", timeout=40,
               what="the version to be verified after the kill")
    assert sql(db, "SELECT count(*) FROM audit_auditevent WHERE action = 'model_version.verify' AND target_id = %s",
               (str(version),)) == [(1,)]
    assert sql(db, "SELECT r.version_id FROM registry_modelref r JOIN registry_modelversion v "
                   "ON v.model_id = r.model_id WHERE v.id = %s AND r.name = 'main'", (version,)) == [(version,)]

    receiver = WebhookReceiver(hold_first=True)
    try:
        delivery = int(_shell(site, EMIT.format(url=receiver.url), **env)["DELIVERY"])
        assert receiver.first_arrived.wait(30), "the worker never sent the webhook"
        _kill_9(second)  # in the middle of the POST: the receiver has the request, the worker never hears back
        receiver.release()
        _worker(site, "w3", **env)
        query = "SELECT status, attempts FROM webhooks_webhookdelivery WHERE id = %s"
        row = wait_until(lambda: [r for r in sql(db, query, (delivery,)) if r[0] != "pending"],
                         timeout=40, what="the delivery to finish after the kill")
        time.sleep(1.5)  # any further copy of the task (broker redelivery, sweep) has had time to run
    finally:
        receiver.close()
    assert row == [("delivered", 1)]
    assert len(receiver.acknowledged) == 1  # acknowledged once
    # The receiver saw the interrupted attempt and the retry: at-least-once, one delivery id to dedupe on.
    assert {r["delivery"] for r in receiver.received} == {str(delivery)} and len(receiver.received) == 2
    assert len({r["body"] for r in receiver.received}) == 1


@pytest.mark.skipif(not ON_POSTGRES, reason="the database-restart drill needs PostgreSQL (DATABASE_URL=postgres://…); "
                                           "SQLite is a file, it does not restart")
def test_a_database_restart_under_load_answers_503_then_recovers_without_a_restart(site):
    url = urlsplit(site["env"]["DATABASE_URL"])
    proxy = TcpProxy(url.hostname, url.port or 5432)
    try:
        web, base = _web(site, DATABASE_URL=site["env"]["DATABASE_URL"].replace(url.netloc.split("@")[-1],
                                                                               f"127.0.0.1:{proxy.port}"))
        headers = {"Authorization": f"Bearer {site['token']}"}
        results, phase, stop = [], ["before"], threading.Event()

        def load(path):
            with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
                while not stop.is_set():
                    start, current = time.monotonic(), phase[0]
                    response = client.get(path, headers={"Accept": "text/html"} if not path.startswith("/api") else {})
                    results.append((current, phase[0], path, response.status_code, time.monotonic() - start,
                                    response.headers.get("Retry-After"), response.headers.get("Content-Type", "")))

        threads = [threading.Thread(target=load, args=(path,)) for path in
                   ("/api/v1/models/aurora/m", "/api/v1/models/aurora/m/versions", "/api/v1/licenses", "/aurora/m",
                    "/healthz")]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        phase[0] = "down"
        proxy.cut()  # PostgreSQL restarts: every connection dropped, new ones refused
        time.sleep(2.5)
        ready_while_down = httpx.get(f"{base}/readyz", timeout=10)
        phase[0] = "back"
        proxy.restore()
        time.sleep(3)
        ready_after = httpx.get(f"{base}/readyz", timeout=10).json()
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        proxy.close()

    assert web.poll() is None  # the same web process throughout
    statuses = {status for *_, status, _, _, _ in results}
    assert 500 not in statuses and statuses <= {200, 503}, sorted(statuses)
    assert max(elapsed for *_, elapsed, _, _ in results) < 8  # bounded by the connect timeout, never a hang
    before = [r for r in results if r[0] == r[1] == "before"]
    assert before and all(r[3] == 200 for r in before)
    down = [r for r in results if r[0] == r[1] == "down" and r[2] != "/healthz"]
    assert down and all(r[3] == 503 and r[5] == "5" for r in down)
    assert all(r[6].startswith("application/json") for r in down if r[2].startswith("/api/"))
    assert all(r[6].startswith("text/html") for r in down if not r[2].startswith("/api/"))
    assert all(r[3] == 200 for r in results if r[2] == "/healthz")  # liveness never depends on the database
    assert ready_while_down.status_code == 503 and "database" in ready_while_down.json()["unavailable"]
    back = [r for r in results if r[0] == "back"]
    recovered_at = min(i for i, r in enumerate(back) if r[3] == 200)
    assert back[-10:] and all(r[3] == 200 for r in back[-10:])  # serving again, without a restart
    assert all(r[3] == 200 for r in back[recovered_at + len(threads) * 2:])
    assert ready_after["status"] in ("ready", "degraded"), ready_after


@pytest.mark.skipif(not ON_REDIS, reason="the Redis-down drill needs the Redis broker (CELERY_BROKER_URL=redis://…); "
                                        "the filesystem broker cannot go down")
def test_redis_down_keeps_the_web_up_and_degraded_and_loses_no_upload(site):
    url = urlsplit(site["env"]["CELERY_BROKER_URL"])
    proxy = TcpProxy(url.hostname, url.port or 6379)
    queue = f"faults-redis-{uuid.uuid4().hex[:6]}"
    broker = site["env"]["CELERY_BROKER_URL"].replace(url.netloc.split("@")[-1], f"127.0.0.1:{proxy.port}")
    env = {"CELERY_BROKER_URL": broker, "GATEHOUSE_DEFAULT_QUEUE": queue}
    try:
        _, base = _web(site, **env)
        _worker(site, "w-redis", **env)
        _beat(site, "beat-redis", **env)
        headers = {"Authorization": f"Bearer {site['token']}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            assert client.get("/readyz").json()["status"] in ("ready", "degraded")
            proxy.cut()
            timings = {}
            for path in ("/healthz", "/readyz", "/metrics", "/api/v1/models/aurora/m", "/aurora/m"):
                start = time.monotonic()
                timings[path] = (client.get(path), time.monotonic() - start)
            folder = site["tmp"] / "redis-upload"
            _shell(site, f"from gatehouse.registry.demo import write_model_folder\n"
                         f"write_model_folder(__import__('pathlib').Path('{folder}'), seed=11)")
            files = [(p.relative_to(folder).as_posix(), (p.name, p.read_bytes())) for p in sorted(folder.rglob("*"))
                     if p.is_file()]
            start = time.monotonic()
            upload = client.post("/api/v1/models/aurora/while-redis-down/versions", files=files)
            timings["upload"] = (upload, time.monotonic() - start)
            assert all(elapsed < 10 for _, elapsed in timings.values()), {k: v[1] for k, v in timings.items()}
            assert {path: r.status_code for path, (r, _) in timings.items()} == {
                "/healthz": 200, "/readyz": 200, "/metrics": 200, "/api/v1/models/aurora/m": 200, "/aurora/m": 200,
                "upload": 202}, upload.text
            ready = timings["/readyz"][0].json()
            assert ready["status"] == "degraded" and ready["unavailable"] == ["broker"]
            assert ready["checks"]["broker"].startswith("error:") and ready["checks"]["database"] == "ok"
            commit = upload.json()["commit"]
            assert upload.json()["status"] == "pending"

            proxy.restore()
            wait_until(lambda: client.get("/readyz").json()["status"] == "ready", timeout=20,
                       what="readiness to come back")
            version = wait_until(
                lambda: (v := client.get(f"/api/v1/models/aurora/while-redis-down/versions/{commit}").json())
                ["status"] == "verified" and v, timeout=40, what="the upload made while Redis was down to be verified")
            assert version["commit"] == commit
    finally:
        proxy.close()
