import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from gatehouse.registry.models import Benchmark, Model, ModelVersion
from gatehouse.registry.services.compute import compute_record_create
from gatehouse.registry.services.records import evaluation_result_record


@pytest.fixture
def catalog(aurora, northwind, alice, carol, register):
    """aurora/open-m (open), aurora/api-m (api), aurora/secret (closed), northwind/breeze (open, cc-by-nc)."""
    versions = {
        "open": register(aurora, "open-m", alice, tier="open", metadata={"license": "apache-2.0", "pipeline_tag": "text-generation"}),
        "api": register(aurora, "api-m", alice, tier="api", metadata={"license": "apache-2.0", "pipeline_tag": "text-generation"}),
        "closed": register(aurora, "secret", alice, tier="closed", metadata={"license": "mit"}),
        "breeze": register(northwind, "breeze", carol, tier="open", metadata={"license": "cc-by-nc-4.0", "pipeline_tag": "fill-mask"}),
    }
    compute_record_create(version=versions["open"], actor=alice, hardware="H100-SXM", flops=2e25)
    return versions


def _ids(response):
    assert response.status_code == 200, response.content
    return sorted(item["id"] for item in response.json()["results"])


def test_closed_models_are_invisible_to_outsiders_and_anonymous(catalog, bob, carol, client_for):
    public = ["aurora/api-m", "aurora/open-m", "northwind/breeze"]
    assert _ids(client_for(None).get("/api/v1/models")) == public
    assert _ids(client_for(carol).get("/api/v1/models")) == public
    assert _ids(client_for(bob).get("/api/v1/models")) == sorted(public + ["aurora/secret"])
    for client in (client_for(None), client_for(carol)):
        response = client.get("/api/v1/models/aurora/secret")
        assert response.status_code == 404
        assert response.json() == {"error": {"status": 404, "code": "not_found",
                                             "message": "Model aurora/secret does not exist or you do not have access to it."}}
        for sub in ("versions", "files", "compute", "evaluations", "risk-assessments", "datasets", "lineage"):
            assert client.get(f"/api/v1/models/aurora/secret/{sub}").status_code == 404
    assert client_for(bob).get("/api/v1/models/aurora/secret").status_code == 200


@pytest.mark.parametrize("query, expected", [
    ("q=breeze", ["northwind/breeze"]),
    ("q=aurora open", ["aurora/open-m"]),
    ("license=cc-by-nc-4.0", ["northwind/breeze"]),
    ("tier=api", ["aurora/api-m"]),
    ("task=fill-mask", ["northwind/breeze"]),
    ("organization=aurora", ["aurora/api-m", "aurora/open-m"]),
    ("designation=eu-systemic-risk", ["aurora/open-m"]),
    ("designation=ca-frontier", []),
    ("designation=no-such-designation", []),
])
def test_list_filters(catalog, client_for, query, expected):
    assert _ids(client_for(None).get(f"/api/v1/models?{query}")) == expected


def test_list_item_shape(catalog, client_for):
    item = next(i for i in client_for(None).get("/api/v1/models").json()["results"] if i["id"] == "aurora/open-m")
    version = catalog["open"]
    assert item["tier"] == "open" and item["license"] == "apache-2.0" and item["task"] == "text-generation"
    assert item["designations"] == ["eu-gpai", "eu-systemic-risk"]
    assert item["latest_version"]["commit"] == version.commit
    assert item["latest_version"]["cumulative_flops"] == 2e25
    assert item["latest_version"]["parameters"] == version.parameters


def test_bad_list_input_gets_400(catalog, client_for):
    response = client_for(None).get("/api/v1/models?tier=public")
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "tier must be one of closed, api, open."
    assert client_for(None).get("/api/v1/models?page=999").status_code == 404
    assert client_for(None).get("/api/v1/models?page=abc").status_code == 404


def test_pagination(catalog, client_for):
    body = client_for(None).get("/api/v1/models?page_size=2").json()
    assert body["count"] == 3 and len(body["results"]) == 2 and body["next"].endswith("page=2&page_size=2")
    assert len(client_for(None).get("/api/v1/models?page_size=500").json()["results"]) == 3  # capped at 100


def _count_queries(client, url):
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200
    return len(ctx.captured_queries), response


def test_list_uses_a_constant_number_of_queries(aurora, alice, bob, register, token_for):
    register(aurora, "m0", alice, tier="closed")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(bob)}")
    client.get("/api/v1/models")  # first use records last_used_at; measure steady state
    few, response = _count_queries(client, "/api/v1/models?page_size=100")
    assert response.json()["count"] == 1
    versions = list(ModelVersion.objects.filter(model__name="m0"))
    for n in range(1, 30):  # clone rows cheaply: the query count must not depend on the page size
        model = Model.objects.create(organization=aurora, name=f"m{n}", tier="open" if n % 2 else "closed")
        version = ModelVersion.objects.create(model=model, commit=f"{n:040x}", status="verified",
                                              verified_at=versions[0].verified_at, parameters=10)
        Model.objects.filter(pk=model.pk).update(latest_version=version)
    many, response = _count_queries(client, "/api/v1/models?page_size=100")
    assert response.json()["count"] == 30
    assert many == few == 4  # token, count, page, thresholds


def test_detail(catalog, client_for):
    body = client_for(None).get("/api/v1/models/aurora/open-m").json()
    assert body["id"] == "aurora/open-m"
    assert body["license"]["key"] == "apache-2.0"
    assert body["refs"] == [{"name": "main", "kind": "branch", "commit": catalog["open"].commit,
                             "updated_at": body["refs"][0]["updated_at"]}]
    assert body["card"].startswith("---\n")
    assert body["designations"] == ["eu-gpai", "eu-systemic-risk"]


def test_versions_files_and_revisions(aurora, alice, carol, register, client_for):
    first = register(aurora, "m", alice)
    second = register(aurora, "m", alice, seed=99)
    pending = register(aurora, "m", alice, seed=100, verify=False)
    outsider = client_for(carol)
    commits = [v["commit"] for v in outsider.get("/api/v1/models/aurora/m/versions").json()["results"]]
    assert commits == [second.commit, first.commit]  # outsiders never see unverified versions
    member_commits = [v["commit"] for v in client_for(alice).get("/api/v1/models/aurora/m/versions").json()["results"]]
    assert member_commits == [pending.commit, second.commit, first.commit]

    detail = outsider.get(f"/api/v1/models/aurora/m/versions/{first.commit}").json()
    assert [f["path"] for f in detail["files"]] == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert outsider.get(f"/api/v1/models/aurora/m/versions/{pending.commit}").status_code == 404

    main_files = outsider.get("/api/v1/models/aurora/m/files").json()["results"]
    old_files = outsider.get(f"/api/v1/models/aurora/m/files?revision={first.commit}").json()["results"]
    weights = lambda files: next(f["sha256"] for f in files if f["path"] == "model.safetensors")  # noqa: E731
    assert weights(main_files) == second.files.get(path="model.safetensors").sha256
    assert weights(old_files) == first.files.get(path="model.safetensors").sha256
    response = outsider.get("/api/v1/models/aurora/m/files?revision=nope")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Revision 'nope' of aurora/m does not exist or is not verified yet."


def test_compute_evaluations_and_lineage_endpoints(aurora, alice, register, client_for):
    base = register(aurora, "base", alice)
    child = register(aurora, "child", alice, metadata={"base_model": "aurora/base"})
    compute_record_create(version=base, actor=alice, hardware="H100-SXM", flops=4e24)
    compute_record_create(version=child, actor=alice, hardware="H100-SXM", flops=7e24)
    bench = Benchmark.objects.create(key="mmlu", name="MMLU")
    evaluation_result_record(version=child, actor=alice, benchmark=bench, metric="acc", value=0.61, stderr=0.01)
    anon = client_for(None)
    compute = anon.get("/api/v1/models/aurora/child/compute").json()
    assert compute["own_flops"] == 7e24 and compute["cumulative_flops"] == pytest.approx(1.1e25)
    assert compute["designations"] == ["eu-gpai", "eu-systemic-risk"]
    assert [r["flops"] for r in compute["records"]] == [7e24]
    evals = anon.get("/api/v1/models/aurora/child/evaluations").json()["results"]
    assert [(e["benchmark"], e["metric"], e["value"], e["stderr"]) for e in evals] == [("mmlu", "acc", 0.61, 0.01)]
    lineage = anon.get("/api/v1/models/aurora/child/lineage").json()
    assert lineage["ancestors"] == [{"model": "aurora/base", "commit": base.commit, "relation": "finetune",
                                     "own_flops": 4e24, "cumulative_flops": 4e24}]
    assert anon.get("/api/v1/models/aurora/base/lineage").json()["derivatives"] == [
        {"model": "aurora/child", "relation": "finetune"}]


def test_lineage_hides_closed_ancestors_from_outsiders_but_counts_their_compute(aurora, alice, bob, carol, register,
                                                                                  client_for):
    base = register(aurora, "secret-base", alice, tier="closed")
    compute_record_create(version=base, actor=alice, hardware="H100-SXM", flops=5e24)
    register(aurora, "public-child", alice, tier="open", metadata={"base_model": "aurora/secret-base"})
    lineage = client_for(carol).get("/api/v1/models/aurora/public-child/lineage").json()
    assert [(a["model"], a["commit"], a["cumulative_flops"]) for a in lineage["ancestors"]] == [(None, None, 5e24)]
    assert lineage["cumulative_flops"] == 5e24
    member_view = client_for(bob).get("/api/v1/models/aurora/public-child/lineage").json()
    assert [a["model"] for a in member_view["ancestors"]] == ["aurora/secret-base"]


def test_reference_endpoints(db, client_for):
    anon = client_for(None)
    frameworks = anon.get("/api/v1/risk-frameworks").json()
    assert [(f["key"], f["version"]) for f in frameworks] == [
        ("anthropic-rsp", "2.2"), ("gdm-fsf", "3"), ("openai-preparedness", "2")]
    openai = next(f for f in frameworks if f["key"] == "openai-preparedness")
    tracked = [d["key"] for d in openai["domains"] if d["category"] == "tracked"]
    assert tracked == ["ai-self-improvement", "biological-chemical", "cybersecurity"]
    assert [t["key"] for t in openai["domains"][0]["thresholds"]] == ["high", "critical"]
    assert [t["key"] for t in anon.get("/api/v1/designation-thresholds").json()] == ["eu-gpai", "eu-systemic-risk", "ca-frontier"]
    licenses = {lic["key"]: lic for lic in anon.get("/api/v1/licenses").json()}
    assert licenses["cc-by-nc-4.0"]["commercial_use"] is False
    assert licenses["llama3.1"]["restrictions_inherited"] is True
    assert anon.get("/api/v1/licenses/mit").json()["osi_approved"] is True
    assert anon.get("/api/v1/licenses/nope").status_code == 404


def test_unknown_api_path_answers_json_404(db, client):
    response = client.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_schema_and_docs_are_served_without_a_cdn(db, client):
    schema = client.get("/api/schema/")
    assert schema.status_code == 200
    assert b"/api/v1/models/{org}/{name}/versions" in schema.content
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "cdn" not in html.lower() and "unpkg" not in html.lower()
    asset = next(part.split('"')[0] for part in html.split('src="')[1:] if "swagger-ui-bundle" in part)
    assert client.get(asset).status_code == 200


def test_a_token_without_read_scope_cannot_read(catalog, alice, client_for):
    response = client_for(alice, scopes=["inference"]).get("/api/v1/models")
    assert response.status_code == 403
    assert response.json()["error"] == {"status": 403, "code": "missing_scope",
                                        "message": "This token lacks the 'read' scope; create a token with --scopes read."}


def test_openapi_schema_is_valid_and_warning_free(db, tmp_path):
    from django.core.management import call_command

    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))
    assert "/api/v1/models/{org}/{name}/risk-assessments" in (tmp_path / "schema.yaml").read_text()


def test_tags_resolve_as_revisions(aurora, alice, register, client_for):
    from gatehouse.core.errors import InvalidInput
    from gatehouse.registry.services.versions import model_ref_set

    first = register(aurora, "m", alice)
    register(aurora, "m", alice, seed=42)
    model_ref_set(model=first.model, name="v1.0", version=first, actor=alice)
    with pytest.raises(InvalidInput, match="'main' always points at the newest verified version"):
        model_ref_set(model=first.model, name="main", version=first, actor=alice)
    compute = client_for(None).get("/api/v1/models/aurora/m/compute?revision=v1.0").json()
    assert compute["commit"] == first.commit
    refs = {r["name"]: r["commit"] for r in client_for(None).get("/api/v1/models/aurora/m").json()["refs"]}
    assert refs["v1.0"] == first.commit and refs["main"] != first.commit


def test_dataset_list_uses_a_constant_number_of_queries(aurora, alice, client_for):
    from gatehouse.registry.models import Dataset, DatasetVersion, License

    client = client_for(None)

    def add(n):
        for i in range(n):
            dataset = Dataset.objects.create(organization=aurora, name=f"d{Dataset.objects.count()}", provenance="synthetic")
            dataset.licenses.set(License.objects.filter(key__in=["mit", "apache-2.0"]))
            DatasetVersion.objects.create(dataset=dataset, version="v1")

    add(2)
    few, _ = _count_queries(client, "/api/v1/datasets")
    add(20)
    many, response = _count_queries(client, "/api/v1/datasets")
    assert response.json()["count"] == 22
    assert few == many == 4  # count, page, licences, versions
