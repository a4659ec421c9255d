"""Issue 10's authorization matrix, second part: on every route that names a model, every persona — anonymous,
an outsider holding each token scope alone, a user whose grant was approved, one whose grant was revoked, a
member, a maintainer, an organization admin and a superuser — meets the answer the release rules say, for a
model in each tier (closed, API-only, gated open weights, open weights).

Each probe sends a body the route accepts, so an authorized caller gets a 2xx and anything else is the gate
speaking; each runs in a savepoint rolled back afterwards, so one persona's downgrade or grant does not change
what the next one sees. The answer is compared by class: ok (2xx/3xx), bad (400/409: allowed to ask, but the
state says no), refused (401/403), hidden (404: the caller may not know the model exists). A server error
fails whatever the expectation. Routes are taken from test_closed_models_do_not_leak.MATRIX["model"]; a model
route without rules here fails the test.
"""
import json
from dataclasses import dataclass

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import transaction
from django.test import Client

from gatehouse.accounts.models import Membership, User
from gatehouse.registry.demo import write_model_folder
from gatehouse.registry.models import Benchmark
from gatehouse.registry.services.ingest import files_from_directory, model_version_ingest
from gatehouse.registry.services.versions import model_version_verify
from releases import access
from releases.models import AccessGrant, AccessPolicy, AccessRequest, InferenceBackend

from .test_closed_models_do_not_leak import MATRIX, _routes

SCOPES = ("read", "gated-read", "inference", "write", "admin")
TIERS = ("closed", "api", "gated", "open")
MEMBERS = {"member", "maintainer", "admin", "superuser"}
WRITERS = {"maintainer", "admin", "superuser"}  # register records; review access requests
APPROVERS = {"admin", "superuser"}  # decide releases and downgrades


@dataclass(frozen=True)
class Persona:
    name: str
    relation: str  # anonymous, outsider, approved, revoked, member, maintainer, admin, superuser
    scopes: frozenset = frozenset(SCOPES)


PERSONAS = ([Persona("anonymous", "anonymous", frozenset())]
            + [Persona(f"outsider[{s}]", "outsider", frozenset({s})) for s in SCOPES]
            + [Persona(r, r) for r in ("approved", "revoked", "member", "maintainer", "admin", "superuser")])


def _visible(p: Persona, tier: str) -> bool:
    return tier != "closed" or p.relation in MEMBERS


def _token_read(p: Persona, tier: str, scope: str = "read") -> str:
    """A read through the REST API: a token must hold the scope; anonymous reads what is public."""
    if p.relation != "anonymous" and scope not in p.scopes:
        return "refused"
    return "ok" if _visible(p, tier) else "hidden"


def _token_write(p: Persona, tier: str, scope: str, allowed: set, *, bad_when=lambda p, tier: False) -> str:
    if p.relation == "anonymous" or scope not in p.scopes:
        return "refused"
    if not _visible(p, tier):
        return "hidden"
    if p.relation not in allowed:
        return "refused"
    return "bad" if bad_when(p, tier) else "ok"


def _files(p: Persona, tier: str) -> str:
    """The weights: closed → members; API-only → members (the inference API is the way in); gated → members
    and approved grants (gated-read scope); open → anyone, a token needs read."""
    if not _visible(p, tier):
        return "hidden"
    if p.relation in MEMBERS or tier == "open" and (p.relation == "anonymous" or "read" in p.scopes):
        return "ok"
    if tier == "gated" and p.relation == "approved":
        return "ok"
    return "refused"


def _hub_metadata(p: Persona, tier: str) -> str:
    return "ok" if _visible(p, tier) else "hidden"  # what the Hub shows anyone: names, sizes, the card


def _inference_model(p: Persona, tier: str) -> str:
    if p.relation == "anonymous":
        return "refused"
    if not _visible(p, tier):
        return "hidden"
    if "inference" not in p.scopes:
        return "refused"
    if p.relation in MEMBERS or tier in ("api", "open") or tier == "gated" and p.relation == "approved":
        return "ok"
    return "refused"  # gated: ask for access first (the refusal says where)


def _request_access(p: Persona, tier: str) -> str:
    if p.relation == "anonymous" or "gated-read" not in p.scopes:
        return "refused"
    if not _visible(p, tier):
        return "hidden"
    if tier != "gated" or p.relation in MEMBERS or p.relation == "approved":
        return "bad"  # nothing to request, a member already, or access already granted
    return "ok"


def _not_gated(p: Persona, tier: str) -> bool:
    return tier != "gated"  # grants apply to gated releases only


def _hub_review(p: Persona, tier: str, *, bad_when=lambda p, tier: False) -> str:
    """The Hub's review routes: a token (never a session), the model looked up first, then write or admin."""
    if p.relation == "anonymous":
        return "refused"
    if not _visible(p, tier):
        return "hidden"
    if not p.scopes & {"write", "admin"} or p.relation not in WRITERS:
        return "refused"
    return "bad" if bad_when(p, tier) else "ok"


def _web_page(p: Persona, tier: str, *, login: bool = False, allowed=None) -> str:
    if login and p.relation == "anonymous":
        return "ok"  # a redirect to the login page
    if not _visible(p, tier):
        return "hidden"
    return "refused" if allowed is not None and p.relation not in allowed else "ok"


def _playground(p: Persona, tier: str) -> str:
    """The playground page: refused (saying why and what to do) to the signed-in who may not use the model."""
    if p.relation == "anonymous":
        return "ok"  # a redirect to the login page
    if not _visible(p, tier):
        return "hidden"
    return "refused" if tier == "gated" and p.relation not in MEMBERS | {"approved"} else "ok"


# (route name, method) → rule(persona, tier). Methods a route does not serve answer 405 for everyone who may
# know the model: checked once per route below.
RULES = {
    **{(name, "get"): _token_read for name in (
        "model-detail", "version-list", "version-detail", "model-files", "model-compute", "model-evaluations",
        "model-risk-assessments", "model-datasets", "model-lineage", "model-releases")},
    ("model-release-checks", "get"): lambda p, t: (
        "refused" if p.relation != "anonymous" and "read" not in p.scopes
        else "ok" if p.relation in MEMBERS else "hidden"),  # the organization's working papers
    **{(name, "post"): (lambda p, t: _token_write(p, t, "write", WRITERS)) for name in (
        "model-compute", "model-evaluations", "model-risk-assessments", "model-evaluations-import")},
    # An upload may create the model: the organization's writers are asked for first, so outsiders learn nothing.
    ("version-list", "post"): lambda p, t: ("refused" if p.relation not in WRITERS or "write" not in p.scopes
                                            else "ok"),
    ("model-card", "put"): lambda p, t: _token_write(p, t, "write", WRITERS),
    ("model-follow", "post"): lambda p, t: _token_write(p, t, "write", MEMBERS | {"outsider", "approved", "revoked"}),
    ("model-follow", "delete"): lambda p, t: _token_write(p, t, "write", MEMBERS | {"outsider", "approved", "revoked"}),
    ("model-downgrade", "post"): lambda p, t: _token_write(p, t, "admin", APPROVERS, bad_when=lambda p, t: t == "closed"),
    ("model-access-requests", "get"): lambda p, t: _token_write(p, t, "read", WRITERS),
    ("model-access-requests", "post"): _request_access,
    ("model-access-grants", "get"): lambda p, t: _token_write(p, t, "read", WRITERS),
    ("model-access-grants", "post"): lambda p, t: _token_write(p, t, "write", WRITERS, bad_when=_not_gated),
    ("model-access-policy", "get"): _token_read,
    ("model-access-policy", "patch"): lambda p, t: _token_write(p, t, "write", WRITERS),
    ("hub-model-info", "get"): _hub_metadata,
    ("hub-model-info-revision", "get"): _hub_metadata,
    ("hub-refs", "get"): _hub_metadata,
    ("hub-tree", "get"): _hub_metadata,
    ("hub-tree-path", "get"): lambda p, t: (  # an API-only model shows outsiders its card alone
        "hidden" if not _visible(p, t) or t == "api" and p.relation not in MEMBERS else "ok"),
    ("hub-resolve", "get"): _files,
    ("hub-resolve", "head"): _files,
    ("hub-access-list", "get"): lambda p, t: _hub_review(p, t),
    ("hub-access-handle", "post"): lambda p, t: _hub_review(p, t),
    ("hub-access-grant", "post"): lambda p, t: _hub_review(p, t, bad_when=_not_gated),
    ("openai-model", "get"): _inference_model,
    ("web-model-detail", "get"): lambda p, t: _web_page(p, t),
    ("web-access-request", "get"): lambda p, t: _web_page(p, t, login=True),
    ("model-playground", "get"): _playground,
    ("release-downgrade", "get"): lambda p, t: _web_page(p, t, login=True, allowed=APPROVERS),
}
WEB = {"web-model-detail", "web-access-request", "model-playground", "release-downgrade"}


def _class(status: int) -> str:
    assert status < 500, f"server error {status}"
    if status in (401, 403):
        return "refused"
    if status == 404:
        return "hidden"
    if status == 405:
        return "no-method"
    if status in (400, 409):
        return "bad"
    assert status < 400, f"unexpected {status}"
    return "ok"


@pytest.fixture
def world(tmp_path, aurora, alice, carol, root, token_for):
    """A model in each tier, each with an inference backend, a pending request from a third person, and
    the personas' users and tokens."""
    Benchmark.objects.get_or_create(key="mmlu", defaults={"name": "MMLU"})
    users = {"outsider": carol, "admin": alice, "superuser": root}
    for relation in ("member", "maintainer"):
        users[relation] = User.objects.create_user(relation, f"{relation}@example.com", "pw")
        Membership.objects.create(user=users[relation], organization=aurora, role=relation)
    for relation in ("approved", "revoked", "requester"):
        users[relation] = User.objects.create_user(relation, f"{relation}@example.org", "pw")
    models = {}
    for tier in TIERS:
        folder = write_model_folder(tmp_path / tier, seed=len(models))
        (folder / "notes").mkdir()
        (folder / "notes" / "eval.md").write_text("# Notes\n")  # a folder, for tree/<rev>/<path>
        version = model_version_verify(version_id=model_version_ingest(
            organization=aurora, name=f"m-{tier}", files=files_from_directory(folder), user=alice,
            tier="open" if tier == "gated" else tier).pk)
        model = models[tier] = version.model
        InferenceBackend.objects.create(model=model, kind="upstream", url="http://127.0.0.1:9/v1", upstream_model="m")
        if tier == "gated":
            AccessPolicy.objects.create(model=model, audience="gated-manual")
            for relation in ("approved", "revoked"):
                access.access_grant_create(model=model, actor=alice, user=users[relation])
            access.access_grant_revoke(grant=AccessGrant.objects.get(user=users["revoked"]), actor=alice, reason="x")
        AccessRequest.objects.create(model=model, user=users["requester"])
    tokens = {p.name: token_for(users[p.relation], tuple(p.scopes)) for p in PERSONAS if p.relation != "anonymous"}
    return {"models": models, "users": users, "tokens": tokens}


def _body(name: str, model) -> dict:
    """A body the route accepts from someone allowed to use it (so that only the gate can refuse)."""
    return {
        "model-compute": {"hardware": "H100-SXM", "flops": 2e24, "device_count": 8},
        "model-evaluations": {"benchmark": "mmlu", "metric": "acc", "value": 0.5, "evaluator": "matrix"},
        "model-risk-assessments": {"framework": "openai-preparedness", "domain": "cybersecurity", "threshold": "high",
                                   "outcome": "below", "mitigation": "pre", "evaluator": "red team"},
        "model-evaluations-import": {"format": "model-index", "data": [{"name": "m", "results": [{
            "task": {"type": "text-generation"}, "dataset": {"type": "mmlu", "name": "MMLU"},
            "metrics": [{"type": "acc", "value": 0.6}],
            "source": {"name": "Leaderboard", "url": "https://example.org/board"}}]}]},
        "model-card": {"card": "# Edited card\n"},
        "model-downgrade": {"tier": "closed", "reason": "matrix"},
        "model-access-requests": {},
        "model-access-grants": {"user": "requester"},
        "model-access-policy": {"cooldown_days": 3},
        "hub-access-handle": {"user": "requester", "status": "accepted"},
        "hub-access-grant": {"user": "requester"},
    }.get(name, {})


def _url(name: str, route: str, model) -> str:
    return "/" + (route.replace("<seg:org>", model.organization.slug).replace("<seg:name>", model.name)
                  .replace("<path:model_id>", model.repo_id).replace("<str:revision>", "main")
                  .replace("<str:commit>", model.latest_version.commit).replace("<str:status>", "pending")
                  .replace("<path:path>", "notes" if name == "hub-tree-path" else "notes/eval.md"))


def _probe(name: str, route: str, method: str, persona: Persona, model, world) -> int:
    client = Client()
    kwargs = {}
    if name in WEB:
        if persona.relation != "anonymous":
            client.force_login(world["users"][persona.relation])
    elif persona.relation != "anonymous":
        kwargs["HTTP_AUTHORIZATION"] = f"Bearer {world['tokens'][persona.name]}"
    if name == "version-list" and method == "post":
        config = SimpleUploadedFile("config.json", json.dumps({"model_type": "llama", "probe": persona.name}).encode())
        data, content_type = {"config.json": config}, None
    else:
        data, content_type = json.dumps(_body(name, model)), "application/json"
    with transaction.atomic():
        if method in ("get", "head"):
            response = getattr(client, method)(_url(name, route, model), **kwargs)
        elif content_type:
            response = getattr(client, method)(_url(name, route, model), data, content_type=content_type, **kwargs)
        else:
            response = client.post(_url(name, route, model), data, **kwargs)
        transaction.set_rollback(True)
    return response.status_code


def test_every_model_route_has_rules():
    served = {name for name, _ in RULES}
    generation = {"openai-completions", "openai-chat-completions"}  # gated by the same rule as openai-model
    assert sorted(MATRIX["model"] - served - generation) == [], "give the new model route its rules in RULES"


@pytest.mark.parametrize("tier", TIERS)
def test_each_persona_gets_what_the_release_rules_say(world, tier):
    routes, model = _routes(), world["models"][tier]
    wrong = []
    for (name, method), rule in sorted(RULES.items()):
        for persona in PERSONAS:
            if name in WEB and persona.relation == "outsider" and persona.scopes != {"read"}:
                continue  # a browser session has no scopes: one outsider is enough
            status = _probe(name, routes[name], method, persona, model, world)
            expected = rule(persona, tier)
            if _class(status) != expected:
                wrong.append(f"{method.upper()} {name} as {persona.name}: {status}, expected {expected}")
    assert wrong == [], "\n".join(wrong)


def test_methods_a_route_does_not_serve_answer_405(world):
    routes, model = _routes(), world["models"]["open"]
    served: dict[str, set] = {}
    for name, method in RULES:
        served.setdefault(name, set()).add(method)
    for name in ("web-access-request", "model-playground", "release-downgrade"):  # their forms post (tested apart)
        served[name].add("post")
    admin = next(p for p in PERSONAS if p.relation == "admin")
    wrong = []
    for name, methods in sorted(served.items()):
        for method in sorted({"get", "post", "put", "patch", "delete"} - methods):
            status = _probe(name, routes[name], method, admin, model, world)
            if status != 405:
                wrong.append(f"{method.upper()} {name}: {status}")
    assert wrong == [], "\n".join(wrong)
