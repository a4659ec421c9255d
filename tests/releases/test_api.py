import pytest

from gatehouse.audit.models import AuditEvent
from gatehouse.registry.models import Model
from releases.models import Release, ReleaseRequest

from .test_workflow import CARD, _assess, erin, releasable  # noqa: F401  (fixtures)


def _create(client, stages=None):
    return client.post("/api/v1/release-requests", {
        "model": "aurora/m", "stages": stages or [{"tier": "api"}, {"tier": "open", "after_days": 30}],
        "incident_contact": "safety@aurora.example"}, format="json")


def test_the_whole_flow_over_the_api(releasable, alice, erin, client_for):
    writer = client_for(alice, scopes=["read", "write"])
    created = _create(writer)
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["status"] == "draft" and body["findings"] == [] and body["model"] == "aurora/m"
    rid = body["id"]
    assert writer.post(f"/api/v1/release-requests/{rid}/submit").json()["status"] == "submitted"
    approver = client_for(erin, scopes=["read", "admin"])
    queue = approver.get("/api/v1/release-requests?status=submitted").json()["results"]
    assert [r["id"] for r in queue] == [rid]
    decided = approver.post(f"/api/v1/release-requests/{rid}/decisions", {"decision": "approve"}, format="json")
    assert decided.status_code == 200 and decided.json()["status"] == "approved"
    assert [(r["tier"], r["status"]) for r in decided.json()["releases"]] == [("api", "effective"), ("open", "scheduled")]
    history = client_for(None).get("/api/v1/models/aurora/m/releases").json()
    assert history["tier"] == "api" and len(history["releases"]) == 2
    down = approver.post("/api/v1/models/aurora/m/downgrade", {"tier": "closed", "reason": "Misuse"}, format="json")
    assert down.status_code == 201 and "cannot be recalled" in down.json()["warning"]
    assert client_for(None).get("/api/v1/models/aurora/m").status_code == 404  # closed again: invisible


def test_denied_paths_leave_no_trace(releasable, alice, bob, carol, erin, client_for):
    rid = _create(client_for(alice, scopes=["write"])).json()["id"]
    client_for(alice, scopes=["write"]).post(f"/api/v1/release-requests/{rid}/submit")
    own, no_scope, outsider, member = (client_for(alice, scopes=["admin"]), client_for(erin, scopes=["write"]),
                                       client_for(carol, scopes=["admin"]), client_for(bob, scopes=["admin"]))
    before = AuditEvent.objects.count()
    url, approve = f"/api/v1/release-requests/{rid}/decisions", {"decision": "approve"}
    response = own.post(url, approve, format="json")
    assert response.status_code == 403 and "your own release request" in response.json()["error"]["message"]
    response = no_scope.post(url, approve, format="json")
    assert response.status_code == 403 and response.json()["error"]["code"] == "missing_scope"
    assert outsider.post(url, approve, format="json").status_code == 404
    assert member.post(url, approve, format="json").status_code == 403
    down = member.post("/api/v1/models/aurora/m/downgrade", {"tier": "closed", "reason": "x"}, format="json")
    assert down.status_code == 403
    assert client_for(None).get(f"/api/v1/release-requests/{rid}").status_code == 401
    assert AuditEvent.objects.count() == before
    assert ReleaseRequest.objects.get().status == "submitted" and Release.objects.count() == 0
    assert Model.objects.get().tier == "closed"


def test_policy_blocks_are_400s_with_findings(aurora, alice, register, client_for):
    register(aurora, "m", alice, tier="closed", metadata={"license": "mit"})
    writer = client_for(alice, scopes=["read", "write"])
    rid = _create(writer, stages=[{"tier": "open"}]).json()["id"]
    response = writer.post(f"/api/v1/release-requests/{rid}/submit")
    assert response.status_code == 400 and response.json()["error"]["code"] == "policy_blocked"
    codes = {f["code"] for f in response.json()["error"]["fields"]["findings"]}
    assert {"card_incomplete", "compute_missing", "risk_assessment_missing"} <= codes
    checks = writer.get("/api/v1/models/aurora/m/release-checks?tier=open").json()
    assert {f["code"] for f in checks["findings"]} == codes and checks["required_approvals"] == 1
    bad = writer.post("/api/v1/release-requests", {"model": "aurora/m", "stages": [{"tier": "open"}, {"tier": "api", "after_days": 5}]},
                      format="json")
    assert bad.status_code == 400 and "must widen access" in bad.json()["error"]["message"]
