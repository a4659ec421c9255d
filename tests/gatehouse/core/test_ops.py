"""Operations endpoints and logs: request ids, liveness, readiness (ready, degraded, unready), Prometheus
metrics without model names, JSON log lines without secrets."""
import json
import logging

from django.test import Client

from releases.models import InferenceBackend


def test_request_ids_are_echoed_when_sane_and_made_otherwise(db):
    client = Client()
    given = client.get("/healthz", HTTP_X_REQUEST_ID="abc-123")
    assert given.status_code == 200 and given["X-Request-Id"] == "abc-123"
    hostile = client.get("/healthz", HTTP_X_REQUEST_ID="x\" onload=1 " * 10)
    assert len(hostile["X-Request-Id"]) == 32 and '"' not in hostile["X-Request-Id"]


def test_readiness_reports_each_part_and_degrades_or_fails(register, aurora, alice, settings, tmp_path):
    ready = Client().get("/readyz").json()
    assert ready["status"] == "ready" and ready["checks"]["database"] == "ok" and ready["checks"]["storage"] == "ok"
    assert ready["checks"]["broker"] == "ok" and ready["checks"]["engines"].startswith("ok")
    model = register(aurora, "m", alice, tier="api").model
    InferenceBackend.objects.create(model=model, kind="local", url="")  # its engine is not up
    degraded = Client().get("/readyz")
    assert degraded.status_code == 200 and degraded.json()["status"] == "degraded"
    assert degraded.json()["checks"]["engines"].startswith("error: RuntimeError: 1 of 1 local engines")
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("storage cannot live under a file, whoever runs the test")
    settings.STORAGES = {**settings.STORAGES, "weights": {"BACKEND": "django.core.files.storage.FileSystemStorage",
                                                          "OPTIONS": {"location": str(not_a_folder)}}}
    unready = Client().get("/readyz")
    assert unready.status_code == 503 and unready.json()["status"] == "unready"
    assert unready.json()["checks"]["storage"].startswith("error:") and unready.json()["checks"]["database"] == "ok"


def test_metrics_are_prometheus_text_with_aggregates_only(register, aurora, alice, client):
    register(aurora, "very-secret-name", alice, tier="closed")
    client.get("/")
    text = client.get("/metrics").content.decode()
    assert "gatehouse_http_request_seconds_bucket" in text and 'gatehouse_models{tier="closed"} 1.0' in text
    assert "gatehouse_downloads 0.0" in text and "gatehouse_tokens_served" in text
    assert "very-secret-name" not in text


def test_json_request_log_carries_the_request_id_and_never_a_token(db, caplog, token_for, alice):
    from gatehouse.core.ops import JsonFormatter

    secret = token_for(alice)
    with caplog.at_level(logging.INFO, logger="gatehouse.requests"):
        Client().get(f"/api/v1/me?token={secret}", HTTP_AUTHORIZATION=f"Bearer {secret}", HTTP_X_REQUEST_ID="req-42")
    record = next(r for r in caplog.records if r.name == "gatehouse.requests")
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "req-42" and line["path"] == "/api/v1/me" and line["status"] == 200
    assert line["route"] == "api/v1/me" and line["user"] == alice.pk
    assert secret not in json.dumps(line) and "Bearer" not in json.dumps(line)


def test_deploy_checks_are_clean_with_production_settings(tmp_path):
    import os
    import secrets
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    env = dict(os.environ, GATEHOUSE_TLS="1", SECRET_KEY=secrets.token_urlsafe(60), DEBUG="0",
               GATEHOUSE_VAR_DIR=str(tmp_path / "var"), ALLOWED_HOSTS="models.example.org")
    result = subprocess.run([sys.executable, str(root / "manage.py"), "check", "--deploy", "--fail-level", "WARNING"],
                            env=env, capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout
    bare = subprocess.run([sys.executable, str(root / "manage.py"), "check", "--deploy", "--fail-level", "WARNING"],
                          env=env | {"GATEHOUSE_TLS": "0"}, capture_output=True, text=True, cwd=root)
    assert bare.returncode != 0 and "SESSION_COOKIE_SECURE" in bare.stderr + bare.stdout  # the check can fail


def test_secrets_can_come_from_files_and_a_name_set_twice_is_refused(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    key_file = tmp_path / "secret_key"
    key_file.write_text("from-a-file-" + "k" * 50 + "\n")
    env = {k: v for k, v in os.environ.items() if k != "SECRET_KEY"} | {
        "GATEHOUSE_VAR_DIR": str(tmp_path / "var"), "SECRET_KEY_FILE": str(key_file),
        "DJANGO_SETTINGS_MODULE": "gatehouse.settings", "PYTHONPATH": f"{root / 'platform'}:{root}"}
    show = [sys.executable, "-c", "from django.conf import settings; print(settings.SECRET_KEY)"]
    read = subprocess.run(show, env=env, capture_output=True, text=True, cwd=root)
    assert read.returncode == 0 and read.stdout.strip() == "from-a-file-" + "k" * 50, read.stderr
    both = subprocess.run(show, env=env | {"SECRET_KEY": "x"}, capture_output=True, text=True, cwd=root)
    assert both.returncode != 0 and "Both SECRET_KEY and SECRET_KEY_FILE are set; keep one." in both.stderr
    missing = subprocess.run(show, env=env | {"SECRET_KEY_FILE": str(tmp_path / "nope")}, capture_output=True,
                             text=True, cwd=root)
    assert missing.returncode != 0 and "SECRET_KEY_FILE=" in missing.stderr and "cannot be read" in missing.stderr


def test_every_periodic_task_is_a_registered_task():
    """A typo in a beat schedule's task name fails only in production, when beat sends a message no worker knows."""
    from django.conf import settings

    from gatehouse import celery_app

    celery_app.loader.import_default_modules()  # what a worker imports at start (autodiscover_tasks)
    assert {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()} <= set(celery_app.tasks)
