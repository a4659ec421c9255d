"""The inference gate as a table (pure policy), and quotas counted from metered calls."""
from datetime import timedelta

import pytest
from django.utils import timezone

from releases import policy
from releases.inference.metering import quota_check
from releases.models import InferenceCall

OUTSIDER = policy.CallerFacts(authenticated=True, scopes=frozenset({"inference"}))
GRANTED = policy.CallerFacts(authenticated=True, scopes=frozenset({"inference"}), grant="active")
MEMBER = policy.CallerFacts(authenticated=True, is_member=True, scopes=frozenset({"inference"}))
NO_SCOPE = policy.CallerFacts(authenticated=True, scopes=frozenset({"read"}))


@pytest.mark.parametrize("tier,audience,aup,caller,expected", [
    ("closed", "organization", False, OUTSIDER, (404, "model_not_found")),
    ("closed", "organization", False, GRANTED, (404, "model_not_found")),
    ("closed", "organization", False, MEMBER, (200, "")),
    ("api", "public", False, OUTSIDER, (200, "")),
    ("api", "public", False, NO_SCOPE, (403, "missing_scope")),
    ("api", "public", True, OUTSIDER, (403, "model_access_denied")),  # accept the acceptable-use policy first
    ("api", "public", True, GRANTED, (200, "")),
    ("api", "gated-manual", False, OUTSIDER, (403, "model_access_denied")),
    ("api", "gated-manual", False, GRANTED, (200, "")),
    ("open", "gated-auto", False, MEMBER, (200, "")),
    ("open", "organization", False, OUTSIDER, (403, "model_access_denied")),
    ("open", "public", False, OUTSIDER, (200, "")),
])
def test_inference_access_table(tier, audience, aup, caller, expected):
    decision = policy.inference_access(repo_id="acme/m", tier=tier, audience=audience, acceptable_use=aup,
                                       caller=caller, request_url="http://x/acme/m/access")
    assert (decision.status, decision.code) == expected
    assert decision.allowed == (expected[0] == 200) and (decision.allowed or decision.message)


@pytest.fixture
def calls(register, aurora, alice, carol, token_for):
    model = register(aurora, "m", alice, tier="api").model
    token_for(carol, ("inference",))
    token = carol.api_tokens.get()

    def make(n, *, user=carol, tok=token, org=None, tokens=0, ago=timedelta(0)):
        for _ in range(n):
            InferenceCall.objects.create(user=user, token=tok, organization=org, model=model, endpoint="completions",
                                         status=200, prompt_tokens=tokens, created_at=timezone.now() - ago)
    return make, token


def test_requests_per_minute_per_token_then_retry_after(calls, carol, settings):
    make, token = calls
    settings.INFERENCE_RPM_PER_TOKEN = 3
    make(2)
    make(5, ago=timedelta(minutes=2))  # outside the window
    assert quota_check(user=carol, token=token, organization_id=None) is None
    make(1, ago=timedelta(seconds=30))
    refusal = quota_check(user=carol, token=token, organization_id=None)
    assert refusal.code == "rate_limit_exceeded" and 25 <= refusal.retry_after <= 32


def test_daily_tokens_per_organization_is_insufficient_quota_until_midnight(calls, carol, northwind, settings):
    make, token = calls
    settings.INFERENCE_TOKENS_PER_DAY_PER_ORGANIZATION = 1000
    make(1, org=northwind, tokens=999)
    assert quota_check(user=carol, token=token, organization_id=northwind.pk) is None
    make(1, org=northwind, tokens=1)
    refusal = quota_check(user=carol, token=token, organization_id=northwind.pk)
    assert refusal.code == "insufficient_quota" and "resets at 00:00 UTC" in refusal.message
    assert 0 < refusal.retry_after <= 86401
    settings.INFERENCE_TOKENS_PER_DAY_PER_ORGANIZATION = 0  # 0: unlimited
    assert quota_check(user=carol, token=token, organization_id=northwind.pk) is None
