"""Signed webhooks: `webhook_emit` records one delivery per subscribed endpoint (on the caller's transaction)
and queues it after commit; `webhook_attempt` makes one attempt and schedules the next with backoff."""
import hashlib
import hmac
import json
import time
import uuid
from datetime import timedelta

import httpx
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from gatehouse.webhooks.models import WebhookDelivery, WebhookEndpoint

MAX_ATTEMPTS = 6
BASE_DELAY_SECONDS = 10


def signature(secret: str, timestamp: str, body: str) -> str:
    """What receivers recompute: HMAC-SHA256 over "<timestamp>.<body>" (the timestamp defeats replays)."""
    return "sha256=" + hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest()


def webhook_emit(*, organization, event: str, data: dict) -> list[WebhookDelivery]:
    deliveries = []
    for endpoint in WebhookEndpoint.objects.filter(organization=organization, is_active=True):
        if not endpoint.wants(event):
            continue
        body = json.dumps({"id": uuid.uuid4().hex, "event": event, "organization": organization.slug,
                           "created_at": timezone.now(), "data": data}, cls=DjangoJSONEncoder, sort_keys=True)
        deliveries.append(WebhookDelivery.objects.create(endpoint=endpoint, event=event, body=body))
    if deliveries:
        from gatehouse.webhooks.tasks import deliver_webhook_task

        ids = [d.pk for d in deliveries]
        transaction.on_commit(lambda: [deliver_webhook_task.delay(pk) for pk in ids])
    return deliveries


def webhook_attempt(*, delivery_id: int, client: httpx.Client | None = None) -> tuple[WebhookDelivery, float | None]:
    """One attempt. Returns the delivery and, when it should be retried, the delay in seconds."""
    delivery = WebhookDelivery.objects.select_related("endpoint").get(pk=delivery_id)
    if delivery.status != WebhookDelivery.Status.PENDING:
        return delivery, None  # delivered or given up: a duplicate task does nothing
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": "Gatehouse-Webhooks/1",
               "X-Gatehouse-Event": delivery.event, "X-Gatehouse-Delivery": str(delivery.pk),
               "X-Gatehouse-Timestamp": timestamp,
               "X-Gatehouse-Signature": signature(delivery.endpoint.secret, timestamp, delivery.body)}
    code, error = None, ""
    try:
        response = (client or httpx).post(delivery.endpoint.url, content=delivery.body, headers=headers, timeout=10)
        code = response.status_code
        if not 200 <= code < 300:
            error = f"HTTP {code}: {response.text[:200]}"
    except httpx.HTTPError as exc:
        error = f"{exc.__class__.__name__}: {exc}"[:500]
    now = timezone.now()
    WebhookDelivery.objects.filter(pk=delivery.pk).update(attempts=F("attempts") + 1, last_status_code=code,
                                                          last_error=error)
    delivery.refresh_from_db()
    if not error:
        WebhookDelivery.objects.filter(pk=delivery.pk).update(status=WebhookDelivery.Status.DELIVERED, delivered_at=now,
                                                              next_attempt_at=None)
        delivery.refresh_from_db()
        return delivery, None
    if delivery.attempts >= MAX_ATTEMPTS:
        WebhookDelivery.objects.filter(pk=delivery.pk).update(status=WebhookDelivery.Status.FAILED, next_attempt_at=None)
        delivery.refresh_from_db()
        return delivery, None
    delay = BASE_DELAY_SECONDS * 2 ** (delivery.attempts - 1)  # 10 s, 20 s, 40 s, …
    WebhookDelivery.objects.filter(pk=delivery.pk).update(next_attempt_at=now + timedelta(seconds=delay))
    delivery.refresh_from_db()
    return delivery, delay
