"""Metering and quotas of the inference API. Every call is recorded when it starts (so in-flight calls count
against requests per minute) and completed with its token counts, latency and status when it ends."""
import contextlib
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Min
from django.utils import timezone

from gatehouse.core.prepared import PreparedInsert, PreparedUpdate, counters_add
from releases.models import InferenceCall, InferenceUsage


@dataclass(frozen=True)
class QuotaRefusal:
    message: str
    code: str  # rate_limit_exceeded (retry soon) or insufficient_quota (wait for tomorrow)
    retry_after: int


# One statement per scope, written out: this runs on every call, and compiling the same check through the ORM
# (a count and a sum, per token and per organization) cost more than the gateway's whole remaining overhead. The
# count reads the index on (scope, created_at) over one minute; the day's tokens are one counter row.
_USAGE_SQL = (f"SELECT (SELECT COUNT(*) FROM {InferenceCall._meta.db_table} WHERE {{scope}} AND created_at > %s), "
              f"COALESCE((SELECT prompt_tokens + completion_tokens FROM {InferenceUsage._meta.db_table} "
              "WHERE scope = %s AND scope_id = %s AND day = %s), 0)")
_SCOPES = {"token": "token_id = %s", "session": "user_id = %s AND token_id IS NULL",
           "organization": "organization_id = %s"}


def _refusal(scope: str, key: int, rpm: int, tokens_per_day: int, what: str, now) -> QuotaRefusal | None:
    """Both quotas of one scope: requests in the last 60 s (in-flight calls included) and tokens since midnight."""
    minute_ago = now - timedelta(seconds=60)
    midnight = datetime(now.year, now.month, now.day, tzinfo=dt_timezone.utc)
    with connection.cursor() as cursor:
        cursor.execute(_USAGE_SQL.format(scope=_SCOPES[scope]),
                       [key, connection.ops.adapt_datetimefield_value(minute_ago), scope, key,
                        connection.ops.adapt_datefield_value(midnight.date())])
        recent, used = cursor.fetchone()
    if rpm and recent >= rpm:
        oldest = _calls(scope, key).filter(created_at__gt=minute_ago).aggregate(oldest=Min("created_at"))["oldest"]
        wait = max(1, int((oldest + timedelta(seconds=60) - now).total_seconds()) + 1)
        return QuotaRefusal(f"Rate limit of {rpm} requests per minute for this {what} reached; retry in {wait} s.",
                            "rate_limit_exceeded", wait)
    if tokens_per_day and used >= tokens_per_day:
        wait = int((midnight + timedelta(days=1) - now).total_seconds()) + 1
        return QuotaRefusal(f"Daily quota of {tokens_per_day} tokens for this {what} is used up ({used} tokens "
                            "today); it resets at 00:00 UTC.", "insufficient_quota", wait)
    return None


def _calls(scope: str, key: int):
    if scope == "token":
        return InferenceCall.objects.filter(token_id=key)
    if scope == "session":
        return InferenceCall.objects.filter(user_id=key, token__isnull=True)
    return InferenceCall.objects.filter(organization_id=key)


def quota_organization(model, organization_ids: list[int]) -> int | None:
    """The organization whose quota a call counts against. A member calling their organization's own model works for
    it; otherwise the lowest id, so that each caller's calls always land on the same organization: memberships come
    from the database in no set order, and an arbitrary pick could spread one person's calls over several
    organizations' quotas (each of them then seeing only part of the use)."""
    if model.organization_id in organization_ids:
        return model.organization_id
    return min(organization_ids, default=None)


def _scope_keys(*, user_id: int, token_id: int | None, organization_id: int | None) -> list[tuple[str, int]]:
    """The scopes a call counts against, as (scope, key): its token (a signed-in session counts as one token of its
    user), then the caller's organization. Every caller locks them in this order."""
    keys = [("token", token_id) if token_id is not None else ("session", user_id)]
    if organization_id:
        keys.append(("organization", organization_id))
    return keys


def _quota_scopes(*, user, token, organization_id: int | None) -> list[tuple[str, int, int, int, str]]:
    """The scopes this call is held to, those with a limit set, as (scope, key, requests per minute, tokens per day,
    what the message calls it)."""
    own, *organization = _scope_keys(user_id=user.pk, token_id=token.pk if token is not None else None,
                                     organization_id=organization_id)
    scopes = [(*own, settings.INFERENCE_RPM_PER_TOKEN, settings.INFERENCE_TOKENS_PER_DAY_PER_TOKEN, "token")]
    scopes += [(*key, settings.INFERENCE_RPM_PER_ORGANIZATION, settings.INFERENCE_TOKENS_PER_DAY_PER_ORGANIZATION,
                "organization") for key in organization]
    return [scope for scope in scopes if scope[2] or scope[3]]


def quota_check(*, user, token, organization_id: int | None) -> QuotaRefusal | None:
    """Per token and per the caller's organization: the first scope over a limit."""
    now = timezone.now()
    for scope in _quota_scopes(user=user, token=token, organization_id=organization_id):
        refusal = _refusal(*scope, now)
        if refusal is not None:
            return refusal
    return None


# PostgreSQL advisory locks, one per quota scope: (class, object id), the class naming the kind of scope.
_LOCK_CLASSES = {"token": 0x47485101, "session": 0x47485102, "organization": 0x47485103}


def inference_call_admit(*, user, token, organization_id, model, endpoint: str,
                         stream: bool) -> InferenceCall | QuotaRefusal:
    """Hold the call to its quotas and record it, as one step per scope: checked apart, a burst of concurrent calls
    all passed a check that none of them was yet counted in, and a limit of 60 a minute let through as many calls
    as arrived together. Calls of one token (or organization) queue here for the check and the insert only."""
    scopes = _quota_scopes(user=user, token=token, organization_id=organization_id)
    # No limit set: nothing to hold, no transaction. On SQLite, IMMEDIATE: the write lock is taken first, so
    # callers queue anyway.
    with transaction.atomic() if scopes else contextlib.nullcontext():
        if scopes and connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT " + ", ".join(["pg_advisory_xact_lock(%s, %s)"] * len(scopes)),
                               [n for kind, key, *_ in scopes for n in (_LOCK_CLASSES[kind], key % 2 ** 31)])
        refusal = quota_check(user=user, token=token, organization_id=organization_id)
        if refusal is not None:
            return refusal
        return inference_call_start(user=user, token=token, organization_id=organization_id, model=model,
                                    endpoint=endpoint, stream=stream)


# Each call writes twice; statements built once, as save() and update() compile them again every time.
_insert_call = PreparedInsert(InferenceCall)
# Only a call still in flight (status 0) is finished: the first outcome stands, and its tokens are counted once.
_finish_call = PreparedUpdate(InferenceCall, "status", "error_code", "prompt_tokens", "completion_tokens", "latency_ms",
                              where={"status": 0})


def inference_call_start(*, user, token, organization_id, model, endpoint: str, stream: bool) -> InferenceCall:
    call = _insert_call(InferenceCall(user=user, token=token, organization_id=organization_id, model=model,
                                      endpoint=endpoint, stream=stream))
    call.started = time.perf_counter()
    return call


def _tokens(usage, name: str) -> int:
    """A count from the backend's usage: what a backend sends is not trusted to be a count at all."""
    value = usage.get(name) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def inference_call_finish(call: InferenceCall, *, status: int, usage: dict | None = None, error_code: str = "",
                          latency_ms: float | None = None) -> None:
    """The call's outcome, and the call and its tokens added to the day's counters of its scopes, in one transaction.
    Once: a call finished already is left as it is (its row, by any path, even another process), so it counts once.
    The latency is measured from the call's start in this process, unless given."""
    if call.status:
        return
    prompt, completion = _tokens(usage, "prompt_tokens"), _tokens(usage, "completion_tokens")
    if latency_ms is None:
        latency_ms = (time.perf_counter() - call.started) * 1000
    with transaction.atomic():
        if _finish_call(call.pk, status=status, error_code=error_code[:64], prompt_tokens=prompt,
                        completion_tokens=completion, latency_ms=latency_ms):
            _add_usage(call, prompt, completion)
    call.status = status  # finished: the gateway's last-resort handler leaves it alone


def inference_calls_finish_abandoned(*, limit: int = 1000) -> int:
    """Calls still in flight long after they started (GATEHOUSE_INFERENCE_ABANDONED_SECONDS): the process serving
    them died in the middle, or metering an answer after sending it failed. Finished as 504 `abandoned`, with the
    tokens nobody recorded left at 0, so they leave the calls in flight and are counted as calls. Returns how many;
    a sweep that races another, or a late finish, finishes each call once."""
    now = timezone.now()
    cutoff = now - timedelta(seconds=settings.INFERENCE_ABANDONED_SECONDS)
    stale = list(InferenceCall.objects.filter(status=0, created_at__lt=cutoff).order_by("created_at")[:limit])
    for call in stale:
        inference_call_finish(call, status=504, error_code="abandoned",
                              latency_ms=(now - call.created_at).total_seconds() * 1000)
    return len(stale)


def _add_usage(call: InferenceCall, prompt: int, completion: int) -> None:
    """The call on its scopes' rows for its day, every scope it counts against, limited now or not: a limit set at
    noon holds the morning's calls too."""
    day = call.created_at.astimezone(dt_timezone.utc).date()
    counters_add(InferenceUsage, keys=("scope", "scope_id", "day"),
                 counts=("calls", "prompt_tokens", "completion_tokens"),
                 rows=[(scope, key, day, 1, prompt, completion)
                       for scope, key in _scope_keys(user_id=call.user_id, token_id=call.token_id,
                                                     organization_id=call.organization_id)])
