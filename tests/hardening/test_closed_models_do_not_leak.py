"""Issue 10's authorization matrix, first part: every route comes from the URL configuration and must be
classified here (a route added without an entry fails), and on every route that names a model, an outsider —
anonymous, or with a token holding every scope — gets exactly the same answer for a closed model as for one
that does not exist: same status, same body once the names are swapped. Nothing tells them it exists."""
import re

import pytest
from django.test import Client
from django.urls import URLResolver, get_resolver

# Every route by name: "model" routes are probed below; the rest are named so that a new route is a decision.
MATRIX = {
    "model": {
        "model-detail", "model-card", "version-list", "version-detail", "model-files", "model-compute",
        "model-evaluations", "model-risk-assessments", "model-datasets", "model-lineage", "model-evaluations-import",
        "model-releases", "model-release-checks", "model-downgrade", "model-follow", "model-access-requests",
        "model-access-grants", "model-access-policy", "release-downgrade", "model-playground", "openai-model",
        "hub-model-info", "hub-model-info-revision", "hub-tree", "hub-tree-path", "hub-refs", "hub-access-handle",
        "hub-access-grant", "hub-access-list", "hub-resolve", "web-access-request", "web-model-detail",
    },
    "listing": {"model-list", "openai-models", "hub-model-index", "web-model-list"},  # probed by search below
    "generation": {"openai-completions", "openai-chat-completions"},  # the model is in the body: probed below
    "by-id": {  # objects named by number: visibility checked per object in their own tests
        "training-run-detail", "training-run-cancel", "training-run-metrics", "training-run-logs", "token-detail",
        "webhook-deliveries", "release-request-detail", "release-request-submit", "release-request-withdraw",
        "release-request-decide", "access-request-decide", "access-grant-revoke", "release-decide", "access-decide",
    },
    "organization-or-dataset": {"dataset-detail", "dataset-versions", "webhook-list", "web-organization",
                                "web-dataset-detail"},
    "no-model-data": {
        "healthz", "readyz", "metrics", "api-schema", "api-docs", "dataset-list", "license-list", "license-detail",
        "benchmark-list", "risk-framework-list", "training-run-list", "designation-threshold-list", "me",
        "token-list", "release-request-list", "my-access-requests", "release-queue", "access-queue", "my-usage",
        "hub-whoami", "login", "logout", "web-tokens", "web-profile", "web-dataset-list", "web-license-list",
    },
}
SAMPLES = {"revision": "main", "commit": "0" * 40, "path": "model.safetensors", "status": "pending"}
METHODS = ("get", "head", "post", "put", "patch", "delete")


def _routes():
    def walk(patterns, prefix=""):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                yield from walk(pattern.url_patterns, prefix + str(pattern.pattern))
            elif pattern.name:
                yield pattern.name, prefix + str(pattern.pattern)
    return {name: route for name, route in walk(get_resolver().url_patterns) if not route.startswith("admin/")}


def test_every_route_is_in_the_matrix():
    routes = set(_routes())
    classified = set().union(*MATRIX.values())
    assert sorted(routes - classified) == [], "classify the new route(s) in MATRIX"
    assert sorted(classified - routes) == [], "remove routes that no longer exist from MATRIX"


def _url(route: str, repo: str) -> str:
    org, name = repo.split("/")
    url = route.replace("<seg:org>", org).replace("<seg:name>", name).replace("<path:model_id>", repo)
    return "/" + re.sub(r"<\w+:(\w+)>", lambda m: SAMPLES[m.group(1)], url)


def _normalised(response, name: str) -> tuple[int, str]:
    body = b"" if response.status_code in (301, 302) else (
        b"".join(response.streaming_content) if response.streaming else response.content)
    text = body.decode(errors="replace").replace(name, "NAME")
    text = re.sub(r"csrfmiddlewaretoken\" value=\"[^\"]+|[0-9a-f]{32}", "X", text)  # per-request tokens and ids
    return response.status_code, text


@pytest.fixture
def closed_model(register, aurora, alice):
    return register(aurora, "secret", alice, tier="closed").model


@pytest.mark.parametrize("who", ["anonymous", "outsider with every scope", "signed-in outsider"])
def test_closed_models_answer_exactly_like_missing_ones_on_every_model_route(closed_model, carol, token_for, who):
    routes = _routes()
    client = Client()
    headers = {}
    if who == "outsider with every scope":
        headers["HTTP_AUTHORIZATION"] = "Bearer " + token_for(carol, ("read", "gated-read", "inference", "write", "admin"))
    elif who == "signed-in outsider":
        client.force_login(carol)
    checked = 0
    for name in sorted(MATRIX["model"]):
        for method in METHODS:
            answers = []
            for repo in ("aurora/secret", "aurora/nosuch"):
                response = getattr(client, method)(_url(routes[name], repo), **headers)
                answers.append(_normalised(response, repo.split("/")[1]))
            assert answers[0] == answers[1], (name, method, answers[0][0], answers[1][0])
            checked += 1
    assert checked == len(MATRIX["model"]) * len(METHODS)


def test_closed_models_are_absent_from_every_listing_and_from_generation(closed_model, carol, token_for):
    token = token_for(carol, ("read", "gated-read", "inference", "write", "admin"))
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    for url in ("/api/v1/models?q=secret", "/api/models?search=secret", "/v1/models", "/?q=secret",
                "/api/v1/models?organization=aurora", "/orgs/aurora"):
        assert "aurora/secret" not in client.get(url).content.decode(), url
    counts = [client.get(f"/api/v1/models?q={q}").json()["count"] for q in ("secret", "nosuch")]
    assert counts == [0, 0]  # not even as a number
    for endpoint in ("/v1/completions", "/v1/chat/completions"):
        answers = [client.post(endpoint, {"model": repo, "prompt": "x", "messages": [{"role": "user", "content": "x"}]},
                               content_type="application/json") for repo in ("aurora/secret", "aurora/nosuch")]
        assert [a.status_code for a in answers] == [404, 404]
        assert answers[0].json()["error"]["message"].replace("secret", "N") == \
            answers[1].json()["error"]["message"].replace("nosuch", "N")


def test_the_probe_tells_an_existing_model_from_a_missing_one(register, aurora, alice, carol, token_for):
    """The comparison above is not vacuous: for a model the outsider may see, most routes answer differently."""
    register(aurora, "visible", alice, tier="open")
    routes = _routes()
    client = Client(HTTP_AUTHORIZATION="Bearer " + token_for(carol, ("read", "gated-read", "inference")))
    differing = {name for name in MATRIX["model"]
                 if _normalised(client.get(_url(routes[name], "aurora/visible")), "visible")
                 != _normalised(client.get(_url(routes[name], "aurora/nosuch")), "nosuch")}
    assert len(differing) >= 20, sorted(MATRIX["model"] - differing)  # of 32
