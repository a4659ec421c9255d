import pytest

from gatehouse.audit.models import AuditEvent
from gatehouse.registry.models import Dataset, DatasetVersion, EvaluationResult, License, TrainingRun


@pytest.fixture
def stdlib(aurora):
    dataset = Dataset.objects.create(organization=aurora, name="stdlib", provenance="licensed")
    dataset.licenses.set(License.objects.filter(key="PSF-2.0"))
    return DatasetVersion.objects.create(dataset=dataset, version="3.11", source_uri="builtin:python-stdlib")


PAYLOAD = {"organization": "aurora", "model": "coder", "preset": "debug", "max_steps": 50,
           "datasets": [{"dataset": "aurora/stdlib", "weight": 1.0}], "options": {"seq_len": 64}}


def test_launch_returns_the_estimate_and_members_follow_it(aurora, alice, bob, stdlib, client_for,
                                                           django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as queued:
        response = client_for(alice, scopes=["write"]).post("/api/v1/training-runs", PAYLOAD, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert len(queued) == 1
    assert body["status"] == "queued" and body["model"] == "aurora/coder" and body["total_steps"] == 50
    assert body["datasets"] == [{"dataset": "aurora/stdlib", "version": "3.11", "weight": 1.0}]
    assert body["estimated_flops"] > 0 and body["expected_designations"] == []
    assert response["Location"] == f"/api/v1/training-runs/{body['id']}"
    teammate = client_for(bob)
    assert teammate.get(f"/api/v1/training-runs/{body['id']}").json()["id"] == body["id"]
    assert [r["id"] for r in teammate.get("/api/v1/training-runs").json()["results"]] == [body["id"]]
    assert teammate.get(f"/api/v1/training-runs/{body['id']}/metrics").json() == {
        "run": body["id"], "status": "queued", "steps": [], "evals": []}
    assert teammate.get(f"/api/v1/training-runs/{body['id']}/logs").json()["log"] == ""


def test_token_budget_sets_the_steps(aurora, alice, stdlib, client_for):
    payload = {**PAYLOAD, "token_budget": 64 * 8 * 10 + 1}
    del payload["max_steps"]
    body = client_for(alice, scopes=["write"]).post("/api/v1/training-runs", payload, format="json").json()
    assert body["total_steps"] == 11


def test_outsiders_see_no_runs_and_cannot_launch(aurora, alice, carol, stdlib, client_for):
    run_id = client_for(alice, scopes=["write"]).post("/api/v1/training-runs", PAYLOAD, format="json").json()["id"]
    outsider = client_for(carol, scopes=["read", "write"])
    assert outsider.get(f"/api/v1/training-runs/{run_id}").status_code == 404
    assert outsider.get(f"/api/v1/training-runs/{run_id}/metrics").status_code == 404
    assert outsider.get("/api/v1/training-runs").json()["results"] == []
    assert outsider.post(f"/api/v1/training-runs/{run_id}/cancel").status_code == 404
    assert client_for(None).get("/api/v1/training-runs").status_code == 401
    assert outsider.post("/api/v1/training-runs", PAYLOAD, format="json").status_code == 403
    assert client_for(alice, scopes=["read"]).post("/api/v1/training-runs", PAYLOAD, format="json").status_code == 403
    assert TrainingRun.objects.count() == 1


@pytest.mark.parametrize("change, message", [
    ({"datasets": [{"dataset": "aurora/nothing"}]}, "Dataset aurora/nothing does not exist or has no versions"),
    ({"datasets": [{"dataset": "aurora/stdlib", "version": "9"}]}, "has no version '9'"),
    ({"organization": "ghost"}, "Unknown organization 'ghost'"),
    ({"method": "lora"}, "Method lora adapts an existing model"),
    ({"options": {"seq_len": "long"}}, "batch_size, seq_len and grad_accum must be positive integers"),
    ({"options": {"lr": [1]}}, "Training option lr must be a float"),
    ({"max_steps": 0}, "max_steps: Ensure this value is greater than or equal to 1."),
    ({"license": "wtfpl"}, "Unknown licence 'wtfpl'"),
    ({"base": {"model": "aurora/none"}, "method": "lora"}, "Model aurora/none does not exist"),
])
def test_bad_launches_are_400s_or_404s(aurora, alice, stdlib, client_for, change, message):
    response = client_for(alice, scopes=["write"]).post("/api/v1/training-runs", {**PAYLOAD, **change}, format="json")
    assert response.status_code in (400, 404)
    assert message in response.json()["error"]["message"]
    assert TrainingRun.objects.count() == 0


def test_cancel_through_the_api(aurora, alice, stdlib, client_for):
    client = client_for(alice, scopes=["write"])
    run_id = client.post("/api/v1/training-runs", PAYLOAD, format="json").json()["id"]
    response = client.post(f"/api/v1/training-runs/{run_id}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    again = client.post(f"/api/v1/training-runs/{run_id}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]["message"]


LM_EVAL = {
    "results": {
        "hellaswag": {"alias": "hellaswag", "acc,none": 0.5123, "acc_stderr,none": 0.005, "acc_norm,none": 0.61,
                      "acc_norm_stderr,none": 0.0049},
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.12, "exact_match_stderr,strict-match": 0.009,
                  "exact_match,flexible-extract": 0.14, "exact_match_stderr,flexible-extract": "N/A"},
    },
    "n-samples": {"hellaswag": {"original": 10042, "effective": 10042}, "gsm8k": {"original": 1319, "effective": 1319}},
    "versions": {"hellaswag": 1.0, "gsm8k": 3.0},
    "lm_eval_version": "0.4.8",
}


def test_import_lm_evaluation_harness_results(aurora, alice, bob, register, client_for):
    register(aurora, "m", alice)
    url = "/api/v1/models/aurora/m/evaluations/import"
    payload = {"format": "lm-eval", "data": LM_EVAL, "evaluator": "EleutherAI harness", "evaluator_kind": "third-party"}
    assert client_for(bob, scopes=["write"]).post(url, payload, format="json").status_code == 403
    assert EvaluationResult.objects.count() == 0
    response = client_for(alice, scopes=["write"]).post(url, payload, format="json")
    assert response.status_code == 201, response.content
    rows = sorted((r["benchmark"], r["metric"], r["value"], r["stderr"], r["samples"]) for r in response.json())
    assert rows == [("gsm8k", "exact_match (flexible-extract)", 0.14, None, 1319),
                    ("gsm8k", "exact_match (strict-match)", 0.12, 0.009, 1319),
                    ("hellaswag", "acc", 0.5123, 0.005, 10042), ("hellaswag", "acc_norm", 0.61, 0.0049, 10042)]
    assert set(EvaluationResult.objects.values_list("harness", "harness_version", "source", "evaluator_kind")) == {
        ("lm-evaluation-harness", "0.4.8", "lm-eval", "third-party")}
    again = client_for(alice, scopes=["write"]).post(url, payload, format="json")
    assert again.status_code == 201 and EvaluationResult.objects.count() == 4  # re-import updates, never duplicates
    assert AuditEvent.objects.filter(action="evaluation.import").count() == 2


def test_import_model_index_and_bad_files(aurora, alice, register, client_for):
    register(aurora, "m", alice)
    url = "/api/v1/models/aurora/m/evaluations/import"
    client = client_for(alice, scopes=["write"])
    model_index = [{"name": "m", "results": [{"task": {"type": "text-generation"},
                                              "dataset": {"type": "mmlu", "name": "MMLU"},
                                              "metrics": [{"type": "acc", "value": 0.7}],
                                              "source": {"name": "Open LLM Leaderboard", "url": "https://example.org/x"}}]}]
    response = client.post(url, {"format": "model-index", "data": model_index}, format="json")
    assert response.status_code == 201
    assert [(r["benchmark"], r["value"], r["evaluator"], r["evidence_url"]) for r in response.json()] == [
        ("mmlu", 0.7, "Open LLM Leaderboard", "https://example.org/x")]
    bad = client.post(url, {"format": "lm-eval", "data": {"nope": 1}}, format="json")
    assert bad.status_code == 400 and "no 'results' object" in bad.json()["error"]["message"]
    assert EvaluationResult.objects.count() == 1


def test_import_evaluations_command(aurora, alice, register, tmp_path, capsys):
    import json

    from django.core.management import call_command

    register(aurora, "m", alice)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(LM_EVAL))
    call_command("import_evaluations", str(path), "--model", "aurora/m", "--user", "alice", "--format", "lm-eval")
    assert "imported 4 evaluation results into aurora/m@" in capsys.readouterr().out
