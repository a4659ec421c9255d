"""The inference gate as a table (pure policy), and quotas counted from metered calls."""
from datetime import timedelta

import json
import threading
import time
from types import SimpleNamespace
from unittest import mock

import pytest
from django.core.signals import request_finished
from django.db import connection
from django.db.models import Sum
from django.test import AsyncRequestFactory, Client, RequestFactory
from django.utils import timezone

from gatehouse.accounts.models import Membership, Organization
from releases import policy
from releases.inference import metering
from releases.inference import views as gateway
from releases.inference.metering import quota_check
from gatehouse.registry.models import Model
from releases.models import AccessPolicy, InferenceBackend, InferenceCall, InferenceUsage
from tests.releases.upstream import chat_chunk

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
        for _ in range(n):  # started when the test says, finished by the gateway's own service, which counts them
            call = InferenceCall.objects.create(user=user, token=tok, organization=org, model=model,
                                                endpoint="completions", created_at=timezone.now() - ago)
            call.started = time.perf_counter()
            metering.inference_call_finish(call, status=200, usage={"prompt_tokens": tokens})
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


def test_a_gateway_call_costs_a_fixed_number_of_queries(register, aurora, alice, carol, northwind, token_for,
                                                        upstream, settings, django_assert_num_queries):
    settings.INFERENCE_RPM_PER_ORGANIZATION, settings.INFERENCE_TOKENS_PER_DAY_PER_ORGANIZATION = 1000, 10 ** 6
    model = register(aurora, "m", alice, tier="api").model
    InferenceBackend.objects.create(model=model, kind="upstream", url=upstream.url, upstream_model="m")
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token_for(carol, ('inference',))}")

    def call():
        response = client.post("/v1/completions", {"model": "aurora/m", "prompt": "x", "max_tokens": 1},
                               content_type="application/json")
        assert response.status_code == 200, response.content
        return response.json()

    call()  # the token's first use is recorded once
    # token, memberships, model (with organization, policy, backend and latest version in one), quota per token,
    # quota per organization, the call's row at the start and its completion, its tokens added to both scopes' day
    # (one upsert): nothing loaded lazily. The quota check and the start are one transaction (a savepoint inside the
    # test's; BEGIN and COMMIT when serving), under one statement taking both scopes' locks on PostgreSQL; the
    # completion and the upsert another.
    locks = 1 if connection.vendor == "postgresql" else 0
    with django_assert_num_queries(8 + 2 + 2 + locks):
        assert call()["usage"]["completion_tokens"] == 1
    assert InferenceCall.objects.filter(organization=northwind, status=200, completion_tokens=1).count() == 2


@pytest.mark.django_db(transaction=True)
def test_concurrent_calls_of_one_token_never_pass_its_per_minute_limit(register, aurora, alice, carol, token_for,
                                                                      settings, monkeypatch):
    if connection.vendor != "postgresql":
        pytest.skip("concurrent connections are exercised on PostgreSQL (SQLite's writers queue on its one lock)")
    settings.INFERENCE_RPM_PER_TOKEN = 3
    model = register(aurora, "m", alice, tier="api").model
    token_for(carol, ("inference",))
    token = carol.api_tokens.get()
    check = metering.quota_check

    def slow_check(**kwargs):  # the window between a call's check and the insert that counts it, widened
        refusal = check(**kwargs)
        time.sleep(0.2)
        return refusal
    monkeypatch.setattr(metering, "quota_check", slow_check)
    outcomes, barrier = [], threading.Barrier(6)

    def call():
        barrier.wait()
        try:
            outcomes.append(metering.inference_call_admit(user=carol, token=token, organization_id=None, model=model,
                                                          endpoint="completions", stream=False))
        finally:
            connection.close()
    threads = [threading.Thread(target=call) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    admitted = [o for o in outcomes if isinstance(o, InferenceCall)]
    refused = [o for o in outcomes if isinstance(o, metering.QuotaRefusal)]
    assert len(admitted) == 3 and len(refused) == 3
    assert all(r.code == "rate_limit_exceeded" and r.retry_after > 0 for r in refused)
    assert InferenceCall.objects.filter(token=token).count() == 3


def _usage() -> dict:
    """Tokens by (scope, id, day)."""
    return {(u.scope, u.scope_id, u.day): u.prompt_tokens + u.completion_tokens for u in InferenceUsage.objects.all()}


def test_each_finished_call_adds_its_tokens_to_its_scopes_day_once(calls, carol, northwind):
    make, token = calls
    today = timezone.now().date()
    yesterday = today - timedelta(days=1)
    make(2, org=northwind, tokens=7)
    make(1, tok=None, tokens=5)  # her session, no organization
    make(1, tokens=0)  # a failed call: a call, no tokens
    make(1, tokens=11, ago=timedelta(days=1))  # started yesterday: counts on yesterday
    assert _usage() == {("token", token.pk, today): 14, ("organization", northwind.pk, today): 14,
                        ("session", carol.pk, today): 5, ("token", token.pk, yesterday): 11}
    assert dict(InferenceUsage.objects.values_list("scope", "calls").filter(day=today)) == {
        "token": 3, "organization": 2, "session": 1}
    metrics = Client().get("/metrics").content.decode()  # every call once: its token's row or its session's
    assert "gatehouse_inference_calls 5.0" in metrics and 'gatehouse_tokens_served{kind="prompt"} 30.0' in metrics
    call = InferenceCall.objects.filter(prompt_tokens=7).first()
    call.status = 0  # another instance of a finished row, as a second process (or a lost COMMIT reply) would hold
    call.started = time.perf_counter()
    metering.inference_call_finish(call, status=500, usage={"prompt_tokens": 1000})  # a second finish: a no-op
    assert _usage()[("token", token.pk, today)] == 14
    row = InferenceCall.objects.get(pk=call.pk)
    assert (row.status, row.prompt_tokens) == (200, 7)  # the row keeps its first outcome


def test_calls_abandoned_in_flight_are_finished_once_and_counted_without_tokens(calls, carol, northwind, settings,
                                                                               django_assert_max_num_queries):
    make, token = calls
    make(1, org=northwind, tokens=7)  # finished: left alone
    model = InferenceCall.objects.get().model

    def in_flight(ago):
        return InferenceCall.objects.create(user=carol, token=token, organization=northwind, model=model,
                                            endpoint="chat/completions", created_at=timezone.now() - ago)
    abandoned, streaming = in_flight(timedelta(hours=2)), in_flight(timedelta(minutes=20))  # a long stream, live
    with django_assert_max_num_queries(1 + 4):  # the in-flight rows by their index; a finish of each
        assert metering.inference_calls_finish_abandoned() == 1
    rows = dict(InferenceCall.objects.values_list("pk", "status"))
    assert (rows[abandoned.pk], rows[streaming.pk]) == (504, 0) and sorted(rows.values()) == [0, 200, 504]
    row = InferenceCall.objects.get(pk=abandoned.pk)
    assert row.error_code == "abandoned" and row.latency_ms >= 2 * 3600 * 1000 and row.prompt_tokens == 0
    assert _calls_by_scope() == {"token": 2, "organization": 2}
    assert sum(_usage().values()) == 14  # no tokens made up: the finished call's 7, on its token and organization
    assert metering.inference_calls_finish_abandoned() == 0  # once
    settings.INFERENCE_ABANDONED_SECONDS = 600
    assert metering.inference_calls_finish_abandoned() == 1 and not InferenceCall.objects.filter(status=0).exists()
    assert _calls_by_scope() == {"token": 3, "organization": 3}


def _calls_by_scope() -> dict:
    """Calls per scope, whatever their day (a call abandoned before midnight counts on its own day)."""
    return dict(InferenceUsage.objects.order_by().values("scope").annotate(n=Sum("calls")).values_list("scope", "n"))


def test_a_finish_that_fails_adds_nothing(calls, carol, monkeypatch):
    make, token = calls
    make(1, tokens=3)
    call = InferenceCall.objects.create(user=carol, token=token, model=InferenceCall.objects.first().model,
                                        endpoint="completions")
    call.started = time.perf_counter()
    monkeypatch.setattr(metering, "_add_usage", mock.Mock(side_effect=RuntimeError("the database went away")))
    with pytest.raises(RuntimeError):
        metering.inference_call_finish(call, status=200, usage={"prompt_tokens": 50})
    assert InferenceCall.objects.get(pk=call.pk).status == 0  # the row and the counter move together, or neither
    assert _usage() == {("token", token.pk, timezone.now().date()): 3}


def test_the_migration_counts_the_calls_made_before_it(calls, carol, northwind):
    import importlib

    from django.apps import apps

    make, token = calls
    make(2, org=northwind, tokens=4)
    make(1, tok=None, tokens=6, ago=timedelta(days=3))
    expected = _usage()
    InferenceUsage.objects.all().delete()
    importlib.import_module("releases.migrations.0006_inference_usage").usage_from_calls(apps, None)
    assert _usage() == expected and len(expected) == 3


@pytest.mark.django_db(transaction=True)
def test_concurrent_finishes_of_one_scope_add_up_exactly(register, aurora, alice, carol, northwind, token_for):
    if connection.vendor != "postgresql":
        pytest.skip("concurrent connections are exercised on PostgreSQL (SQLite's writers queue on its one lock)")
    model = register(aurora, "m", alice, tier="api").model
    token_for(carol, ("inference",))
    token = carol.api_tokens.get()
    calls = [InferenceCall.objects.create(user=carol, token=token, organization=northwind, model=model,
                                          endpoint="completions") for _ in range(24)]
    barrier = threading.Barrier(8)

    def finish(mine):
        barrier.wait()
        try:
            for call in mine:
                call.started = time.perf_counter()
                metering.inference_call_finish(call, status=200, usage={"prompt_tokens": 3, "completion_tokens": 2})
        finally:
            connection.close()
    threads = [threading.Thread(target=finish, args=(calls[i::8],)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    today = timezone.now().date()
    assert _usage() == {("token", token.pk, today): 120, ("organization", northwind.pk, today): 120}


@pytest.fixture
def served(register, aurora, alice, carol, token_for, upstream):
    """aurora/m (API-only, public) served by the upstream stand-in, and carol's inference client."""
    model = register(aurora, "m", alice, tier="api").model
    backend = InferenceBackend.objects.create(model=model, kind="upstream", url=upstream.url, upstream_model="m")
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token_for(carol, ('inference',))}")
    return SimpleNamespace(model=model, backend=backend, client=client, upstream=upstream)


def _chat(served, **extra):
    return served.client.post("/v1/chat/completions", {"model": "aurora/m", "messages": [
        {"role": "user", "content": "hi"}], "max_tokens": 8, **extra}, content_type="application/json")


def _error(response) -> dict:
    assert response["Content-Type"] == "application/json", response.content[:200]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _client_leaves(response) -> None:
    """What the server does when the client has gone: close the response, without the request_finished that would
    close the test's own database connection (on PostgreSQL) in the middle of its transaction."""
    with mock.patch.object(request_finished, "send"):
        response.close()


def _events(chunks) -> list:
    """The `data:` payloads of a relayed stream, JSON decoded (but "[DONE]")."""
    lines = b"".join(chunks).decode().split("\n\n")
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line]


def test_a_whole_answer_is_metered_once_the_server_has_sent_it(served):
    """The caller does not wait for the metering transaction: the call is finished when the server closes the
    response it sent (gunicorn does in a finally, whatever happened to the client)."""
    request = RequestFactory().post("/v1/completions", {"model": "aurora/m", "prompt": "x", "max_tokens": 1},
                                    content_type="application/json",
                                    HTTP_AUTHORIZATION=served.client.defaults["HTTP_AUTHORIZATION"])
    response = gateway.completions(request)
    assert response.status_code == 200 and json.loads(response.content)["usage"]["completion_tokens"] == 1
    call = InferenceCall.objects.get()
    assert call.status == 0 and not InferenceUsage.objects.exists()  # in flight while the answer is on its way
    _client_leaves(response)
    call.refresh_from_db()
    assert (call.status, call.prompt_tokens, call.completion_tokens) == (200, 3, 1)
    assert InferenceUsage.objects.get(scope="token").completion_tokens == 1
    # Django's ASGI handler does not close a response whose client has gone: there the call is metered before.
    request = AsyncRequestFactory().post("/v1/completions", {"model": "aurora/m", "prompt": "x", "max_tokens": 1},
                                         content_type="application/json",
                                         headers={"Authorization": served.client.defaults["HTTP_AUTHORIZATION"]})
    assert gateway.completions(request).status_code == 200
    assert InferenceCall.objects.latest("id").status == 200


def test_every_v1_failure_is_openai_error_json(served):
    for method, path in [("get", "/v1/nope"), ("post", "/v1/engines/m/completions"), ("get", "/v1/models/")]:
        response = getattr(served.client, method)(path)
        assert response.status_code == 404 and _error(response)["code"] == "unknown_url"
    for method, path, allowed in [("get", "/v1/chat/completions", "POST"), ("delete", "/v1/models", "GET"),
                                  ("put", "/v1/models/aurora/m", "GET")]:
        response = getattr(served.client, method)(path)
        assert response.status_code == 405 and response["Allow"] == allowed
        assert _error(response)["code"] == "method_not_allowed"
    assert not served.upstream.requests and not InferenceCall.objects.exists()


def test_a_long_model_id_is_not_echoed_whole(served):
    response = _chat(served, model="a/" + "b" * 100_000)
    error = _error(response)
    assert response.status_code == 404 and error["code"] == "model_not_found" and len(error["message"]) < 400
    assert not served.upstream.requests and not InferenceCall.objects.exists()


def test_top_logprobs_without_logprobs_is_refused(served):
    for extra in ({"top_logprobs": 3}, {"top_logprobs": 3, "logprobs": False}):
        response = _chat(served, **extra)
        error = _error(response)
        assert response.status_code == 400 and error["param"] == "top_logprobs" and "logprobs: true" in error["message"]
    assert _chat(served, top_logprobs=3, logprobs=True).status_code == 200
    assert len(served.upstream.requests) == 1 and InferenceCall.objects.count() == 1


def test_a_model_id_with_a_nul_names_no_model(served):
    response = _chat(served, model="aurora/m\x00")  # PostgreSQL refuses a NUL in a query: this was a 500 there
    assert response.status_code == 404 and _error(response)["code"] == "model_not_found"
    assert not served.upstream.requests and not InferenceCall.objects.exists()


def test_an_unpaired_surrogate_names_no_model_and_is_no_prompt(served):
    # Valid JSON ("\\ud800"), not text: a database query and the forward to the backend both raised on it (500s).
    def post(body):
        return served.client.post("/v1/chat/completions", body, content_type="application/json")
    unknown = post('{"model": "aurora/m\\ud800", "messages": [{"role": "user", "content": "hi"}]}')
    assert unknown.status_code == 404 and _error(unknown)["code"] == "model_not_found"
    refused = post('{"model": "aurora/m", "messages": [{"role": "user", "content": "a\\ud800b"}]}')
    assert refused.status_code == 400 and _error(refused)["param"] == "messages"
    assert "unpaired surrogate" in _error(refused)["message"]
    assert not served.upstream.requests and not InferenceCall.objects.exists()


def test_an_unexpected_error_is_a_json_500_and_finishes_the_call(served, monkeypatch):
    from releases.inference import views

    def bug(*args, **kwargs):  # stands for any bug past the call's start
        raise RuntimeError("a bug")

    monkeypatch.setattr(views, "_forward", bug)
    response = Client(raise_request_exception=False, **served.client.defaults).post(
        "/v1/completions", {"model": "aurora/m", "prompt": "x"}, content_type="application/json")
    assert response.status_code == 500 and _error(response) == {
        "message": "The gateway failed unexpectedly; the error has been logged.", "type": "server_error",
        "param": None, "code": "internal_error"}
    assert list(InferenceCall.objects.values_list("status", "error_code")) == [(500, "internal_error")]


@pytest.mark.parametrize("body", [b"[1, 2]", b"not json", b'{"object": "chat.completion"}'])
def test_an_upstream_answer_that_is_not_a_completion_is_a_502(served, body):
    served.upstream.body = body
    response = _chat(served)
    assert response.status_code == 502 and _error(response)["code"] == "engine_bad_answer"
    assert list(InferenceCall.objects.values_list("status", "error_code")) == [(502, "engine_bad_answer")]


def test_an_upstream_cut_off_in_the_middle_of_its_body_is_a_502(served):
    served.upstream.cut = True
    response = _chat(served)
    assert response.status_code == 502 and _error(response)["code"] == "engine_bad_answer"
    served.upstream.events = [chat_chunk("a"), chat_chunk("b")]  # then the connection breaks, mid-stream
    events = _events(_chat(served, stream=True).streaming_content)
    assert [e["choices"][0]["delta"]["content"] for e in events[:2]] == ["a", "b"]
    assert events[2]["error"]["code"] == "engine_disconnected" and len(events) == 3
    assert list(InferenceCall.objects.order_by("id").values_list("status", "error_code", "completion_tokens")) == [
        (502, "engine_bad_answer", 0), (502, "engine_disconnected", 2)]


@pytest.mark.parametrize("status,payload,what", [
    (401, {"error": {"message": "Invalid API key", "type": "invalid_request_error", "code": "invalid_api_key"}},
     "its api_key"),
    (403, {"error": {"message": "Forbidden"}}, "its api_key"),
    (404, {"object": "error", "message": "The model `m` does not exist.", "type": "NotFoundError", "param": None,
           "code": 404}, "its upstream_model or URL"),  # vLLM's own shape
])
def test_an_upstream_refusing_the_gateway_is_a_misconfigured_backend_not_the_callers_error(served, status,
                                                                                            payload, what):
    served.upstream.status, served.upstream.body = status, json.dumps(payload).encode()
    response = _chat(served)
    error = _error(response)
    assert response.status_code == 502 and (error["type"], error["code"]) == ("upstream_error", "backend_misconfigured")
    assert "misconfigured" in error["message"] and what in error["message"]
    assert "Invalid API key" not in error["message"] and "does not exist" not in error["message"]  # not the caller's
    assert list(InferenceCall.objects.values_list("status", "error_code")) == [(502, f"upstream_{status}")]


def test_client_errors_and_rate_limits_of_an_upstream_are_passed_through(served):
    served.upstream.status = 400
    served.upstream.body = json.dumps({"object": "error", "message": "best_of must be 1 with beam search off",
                                       "type": "BadRequestError", "param": "best_of", "code": 400}).encode()
    response = _chat(served, best_of=2)
    assert response.status_code == 400 and _error(response) == {
        "message": "best_of must be 1 with beam search off", "type": "invalid_request_error", "param": "best_of",
        "code": "engine_error"}
    served.upstream.status, served.upstream.headers = 429, {"Retry-After": "7"}
    served.upstream.body = json.dumps({"error": {"message": "Slow down", "code": "rate_limit_exceeded"}}).encode()
    response = _chat(served)
    assert response.status_code == 429 and response["Retry-After"] == "7"
    assert _error(response)["code"] == "rate_limit_exceeded"
    assert list(InferenceCall.objects.order_by("id").values_list("status", flat=True)) == [400, 429]


def test_a_busy_engine_is_passed_on_as_503_with_its_retry_after(served):
    served.upstream.status, served.upstream.headers = 503, {"Retry-After": "1"}
    served.upstream.body = json.dumps({"error": {"message": "The engine is at capacity; retry shortly.",
                                                 "type": "server_error", "code": "engine_overloaded"}}).encode()
    response = _chat(served)
    assert response.status_code == 503 and response["Retry-After"] == "1"
    assert _error(response)["code"] == "engine_overloaded"
    assert list(InferenceCall.objects.values_list("status", "error_code")) == [(503, "engine_overloaded")]


def test_a_client_gone_before_the_first_event_is_metered_and_the_engine_stream_closed(served):
    served.upstream.events = [chat_chunk(""), *[chat_chunk("a")] * 20, "[DONE]"]
    served.upstream.gap = 0.05  # still sending when the client leaves
    response = _chat(served, stream=True)
    assert list(InferenceCall.objects.values_list("status", flat=True)) == [0]  # in flight
    _client_leaves(response)  # the relay never ran
    assert list(InferenceCall.objects.values_list("status", "error_code")) == [(499, "client_disconnected")]
    assert served.upstream.hung_up.wait(5)  # the engine's write failed: it stops generating


def test_a_stream_cut_short_is_an_error_not_a_normal_end(served):
    served.upstream.events = [chat_chunk(""), chat_chunk("a"), chat_chunk("b")]  # no finish, no usage, no [DONE]
    events = _events(_chat(served, stream=True).streaming_content)
    assert events[-1]["error"]["code"] == "engine_incomplete" and "[DONE]" not in events
    assert list(InferenceCall.objects.values_list("status", "error_code", "completion_tokens")) == [
        (502, "engine_incomplete", 2)]


def test_a_complete_stream_is_relayed_and_metered_from_its_usage(served):
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    served.upstream.events = [chat_chunk(""), chat_chunk("a"), chat_chunk("b"), chat_chunk(finish="stop"),
                              chat_chunk(usage=usage), "[DONE]"]
    events = _events(_chat(served, stream=True).streaming_content)
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])  # the client did not ask for it
    assert served.upstream.requests[0]["stream_options"] == {"include_usage": True}
    assert list(InferenceCall.objects.values_list("status", "prompt_tokens", "completion_tokens")) == [(200, 5, 3)]


def test_a_client_that_leaves_before_the_usage_chunk_is_metered_for_what_was_relayed(served):
    served.upstream.events = [chat_chunk(""), chat_chunk("a"), chat_chunk("b"), *[chat_chunk("c")] * 10,
                              chat_chunk(finish="stop"), chat_chunk(usage={"completion_tokens": 12}), "[DONE]"]
    served.upstream.gap = 0.05  # one event a read: events that come together are relayed in one write
    response = _chat(served, stream=True)
    relayed = iter(response.streaming_content)
    assert [next(relayed) for _ in range(3)]  # the role chunk, "a", "b": then the client goes away
    _client_leaves(response)
    assert list(InferenceCall.objects.values_list("status", "error_code", "completion_tokens")) == [
        (499, "client_disconnected", 2)]
    assert served.upstream.hung_up.wait(5)


def test_events_that_come_in_one_read_are_relayed_in_one_write(served):
    """A backend ahead of the gateway (a loaded one) costs a send per read, not one per token."""
    together = [chat_chunk("a"), chat_chunk("b"), chat_chunk(finish="stop"), "[DONE]"]
    served.upstream.events = ["\n\ndata: ".join(together)]  # the stand-in sends them in one write
    writes = list(_chat(served, stream=True).streaming_content)
    assert len(writes) == 1
    events = _events(writes)
    assert [e["choices"][0]["delta"].get("content") for e in events[:2]] == ["a", "b"] and events[-1] == "[DONE]"
    assert InferenceCall.objects.get().completion_tokens == 2


@pytest.mark.parametrize("backend", [{"kind": "local"},  # our engine, at the stand-in's address
                                     {"kind": "upstream", "usage_in_every_chunk": True}])  # vLLM, marked so
def test_usage_in_every_chunk_is_asked_for_so_a_client_leaving_early_pays_for_its_prompt(served, backend):
    InferenceBackend.objects.filter(pk=served.backend.pk).update(**backend)
    usage = lambda n: {"prompt_tokens": 40, "completion_tokens": n, "total_tokens": 40 + n}  # noqa: E731
    events = [chat_chunk("a"), chat_chunk("b"), chat_chunk("c"), chat_chunk(finish="stop")]
    served.upstream.events = [e[:-1] + f', "usage": {json.dumps(usage(n))}}}' for n, e in enumerate(events, 1)] + [
        chat_chunk(usage=usage(3)), "[DONE]"]
    served.upstream.gap = 0.05  # one event a read: events that come together are relayed in one write
    response = _chat(served, stream=True)
    relayed = iter(response.streaming_content)
    first_two = _events([next(relayed), next(relayed)])
    _client_leaves(response)
    assert served.upstream.requests[0]["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert all("usage" not in e for e in first_two)  # asked for metering, not by this client
    assert list(InferenceCall.objects.values_list("status", "prompt_tokens", "completion_tokens")) == [(499, 40, 2)]
    # A client that asks for every chunk's usage gets it.
    events = _events(_chat(served, stream=True, stream_options={"include_usage": True,
                                                                "continuous_usage_stats": True}).streaming_content)
    assert [e["usage"]["completion_tokens"] for e in events[:-1]] == [1, 2, 3, 4, 3]


def test_the_organization_charged_is_the_models_own_for_its_members_else_the_lowest_id(served, register, alice,
                                                                                     carol, settings):
    settings.INFERENCE_RPM_PER_ORGANIZATION = 1000
    low, high, zeta = (Organization.objects.create(slug=slug, name=slug) for slug in ("low", "high", "zeta"))
    Membership.objects.create(user=alice, organization=zeta, role=Membership.Role.ADMIN)
    model = register(zeta, "z", alice, tier="api").model
    InferenceBackend.objects.create(model=model, kind="upstream", url=served.upstream.url, upstream_model="z")
    for org in (high, low):  # joined the lowest id last
        Membership.objects.create(user=carol, organization=org, role=Membership.Role.MEMBER)
    assert _chat(served).status_code == 200  # not a member of aurora: her lowest id
    Membership.objects.create(user=carol, organization=zeta, role=Membership.Role.MEMBER)
    response = served.client.post("/v1/completions", {"model": "zeta/z", "prompt": "x"},
                                  content_type="application/json")
    assert response.status_code == 200  # a member of zeta: zeta's own model counts against zeta, not her lowest id
    assert list(InferenceCall.objects.order_by("id").values_list("organization__slug", flat=True)) == ["low", "zeta"]


WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("param,value", [
    ("tools", [WEATHER_TOOL]), ("tool_choice", "required"), ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
    ("functions", [WEATHER_TOOL["function"]]), ("modalities", ["text", "audio"]),
])
def test_a_local_engine_refuses_tools_and_formats_it_would_ignore(served, param, value):
    InferenceBackend.objects.filter(pk=served.backend.pk).update(kind="local")
    response = _chat(served, **{param: value})
    error = _error(response)
    assert response.status_code == 400 and (error["param"], error["code"]) == (param, "unsupported_parameter")
    assert "not supported by this model's engine" in error["message"]
    assert not served.upstream.requests and not InferenceCall.objects.exists()  # never reached the engine


@pytest.mark.parametrize("message", [
    {"role": "tool", "tool_call_id": "1", "content": "sunny"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                           "function": {"name": "weather", "arguments": "{}"}}]},
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.org/a.png"}}]},
])
def test_a_local_engine_refuses_tool_turns_and_non_text_parts_before_the_call_counts(served, message):
    InferenceBackend.objects.filter(pk=served.backend.pk).update(kind="local")
    response = served.client.post("/v1/chat/completions", {"model": "aurora/m", "messages": [
        {"role": "user", "content": "hi"}, message]}, content_type="application/json")
    error = _error(response)
    assert response.status_code == 400 and (error["param"], error["code"]) == ("messages", "unsupported_parameter")
    assert "messages[1]" in error["message"]
    assert not served.upstream.requests and not InferenceCall.objects.exists()
    # Text parts and the developer role the engine takes (it joins the parts, and reads developer as system).
    text = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    response = served.client.post("/v1/chat/completions", {"model": "aurora/m", "messages": text},
                                  content_type="application/json")
    assert response.status_code == 200 and served.upstream.requests[0]["messages"] == text


def test_asking_for_plain_text_reaches_a_local_engine_and_tools_reach_an_upstream(served):
    InferenceBackend.objects.filter(pk=served.backend.pk).update(kind="local")
    plain = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "modalities": ["text"]}
    assert _chat(served, **plain).status_code == 200
    InferenceBackend.objects.filter(pk=served.backend.pk).update(kind="upstream")  # vLLM parses tool calls
    assert _chat(served, tools=[WEATHER_TOOL], tool_choice="required").status_code == 200
    assert [r.get("tools") for r in served.upstream.requests] == [[], [WEATHER_TOOL]]


@pytest.mark.parametrize("param,value", [("best_of", 3), ("suffix", "}")])
def test_a_local_engine_refuses_completion_parameters_it_would_ignore(served, param, value):
    InferenceBackend.objects.filter(pk=served.backend.pk).update(kind="local")
    response = served.client.post("/v1/completions", {"model": "aurora/m", "prompt": "x", param: value},
                                  content_type="application/json")
    error = _error(response)
    assert response.status_code == 400 and (error["param"], error["code"]) == (param, "unsupported_parameter")
    assert "not supported by this model's engine" in error["message"]
    assert not served.upstream.requests and not InferenceCall.objects.exists()


def test_max_tokens_0_is_only_for_scoring_a_prompt(served):
    InferenceBackend.objects.filter(pk=served.backend.pk).update(kind="local")

    def complete(**body):
        return served.client.post("/v1/completions", {"model": "aurora/m", "prompt": "x", **body},
                                  content_type="application/json")
    assert complete(max_tokens=0, echo=True, logprobs=1).status_code == 200  # the engine scores it
    for body in ({"max_tokens": 0}, {"max_tokens": 0, "echo": True}, {"max_tokens": 0, "logprobs": 1}):
        response = complete(**body)
        assert response.status_code == 400 and _error(response)["param"] == "max_tokens", body
    assert len(served.upstream.requests) == 1 and InferenceCall.objects.count() == 1


def test_defaults_reach_a_local_engine_and_everything_reaches_an_upstream(served):
    defaults = {"logprobs": False, "top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0.0,
                "logit_bias": {}, "n": 1}
    InferenceBackend.objects.filter(pk=served.backend.pk).update(kind="local")
    assert _chat(served, **defaults).status_code == 200
    implemented = {"logprobs": True, "top_logprobs": 2, "presence_penalty": 0.5, "frequency_penalty": -1,
                   "logit_bias": {"50256": -100}, "n": 2}  # our engine does these
    assert _chat(served, **implemented).status_code == 200
    InferenceBackend.objects.filter(pk=served.backend.pk).update(kind="upstream")  # vLLM does them all
    asked = {"logprobs": True, "top_logprobs": 2, "presence_penalty": 0.5, "logit_bias": {"50256": -100}, "n": 2}
    assert _chat(served, **asked).status_code == 200
    assert [{k: r[k] for k in implemented} for r in served.upstream.requests[1:2]] == [implemented]
    assert [{k: r[k] for k in asked} for r in served.upstream.requests[2:]] == [asked]


@pytest.fixture
def browser(carol):
    client = Client()
    client.force_login(carol)
    return client


def test_the_playground_shows_its_form_and_snippet_to_whoever_may_use_the_model(served, browser):
    page = browser.get("/releases/models/aurora/m/playground")
    assert page.status_code == 200
    assert b'<textarea id="message"' in page.content and b"OpenAI(base_url=" in page.content


def test_the_playground_tells_who_may_not_use_the_model_why_and_what_to_do(served, browser):
    AccessPolicy.objects.create(model=served.model, audience="gated-manual")
    page = browser.get("/releases/models/aurora/m/playground")
    assert page.status_code == 403 and b"needs approval: request access" in page.content
    assert b'href="/aurora/m/access"' in page.content
    assert b'<textarea id="message"' not in page.content and b"OpenAI(base_url=" not in page.content
    posted = browser.post("/releases/models/aurora/m/playground", {"message": "hi", "max_tokens": "4"})
    assert posted.status_code == 403 and not served.upstream.requests and not InferenceCall.objects.exists()


def test_the_playground_of_a_model_not_served_says_so(served, browser):
    InferenceBackend.objects.filter(pk=served.backend.pk).update(enabled=False)
    page = browser.get("/releases/models/aurora/m/playground")
    assert page.status_code == 404 and b"not served by the inference API" in page.content
    assert b'<textarea id="message"' not in page.content and b"OpenAI(base_url=" not in page.content
    # The API says the same to whoever can see the model, not that it does not exist.
    response = _chat(served)
    error = _error(response)
    assert response.status_code == 404 and error["code"] == "model_not_served"
    assert "not served by the inference API" in error["message"]
    assert "does not serve it yet" in browser.get("/aurora/m").content.decode()
    # A closed model answers as one that does not exist, served or not.
    Model.objects.filter(pk=served.model.pk).update(tier="closed")
    closed, missing = _chat(served), _chat(served, model="aurora/nothing-here")
    assert closed.status_code == missing.status_code == 404
    assert _error(closed)["code"] == _error(missing)["code"] == "model_not_found"
    assert not served.upstream.requests and not InferenceCall.objects.exists()


def test_the_playground_keeps_what_was_typed_and_names_the_field_that_is_not_a_number(served, browser):
    page = browser.post("/releases/models/aurora/m/playground", {"message": "hi", "max_tokens": "1e1",
                                                                  "temperature": "0.3"})
    text = page.content.decode()
    assert page.status_code == 400 and "Max tokens must be a whole number; got &#x27;1e1&#x27;." in text
    assert 'value="1e1"' in text and 'value="0.3"' in text and "hi</textarea>" in text
    assert not served.upstream.requests and not InferenceCall.objects.exists()
    page = browser.post("/releases/models/aurora/m/playground", {"message": "hi", "max_tokens": "",
                                                                  "temperature": "0.3"})
    assert page.status_code == 502 and "answered without a chat message" in page.content.decode()  # a completion
    assert served.upstream.requests[-1]["max_tokens"] == 64  # empty: the default
    served.upstream.body = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hello there"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}).encode()
    page = browser.post("/releases/models/aurora/m/playground", {"message": "hi", "max_tokens": "8",
                                                                  "temperature": "0"})
    assert page.status_code == 200 and "hello there" in page.content.decode()
    # Metered: the gateway meters an answer when it is closed, and the page closes the one it read.
    latest = InferenceCall.objects.latest("id")
    assert (latest.status, latest.completion_tokens) == (200, 2)


def _stream_playground(browser, **fields):
    return browser.post("/releases/models/aurora/m/playground", {"message": "hi", "max_tokens": "8", **fields},
                        HTTP_ACCEPT="text/event-stream")


def test_the_playground_streams_the_answer_to_its_script_and_meters_it(served, browser):
    """playground.js posts the form asking for text/event-stream: the gateway's own stream comes back, as it comes."""
    served.upstream.events = [chat_chunk("hel"), chat_chunk("lo"), chat_chunk(finish="stop"),
                              chat_chunk(usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}),
                              "[DONE]"]
    response = _stream_playground(browser, temperature="0")
    assert response.status_code == 200 and response["Content-Type"] == "text/event-stream"
    events = _events(response.streaming_content)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:3]) == "hello"
    assert events[3]["usage"]["completion_tokens"] == 2 and events[-1] == "[DONE]"
    sent = served.upstream.requests[-1]
    assert sent["stream"] is True and sent["stream_options"]["include_usage"] is True
    assert sent["messages"] == [{"role": "user", "content": "hi"}] and sent["max_tokens"] == 8
    call = InferenceCall.objects.get()
    assert (call.user.username, call.stream, call.status, call.completion_tokens) == ("carol", True, 200, 2)


def test_the_playground_script_gets_refusals_as_openai_errors_and_nothing_is_called(served, browser):
    response = _stream_playground(browser, max_tokens="1e1")
    assert response.status_code == 400 and _error(response)["message"] == "Max tokens must be a whole number; got '1e1'."
    response = _stream_playground(browser, temperature="7")  # a number, out of the gateway's range
    assert response.status_code == 400 and _error(response)["param"] == "temperature"
    AccessPolicy.objects.create(model=served.model, audience="gated-manual")
    response = _stream_playground(browser)
    assert response.status_code == 403 and "needs approval: request access" in _error(response)["message"]
    AccessPolicy.objects.all().delete()
    InferenceBackend.objects.filter(pk=served.backend.pk).update(enabled=False)
    response = _stream_playground(browser)
    assert response.status_code == 404 and _error(response)["code"] == "model_not_served"
    assert not served.upstream.requests and not InferenceCall.objects.exists()


def test_the_playground_page_loads_its_script_and_holds_the_answer_and_error_parts_it_fills(served, browser):
    page = browser.get("/releases/models/aurora/m/playground").content.decode()
    assert '<form method="post" class="card" data-playground>' in page
    assert '<script src="/static/releases/playground.js" defer></script>' in page
    assert '<section id="answer" class="card" aria-live="polite" hidden>' in page
    assert '<p id="error" class="card error" role="alert" hidden></p>' in page
    script = browser.get("/static/releases/playground.js")
    assert script.status_code == 200 and b"text/event-stream" in b"".join(script.streaming_content)


def test_a_page_of_a_model_one_may_not_see_names_the_path_in_its_404(served, browser):
    page = browser.get("/releases/models/aurora/nothing-here/playground")
    assert page.status_code == 404 and b"<code>/releases/models/aurora/nothing-here/playground</code>" in page.content
