"""Work whose task message was lost is queued again.

Tasks are acks_late, so on Redis a message whose worker died is redelivered after the visibility timeout. Two
cases stay uncovered by the broker: kombu's filesystem transport (the embedded default) deletes a message when
a worker takes it, so `kill -9` of that worker loses it for good; and work committed while the broker was down
(the on-commit publish failed) was never queued at all. This sweep, run by beat, finds such work by its state in
the database and queues it again. Every task it queues claims its work with a conditional update, so a copy that
turns out not to be lost does nothing.

Training runs: a running run that stops heart-beating is requeued by its own reaper; a queued run no worker took
is requeued here, by the service that owns its state (gatehouse.registry.services.training).
"""
import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

log = logging.getLogger("gatehouse.redelivery")


def _cutoff(stale_after_seconds: int | None):
    seconds = settings.GATEHOUSE_STRANDED_WORK_SECONDS if stale_after_seconds is None else stale_after_seconds
    return timezone.now() - timedelta(seconds=seconds)


def stranded_verifications_requeue(*, stale_after_seconds: int | None = None) -> list[int]:
    """Versions still pending or verifying long after upload: queue their verification again (idempotent)."""
    from gatehouse.registry.models import ModelVersion
    from gatehouse.registry.tasks import verify_model_version_task

    ids = list(ModelVersion.objects.filter(
        status__in=[ModelVersion.Status.PENDING, ModelVersion.Status.VERIFYING],
        created_at__lt=_cutoff(stale_after_seconds)).values_list("pk", flat=True)[:500])
    for pk in ids:
        verify_model_version_task.delay(pk)
    return ids


def stranded_webhooks_requeue(*, stale_after_seconds: int | None = None) -> list[int]:
    """Pending deliveries whose attempt is overdue: queue the attempt again. `next_attempt_at` is moved to now
    with a conditional update first, so one overdue delivery is queued once per stale period, by one sweeper."""
    from gatehouse.webhooks.models import WebhookDelivery
    from gatehouse.webhooks.tasks import deliver_webhook_task

    cutoff, now = _cutoff(stale_after_seconds), timezone.now()
    overdue = WebhookDelivery.objects.filter(
        Q(next_attempt_at__isnull=True, created_at__lt=cutoff) | Q(next_attempt_at__lt=cutoff),
        status=WebhookDelivery.Status.PENDING)
    queued = []
    for pk, next_attempt_at in overdue.values_list("pk", "next_attempt_at")[:500]:
        with transaction.atomic():
            if WebhookDelivery.objects.filter(pk=pk, status=WebhookDelivery.Status.PENDING,
                                              next_attempt_at=next_attempt_at).update(next_attempt_at=now):
                transaction.on_commit(lambda pk=pk: deliver_webhook_task.delay(pk))
                queued.append(pk)
    return queued


def stranded_work_redeliver(*, stale_after_seconds: int | None = None) -> dict[str, list[int]]:
    from gatehouse.registry.services.training import stranded_training_runs_requeue

    requeued = {"verifications": stranded_verifications_requeue(stale_after_seconds=stale_after_seconds),
                "webhook_deliveries": stranded_webhooks_requeue(stale_after_seconds=stale_after_seconds),
                "training_runs": stranded_training_runs_requeue(stale_after_seconds=stale_after_seconds)}
    if any(requeued.values()):
        log.warning("requeued stranded work: %s", requeued)
    return requeued
