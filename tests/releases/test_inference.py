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


def test_each_scope_counts_only_its_own_calls(calls, alice, carol, northwind, settings, django_assert_num_queries):
    from datetime import datetime, timezone as dt_timezone

    make, token = calls
    settings.INFERENCE_RPM_PER_TOKEN, settings.INFERENCE_TOKENS_PER_DAY_PER_TOKEN = 2, 100
    settings.INFERENCE_RPM_PER_ORGANIZATION, settings.INFERENCE_TOKENS_PER_DAY_PER_ORGANIZATION = 0, 0
    now = timezone.now()
    before_midnight = now - datetime(now.year, now.month, now.day, tzinfo=dt_timezone.utc) + timedelta(seconds=1)
    make(3, tok=None, tokens=500)  # carol signed in, without a token: her session's calls
    make(3, user=alice, tok=None, tokens=500)  # someone else's session
    make(1, tokens=5000, ago=before_midnight)  # this token, yesterday
    with django_assert_num_queries(1):  # one statement per scope, whatever the limits
        assert quota_check(user=carol, token=token, organization_id=northwind.pk) is None
    refusal = quota_check(user=carol, token=None, organization_id=None)
    assert refusal.code == "rate_limit_exceeded"  # her session made 3 calls this minute
    settings.INFERENCE_RPM_PER_TOKEN = 0
    refusal = quota_check(user=carol, token=None, organization_id=None)
    assert refusal.code == "insufficient_quota" and "(1500 tokens today)" in refusal.message
    make(1, tokens=100)
    assert quota_check(user=carol, token=token, organization_id=None).code == "insufficient_quota"


@pytest.fixture
def upstream():
    """An OpenAI-compatible backend answering every completion with one token (the engine itself is tested in
    tests/training and, behind the gateway, in tests/e2e/test_inference_clients.py)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [
                {"index": 0, "text": "x", "finish_reason": "length"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_a_gateway_call_costs_a_fixed_number_of_queries(register, aurora, alice, carol, northwind, token_for,
                                                        upstream, settings, django_assert_num_queries):
    from django.test import Client

    from releases.models import InferenceBackend

    settings.INFERENCE_RPM_PER_ORGANIZATION, settings.INFERENCE_TOKENS_PER_DAY_PER_ORGANIZATION = 1000, 10 ** 6
    model = register(aurora, "m", alice, tier="api").model
    InferenceBackend.objects.create(model=model, kind="upstream", url=upstream, upstream_model="m")
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token_for(carol, ('inference',))}")

    def call():
        response = client.post("/v1/completions", {"model": "aurora/m", "prompt": "x", "max_tokens": 1},
                               content_type="application/json")
        assert response.status_code == 200, response.content
        return response.json()

    call()  # the token's first use is recorded once
    # token, memberships, model (with organization, policy, backend and latest version in one), quota per token,
    # quota per organization, the call's row at the start and its completion: nothing loaded lazily.
    with django_assert_num_queries(7):
        assert call()["usage"]["completion_tokens"] == 1
    assert InferenceCall.objects.filter(organization=northwind, status=200, completion_tokens=1).count() == 2
