"""Signed webhooks: `webhook_endpoint_create` registers a receiver whose URL passed the SSRF checks;
`webhook_emit` records one delivery per subscribed endpoint (on the caller's transaction) and queues it after
commit; `webhook_attempt` makes one attempt, to the address it has just checked, and schedules the next with
backoff."""
import hashlib
import hmac
import json
import secrets
import time
import uuid
from datetime import timedelta

import httpx
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from gatehouse.audit.services import audit_record
from gatehouse.core.errors import InvalidInput
from gatehouse.webhooks.addresses import Target, UrlRefused, UrlUnresolved, delivery_targets, webhook_url_check
from gatehouse.webhooks.models import WebhookDelivery, WebhookEndpoint

MAX_ATTEMPTS = 6
BASE_DELAY_SECONDS = 10


def signature(secret: str, timestamp: str, body: str) -> str:
    """What receivers recompute: HMAC-SHA256 over "<timestamp>.<body>" (the timestamp defeats replays)."""
    return "sha256=" + hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest()


def webhook_url_refusal(url: str) -> str | None:
    """Why a receiver URL may not be registered, with what to do about it; None when it may. The API and the
    admin site ask this one question."""
    try:
        webhook_url_check(url, allow_private=settings.WEBHOOK_ALLOW_PRIVATE_URLS)
    except UrlRefused as exc:
        return f"url is refused: {exc.reason}. {exc.advice}"
    except UrlUnresolved as exc:
        return f"url is refused: {exc}. Check the host name, or create its DNS record first, then try again."
    return None


def webhook_endpoint_create(*, actor, organization, url: str, events: list[str]) -> WebhookEndpoint:
    """Register a receiver. The URL is checked before anything is written: a refused one is a 400 and leaves no row."""
    refusal = webhook_url_refusal(url)
    if refusal:
        raise InvalidInput(refusal, fields={"url": [refusal]})
    with transaction.atomic():
        endpoint = WebhookEndpoint.objects.create(organization=organization, url=url, events=list(events),
                                                  secret=secrets.token_urlsafe(32))
        audit_record(actor=actor, action="webhook.create", target=endpoint, data={"url": endpoint.url})
    return endpoint


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
        # robust: with the broker down the change itself is saved and must not answer 503; the pending deliveries
        # are queued again by the stranded-work sweep (gatehouse.core.redelivery).
        for pk in ids:
            transaction.on_commit(lambda pk=pk: deliver_webhook_task.delay(pk), robust=True)
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
    code, error, give_up = None, "", False
    try:
        # Resolved and checked again now, not trusted from creation time: the name may point elsewhere since.
        targets = delivery_targets(delivery.endpoint.url, allow_private=settings.WEBHOOK_ALLOW_PRIVATE_URLS)
    except UrlRefused as exc:
        error, give_up = f"refused: {exc.reason}", True  # the same answer every time: retrying won't help
    except UrlUnresolved as exc:
        error = f"DNS lookup failed: {exc}"  # DNS outages pass: retried with backoff like a refused connection
    else:
        try:
            code, excerpt = _post(client, targets, body=delivery.body, headers=headers)
            if not 200 <= code < 300:
                error = f"HTTP {code}: {excerpt.decode(errors='replace')[:200]}"
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
    if give_up or delivery.attempts >= MAX_ATTEMPTS:
        WebhookDelivery.objects.filter(pk=delivery.pk).update(status=WebhookDelivery.Status.FAILED, next_attempt_at=None)
        delivery.refresh_from_db()
        return delivery, None
    delay = BASE_DELAY_SECONDS * 2 ** (delivery.attempts - 1)  # 10 s, 20 s, 40 s, …
    WebhookDelivery.objects.filter(pk=delivery.pk).update(next_attempt_at=now + timedelta(seconds=delay))
    delivery.refresh_from_db()
    return delivery, delay


def _post(client: httpx.Client | None, targets: list[Target], *, body: str, headers: dict) -> tuple[int, bytes]:
    """POST to the first checked address that accepts a connection, presenting the original name as Host and,
    for https, as the TLS server name. Returns the status and at most the first KiB of the answer: a receiver
    cannot make us read a large body."""

    def send(target: Target) -> tuple[int, bytes]:
        extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else None
        request = client.build_request("POST", target.url, content=body, headers=headers | {"Host": target.host},
                                       timeout=10, extensions=extensions)
        # Never follow redirects (httpx's default, stated here on purpose): a public receiver could otherwise
        # send the POST on to a private address that was never checked.
        response = client.send(request, stream=True, follow_redirects=False)
        try:
            excerpt = b""
            for chunk in response.iter_bytes(1024):
                excerpt += chunk
                if len(excerpt) >= 1024:
                    break
            return response.status_code, excerpt[:1024]
        finally:
            response.close()

    # Our own client ignores proxy variables (trust_env=False): a proxy would resolve the name itself, and its
    # https tunnel would verify the certificate against the pinned IP instead of the name.
    own = client is None
    client = client or httpx.Client(trust_env=False)
    try:
        for target in targets[:-1]:
            try:
                return send(target)
            except httpx.ConnectError:
                continue  # refused or unreachable: the next checked address (a timeout is not: attempts stay short)
        return send(targets[-1])
    finally:
        if own:
            client.close()
