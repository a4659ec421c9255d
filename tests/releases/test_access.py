"""Access requests, grants and revocation through the REST API and the web form, with their effect on the
download gate, notifications and webhooks; and a downgrade turning a working grant into a refusal."""
from datetime import timedelta

import pytest
from django.core import mail
from django.test import Client
from django.utils import timezone

from gatehouse.audit.models import AuditEvent
from gatehouse.registry.models import License
from gatehouse.webhooks.models import WebhookDelivery, WebhookEndpoint
from releases.models import AccessGrant, AccessPolicy, AccessRequest, Download
from releases.services import release_downgrade

WEIGHTS = "/aurora/gated/resolve/main/model.safetensors"


@pytest.fixture
def gated(register, aurora, alice):
    version = register(aurora, "gated", alice, tier="open")
    model = version.model
    model.license = License.objects.get(key="apache-2.0")
    model.save(update_fields=["license"])
    AccessPolicy.objects.create(model=model, audience="gated-manual", acceptable_use="No weapons work.",
                                request_fields=[{"name": "affiliation", "label": "Affiliation", "required": True}])
    WebhookEndpoint.objects.create(organization=aurora, url="http://127.0.0.1:9/hook", secret="s", events=["*"])
    return model


def download(token_for, user):
    return Client().head(WEIGHTS, HTTP_AUTHORIZATION=f"Bearer {token_for(user, ('read', 'gated-read'))}")


def events():
    return list(WebhookDelivery.objects.order_by("id").values_list("event", flat=True))


def test_manual_review_request_reject_cooldown_and_accept(gated, alice, bob, carol, client_for, token_for,
                                                          django_capture_on_commit_callbacks):
    requester = client_for(carol, ("read", "gated-read"))
    url = "/api/v1/models/aurora/gated/access-requests"
    # Bad input is refused with a message that says what to do, and nothing is recorded.
    missing = requester.post(url, {"accept_license": True, "accept_acceptable_use": True}, format="json")
    assert missing.status_code == 400 and "affiliation" in missing.json()["error"]["message"]
    unaccepted = requester.post(url, {"fields": {"affiliation": "Uni"}, "accept_acceptable_use": True}, format="json")
    assert unaccepted.status_code == 400 and "Accept the license (apache-2.0)" in unaccepted.json()["error"]["message"]
    no_aup = requester.post(url, {"fields": {"affiliation": "Uni"}, "accept_license": True}, format="json")
    assert no_aup.status_code == 400 and "acceptable-use" in no_aup.json()["error"]["message"]
    read_only = client_for(carol, ("read",)).post(url, {}, format="json")
    assert read_only.status_code == 403 and "gated-read" in read_only.json()["error"]["message"]
    assert AccessRequest.objects.count() == 0 and events() == [] and mail.outbox == []

    with django_capture_on_commit_callbacks(execute=True):  # emails go out after commit
        made = requester.post(url, {"fields": {"affiliation": "Uni"}, "accept_license": True,
                                    "accept_acceptable_use": True}, format="json")
    assert made.status_code == 201 and made.json()["status"] == "pending"
    license = License.objects.get(key="apache-2.0")
    assert made.json()["license_key"] == "apache-2.0" and len(made.json()["acceptable_use_sha256"]) == 64
    assert made.json()["license_sha256"] == (license.text_sha256 or made.json()["license_sha256"]) != ""
    assert events() == ["access_request.created"] and mail.outbox[-1].to == ["alice@example.com"]
    again = requester.post(url, {"fields": {"affiliation": "Uni"}, "accept_license": True,
                                 "accept_acceptable_use": True}, format="json")
    assert again.status_code == 409 and "already pending" in again.json()["error"]["message"]

    # Reviewers see the queue with waiting time; a plain member may not review.
    queue = client_for(alice).get(url).json()["results"]
    assert [r["user"] for r in queue] == ["carol"] and queue[0]["waiting_seconds"] >= 0
    assert client_for(bob).get(url).status_code == 403
    request_id = made.json()["id"]
    denied = client_for(bob, ("read", "write")).post(f"/api/v1/access-requests/{request_id}/decision",
                                                     {"status": "accepted"}, format="json")
    assert denied.status_code == 403 and AccessRequest.objects.get().status == "pending"

    with django_capture_on_commit_callbacks(execute=True):
        rejected = client_for(alice, ("read", "write")).post(f"/api/v1/access-requests/{request_id}/decision",
                                                             {"status": "rejected", "reason": "Unknown affiliation"},
                                                             format="json")
    assert rejected.status_code == 200 and rejected.json()["rejection_reason"] == "Unknown affiliation"
    assert events()[-1] == "access_request.rejected" and "Unknown affiliation" in mail.outbox[-1].body
    assert "Unknown affiliation" in download(token_for, carol)["X-Error-Message"]
    cooldown = requester.post(url, {"fields": {"affiliation": "Uni"}, "accept_license": True,
                                    "accept_acceptable_use": True}, format="json")
    assert cooldown.status_code == 409 and "ask again after" in cooldown.json()["error"]["message"]
    assert AccessRequest.objects.count() == 1

    AccessRequest.objects.update(decided_at=timezone.now() - timedelta(days=8))  # the 7-day cooldown is over
    second = requester.post(url, {"fields": {"affiliation": "Uni, lab 3"}, "accept_license": True,
                                  "accept_acceptable_use": True}, format="json")
    assert second.status_code == 201
    accepted = client_for(alice, ("read", "write")).post(f"/api/v1/access-requests/{second.json()['id']}/decision",
                                                         {"status": "accepted"}, format="json")
    assert accepted.json()["status"] == "accepted" and events()[-1] == "access_request.approved"
    grant = AccessGrant.objects.get(user=carol)
    assert grant.license_key == "apache-2.0" and grant.granted_by == alice
    assert download(token_for, carol).status_code == 200
    mine = client_for(carol).get("/api/v1/access-requests/mine").json()["results"]
    assert [r["status"] for r in mine] == ["accepted", "rejected"]


def test_revocation_is_effective_on_the_next_request(gated, alice, carol, client_for, token_for):
    reviewer = client_for(alice, ("read", "write"))
    grant = reviewer.post("/api/v1/models/aurora/gated/access-grants", {"user": "carol"}, format="json")
    assert grant.status_code == 201 and grant.json()["active"] is True
    assert download(token_for, carol).status_code == 200
    no_reason = reviewer.post(f"/api/v1/access-grants/{grant.json()['id']}/revoke", {"reason": ""}, format="json")
    assert no_reason.status_code == 400 and AccessGrant.objects.get().revoked_at is None
    revoked = reviewer.post(f"/api/v1/access-grants/{grant.json()['id']}/revoke", {"reason": "Terms breached"},
                            format="json")
    assert revoked.status_code == 200 and revoked.json()["active"] is False
    refused = download(token_for, carol)
    assert refused.status_code == 403 and "revoked" in refused["X-Error-Message"]
    assert "Terms breached" in refused["X-Error-Message"]
    assert events()[-1] == "access_grant.revoked"
    assert AuditEvent.objects.filter(action="access_grant.revoke").count() == 1


def test_organization_grant_with_expiry(gated, alice, carol, northwind, client_for, token_for):
    reviewer = client_for(alice, ("read", "write"))
    past = reviewer.post("/api/v1/models/aurora/gated/access-grants",
                         {"organization": "northwind", "expires_at": "2020-01-01T00:00:00Z"}, format="json")
    assert past.status_code == 400 and AccessGrant.objects.count() == 0
    soon = timezone.now() + timedelta(days=30)
    made = reviewer.post("/api/v1/models/aurora/gated/access-grants",
                         {"organization": "northwind", "expires_at": soon.isoformat()}, format="json")
    assert made.status_code == 201 and made.json()["organization"] == "northwind"
    assert download(token_for, carol).status_code == 200
    AccessGrant.objects.update(expires_at=timezone.now() - timedelta(minutes=1))
    expired = download(token_for, carol)
    assert expired.status_code == 403 and "expired on" in expired["X-Error-Message"]


def test_automatic_approval_for_everyone_and_by_email_domain(gated, alice, carol, client_for, token_for):
    AccessPolicy.objects.filter(model=gated).update(audience="gated-manual", auto_approve_email_domains=["example.com"])
    body = {"fields": {"affiliation": "Northwind"}, "accept_license": True, "accept_acceptable_use": True}
    made = client_for(carol, ("read", "gated-read")).post("/api/v1/models/aurora/gated/access-requests", body,
                                                          format="json")
    assert made.status_code == 201 and made.json()["status"] == "accepted"
    assert made.json()["decided_automatically"] is True and made.json()["decided_by"] is None
    assert download(token_for, carol).status_code == 200


def test_members_and_ungated_models_have_nothing_to_request(gated, register, aurora, alice, bob, carol, client_for):
    body = {"fields": {"affiliation": "x"}, "accept_license": True, "accept_acceptable_use": True}
    member = client_for(bob, ("read", "gated-read")).post("/api/v1/models/aurora/gated/access-requests", body,
                                                          format="json")
    assert member.status_code == 400 and "already have access" in member.json()["error"]["message"]
    register(aurora, "served", alice, tier="api")
    api = client_for(carol, ("read", "gated-read")).post("/api/v1/models/aurora/served/access-requests", body,
                                                         format="json")
    assert api.status_code == 400 and "needs no approval" in api.json()["error"]["message"]
    assert AccessRequest.objects.count() == 0


def test_web_form_asks_for_the_fields_and_the_license_and_records_the_request(gated, carol):
    browser = Client()
    assert browser.get("/aurora/gated/access").status_code == 302  # sign in first
    browser.force_login(carol)
    page = browser.get("/aurora/gated/access")
    html = page.content.decode()
    assert page.status_code == 200 and 'name="affiliation"' in html and 'name="accept_license"' in html
    assert "No weapons work." in html and "csrfmiddlewaretoken" in html
    refused = browser.post("/aurora/gated/access", {"affiliation": "Uni"})
    assert refused.status_code == 400 and "Accept the license" in refused.content.decode()
    assert AccessRequest.objects.count() == 0
    sent = browser.post("/aurora/gated/access", {"affiliation": "Uni", "accept_license": "on",
                                                 "accept_acceptable_use": "on"}, follow=True)
    assert "pending review since" in sent.content.decode()
    assert AccessRequest.objects.get().fields == {"affiliation": "Uni"}


def test_downgrade_turns_a_working_grant_into_a_refusal_at_once(gated, alice, carol, token_for):
    from gatehouse.accounts.models import User

    AccessGrant.objects.create(model=gated, user=carol)
    waiting = AccessRequest.objects.create(model=gated, user=User.objects.create_user("dan", "dan@example.org", "pw"))
    assert download(token_for, carol).status_code == 200
    release_downgrade(model=gated, actor=alice, tier="api", reason="Misuse reported")
    to_api = download(token_for, carol)
    assert to_api.status_code == 403 and "API-only" in to_api["X-Error-Message"]
    # Grants are revoked and pending requests cancelled, so re-opening later restores nothing silently.
    assert AccessGrant.objects.get(user=carol).revoke_reason == "model downgraded to api: Misuse reported"
    waiting.refresh_from_db()
    assert waiting.status == "cancelled" and events()[-2:] == ["access_grant.revoked", "release.downgraded"]
    release_downgrade(model=type(gated).objects.get(pk=gated.pk), actor=alice, tier="closed", reason="Incident")
    assert download(token_for, carol).status_code == 404
    assert Download.objects.count() == 0  # HEADs are not metered; nothing was served after the downgrade


def test_followers_hear_of_downgrades_only_while_they_may_see_the_model(gated, alice, carol, client_for,
                                                                        django_capture_on_commit_callbacks):
    for user in (alice, carol):
        followed = client_for(user, ("read", "write")).post("/api/v1/models/aurora/gated/follow")
        assert followed.status_code == 200 and followed.json()["following"] is True
    with django_capture_on_commit_callbacks(execute=True):
        release_downgrade(model=gated, actor=alice, tier="api", reason="Misuse reported")
    notice = [m for m in mail.outbox if "is now released at tier api" in m.subject]
    assert len(notice) == 1 and sorted(notice[0].to) == ["alice@example.com", "carol@example.com"]
    assert "Misuse reported" in notice[0].body
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        release_downgrade(model=type(gated).objects.get(pk=gated.pk), actor=alice, tier="closed", reason="Incident")
    notice = [m for m in mail.outbox if "is now released at tier closed" in m.subject]
    assert len(notice) == 1 and notice[0].to == ["alice@example.com"]  # carol may no longer know it exists
    gone = client_for(carol, ("read", "write")).delete("/api/v1/models/aurora/gated/follow")
    assert gone.status_code == 404


def test_downgrade_page_warns_and_only_approvers_can_use_it(gated, alice, bob):
    browser = Client()
    browser.force_login(bob)
    page = browser.get("/releases/models/aurora/gated/downgrade")
    assert page.status_code == 403 and "Only approvers" in page.content.decode() and 'name="reason"' not in page.content.decode()
    refused = browser.post("/releases/models/aurora/gated/downgrade", {"tier": "api", "reason": "x"})
    assert refused.status_code == 403 and "Only approvers" in refused.content.decode()
    assert type(gated).objects.get(pk=gated.pk).tier == "open"
    browser.force_login(alice)
    page = browser.get("/releases/models/aurora/gated/downgrade")
    assert page.status_code == 200 and "cannot be recalled" in page.content.decode()
    done = browser.post("/releases/models/aurora/gated/downgrade", {"tier": "api", "reason": "Misuse"}, follow=True)
    assert "is now api" in done.content.decode() and type(gated).objects.get(pk=gated.pk).tier == "api"


def test_model_page_shows_each_caller_what_they_may_do(gated, alice, carol, bob):
    def page(user):
        browser = Client()
        if user:
            browser.force_login(user)
        response = browser.get("/aurora/gated")
        assert response.status_code == 200
        return response.content.decode()

    anonymous = page(None)
    assert "Log in</a> to request access" in anonymous and "snapshot_download" not in anonymous
    outsider = page(carol)
    assert 'href="/aurora/gated/access"' in outsider and "/resolve/" not in outsider
    AccessRequest.objects.create(model=gated, user=carol)
    assert "pending review since" in page(carol)
    AccessGrant.objects.create(model=gated, user=carol)
    granted = page(carol)
    commit = gated.latest_version.commit
    assert "snapshot_download(&quot;aurora/gated&quot;" in granted or 'snapshot_download("aurora/gated"' in granted
    assert f"/aurora/gated/resolve/{commit}/model.safetensors" in granted
    # The link works for the signed-in browser: the gate reads the session.
    browser = Client()
    browser.force_login(carol)
    assert browser.get(f"/aurora/gated/resolve/{commit}/model.safetensors").status_code == 200
    assert "Downgrade" in page(alice) and "Downgrade" not in page(bob)


def test_access_queue_page_lists_oldest_first_and_decides(gated, alice, bob, carol):
    from gatehouse.accounts.models import User

    dan = User.objects.create_user("dan", "dan@example.org", "pw")
    older = AccessRequest.objects.create(model=gated, user=dan, created_at=timezone.now() - timedelta(hours=5),
                                         fields={"affiliation": "Lab"})
    AccessRequest.objects.create(model=gated, user=carol)
    browser = Client()
    browser.force_login(alice)
    html = browser.get("/releases/access-requests").content.decode()
    assert html.index("dan") < html.index("carol") and "Waiting for 5" in html and "Lab" in html
    browser.force_login(bob)  # a plain member reviews nothing
    assert "No access requests wait for you" in browser.get("/releases/access-requests").content.decode()
    refused = browser.post(f"/releases/access-requests/{older.pk}/decide", {"status": "accepted"}, follow=True)
    assert "Only admins and maintainers" in refused.content.decode()
    older.refresh_from_db()
    assert older.status == "pending"
    browser.force_login(alice)
    browser.post(f"/releases/access-requests/{older.pk}/decide", {"status": "accepted"})
    older.refresh_from_db()
    assert older.status == "accepted" and AccessGrant.objects.filter(user=dan).exists()


def test_my_page_lists_my_requests_downloads_and_inference_only(gated, alice, carol, django_assert_max_num_queries):
    from releases.models import InferenceCall

    AccessRequest.objects.create(model=gated, user=carol, status="rejected", rejection_reason="Say who you are",
                                 decided_at=timezone.now())
    version = gated.latest_version
    Download.objects.create(user=carol, model=gated, version=version, path="model.safetensors", bytes=2048, via="stream")
    Download.objects.create(user=alice, model=gated, version=version, path="model.safetensors", bytes=999, via="stream")
    InferenceCall.objects.create(user=carol, model=gated, endpoint="completions", status=200, prompt_tokens=5,
                                 completion_tokens=7)
    browser = Client()
    browser.force_login(carol)
    with django_assert_max_num_queries(8):
        html = browser.get("/releases/mine").content.decode()
    assert "Say who you are" in html and "2.0\xa0KB" in html and ">7<" in html
    assert "999" not in html  # alice's download is hers


def test_catalog_sorts_by_downloads(gated, register, aurora, alice, carol):
    from releases import access

    other = register(aurora, "popular", alice, tier="open").model
    version = other.latest_version
    type(gated).objects.filter(pk=gated.pk).update(updated_at=timezone.now())  # listed first unless downloads decide
    for _ in range(3):
        access.download_record(user=carol, token=None, version=version, file=version.files.first(), bytes=1,
                               range_start=None, via="stream")
    assert Client().get("/").content.decode().index("aurora/gated") < \
        Client().get("/").content.decode().index("aurora/popular")
    html = Client().get("/?sort=downloads").content.decode()
    assert html.index("aurora/popular") < html.index("aurora/gated")
    assert '<option value="downloads" selected>' in html
