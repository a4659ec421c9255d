import threading
from datetime import timedelta

import pytest
from django.core import mail
from django.db import connection
from django.utils import timezone

from gatehouse.accounts.models import Membership, User
from gatehouse.audit.models import AuditEvent
from gatehouse.core.errors import Conflict, InvalidInput, PermissionDenied
from gatehouse.registry.models import Dataset, DatasetVersion, License, Model, RiskAssessment, RiskThreshold
from gatehouse.registry.services.compute import compute_record_create
from gatehouse.registry.services.records import risk_assessment_record
from releases.models import Release, ReleaseApproval, ReleaseRequest
from releases.services import (
    release_downgrade, release_request_create, release_request_decide, release_request_submit,
    release_request_withdraw, releases_apply_due,
)

CARD = "# Model\n\n## Intended use\nResearch.\n\n## Limitations\nMany.\n\n## Training data\nWeb.\n\n## Evaluation\nSome.\n"


@pytest.fixture(autouse=True)
def _email(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"


@pytest.fixture
def erin(db, aurora):
    user = User.objects.create_user("erin", "erin@example.com", "pw")
    Membership.objects.create(user=user, organization=aurora, role=Membership.Role.APPROVER)
    return user


@pytest.fixture
def frank(db, aurora):
    user = User.objects.create_user("frank", "frank@example.com", "pw")
    Membership.objects.create(user=user, organization=aurora, role=Membership.Role.APPROVER)
    return user


def _assess(version, alice, outcome="below", mitigation="pre", when=None):
    for threshold in RiskThreshold.objects.filter(domain__framework__key="openai-preparedness",
                                                  domain__category="tracked", key="high"):
        assessment = risk_assessment_record(version=version, actor=alice, threshold=threshold, outcome=outcome,
                                            mitigation=mitigation, evaluator="internal red team")
        if when:
            RiskAssessment.objects.filter(pk=assessment.pk).update(assessed_at=when)


@pytest.fixture
def releasable(aurora, alice, register):
    """A closed, verified version that passes the policy for api and open."""
    dataset = Dataset.objects.create(organization=aurora, name="corpus", provenance="licensed")
    dataset.licenses.set(License.objects.filter(key="mit"))
    DatasetVersion.objects.create(dataset=dataset, version="v1", manifest_sha256="a" * 64, documents=10)
    version = register(aurora, "m", alice, tier="closed", metadata={"license": "mit", "datasets": ["aurora/corpus"]},
                       body=CARD)
    compute_record_create(version=version, actor=alice, hardware="H100-SXM", flops=1e22)
    _assess(version, alice)
    return version


def _submitted(version, alice, stages=({"tier": "api", "after_days": 0},), **kwargs):
    request = release_request_create(version=version, actor=alice, stages=list(stages), **kwargs)
    return release_request_submit(request=request, actor=alice)


def test_submit_and_approve_makes_the_release_effective(releasable, alice, erin, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        request = _submitted(releasable, alice)
    assert request.status == "submitted" and request.required_approvals == 1 and request.findings == []
    assert [m.to for m in mail.outbox] == [["erin@example.com"]]  # approvers hear of it, the requester does not
    with django_capture_on_commit_callbacks(execute=True):
        request = release_request_decide(request=request, actor=erin, decision="approve")
    assert mail.outbox[-1].to == ["alice@example.com"] and "approve by erin" in mail.outbox[-1].subject
    assert request.status == "approved"
    assert Model.objects.get().tier == "api"
    release = Release.objects.get()
    assert (release.tier, release.status, release.audience) == ("api", "effective", "public")
    actions = list(AuditEvent.objects.filter(action__startswith="release").values_list("action", flat=True))
    assert actions == ["release_request.create", "release_request.submit", "release_request.approve",
                       "release.schedule", "release.effective"]


def test_separation_of_duties_and_nothing_happens_on_denial(releasable, alice, bob, carol, root, erin):
    request = _submitted(releasable, alice)
    before = AuditEvent.objects.count()
    with pytest.raises(PermissionDenied, match="cannot decide on your own release request"):
        release_request_decide(request=request, actor=alice, decision="approve")
    for user in (bob, carol):  # a teammate without the approver role; an outsider
        with pytest.raises(PermissionDenied, match="Only approvers"):
            release_request_decide(request=request, actor=user, decision="approve")
    assert ReleaseApproval.objects.count() == 0 and Release.objects.count() == 0
    assert AuditEvent.objects.count() == before
    assert ReleaseRequest.objects.get().status == "submitted" and Model.objects.get().tier == "closed"
    assert release_request_decide(request=request, actor=root, decision="approve").status == "approved"


def test_blocked_submission_changes_nothing(aurora, alice, register):
    version = register(aurora, "bare", alice, tier="closed", metadata={"license": "mit"})
    request = release_request_create(version=version, actor=alice, stages=[{"tier": "open", "after_days": 0}])
    before = AuditEvent.objects.count()
    with pytest.raises(InvalidInput) as info:
        release_request_submit(request=request, actor=alice)
    assert info.value.code == "policy_blocked"
    codes = {f["code"] for f in info.value.fields["findings"]}
    assert codes == {"card_incomplete", "datasets_missing", "compute_missing", "risk_assessment_missing"}
    assert ReleaseRequest.objects.get().status == "draft" and AuditEvent.objects.count() == before


def test_checks_are_recomputed_at_approval(releasable, alice, erin):
    request = _submitted(releasable, alice)
    _assess(releasable, alice, outcome="cannot_rule_out")  # new evidence after submission
    with pytest.raises(InvalidInput, match="no longer passes the policy"):
        release_request_decide(request=request, actor=erin, decision="approve")
    assert ReleaseApproval.objects.count() == 0 and Model.objects.get().tier == "closed"


def test_request_changes_then_resubmit_then_reject_needs_reasons(releasable, alice, erin):
    request = _submitted(releasable, alice)
    with pytest.raises(InvalidInput, match="needs a comment"):
        release_request_decide(request=request, actor=erin, decision="reject")
    request = release_request_decide(request=request, actor=erin, decision="request_changes", comment="Add a contact")
    assert request.status == "changes_requested"
    request = release_request_submit(request=request, actor=alice)
    request = release_request_decide(request=request, actor=erin, decision="reject", comment="Not this quarter")
    assert request.status == "rejected" and Release.objects.count() == 0


def test_staged_schedule_takes_effect_at_its_time_and_not_before(releasable, alice, erin):
    request = _submitted(releasable, alice, stages=[{"tier": "api", "after_days": 0}, {"tier": "open", "after_days": 90}])
    release_request_decide(request=request, actor=erin, decision="approve")
    assert Model.objects.get().tier == "api"
    later = Release.objects.get(tier="open")
    assert releases_apply_due(now=later.effective_at - timedelta(seconds=1)) == []
    assert Model.objects.get().tier == "api"
    assert releases_apply_due(now=later.effective_at) == [later]
    assert Model.objects.get().tier == "open" and Release.objects.get(pk=later.pk).status == "effective"


def test_a_due_stage_that_no_longer_passes_is_blocked_and_notified(releasable, alice, erin,
                                                                   django_capture_on_commit_callbacks):
    request = _submitted(releasable, alice, stages=[{"tier": "api", "after_days": 0}, {"tier": "open", "after_days": 30}])
    release_request_decide(request=request, actor=erin, decision="approve")
    RiskAssessment.objects.update(assessed_at=timezone.now() - timedelta(days=365))  # the evidence went stale
    mail.outbox.clear()
    due = Release.objects.get(tier="open")
    with django_capture_on_commit_callbacks(execute=True):
        assert releases_apply_due(now=due.effective_at + timedelta(minutes=1)) == []
    due.refresh_from_db()
    assert sorted(mail.outbox[-1].to) == ["alice@example.com", "erin@example.com"]
    assert "did not take effect" in mail.outbox[-1].subject
    assert due.status == "blocked" and "newer than 180 days" in due.reason
    assert Model.objects.get().tier == "api"
    assert AuditEvent.objects.filter(action="release.blocked").count() == 1


def test_withdraw_cancels_what_is_still_scheduled(releasable, alice, erin):
    request = _submitted(releasable, alice, stages=[{"tier": "api", "after_days": 0}, {"tier": "open", "after_days": 90}])
    release_request_decide(request=request, actor=erin, decision="approve")
    assert release_request_withdraw(request=request, actor=alice).status == "withdrawn"
    assert Release.objects.get(tier="open").status == "cancelled"
    assert releases_apply_due(now=timezone.now() + timedelta(days=365)) == []
    with pytest.raises(Conflict):
        release_request_withdraw(request=request, actor=alice)


def test_downgrade_is_immediate_and_needs_an_approver(releasable, alice, bob, erin):
    request = _submitted(releasable, alice, stages=[{"tier": "api", "after_days": 0}, {"tier": "open", "after_days": 90}])
    release_request_decide(request=request, actor=erin, decision="approve")
    model = Model.objects.get()
    before = AuditEvent.objects.count()
    with pytest.raises(PermissionDenied):
        release_downgrade(model=model, actor=bob, tier="closed", reason="incident")
    assert Model.objects.get().tier == "api" and AuditEvent.objects.count() == before
    release = release_downgrade(model=model, actor=erin, tier="closed", reason="Misuse reported")
    assert release.status == "effective" and Model.objects.get().tier == "closed"
    assert Release.objects.get(tier="open").status == "cancelled"
    with pytest.raises(InvalidInput, match="more closed tier"):
        release_downgrade(model=Model.objects.get(), actor=erin, tier="open", reason="x")


def test_systemic_risk_needs_two_approvers(releasable, alice, erin, frank):
    compute_record_create(version=releasable, actor=alice, hardware="H100-SXM", flops=2e25)
    from gatehouse.registry.models import Benchmark
    from gatehouse.registry.services.records import evaluation_result_record

    evaluation_result_record(version=releasable, actor=alice, benchmark=Benchmark.objects.create(
        key="red-team", name="Red team", category="safety"), metric="attack_success", value=0.02, evaluator="AISI")
    request = _submitted(releasable, alice, incident_contact="incidents@aurora.example")
    assert request.required_approvals == 2
    assert release_request_decide(request=request, actor=erin, decision="approve").status == "submitted"
    assert Model.objects.get().tier == "closed"
    assert release_request_decide(request=request, actor=frank, decision="approve").status == "approved"
    assert Model.objects.get().tier == "api"


@pytest.mark.django_db(transaction=True)
def test_two_approvers_racing_produce_one_transition(aurora, alice, erin, frank, register):
    if connection.vendor != "postgresql":
        pytest.skip("row locks (select_for_update) are exercised on PostgreSQL")
    dataset = Dataset.objects.create(organization=aurora, name="corpus", provenance="licensed")
    dataset.licenses.set(License.objects.filter(key="mit"))
    DatasetVersion.objects.create(dataset=dataset, version="v1", manifest_sha256="a" * 64)
    version = register(aurora, "m", alice, tier="closed", metadata={"license": "mit", "datasets": ["aurora/corpus"]},
                       body=CARD)
    compute_record_create(version=version, actor=alice, hardware="H100-SXM", flops=1e22)
    _assess(version, alice)
    request = _submitted(version, alice)
    outcomes, barrier = [], threading.Barrier(2)

    def approve(user):
        barrier.wait()
        try:
            outcomes.append(release_request_decide(request=request, actor=user, decision="approve").status)
        except Conflict as exc:
            outcomes.append(exc.code)
        finally:
            connection.close()

    threads = [threading.Thread(target=approve, args=(u,)) for u in (erin, frank)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(outcomes) == ["approved", "conflict"]
    assert Release.objects.count() == 1 and ReleaseApproval.objects.count() == 1
    assert AuditEvent.objects.filter(action="release.effective").count() == 1


def test_approver_queue_page(releasable, alice, erin, carol, client):
    request = _submitted(releasable, alice)
    client.force_login(erin)
    html = client.get("/releases/queue").content.decode()
    assert "aurora/m" in html and releasable.commit[:12] in html and "Approve" in html
    assert "openai-preparedness" in html and "aurora/corpus" in html
    response = client.post(f"/releases/requests/{request.pk}/decide", {"decision": "approve", "comment": "ok"})
    assert response.status_code == 302
    assert ReleaseRequest.objects.get().status == "approved" and Model.objects.get().tier == "api"
    client.force_login(carol)  # an outsider sees an empty queue and cannot decide
    assert "Nothing awaits your decision" in client.get("/releases/queue").content.decode()
    client.force_login(alice)
    assert "another approver decides" not in client.get("/releases/queue").content.decode()  # no longer queued
    client.logout()
    assert client.get("/releases/queue").status_code == 302  # to the login page


def test_queue_page_refuses_own_decision(releasable, alice, client):
    request = _submitted(releasable, alice)
    client.force_login(alice)
    assert "another approver decides" in client.get("/releases/queue").content.decode()
    client.post(f"/releases/requests/{request.pk}/decide", {"decision": "approve"})
    assert ReleaseRequest.objects.get().status == "submitted" and ReleaseApproval.objects.count() == 0


def test_release_transitions_emit_signed_webhooks(releasable, alice, erin):
    from gatehouse.webhooks.models import WebhookDelivery, WebhookEndpoint

    WebhookEndpoint.objects.create(organization=releasable.model.organization, url="http://127.0.0.1:9/hook",
                                   secret="s", events=["*"])
    request = _submitted(releasable, alice)
    release_request_decide(request=request, actor=erin, decision="approve")
    release_downgrade(model=Model.objects.get(), actor=erin, tier="closed", reason="Misuse")
    assert list(WebhookDelivery.objects.order_by("id").values_list("event", flat=True)) == [
        "release_request.submitted", "release_request.approve", "release.downgraded"]


def test_seed_release_demo_submits_a_passing_request(alice, register, capsys):
    from django.core.management import call_command

    from gatehouse.accounts.models import Organization

    org = Organization.objects.create(slug="aurora-labs", name="Aurora Labs")
    Membership.objects.create(user=alice, organization=org, role=Membership.Role.ADMIN)
    call_command("seed_release_demo")
    assert "no release request seeded" in capsys.readouterr().out
    dataset = Dataset.objects.create(organization=org, name="python-stdlib", provenance="licensed")
    dataset.licenses.set(License.objects.filter(key="PSF-2.0"))
    DatasetVersion.objects.create(dataset=dataset, version="3.11", manifest_sha256="b" * 64)
    version = register(org, "stdlib-coder", alice, tier="closed",
                       metadata={"license": "PSF-2.0", "datasets": ["aurora-labs/python-stdlib"]},
                       body="# stdlib-coder\n\n## Evaluation\n\nSome.\n")
    compute_record_create(version=version, actor=alice, hardware="CPU", flops=1e15)
    call_command("seed_release_demo")
    call_command("seed_release_demo")  # idempotent
    request = ReleaseRequest.objects.get()
    assert request.status == "submitted" and request.findings == []


def test_a_more_open_derivative_needs_the_base_owners_approval(aurora, northwind, alice, carol, erin, register):
    """aurora fine-tuned northwind's API-only model and asks for open weights with the lineage waiver:
    aurora's approver alone is not enough; northwind's approver must approve too."""
    base = register(northwind, "base", carol, tier="api", metadata={"license": "mit"})
    dataset = Dataset.objects.create(organization=aurora, name="corpus", provenance="licensed")
    dataset.licenses.set(License.objects.filter(key="mit"))
    DatasetVersion.objects.create(dataset=dataset, version="v1", manifest_sha256="a" * 64)
    derivative = register(aurora, "ft", alice, tier="closed", body=CARD, metadata={
        "license": "mit", "datasets": ["aurora/corpus"], "base_model": "northwind/base"})
    assert derivative.base_version_id == base.pk
    compute_record_create(version=derivative, actor=alice, hardware="CPU", flops=1e15)
    _assess(derivative, alice)
    with pytest.raises(InvalidInput, match=r"would be more open \(open\) than its base northwind/base"):
        _submitted(derivative, alice, stages=[{"tier": "open", "after_days": 0}])
    request = _submitted(derivative, alice, stages=[{"tier": "open", "after_days": 0}],
                         waivers=["derivative_more_open"])
    assert release_request_decide(request=request, actor=erin, decision="approve").status == "submitted"
    assert Model.objects.get(name="ft").tier == "closed"
    assert release_request_decide(request=request, actor=carol, decision="approve").status == "approved"
    assert Model.objects.get(name="ft").tier == "open"


def test_base_owners_see_waiver_requests_in_their_queue(aurora, northwind, alice, carol, register, client):
    base = register(northwind, "base", carol, tier="api", metadata={"license": "mit"})
    derivative = register(aurora, "ft", alice, tier="closed", body=CARD,
                          metadata={"license": "mit", "base_model": "northwind/base"})
    assert derivative.base_version_id == base.pk
    request = release_request_create(version=derivative, actor=alice, stages=[{"tier": "open", "after_days": 0}],
                                     waivers=["derivative_more_open"])
    ReleaseRequest.objects.filter(pk=request.pk).update(status="submitted")
    client.force_login(carol)
    assert "aurora/ft" in client.get("/releases/queue").content.decode()
