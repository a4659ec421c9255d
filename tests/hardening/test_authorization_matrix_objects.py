"""Issue 10's authorization matrix, third part: the routes that name no model — objects by number (training runs,
release and access requests, grants, tokens, webhook endpoints), organizations and datasets, and the lists and
pages every signed-in person has — for each persona of the model matrix, with the same answer classes (ok, bad,
refused, hidden). Tiers do not apply here; the objects belong to aurora (alice is its admin). Writes send an
empty body where the route parses before it authorizes (the house order: parse, authorize, call one service),
so an allowed caller gets "bad" (400) and anything else is the gate. Every classified route must have rules.
"""
import pytest
from django.db import transaction
from django.test import Client

from gatehouse.accounts.models import ApiToken
from gatehouse.registry.models import Dataset, TrainingRun
from gatehouse.webhooks.models import WebhookEndpoint
from releases.models import AccessGrant, AccessRequest
from releases.services import release_request_create

from .test_authorization_matrix import MEMBERS, PERSONAS, WRITERS, _class, world  # noqa: F401  (fixture)
from .test_closed_models_do_not_leak import MATRIX, _routes

SIGNED_IN = MEMBERS | {"outsider", "approved", "revoked"}
# Pages for browsers: a session, and the login page for anonymous visitors (a redirect, "ok" by class).
WEB = {"access-queue", "my-usage", "release-queue", "web-profile", "web-tokens", "web-dataset-detail",
       "web-dataset-list", "web-license-list", "web-organization", "login"}


def everyone(relation: str) -> str:
    return "ok"


def signed_in(relation: str) -> str:
    return "refused" if relation == "anonymous" else "ok"


def signed_in_page(relation: str) -> str:
    return "login" if relation == "anonymous" else "ok"


def only(allowed: set, *, others: str = "refused", anonymous: str = "refused", when_allowed: str = "ok"):
    def rule(relation: str) -> str:
        if relation == "anonymous":
            return anonymous
        return when_allowed if relation in allowed else others
    return rule


def members_then(allowed: set, *, when_allowed: str = "ok"):
    """Objects of aurora: outsiders may not know they exist; members who may not act are refused."""
    def rule(relation: str) -> str:
        if relation == "anonymous":
            return "refused"
        if relation not in MEMBERS:
            return "hidden"
        return when_allowed if relation in allowed else "refused"
    return rule


APPROVERS = {"admin", "superuser"}
RULES = {
    **{(name, "get"): everyone for name in (
        "api-docs", "api-schema", "benchmark-list", "dataset-detail", "dataset-list", "designation-threshold-list",
        "license-detail", "license-list", "risk-framework-list", "healthz", "readyz", "metrics", "login",
        "web-dataset-detail", "web-dataset-list", "web-license-list", "web-organization")},
    **{(name, "get"): signed_in for name in (
        "me", "hub-whoami", "my-access-requests", "release-request-list", "training-run-list", "token-list")},
    **{(name, "get"): signed_in_page for name in ("access-queue", "my-usage", "release-queue", "web-profile",
                                                  "web-tokens")},
    # Creation routes parse first: a signed-in caller with the scope gets the body's 400.
    **{(name, "post"): (lambda r: "refused" if r == "anonymous" else "bad") for name in (
        "dataset-list", "token-list", "training-run-list", "release-request-list")},
    ("web-tokens", "post"): lambda r: "login" if r == "anonymous" else "bad",
    ("dataset-versions", "post"): lambda r: "refused" if r == "anonymous" else "bad",
    ("logout", "post"): everyone,
    ("login", "post"): everyone,  # the form answers, with its own throttling (test_abuse_controls)
    ("training-run-detail", "get"): lambda r: "hidden" if r not in MEMBERS else "ok",
    ("training-run-logs", "get"): lambda r: "hidden" if r not in MEMBERS else "ok",
    ("training-run-metrics", "get"): lambda r: "hidden" if r not in MEMBERS else "ok",
    ("training-run-cancel", "post"): members_then(WRITERS),
    ("release-request-detail", "get"): members_then(MEMBERS),
    ("release-request-submit", "post"): members_then(WRITERS, when_allowed="bad"),  # the draft lacks assessments
    ("release-request-withdraw", "post"): members_then(WRITERS),
    ("release-request-decide", "post"): lambda r: "refused" if r == "anonymous" else "bad",  # parses first
    ("access-request-decide", "post"): lambda r: "refused" if r == "anonymous" else "bad",  # parses first
    ("access-grant-revoke", "post"): lambda r: ("refused" if r == "anonymous" else "bad" if r in WRITERS
                                                else "hidden"),  # a grant is shown only to its reviewers
    ("token-detail", "delete"): only({"admin"}, others="hidden"),  # alice's own token
    ("webhook-list", "get"): only(APPROVERS),
    ("webhook-list", "post"): only(APPROVERS, when_allowed="bad"),
    ("webhook-deliveries", "get"): only(APPROVERS),
    # Browser forms post and redirect back with a message whatever the outcome (tested in test_access / workflow).
    ("release-decide", "post"): everyone,
    ("access-decide", "post"): everyone,
}


@pytest.fixture
def objects(world):
    users, models = world["users"], world["models"]
    alice, aurora = users["admin"], models["open"].organization
    draft = release_request_create(version=models["closed"].latest_version, actor=alice,
                                   stages=[{"tier": "api", "after_days": 0}])
    Dataset.objects.create(organization=aurora, name="corpus", provenance="licensed")
    return {
        "run_id": TrainingRun.objects.create(organization=aurora, model_name="run-x", created_by=alice).pk,
        "endpoint_id": WebhookEndpoint.objects.create(organization=aurora, url="https://example.com/h", secret="s").pk,
        "release_request_id": draft.pk,
        "access_request_id": AccessRequest.objects.get(model=models["gated"], user=users["requester"]).pk,
        "grant_id": AccessGrant.objects.get(model=models["gated"], user=users["approved"]).pk,
        "token_id": ApiToken.objects.filter(user=alice).first().pk,
    }


def _url(name: str, route: str, ids: dict) -> str:
    request_id = ids["access_request_id"] if name in ("access-request-decide", "access-decide") \
        else ids["release_request_id"]
    url = (route.replace("<seg:org>", "aurora").replace("<seg:name>", "corpus").replace("<str:key>", "mit")
           .replace("<int:request_id>", str(request_id)))
    for key, value in ids.items():
        url = url.replace(f"<int:{key}>", str(value))
    return "/" + url


def test_every_other_route_has_rules():
    other = MATRIX["by-id"] | MATRIX["organization-or-dataset"] | MATRIX["no-model-data"]
    assert sorted(other - {name for name, _ in RULES}) == [], "give the new route its rules in RULES"


def test_each_persona_gets_what_the_rules_say_on_every_other_route(world, objects):
    """Tokens hold every scope, so that these rules are about who one is; scopes have their own test below."""
    from gatehouse.accounts.services import api_token_create

    routes, wrong = _routes(), []
    tokens = {p.relation: world["tokens"][p.name] for p in PERSONAS if p.relation not in ("anonymous", "outsider")}
    tokens["outsider"] = api_token_create(user=world["users"]["outsider"], name="all",
                                          scopes=["read", "gated-read", "inference", "write", "admin"]).secret
    for (name, method), rule in sorted(RULES.items()):
        for relation in ("anonymous", "outsider", "approved", "revoked", "member", "maintainer", "admin",
                         "superuser"):
            client, kwargs = Client(), {}
            if relation != "anonymous":
                if name in WEB or name in ("release-decide", "access-decide", "logout"):
                    client.force_login(world["users"][relation])
                else:
                    kwargs["HTTP_AUTHORIZATION"] = f"Bearer {tokens[relation]}"
            with transaction.atomic():
                url = _url(name, routes[name], objects)
                response = (client.get(url, **kwargs) if method == "get"
                            else getattr(client, method)(url, "{}", content_type="application/json", **kwargs))
                transaction.set_rollback(True)
            answer = _class(response.status_code)
            if rule(relation) == "login":  # a redirect to the login page, nothing else
                answer = "login" if response.status_code == 302 and "/accounts/login/" in response["Location"] \
                    else answer
            if answer != rule(relation):
                wrong.append(f"{method.upper()} {name} as {relation}: {response.status_code}, expected {rule(relation)}")
    assert wrong == [], "\n".join(wrong)


def test_a_token_without_the_scope_is_refused_before_anything_else(world, objects):
    """A read-only token of aurora's admin cannot write anywhere, and an admin-scope token is needed for tokens
    and webhooks: 403 naming the scope, whatever the object."""
    from gatehouse.accounts.services import api_token_create

    read_only = api_token_create(user=world["users"]["admin"], name="ro", scopes=["read"]).secret
    client = Client(HTTP_AUTHORIZATION=f"Bearer {read_only}")
    routes = _routes()
    for name in ("training-run-cancel", "release-request-withdraw", "access-grant-revoke", "webhook-list",
                 "token-list", "dataset-list"):
        response = client.post(_url(name, routes[name], objects), "{}", content_type="application/json")
        assert response.status_code == 403 and "scope" in response.json()["error"]["message"], name
    assert client.get(_url("webhook-list", routes["webhook-list"], objects)).status_code == 403
