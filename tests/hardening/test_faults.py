"""Faults, in process (both database backends): a database outage answers 503 with Retry-After in each API
family's error shape and a plain page for browsers, and the next request after it is served normally; weight
storage failing mid-upload leaves no version and no file; a broker that is down when an upload commits loses no
verification (the stranded-work sweep queues it later, once); an unreachable broker degrades readiness without
touching liveness or reads. The same faults against real processes: tests/e2e/test_fault_drills.py."""
import errno
import socket

import pytest
from django.core.files.storage import FileSystemStorage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import OperationalError, connection
from django.test import Client

from gatehouse import celery_app
from gatehouse.audit.models import AuditEvent
from gatehouse.registry.models import Model, ModelFile, ModelVersion

from .faults import WebhookReceiver


def _database_down(execute, sql, params, many, context):
    raise OperationalError("server closed the connection unexpectedly\n\tThis probably means the server terminated")


def _payload(folder):
    return {p.relative_to(folder).as_posix(): SimpleUploadedFile(p.name, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_503(response, content_type):
    assert response.status_code == 503, response.content[:300]
    assert response["Retry-After"] == "5" and response["Content-Type"].startswith(content_type)
    assert b"Traceback" not in response.content and b"OperationalError" not in response.content


def test_a_database_outage_is_a_503_in_each_api_family_and_a_plain_page_for_browsers(aurora, alice, register,
                                                                                     token_for):
    register(aurora, "m", alice, tier="open")
    token = token_for(alice, ("read", "inference"))
    browser = Client()
    browser.force_login(alice)  # a signed-in browser: its session lives in the database too
    with connection.execute_wrapper(_database_down):
        ours = Client().get("/api/v1/models/aurora/m", HTTP_AUTHORIZATION=f"Bearer {token}")
        anonymous = Client().get("/api/v1/models")
        openai = Client().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {token}")
        hub = Client().get("/api/models/aurora/m")
        page = browser.get("/aurora/m")
        home = Client().get("/", HTTP_ACCEPT="text/html")
        write = Client().post("/api/v1/models/aurora/m/versions", {}, HTTP_AUTHORIZATION=f"Bearer {token}")
        alive = browser.get("/healthz")
        ready = Client().get("/readyz")
    for response in (ours, anonymous, write):
        _assert_503(response, "application/json")
        assert response.json()["error"]["status"] == 503 and response.json()["error"]["code"] == "unavailable"
        assert "database" in response.json()["error"]["message"]
    _assert_503(openai, "application/json")
    assert openai.json()["error"]["type"] == "service_unavailable" and openai.json()["error"]["param"] is None
    _assert_503(hub, "application/json")
    assert hub["X-Error-Code"] == "ServiceUnavailable" and "temporarily unavailable" in hub["X-Error-Message"]
    assert hub.json() == {"error": hub["X-Error-Message"]}  # the Hub's own shape, as its other errors
    for response in (page, home):
        _assert_503(response, "text/html")
        assert b"Temporarily unavailable" in response.content and b"try again" in response.content
    assert alive.status_code == 200  # liveness never asks the database, even with a session cookie
    assert ready.status_code == 503 and ready.json()["status"] == "unready"
    assert ready.json()["unavailable"][0] == "database" and ready.json()["checks"]["storage"] == "ok"
    # The database is back: the same clients are served again, no restart needed.
    assert Client().get("/api/v1/models/aurora/m", HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 200
    assert browser.get("/aurora/m").status_code == 200
    assert Client().get("/readyz").json()["status"] in ("ready", "degraded")


def test_a_database_error_after_the_view_is_a_503_too(db, monkeypatch):
    """Errors outside the view (here: saving the session on the way out) reach us as Django's 500: still a 503."""
    from django.contrib.sessions.middleware import SessionMiddleware

    def failing(self, request, response):
        raise OperationalError("terminating connection due to administrator command")

    monkeypatch.setattr(SessionMiddleware, "process_response", failing)
    client = Client(raise_request_exception=False)  # as a real server does: no test-client re-raise
    api, page = client.get("/api/v1/licenses"), client.get("/", HTTP_ACCEPT="text/html")
    _assert_503(api, "application/json")
    _assert_503(page, "text/html")
    assert api["X-Request-Id"] and page["X-Request-Id"]


def test_weight_storage_failing_mid_upload_leaves_no_version_and_no_file(aurora, alice, client_for, model_folder,
                                                                        stored_files, weights_dir, monkeypatch):
    original, calls = FileSystemStorage._save, []

    def disk_full_on_the_second_file(self, name, content):
        calls.append(name)
        if len(calls) < 2:
            return original(self, name, content)
        path = weights_dir / name  # what a full disk leaves: part of the file, then the error
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.read(7))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystemStorage, "_save", disk_full_on_the_second_file)
    client = client_for(alice, scopes=["write"])
    events_before = AuditEvent.objects.count()
    response = client.post("/api/v1/models/aurora/m/versions", _payload(model_folder()), format="multipart")
    assert response.status_code == 503 and response["Retry-After"] == "5", response.content
    error = response.json()["error"]
    assert error["code"] == "unavailable" and "nothing was registered" in error["message"]
    assert "No space" not in error["message"]  # the cause is logged, not shown
    assert len(calls) == 2
    assert Model.objects.count() == ModelVersion.objects.count() == ModelFile.objects.count() == 0
    assert AuditEvent.objects.count() == events_before
    assert stored_files() == []  # the first file and the half-written second one are gone


def test_the_database_failing_after_the_bytes_are_stored_leaves_no_file(aurora, alice, client_for, model_folder,
                                                                       stored_files):
    def insert_fails(execute, sql, params, many, context):
        if sql.startswith('INSERT INTO "registry_modelversion"'):
            raise OperationalError("server closed the connection unexpectedly")
        return execute(sql, params, many, context)

    client = client_for(alice, scopes=["write"])
    payload = _payload(model_folder())
    with connection.execute_wrapper(insert_fails):
        response = client.post("/api/v1/models/aurora/m/versions", payload, format="multipart")
    _assert_503(response, "application/json")
    assert ModelVersion.objects.count() == ModelFile.objects.count() == 0
    assert stored_files() == []


def test_an_upload_while_the_broker_is_down_is_kept_and_verified_once_it_is_back(alice, client_for, model_folder,
                                                                               stored_files, monkeypatch, caplog,
                                                                               django_capture_on_commit_callbacks):
    """Before: the failed on-commit publish propagated into ingest's cleanup, which deleted the files of the
    version it had just committed (a 500, and a version that could never verify)."""
    from kombu.exceptions import OperationalError as BrokerDown

    from gatehouse.accounts.models import Membership, Organization
    from gatehouse.core.redelivery import stranded_work_redeliver
    from gatehouse.registry.tasks import verify_model_version_task

    org = Organization.objects.create(slug="aurora", name="Aurora")
    Membership.objects.create(user=alice, organization=org, role=Membership.Role.ADMIN)

    def broker_down(*args, **kwargs):
        raise BrokerDown("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    with monkeypatch.context() as patch, django_capture_on_commit_callbacks(execute=True) as published:
        patch.setattr(verify_model_version_task, "delay", broker_down)
        response = client_for(alice, scopes=["write"]).post("/api/v1/models/aurora/m/versions",
                                                            _payload(model_folder()), format="multipart")
    assert len(published) == 1  # the publish was attempted after commit, failed, and was only logged
    assert response.status_code == 202, response.content
    version = ModelVersion.objects.get()
    assert version.status == "pending" and len(stored_files()) == version.files.count() > 0
    assert stranded_work_redeliver()["verifications"] == []  # not stranded yet: a normal queue wait
    assert stranded_work_redeliver(stale_after_seconds=0)["verifications"] == [version.pk]
    version.refresh_from_db()
    assert version.status == "verified" and len(stored_files()) == version.files.count()
    assert AuditEvent.objects.filter(action="model_version.verify").count() == 1
    assert stranded_work_redeliver(stale_after_seconds=0)["verifications"] == []  # nothing left to do


def test_an_overdue_webhook_delivery_is_queued_again_and_delivered_once(aurora, settings,
                                                                       django_capture_on_commit_callbacks):
    from datetime import timedelta

    from django.utils import timezone

    from gatehouse.core.redelivery import stranded_webhooks_requeue
    from gatehouse.webhooks.models import WebhookDelivery, WebhookEndpoint

    settings.WEBHOOK_ALLOW_PRIVATE_URLS = True  # the receiver is on loopback
    receiver = WebhookReceiver()
    try:
        endpoint = WebhookEndpoint.objects.create(organization=aurora, url=receiver.url, secret="s", events=["*"])
        old = timezone.now() - timedelta(hours=1)
        lost = WebhookDelivery.objects.create(endpoint=endpoint, event="e", body='{"n": 1}', created_at=old)
        waiting = WebhookDelivery.objects.create(endpoint=endpoint, event="e", body='{"n": 2}', created_at=old,
                                                 next_attempt_at=timezone.now() + timedelta(seconds=30))
        fresh = WebhookDelivery.objects.create(endpoint=endpoint, event="e", body='{"n": 3}')
        with django_capture_on_commit_callbacks(execute=True):
            assert stranded_webhooks_requeue(stale_after_seconds=60) == [lost.pk]
        with django_capture_on_commit_callbacks(execute=True):
            assert stranded_webhooks_requeue(stale_after_seconds=60) == []  # delivered: nothing to redo
    finally:
        receiver.close()
    assert {d.pk: d.status for d in WebhookDelivery.objects.all()} == {
        lost.pk: "delivered", waiting.pk: "pending", fresh.pk: "pending"}
    assert [r["delivery"] for r in receiver.acknowledged] == [str(lost.pk)]


@pytest.fixture
def unreachable_broker():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: connections are refused
    saved = celery_app.conf.broker_url, celery_app.conf.broker_write_url, celery_app.conf.broker_read_url
    celery_app.conf.broker_url = celery_app.conf.broker_write_url = celery_app.conf.broker_read_url = \
        f"redis://127.0.0.1:{port}/0"
    yield
    celery_app.conf.broker_url, celery_app.conf.broker_write_url, celery_app.conf.broker_read_url = saved


def test_an_unreachable_broker_degrades_readiness_but_not_liveness_or_reads(aurora, alice, register,
                                                                           unreachable_broker):
    import time

    register(aurora, "m", alice, tier="open")
    start = time.monotonic()
    ready = Client().get("/readyz")
    assert time.monotonic() - start < 10
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"
    assert ready.json()["unavailable"] == ["broker"] and ready.json()["checks"]["broker"].startswith("error:")
    assert ready.json()["checks"]["database"] == ready.json()["checks"]["storage"] == "ok"
    assert Client().get("/healthz").status_code == 200
    assert Client().get("/api/v1/models/aurora/m").status_code == 200
    assert Client().get("/aurora/m").status_code == 200
