"""Metering and quotas of the inference API. Every call is recorded when it starts (so in-flight calls count
against requests per minute) and completed with its token counts, latency and status when it ends."""
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

from django.conf import settings
from django.db.models import Min, Sum
from django.utils import timezone

from releases.models import InferenceCall


@dataclass(frozen=True)
class QuotaRefusal:
    message: str
    code: str  # rate_limit_exceeded (retry soon) or insufficient_quota (wait for tomorrow)
    retry_after: int


def _window(calls, limit: int, what: str, now) -> QuotaRefusal | None:
    if not limit:
        return None
    recent = calls.filter(created_at__gt=now - timedelta(seconds=60))
    if recent.count() < limit:
        return None
    oldest = recent.aggregate(oldest=Min("created_at"))["oldest"]
    wait = max(1, int((oldest + timedelta(seconds=60) - now).total_seconds()) + 1)
    return QuotaRefusal(f"Rate limit of {limit} requests per minute for this {what} reached; retry in {wait} s.",
                        "rate_limit_exceeded", wait)


def _daily(calls, limit: int, what: str, now) -> QuotaRefusal | None:
    if not limit:
        return None
    midnight = datetime(now.year, now.month, now.day, tzinfo=dt_timezone.utc)
    used = calls.filter(created_at__gte=midnight).aggregate(
        total=Sum("prompt_tokens") + Sum("completion_tokens"))["total"] or 0
    if used < limit:
        return None
    wait = int((midnight + timedelta(days=1) - now).total_seconds()) + 1
    return QuotaRefusal(f"Daily quota of {limit} tokens for this {what} is used up ({used} tokens today); it resets "
                        "at 00:00 UTC.", "insufficient_quota", wait)


def quota_check(*, user, token, organization_id: int | None) -> QuotaRefusal | None:
    """Per token (a signed-in session counts as one token of its user) and per the caller's organization."""
    now = timezone.now()
    by_token = InferenceCall.objects.filter(token=token) if token is not None else \
        InferenceCall.objects.filter(user=user, token__isnull=True)
    checks = [(_window, by_token, settings.INFERENCE_RPM_PER_TOKEN, "token"),
              (_daily, by_token, settings.INFERENCE_TOKENS_PER_DAY_PER_TOKEN, "token")]
    if organization_id:
        by_org = InferenceCall.objects.filter(organization_id=organization_id)
        checks += [(_window, by_org, settings.INFERENCE_RPM_PER_ORGANIZATION, "organization"),
                   (_daily, by_org, settings.INFERENCE_TOKENS_PER_DAY_PER_ORGANIZATION, "organization")]
    for check, calls, limit, what in checks:
        refusal = check(calls, limit, what, now)
        if refusal:
            return refusal
    return None


def inference_call_start(*, user, token, organization_id, model, endpoint: str, stream: bool) -> InferenceCall:
    call = InferenceCall.objects.create(user=user, token=token, organization_id=organization_id, model=model,
                                        endpoint=endpoint, stream=stream)
    call.started = time.perf_counter()
    return call


def inference_call_finish(call: InferenceCall, *, status: int, usage: dict | None = None, error_code: str = "") -> None:
    usage = usage or {}
    InferenceCall.objects.filter(pk=call.pk).update(
        status=status, error_code=error_code[:64], prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        latency_ms=(time.perf_counter() - call.started) * 1000)
