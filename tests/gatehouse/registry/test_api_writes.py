import io

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from gatehouse.audit.models import AuditEvent
from gatehouse.registry.models import (
    Benchmark, ComputeRecord, Dataset, DatasetVersion, EvaluationResult, Model, ModelVersion, RiskAssessment,
)


def _upload_payload(folder, extra=None):
    payload = {p.relative_to(folder).as_posix(): SimpleUploadedFile(p.name, p.read_bytes())
               for p in sorted(folder.rglob("*")) if p.is_file()}
    return payload | (extra or {})


def _nothing_written(stored_files, events_before=0):
    assert Model.objects.count() == 0
    assert ModelVersion.objects.count() == 0
    assert AuditEvent.objects.count() == events_before
    assert stored_files() == []


def test_upload_creates_a_verified_version(aurora, alice, client_for, model_folder, django_capture_on_commit_callbacks):
    client = client_for(alice, scopes=["write"])
    payload = _upload_payload(model_folder(metadata={"license": "mit"}), {"message": "first", "tier": "api"})
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/api/v1/models/aurora/new-model/versions", payload, format="multipart")
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["status"] == "pending" and body["message"] == "first"
    assert response["Location"] == f"/api/v1/models/aurora/new-model/versions/{body['commit']}"
    model = Model.objects.get()
    assert (model.repo_id, model.tier, model.license.key) == ("aurora/new-model", "api", "mit")
    assert ModelVersion.objects.get().status == "verified"


@pytest.mark.parametrize("who, scopes, status, code", [
    (None, None, 401, "not_authenticated"),
    ("alice", ["read"], 403, "missing_scope"),
    ("bob", ["write"], 403, "permission_denied"),  # a member, not a maintainer
    ("carol", ["write"], 403, "permission_denied"),  # an outsider
])
def test_upload_is_denied_without_write_rights(aurora, bob, carol, alice, client_for, model_folder, stored_files,
                                               who, scopes, status, code):
    user = {"alice": alice, "bob": bob, "carol": carol}.get(who)
    client = client_for(user, scopes=scopes)
    events_before = AuditEvent.objects.count()
    response = client.post("/api/v1/models/aurora/m/versions",
                                                    _upload_payload(model_folder()), format="multipart")
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    _nothing_written(stored_files, events_before)


def test_upload_refusals_are_400_or_404_and_leave_nothing(aurora, alice, client_for, model_folder, stored_files):
    client = client_for(alice, scopes=["write"])
    events_before = AuditEvent.objects.count()
    pickle = _upload_payload(model_folder(), {"pytorch_model.bin": SimpleUploadedFile("x.bin", b"\x80\x04pickle")})
    response = client.post("/api/v1/models/aurora/m/versions", pickle, format="multipart")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "pickle_refused"
    assert "safetensors" in response.json()["error"]["message"]

    traversal = {"../../etc/cron.d/x": SimpleUploadedFile("x", b"boom")}
    response = client.post("/api/v1/models/aurora/m/versions", traversal, format="multipart")
    assert response.status_code == 400 and "contains '..'" in response.json()["error"]["message"]

    twice = {"config.json": [SimpleUploadedFile("a", b"{}"), SimpleUploadedFile("b", b"{}")]}
    response = client.post("/api/v1/models/aurora/m/versions", twice, format="multipart")
    assert response.status_code == 400 and "appears 2 times" in response.json()["error"]["message"]

    bad_weights = {"model.safetensors": SimpleUploadedFile("m", b"\x05\x00\x00\x00\x00\x00\x00\x00{}")}
    response = client.post("/api/v1/models/aurora/m/versions", bad_weights, format="multipart")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_safetensors"

    response = client.post("/api/v1/models/aurora/m/versions", {}, format="multipart")
    assert response.status_code == 400 and "No files given" in response.json()["error"]["message"]

    response = client.post("/api/v1/models/aurora/bad..name!/versions", _upload_payload(model_folder()), format="multipart")
    assert response.status_code == 404

    response = client.post("/api/v1/models/ghost/m/versions", _upload_payload(model_folder()), format="multipart")
    assert response.status_code == 404 and response.json()["error"]["message"] == "Organization 'ghost' does not exist."
    _nothing_written(stored_files, events_before)


def test_same_upload_twice_is_a_409(aurora, alice, client_for, model_folder, stored_files):
    client = client_for(alice, scopes=["write"])
    folder = model_folder()
    assert client.post("/api/v1/models/aurora/m/versions", _upload_payload(folder), format="multipart").status_code == 202
    files_after_first = stored_files()
    response = client.post("/api/v1/models/aurora/m/versions", _upload_payload(folder), format="multipart")
    assert response.status_code == 409 and response.json()["error"]["code"] == "duplicate_version"
    assert ModelVersion.objects.count() == 1
    assert stored_files() == files_after_first


def test_record_compute_through_the_api(aurora, alice, bob, client_for, register):
    version = register(aurora, "m", alice)
    url = "/api/v1/models/aurora/m/compute"
    denied = client_for(bob, scopes=["write"]).post(url, {"hardware": "H100-SXM", "flops": 1e25}, format="json")
    assert denied.status_code == 403
    assert ComputeRecord.objects.count() == 0
    bad = client_for(alice, scopes=["write"]).post(url, {"hardware": "H100-SXM", "flops": -5}, format="json")
    assert bad.status_code == 400 and bad.json()["error"]["fields"] == {"flops": ["Ensure this value is greater than or equal to 0."]}
    assert ComputeRecord.objects.count() == 0
    ok = client_for(alice, scopes=["write"]).post(url, {"hardware": "H100-SXM", "flops": 2e25, "device_count": 8},
                                                   format="json")
    assert ok.status_code == 201 and ok.json()["flops"] == 2e25
    version.refresh_from_db()
    assert version.cumulative_flops == 2e25
    assert client_for(None).get(url).json()["designations"] == ["eu-gpai", "eu-systemic-risk"]


def test_record_evaluations_and_risk_assessments(aurora, alice, bob, client_for, register):
    register(aurora, "m", alice)
    Benchmark.objects.create(key="mmlu", name="MMLU")
    writer = client_for(alice, scopes=["write"])
    evals = "/api/v1/models/aurora/m/evaluations"
    assert writer.post(evals, {"benchmark": "nope", "metric": "acc", "value": 0.5}, format="json").status_code == 400
    response = writer.post(evals, {"benchmark": "mmlu", "metric": "acc", "value": 0.7, "stderr": 0.01,
                                   "evaluator": "METR", "evaluator_kind": "third-party"}, format="json")
    assert response.status_code == 201 and response.json()["evaluator_kind"] == "third-party"
    duplicate = writer.post(evals, {"benchmark": "mmlu", "metric": "acc", "value": 0.8, "evaluator": "METR"}, format="json")
    assert duplicate.status_code == 409
    assert EvaluationResult.objects.count() == 1

    risks = "/api/v1/models/aurora/m/risk-assessments"
    bad = writer.post(risks, {"framework": "openai-preparedness", "domain": "cybersecurity", "threshold": "extreme",
                              "outcome": "below", "mitigation": "pre", "evaluator": "red team"}, format="json")
    assert bad.status_code == 400 and "No such framework/domain/threshold" in bad.json()["error"]["message"]
    denied = client_for(bob, scopes=["write"]).post(risks, {
        "framework": "openai-preparedness", "domain": "cybersecurity", "threshold": "high", "outcome": "below",
        "mitigation": "pre", "evaluator": "red team"}, format="json")
    assert denied.status_code == 403
    assert RiskAssessment.objects.count() == 0
    ok = writer.post(risks, {"framework": "openai-preparedness", "domain": "cybersecurity", "threshold": "high",
                             "outcome": "cannot_rule_out", "mitigation": "post", "evaluator": "red team",
                             "elicitation": "agentic scaffold"}, format="json")
    assert ok.status_code == 201
    listed = client_for(None).get(risks).json()["results"]
    assert [(r["framework"], r["domain"], r["threshold"], r["outcome"]) for r in listed] == [
        ("openai-preparedness@2", "cybersecurity", "high", "cannot_rule_out")]


def test_datasets_api(aurora, alice, carol, client_for):
    writer = client_for(alice, scopes=["write"])
    payload = {"organization": "aurora", "name": "web-2025", "provenance": "web-scraped", "licenses": ["cc-by-4.0"],
               "motivation": "m", "composition": "c", "collection": "c", "preprocessing": "p", "uses": "u",
               "distribution": "d", "maintenance": "m"}
    assert client_for(None).post("/api/v1/datasets", payload, format="json").status_code == 401
    assert client_for(carol, scopes=["write"]).post("/api/v1/datasets", payload, format="json").status_code == 403
    assert writer.post("/api/v1/datasets", payload | {"provenance": "found-it"}, format="json").status_code == 400
    assert writer.post("/api/v1/datasets", payload | {"licenses": ["wtfpl"]}, format="json").status_code == 400
    assert Dataset.objects.count() == 0
    created = writer.post("/api/v1/datasets", payload, format="json")
    assert created.status_code == 201 and created.json()["datasheet_complete"] is True
    assert writer.post("/api/v1/datasets", payload, format="json").status_code == 409
    version = writer.post("/api/v1/datasets/aurora/web-2025/versions",
                          {"version": "v1", "documents": 10, "tokens": 1000, "exact_duplicate_rate": 0.1,
                           "personal_data_found": {"email": 2}}, format="json")
    assert version.status_code == 201
    bad = writer.post("/api/v1/datasets/aurora/web-2025/versions", {"version": "v2", "exact_duplicate_rate": 1.5},
                      format="json")
    assert bad.status_code == 400
    assert DatasetVersion.objects.count() == 1
    detail = client_for(None).get("/api/v1/datasets/aurora/web-2025").json()
    assert detail["licenses"] == ["cc-by-4.0"] and detail["versions"][0]["personal_data_found"] == {"email": 2}


def test_dataset_link_from_card(aurora, alice, client_for, register):
    Dataset.objects.create(organization=aurora, name="corpus", provenance="synthetic")
    register(aurora, "m", alice, metadata={"datasets": ["aurora/corpus"]})
    datasets = client_for(None).get("/api/v1/models/aurora/m/datasets").json()
    assert [d["id"] for d in datasets] == ["aurora/corpus"]
    assert client_for(None).get("/api/v1/models/aurora/m").json()["datasets"][0]["id"] == "aurora/corpus"


def test_an_invalid_model_name_is_a_400_not_a_500(aurora, alice, client_for, model_folder, stored_files):
    client = client_for(alice, scopes=["write"])
    events_before = AuditEvent.objects.count()
    response = client.post("/api/v1/models/aurora/trailing-/versions",
                                                        _upload_payload(model_folder()), format="multipart")
    assert response.status_code == 400
    assert response.json()["error"]["fields"]["name"][0].startswith("Use letters, digits")
    _nothing_written(stored_files, events_before)


def test_the_card_stays_editable_but_not_its_facts(aurora, alice, bob, client_for, register, client):
    register(aurora, "m", alice, metadata={"license": "mit"}, body="# Generated card\n")
    url = "/api/v1/models/aurora/m/card"
    edited = "---\nlicense: mit\n---\n# Edited by a human\n\nNow with a limitations section.\n"
    assert client_for(bob, scopes=["write"]).put(url, {"card": edited}, format="json").status_code == 403
    lying = client_for(alice, scopes=["write"]).put(url, {"card": "---\nlicense: apache-2.0\n---\n# x\n"}, format="json")
    assert lying.status_code == 400 and "recorded under mit" in lying.json()["error"]["message"]
    assert client_for(None).get("/api/v1/models/aurora/m").json()["card_edited"] is False
    response = client_for(alice, scopes=["write"]).put(url, {"card": edited}, format="json")
    assert response.status_code == 200
    assert response.json()["card"] == edited and response.json()["card_edited"] is True
    assert "Edited by a human" in client.get("/aurora/m").content.decode()
    restored = client_for(alice, scopes=["write"]).put(url, {"card": ""}, format="json").json()
    assert restored["card_edited"] is False and "Generated card" in restored["card"]
