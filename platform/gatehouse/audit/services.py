"""The audit log: written only by services, inside their transaction, and verifiable end to end."""
import hashlib
import json
from dataclasses import dataclass
from datetime import timezone as dt_timezone

from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, transaction
from django.utils import timezone

from gatehouse.audit.models import AuditEvent

_PG_LOCK_KEY = 0x6761746568  # "gateh": serialises appends so the chain stays linear


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), cls=DjangoJSONEncoder, ensure_ascii=False)


def event_hash(event: AuditEvent) -> str:
    payload = {
        "prev": event.prev_hash,
        "at": event.created_at.astimezone(dt_timezone.utc).isoformat(),
        "actor": [event.actor_id, event.actor_label],
        "action": event.action,
        "target": [event.target_type, event.target_id],
        "data": event.data,
    }
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()


def audit_record(*, actor, action: str, target=None, data: dict | None = None) -> AuditEvent:
    """Append one event. Call inside the service's transaction so the event and the change commit together."""
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_PG_LOCK_KEY])
        last = AuditEvent.objects.order_by("-id").values_list("hash", flat=True).first()
        event = AuditEvent(
            created_at=timezone.now(),
            actor_id=getattr(actor, "pk", None),
            actor_label=getattr(actor, "username", "") or ("system" if actor is None else str(actor)),
            action=action,
            target_type=target._meta.label_lower if target is not None else "",
            target_id=str(target.pk) if target is not None else "",
            data=_canonical(data or {}),
            prev_hash=last or AuditEvent.GENESIS,
        )
        event.hash = event_hash(event)
        event.save()
    return event


@dataclass(frozen=True)
class ChainReport:
    checked: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def audit_verify() -> ChainReport:
    """Walk the chain in id order; report every row whose content or link does not match."""
    problems: list[str] = []
    expected_prev = AuditEvent.GENESIS
    checked = 0
    for event in AuditEvent.objects.order_by("id").iterator(chunk_size=2000):
        checked += 1
        if event.prev_hash != expected_prev:
            problems.append(f"event #{event.pk}: link broken (a row before it was removed or reordered)")
        if event_hash(event) != event.hash:
            problems.append(f"event #{event.pk} ({event.action}): content does not match its hash (edited)")
        expected_prev = event.hash
    return ChainReport(checked=checked, problems=problems)
