"""Credential guessing is refused: after too many bad tokens from one address, every credential from it gets a
429 with Retry-After on the REST API, the Hub endpoints and the OpenAI gateway; after too many failed logins, the
login form refuses even the right password until the window passes. Nothing is granted meanwhile."""
from django.test import Client

from gatehouse.accounts.models import User


def test_bad_tokens_from_one_address_are_throttled_on_every_api(alice, token_for, settings):
    settings.AUTH_FAILURES_PER_WINDOW = 5
    good = token_for(alice, ("read", "inference"))
    client = Client()
    for _ in range(5):
        assert client.get("/api/v1/me", HTTP_AUTHORIZATION="Bearer gh_guess").status_code == 401
    for url, status_field in [("/api/v1/me", None), ("/api/whoami-v2", None), ("/v1/models", None)]:
        refused = client.get(url, HTTP_AUTHORIZATION=f"Bearer {good}")
        assert refused.status_code == 429 and int(refused["Retry-After"]) == settings.AUTH_FAILURE_WINDOW_SECONDS, url
    assert "Too many invalid credentials" in client.get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {good}").json()[
        "error"]["message"]
    other = Client(REMOTE_ADDR="10.0.0.9")  # another address is not affected
    assert other.get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {good}").status_code == 200


def test_failed_logins_lock_the_form_for_that_user_and_address(alice, settings):
    settings.AUTH_FAILURES_PER_WINDOW = 3
    browser = Client()
    for _ in range(3):
        wrong = browser.post("/accounts/login/", {"username": "alice", "password": "nope"})
        assert wrong.status_code == 200 and "did not match" in wrong.content.decode()
    right = browser.post("/accounts/login/", {"username": "alice", "password": "pw-alice"})
    assert right.status_code == 429 and "Too many invalid credentials" in right.content.decode()
    assert "_auth_user_id" not in browser.session
    elsewhere = Client(REMOTE_ADDR="10.0.0.7")  # the username is locked too, from any address
    assert elsewhere.post("/accounts/login/", {"username": "ALICE", "password": "pw-alice"}).status_code == 429
    fresh = Client(REMOTE_ADDR="10.0.0.8")
    assert fresh.post("/accounts/login/", {"username": "carol", "password": "x"}).status_code == 200


def test_pages_carry_a_content_security_policy_and_refuse_framing(db, client):
    page = client.get("/")
    csp = page["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert page["X-Frame-Options"] == "DENY" and page["X-Content-Type-Options"] == "nosniff"
    assert "Content-Security-Policy" not in client.get("/api/v1/licenses")  # JSON needs none


def test_behind_a_trusted_proxy_each_client_is_counted_apart_and_the_header_cannot_be_forged(alice, token_for,
                                                                                              settings):
    settings.AUTH_FAILURES_PER_WINDOW = 3
    good = token_for(alice)
    proxy = Client(REMOTE_ADDR="127.0.0.1")  # nginx in front: every request comes from it

    def me(token, forwarded):
        return proxy.get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_FORWARDED_FOR=forwarded)

    settings.TRUSTED_PROXY_HOPS = 1
    for _ in range(3):
        assert me("gh_guess", "203.0.113.5").status_code == 401
    assert me(good, "203.0.113.5").status_code == 429
    assert me(good, "198.51.100.7").status_code == 200  # other clients behind the same proxy are unaffected
    assert me(good, "10.9.9.9, 203.0.113.5").status_code == 429  # a forged first entry does not escape
    settings.TRUSTED_PROXY_HOPS = 0  # not behind a proxy: the header is the client's own words, ignored
    assert me(good, "198.51.100.7").status_code == 200  # 127.0.0.1 itself has no failures
    for _ in range(3):
        me("gh_guess", "198.51.100.99")
    assert me(good, "203.0.113.77").status_code == 429  # rotating the header does not help an attacker


def test_access_requests_are_limited_per_person_across_models_and_nothing_is_recorded_past_the_limit(
        register, aurora, alice, carol, client_for, settings, django_capture_on_commit_callbacks):
    from django.core import mail

    from gatehouse.audit.models import AuditEvent
    from releases.models import AccessPolicy, AccessRequest

    settings.ACCESS_REQUESTS_PER_USER_PER_WINDOW = 2
    for name in ("one", "two", "three"):
        AccessPolicy.objects.create(model=register(aurora, name, alice, tier="open").model, audience="gated-manual")
    api = client_for(carol, ("read", "gated-read"))
    for name in ("one", "two"):
        with django_capture_on_commit_callbacks(execute=True):
            assert api.post(f"/api/v1/models/aurora/{name}/access-requests", {}, format="json").status_code == 201
    audit_rows, emails = AuditEvent.objects.count(), len(mail.outbox)
    refused = api.post("/api/v1/models/aurora/three/access-requests", {}, format="json")
    assert refused.status_code == 429 and int(refused["Retry-After"]) == settings.ACCESS_REQUEST_WINDOW_SECONDS
    assert "2 access requests in the last 60 minutes" in refused.json()["error"]["message"]
    browser = Client()
    browser.force_login(carol)
    page = browser.post("/aurora/three/access", {})  # the web form counts against the same limit
    assert page.status_code == 429 and "the most allowed" in page.content.decode()
    assert list(AccessRequest.objects.order_by("id").values_list("model__name", flat=True)) == ["one", "two"]
    assert AuditEvent.objects.count() == audit_rows and len(mail.outbox) == emails
    dave = User.objects.create_user("dave", "dave@example.org", "pw")  # another person is not affected
    made = client_for(dave, ("read", "gated-read")).post("/api/v1/models/aurora/three/access-requests", {}, format="json")
    assert made.status_code == 201


def test_a_signed_in_browser_cannot_be_made_to_post_without_the_csrf_token(register, aurora, alice, carol, token_for):
    """Every state-changing form and the session-authenticated REST API refuse a cross-site POST (no CSRF token):
    403, and nothing changes."""
    from gatehouse.accounts.models import ApiToken
    from releases.models import AccessPolicy, AccessRequest

    model = register(aurora, "gated", alice, tier="open").model
    AccessPolicy.objects.create(model=model, audience="gated-manual")
    tokens_before = ApiToken.objects.count()
    victim = Client(enforce_csrf_checks=True)
    victim.force_login(carol)
    forged = [
        victim.post("/aurora/gated/access", {}),
        victim.post("/accounts/tokens", {"name": "attacker", "scopes": ["read", "write"]}),
        victim.post("/api/v1/models/aurora/gated/access-requests", {}, content_type="application/json"),
        victim.post("/api/v1/tokens", {"name": "attacker", "scopes": ["read"]}, content_type="application/json"),
    ]
    assert [r.status_code for r in forged] == [403, 403, 403, 403]
    assert all("CSRF" in r.json()["error"]["message"] for r in forged[2:])
    assert all("CSRF" in r.content.decode() for r in forged[:2])
    admin = Client(enforce_csrf_checks=True)
    admin.force_login(alice)
    assert admin.post("/releases/models/aurora/gated/downgrade", {"tier": "closed", "reason": "x"}).status_code == 403
    assert type(model).objects.get(pk=model.pk).tier == "open"
    assert AccessRequest.objects.count() == 0 and ApiToken.objects.count() == tokens_before
    # With a token instead of the session cookie there is no ambient authority to forge: no CSRF token needed.
    api = Client(enforce_csrf_checks=True, HTTP_AUTHORIZATION=f"Bearer {token_for(carol, ('read', 'gated-read'))}")
    assert api.post("/api/v1/models/aurora/gated/access-requests", {}, content_type="application/json").status_code == 201


def test_a_shared_cache_that_is_down_does_not_take_logins_and_tokens_down(alice, token_for, caplog):
    """Throttling fails open (logged): an unreachable cache must not turn every call into a 500."""
    from django.test import override_settings

    good = token_for(alice)
    down = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                        "LOCATION": "redis://127.0.0.1:1/0"}}  # nothing listens on port 1
    with override_settings(CACHES=down):
        client = Client()
        assert client.get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {good}").status_code == 200
        assert client.get("/api/v1/me", HTTP_AUTHORIZATION="Bearer gh_guess").status_code == 401
        assert Client().post("/accounts/login/", {"username": "alice", "password": "pw-alice"}).status_code == 302
    assert "the cache is unavailable" in caplog.text
