"""Signed webhooks against a real local HTTP receiver."""
import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from gatehouse.webhooks.models import WebhookDelivery, WebhookEndpoint
from gatehouse.webhooks.services import MAX_ATTEMPTS, webhook_attempt, webhook_emit


@pytest.fixture(autouse=True)
def _local_receivers_allowed(settings):
    """These tests deliver to a receiver on 127.0.0.1, which the SSRF checks refuse unless an operator allows
    private addresses (tests/hardening/test_webhook_urls.py covers the refusals)."""
    settings.WEBHOOK_ALLOW_PRIVATE_URLS = True


@pytest.fixture
def receiver():
    """A local HTTP server that records requests and answers with the queued status codes (default 200)."""
    received, statuses = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            received.append({"headers": dict(self.headers), "body": body})
            self.send_response(statuses.pop(0) if statuses else 200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{server.server_port}/hook", "received": received, "statuses": statuses}
    server.shutdown()


def _endpoint(org, url, events=("*",)):
    return WebhookEndpoint.objects.create(organization=org, url=url, secret="s3cret", events=list(events))


def test_delivery_is_signed_and_logged(aurora, receiver):
    _endpoint(aurora, receiver["url"])
    delivery = webhook_emit(organization=aurora, event="release.downgraded", data={"model": "aurora/m"})[0]
    delivery, retry = webhook_attempt(delivery_id=delivery.pk)
    assert (delivery.status, delivery.attempts, delivery.last_status_code, retry) == ("delivered", 1, 200, None)
    request = receiver["received"][0]
    timestamp = request["headers"]["X-Gatehouse-Timestamp"]
    expected = "sha256=" + hmac.new(b"s3cret", f"{timestamp}.{request['body']}".encode(), hashlib.sha256).hexdigest()
    assert request["headers"]["X-Gatehouse-Signature"] == expected
    assert request["headers"]["X-Gatehouse-Event"] == "release.downgraded"
    assert json.loads(request["body"])["data"] == {"model": "aurora/m"}
    assert webhook_attempt(delivery_id=delivery.pk)[0].attempts == 1  # a duplicate task sends nothing more


def test_a_named_receiver_is_reached_at_its_checked_address_with_its_name_as_host(aurora, receiver):
    """A real connection by name ("localhost" resolves from the hosts file, never the network): the delivery
    connects to the address it checked and still tells the receiver which host it asked for."""
    port = receiver["url"].split(":")[2].split("/")[0]
    _endpoint(aurora, f"http://localhost:{port}/hook")
    delivery, _ = webhook_attempt(delivery_id=webhook_emit(organization=aurora, event="x", data={})[0].pk)
    assert delivery.status == "delivered" and receiver["received"][0]["headers"]["Host"] == f"localhost:{port}"


def test_failures_retry_with_backoff_then_give_up(aurora, receiver):
    _endpoint(aurora, receiver["url"])
    receiver["statuses"].extend([500, 503])
    delivery = webhook_emit(organization=aurora, event="x", data={})[0]
    delays = []
    for _ in range(3):
        delivery, retry = webhook_attempt(delivery_id=delivery.pk)
        delays.append(retry)
    assert delays == [10, 20, None] and delivery.status == "delivered" and delivery.attempts == 3
    receiver["statuses"].extend([500] * MAX_ATTEMPTS)
    failing = webhook_emit(organization=aurora, event="x", data={})[0]
    for _ in range(MAX_ATTEMPTS):
        failing, retry = webhook_attempt(delivery_id=failing.pk)
    assert failing.status == "failed" and failing.attempts == MAX_ATTEMPTS and retry is None
    assert failing.last_error.startswith("HTTP 500")


def test_unreachable_receiver_is_recorded(aurora):
    _endpoint(aurora, "http://127.0.0.1:9/nothing-listens-here")
    delivery, retry = webhook_attempt(delivery_id=webhook_emit(organization=aurora, event="x", data={})[0].pk)
    assert delivery.status == "pending" and retry == 10 and "ConnectError" in delivery.last_error


def test_only_subscribed_active_endpoints_get_events(aurora, northwind, receiver):
    _endpoint(aurora, receiver["url"], events=["release.downgraded"])
    WebhookEndpoint.objects.create(organization=aurora, url=receiver["url"], secret="x", events=["*"], is_active=False)
    _endpoint(northwind, receiver["url"])
    assert webhook_emit(organization=aurora, event="release_request.submitted", data={}) == []
    assert len(webhook_emit(organization=aurora, event="release.downgraded", data={})) == 1
    assert WebhookDelivery.objects.count() == 1


def test_admins_manage_endpoints_and_read_the_delivery_log(aurora, alice, bob, client_for, receiver):
    admin = client_for(alice, scopes=["admin"])
    assert client_for(bob, scopes=["admin"]).post("/api/v1/organizations/aurora/webhooks",
                                                  {"url": receiver["url"]}, format="json").status_code == 403
    assert client_for(alice, scopes=["write"]).get("/api/v1/organizations/aurora/webhooks").status_code == 403
    assert WebhookEndpoint.objects.count() == 0
    created = admin.post("/api/v1/organizations/aurora/webhooks", {"url": receiver["url"],
                                                                   "events": ["release.downgraded"]}, format="json")
    assert created.status_code == 201 and len(created.json()["secret"]) > 20
    endpoint_id = created.json()["id"]
    assert "secret" not in admin.get("/api/v1/organizations/aurora/webhooks").json()["results"][0]
    webhook_attempt(delivery_id=webhook_emit(organization=aurora, event="release.downgraded", data={})[0].pk)
    log = admin.get(f"/api/v1/organizations/aurora/webhooks/{endpoint_id}/deliveries").json()["results"]
    assert [(d["event"], d["status"], d["attempts"]) for d in log] == [("release.downgraded", "delivered", 1)]


def test_a_receiver_cannot_make_us_read_a_huge_error_body(aurora, settings):
    import httpx

    from gatehouse.webhooks.models import WebhookDelivery, WebhookEndpoint
    from gatehouse.webhooks.services import webhook_attempt

    read = []

    def endless():
        for _ in range(10_000):  # 640 MB if anyone read it all
            read.append(1)
            yield b"x" * 65536

    client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(500, content=endless())))
    endpoint = WebhookEndpoint.objects.create(organization=aurora, url="http://127.0.0.1:9/hook", secret="s")
    delivery = WebhookDelivery.objects.create(endpoint=endpoint, event="x", body="{}")
    delivered, retry_in = webhook_attempt(delivery_id=delivery.pk, client=client)
    assert delivered.last_status_code == 500 and delivered.last_error == "HTTP 500: " + "x" * 200
    assert retry_in is not None and len(read) <= 2
