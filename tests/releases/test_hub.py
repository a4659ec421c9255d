"""The Hub-compatible endpoints through Django's test client: the tier gate on every file route, the exact
headers the stock client needs, Range, listings, and metering. The stock clients themselves run against a
live server in tests/e2e/test_hub_clients.py."""
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from gatehouse.accounts.models import User
from releases.models import AccessGrant, AccessPolicy, AccessRequest, Download

WEIGHTS = "model.safetensors"


@pytest.fixture
def hub(token_for):
    def call(method, url, user=None, scopes=("read", "gated-read"), **headers):
        extra = {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in headers.items()}
        if user is not None:
            extra["HTTP_AUTHORIZATION"] = f"Bearer {token_for(user, scopes)}"
        return getattr(Client(), method.lower())(url, **extra)
    return call


def gate(model, audience):
    AccessPolicy.objects.update_or_create(model=model, defaults={"audience": audience})


@pytest.fixture
def people(db, aurora, alice, bob, carol):
    """The callers of the table: anonymous, outsider, approved, revoked, expired, member, admin."""
    def user(name):
        return User.objects.create_user(name, f"{name}@example.org", "pw")
    return {"anonymous": None, "outsider": carol, "approved": user("dave"), "revoked": user("erin"),
            "expired": user("frank"), "member": bob, "admin": alice}


def give_grants(model, people):
    now = timezone.now()
    AccessGrant.objects.create(model=model, user=people["approved"])
    AccessGrant.objects.create(model=model, user=people["revoked"], revoked_at=now, revoke_reason="left the project")
    AccessGrant.objects.create(model=model, user=people["expired"], expires_at=now - timedelta(days=1))


TIERS = {  # name: (tier, audience)
    "closed": ("closed", "organization"),
    "api": ("api", "public"),
    "open-gated": ("open", "gated-manual"),
    "open-public": ("open", "public"),
}
# Expected (status, X-Error-Code) for GET of the weights, by tier then caller.
EXPECTED = {
    "closed": {"anonymous": (404, "RepoNotFound"), "outsider": (404, "RepoNotFound"), "approved": (404, "RepoNotFound"),
               "revoked": (404, "RepoNotFound"), "expired": (404, "RepoNotFound"), "member": (200, None),
               "admin": (200, None)},
    "api": {"anonymous": (403, "GatedRepo"), "outsider": (403, "GatedRepo"), "approved": (403, "GatedRepo"),
            "revoked": (403, "GatedRepo"), "expired": (403, "GatedRepo"), "member": (200, None), "admin": (200, None)},
    "open-gated": {"anonymous": (401, "GatedRepo"), "outsider": (403, "GatedRepo"), "approved": (200, None),
                   "revoked": (403, "GatedRepo"), "expired": (403, "GatedRepo"), "member": (200, None),
                   "admin": (200, None)},
    "open-public": {caller: (200, None) for caller in
                    ("anonymous", "outsider", "approved", "revoked", "expired", "member", "admin")},
}


@pytest.mark.parametrize("tier_name", list(TIERS))
def test_every_caller_and_tier_gets_exactly_the_answer_of_the_table(tier_name, register, aurora, alice, people, hub):
    tier, audience = TIERS[tier_name]
    version = register(aurora, f"m-{tier_name}", alice, tier=tier)
    gate(version.model, audience)
    give_grants(version.model, people)
    size = version.files.get(path=WEIGHTS).size
    for caller, (status, code) in EXPECTED[tier_name].items():
        before = Download.objects.count()
        for method in ("HEAD", "GET"):
            response = hub(method, f"/aurora/m-{tier_name}/resolve/main/{WEIGHTS}", user=people[caller])
            assert (response.status_code, response.headers.get("X-Error-Code")) == (status, code), (caller, method)
            if status == 200:
                assert response["X-Repo-Commit"] == version.commit and response["X-Linked-Size"] == str(size)
            else:
                assert response["X-Error-Message"]
        served = b"".join(response.streaming_content) if status == 200 else b""
        assert len(served) == (size if status == 200 else 0), caller
        # GET is metered once when bytes flow, never for a refusal or a HEAD.
        assert Download.objects.count() - before == (1 if status == 200 else 0), caller
        if status == 200:
            row = Download.objects.first()
            assert (row.path, row.bytes, row.version_id) == (WEIGHTS, size, version.pk)
            assert row.user_id == (people[caller].pk if people[caller] else None)


def test_api_only_model_serves_its_card_to_outsiders_and_points_to_the_inference_api(register, aurora, alice, carol, hub):
    version = register(aurora, "served", alice, tier="api")
    card = hub("GET", "/aurora/served/resolve/main/README.md", user=carol)
    assert card.status_code == 200 and b"".join(card.streaming_content).startswith(b"---")
    weights = hub("GET", f"/aurora/served/resolve/main/{WEIGHTS}", user=carol)
    assert weights.status_code == 403 and "API-only" in weights["X-Error-Message"]
    assert "/v1" in weights["X-Error-Message"] and "aurora/served" in weights["X-Error-Message"]
    # Listings show outsiders the card alone; members see everything.
    listing = hub("GET", "/api/models/aurora/served/tree/main?recursive=true", user=carol).json()
    assert [e["path"] for e in listing] == ["README.md"]
    info = hub("GET", "/api/models/aurora/served", user=carol).json()
    assert [s["rfilename"] for s in info["siblings"]] == ["README.md"] and info["sha"] == version.commit
    assert len(hub("GET", "/api/models/aurora/served/tree/main", user=alice).json()) == version.files.count()


def test_each_gated_refusal_says_why_and_what_to_do(register, aurora, alice, carol, hub):
    version = register(aurora, "gated", alice, tier="open")
    gate(version.model, "gated-manual")
    url = f"/aurora/gated/resolve/main/{WEIGHTS}"

    def message(**kwargs):
        response = hub("HEAD", url, **kwargs)
        assert response["X-Error-Code"] == "GatedRepo"
        return response["X-Error-Message"]

    assert "pass a Gatehouse token" in message() and "/aurora/gated/access" in message()
    assert "lacks the 'gated-read' scope" in message(user=carol, scopes=("read",))
    assert "lacks the 'read' scope" in message(user=carol, scopes=("inference",))
    assert "request access at http://testserver/aurora/gated/access" in message(user=carol)
    request = AccessRequest.objects.create(model=version.model, user=carol)
    assert f"pending review since {request.created_at:%Y-%m-%d}" in message(user=carol)
    AccessRequest.objects.filter(pk=request.pk).update(status="rejected", decided_at=timezone.now(),
                                                       rejection_reason="no affiliation given")
    rejected = message(user=carol)
    assert "was rejected on" in rejected and "no affiliation given" in rejected and "ask again after" in rejected
    AccessGrant.objects.create(model=version.model, user=carol, expires_at=timezone.now() - timedelta(hours=1))
    assert "expired on" in message(user=carol)
    AccessGrant.objects.create(model=version.model, user=carol, revoked_at=timezone.now(), revoke_reason="misuse")
    assert "was revoked on" in message(user=carol) and "misuse" in message(user=carol)
    assert Download.objects.count() == 0


def test_organization_grant_opens_the_gate_for_every_member_of_that_organization(register, aurora, alice, carol,
                                                                                 northwind, hub):
    version = register(aurora, "gated", alice, tier="open")
    gate(version.model, "gated-auto")
    assert hub("HEAD", f"/aurora/gated/resolve/main/{WEIGHTS}", user=carol).status_code == 403
    AccessGrant.objects.create(model=version.model, organization=northwind)
    assert hub("HEAD", f"/aurora/gated/resolve/main/{WEIGHTS}", user=carol).status_code == 200



def test_the_gate_weighs_the_callers_own_and_organization_grants_together(register, aurora, alice, carol, northwind,
                                                                          hub, django_assert_max_num_queries):
    from releases import access

    version = register(aurora, "gated", alice, tier="open")
    gate(version.model, "gated-auto")
    now = timezone.now()
    org_grant = AccessGrant.objects.create(model=version.model, organization=northwind, created_at=now - timedelta(days=9))
    AccessGrant.objects.create(model=version.model, user=carol, revoked_at=now, revoke_reason="misuse")
    assert hub("HEAD", f"/aurora/gated/resolve/main/{WEIGHTS}", user=carol).status_code == 200  # her team's still holds
    AccessGrant.objects.filter(pk=org_grant.pk).update(expires_at=now - timedelta(days=1))
    refused = hub("HEAD", f"/aurora/gated/resolve/main/{WEIGHTS}", user=carol)
    assert refused.status_code == 403 and "misuse" in refused["X-Error-Message"]  # the latest of both: hers, revoked
    model = type(version.model).objects.get(pk=version.model.pk)
    with django_assert_max_num_queries(5):  # memberships, policy, her grants, her organizations', her request
        assert access.caller_facts(user=carol, token=None, model=model).grant == "revoked"

def test_missing_repo_revision_and_file_get_the_clients_error_codes(register, aurora, alice, hub):
    version = register(aurora, "m", alice, tier="open")
    missing_repo = hub("HEAD", f"/aurora/nope/resolve/main/{WEIGHTS}")
    assert (missing_repo.status_code, missing_repo["X-Error-Code"]) == (404, "RepoNotFound")
    missing_rev = hub("HEAD", f"/aurora/m/resolve/v9/{WEIGHTS}")
    assert (missing_rev.status_code, missing_rev["X-Error-Code"]) == (404, "RevisionNotFound")
    missing_file = hub("HEAD", "/aurora/m/resolve/main/nope.bin")
    assert (missing_file.status_code, missing_file["X-Error-Code"]) == (404, "EntryNotFound")
    assert missing_file["X-Repo-Commit"] == version.commit  # lets the client cache "known missing"
    # Bytes are immutable per commit: the commit id resolves like main does.
    by_commit = hub("HEAD", f"/aurora/m/resolve/{version.commit}/{WEIGHTS}")
    assert by_commit.status_code == 200 and by_commit["ETag"] == f'"{version.files.get(path=WEIGHTS).sha256}"'


def test_an_unverified_version_is_not_served_and_says_so(register, aurora, alice, hub):
    version = register(aurora, "m", alice, tier="open", verify=False)
    response = hub("HEAD", f"/aurora/m/resolve/{version.commit}/{WEIGHTS}")
    assert response.status_code == 404 and response["X-Error-Code"] == "RevisionNotFound"
    assert "not verified yet" in response["X-Error-Message"]


def test_range_requests_get_206_with_the_exact_bytes_and_bad_ranges_416(register, aurora, alice, hub, weights_dir):
    version = register(aurora, "m", alice, tier="open")
    file = version.files.get(path=WEIGHTS)
    data = (weights_dir / file.storage_key).read_bytes()
    part = hub("GET", f"/aurora/m/resolve/main/{WEIGHTS}", range="bytes=100-199")
    assert part.status_code == 206 and part["Content-Range"] == f"bytes 100-199/{file.size}"
    assert b"".join(part.streaming_content) == data[100:200] and part["Content-Length"] == "100"
    tail = hub("GET", f"/aurora/m/resolve/main/{WEIGHTS}", range="bytes=-10")
    assert b"".join(tail.streaming_content) == data[-10:]
    resume = hub("GET", f"/aurora/m/resolve/main/{WEIGHTS}", range=f"bytes={file.size - 5}-")
    assert b"".join(resume.streaming_content) == data[-5:]
    assert Download.objects.filter(range_start__isnull=False).values_list("bytes", flat=True).count() == 3
    beyond = hub("GET", f"/aurora/m/resolve/main/{WEIGHTS}", range=f"bytes={file.size}-")
    assert beyond.status_code == 416 and beyond["Content-Range"] == f"bytes */{file.size}"
    assert Download.objects.count() == 3


def test_the_gate_decision_costs_a_constant_number_of_queries(register, aurora, alice, carol, token_for,
                                                              django_assert_num_queries):
    version = register(aurora, "gated", alice, tier="open")
    gate(version.model, "gated-manual")
    AccessGrant.objects.create(model=version.model, user=carol)
    client, token = Client(), token_for(carol, ("read", "gated-read"))
    url = f"/aurora/gated/resolve/main/{WEIGHTS}"
    client.head(url, HTTP_AUTHORIZATION=f"Bearer {token}")  # the first use records last_used_at
    # token, memberships, model (with policy and licence), active grant, version by its ref, file
    with django_assert_num_queries(6):
        assert client.head(url, HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 200


def test_listing_shows_only_what_the_caller_may_know_exists(register, aurora, alice, carol, hub, settings):
    register(aurora, "open-one", alice, tier="open")
    register(aurora, "secret", alice, tier="closed")
    register(aurora, "served", alice, tier="api")
    anonymous = {m["id"] for m in hub("GET", "/api/models").json()}
    assert anonymous == {"aurora/open-one", "aurora/served"}
    assert {m["id"] for m in hub("GET", "/api/models", user=alice).json()} == anonymous | {"aurora/secret"}
    assert [m["id"] for m in hub("GET", "/api/models?search=served").json()] == ["aurora/served"]
    assert hub("GET", "/api/models?author=northwind").json() == []
    settings.GATEHOUSE_HUB_PAGE_SIZE = 1
    first = hub("GET", "/api/models")
    assert len(first.json()) == 1 and 'rel="next"' in first["Link"] and "offset=1" in first["Link"]
    closed = hub("GET", "/api/models/aurora/secret", user=carol)
    assert (closed.status_code, closed["X-Error-Code"]) == (404, "RepoNotFound")
    assert "secret" not in hub("GET", "/api/models?search=secret", user=carol).content.decode()


def test_tree_lists_folders_recursively_and_pages_with_link(register, aurora, alice, hub, settings):
    version = register(aurora, "m", alice, tier="open")
    paths = sorted(version.files.values_list("path", flat=True))
    entries = hub("GET", "/api/models/aurora/m/tree/main?recursive=true&expand=false").json()
    assert [e["path"] for e in entries] == paths
    assert all(e["type"] == "file" and len(e["lfs"]["oid"]) == 64 and e["size"] >= 0 for e in entries)
    settings.GATEHOUSE_HUB_PAGE_SIZE = 2
    page = hub("GET", "/api/models/aurora/m/tree/main?recursive=true")
    assert len(page.json()) == 2 and "cursor=2" in page["Link"]
    assert hub("GET", "/api/models/aurora/m/tree/main/nope").status_code == 404


def test_refs_and_whoami(register, aurora, alice, hub):
    version = register(aurora, "m", alice, tier="open")
    refs = hub("GET", "/api/models/aurora/m/refs").json()
    assert refs["branches"] == [{"name": "main", "ref": "refs/heads/main", "targetCommit": version.commit}]
    assert refs["tags"] == [] and refs["converts"] == []
    me = hub("GET", "/api/whoami-v2", user=alice).json()
    assert me["name"] == "alice" and me["orgs"][0]["name"] == "aurora"
    assert me["auth"]["accessToken"]["role"] == "read"
    anonymous = hub("GET", "/api/whoami-v2")
    assert anonymous.status_code == 401
    bad = Client().get("/api/whoami-v2", HTTP_AUTHORIZATION="Bearer nope")
    assert bad.status_code == 401 and bad["X-Error-Message"].startswith("Invalid credentials in Authorization header")


def test_hub_review_routes_need_a_token_not_a_browser_session(register, aurora, alice, carol):
    """They accept POSTs without CSRF tokens (as the Hub does), so a session cookie must not be enough."""
    version = register(aurora, "gated", alice, tier="open")
    gate(version.model, "gated-manual")
    AccessRequest.objects.create(model=version.model, user=carol)
    browser = Client()
    browser.force_login(alice)
    response = browser.post("/api/models/aurora/gated/user-access-request/handle",
                            data='{"user": "carol", "status": "accepted"}', content_type="application/json")
    assert response.status_code == 401 and AccessRequest.objects.get().status == "pending"
    assert AccessGrant.objects.count() == 0


def _fetch(hub, repo: str, n: int, **headers) -> None:
    for _ in range(n):
        response = hub("GET", f"/{repo}/resolve/main/{WEIGHTS}", **headers)
        assert response.status_code in (200, 206)
        b"".join(response.streaming_content)


def test_download_totals_are_kept_as_downloads_are_recorded_and_sort_the_listings(register, aurora, alice, hub):
    from django.db.models import Sum

    from gatehouse.registry.models import Model
    from releases.models import DownloadTotals
    from releases.views import sort_by_downloads

    popular = register(aurora, "popular", alice, tier="open").model
    recent = register(aurora, "recent", alice, tier="open").model  # the newer: first unless downloads decide
    _fetch(hub, "aurora/popular", 3)
    _fetch(hub, "aurora/recent", 1)
    _fetch(hub, "aurora/recent", 4, range="bytes=0-9")  # parts of a download, not downloads
    assert {t.model_id: (t.files, t.transfers) for t in DownloadTotals.objects.all()} == {
        popular.pk: (3, 3), recent.pk: (1, 5)}
    assert DownloadTotals.objects.aggregate(b=Sum("bytes"))["b"] == Download.objects.aggregate(b=Sum("bytes"))["b"]

    listed = Client().get("/api/models?sort=downloads").json()
    assert [(m["id"], m["downloads"]) for m in listed] == [("aurora/popular", 3), ("aurora/recent", 1)]
    assert [m["downloads"] for m in Client().get("/api/models").json()] == [1, 3]  # newest first, counts shown
    assert Client().get("/api/models/aurora/popular").json()["downloads"] == 3
    html = Client().get("/?sort=downloads").content.decode()
    assert html.index("aurora/popular") < html.index("aurora/recent")
    metrics = Client().get("/metrics").content.decode()
    assert "gatehouse_downloads 8.0" in metrics
    # The sort reads each model's totals row, never the download rows: its cost does not grow with them.
    assert '"releases_download"' not in str(sort_by_downloads(Model.objects.all()).query)


def test_a_download_whose_totals_cannot_be_written_is_not_recorded(register, aurora, alice, monkeypatch):
    from unittest import mock

    from releases import access

    version = register(aurora, "m", alice, tier="open")
    monkeypatch.setattr(access, "counters_add", mock.Mock(side_effect=RuntimeError("the database went away")))
    with pytest.raises(RuntimeError):
        access.download_record(user=None, token=None, version=version, file=version.files.get(path=WEIGHTS), bytes=5,
                               range_start=None, via="stream")
    assert Download.objects.count() == 0  # the row and the totals move together, or neither


def test_the_migration_totals_the_downloads_made_before_it(register, aurora, alice, hub):
    import importlib

    from django.apps import apps

    from releases.models import DownloadTotals

    register(aurora, "m", alice, tier="open")
    _fetch(hub, "aurora/m", 2)
    _fetch(hub, "aurora/m", 1, range="bytes=5-")
    expected = list(DownloadTotals.objects.values_list("model_id", "files", "transfers", "bytes"))
    DownloadTotals.objects.all().delete()
    importlib.import_module("releases.migrations.0007_download_totals").totals_from_downloads(apps, None)
    assert list(DownloadTotals.objects.values_list("model_id", "files", "transfers", "bytes")) == expected
    assert expected[0][1:3] == (2, 3)


@pytest.mark.django_db(transaction=True)
def test_concurrent_downloads_of_one_model_add_up_exactly(register, aurora, alice):
    import threading

    from django.db import connection

    from releases import access
    from releases.models import DownloadTotals

    if connection.vendor != "postgresql":
        pytest.skip("concurrent connections are exercised on PostgreSQL (SQLite's writers queue on its one lock)")
    version = register(aurora, "m", alice, tier="open")
    file = version.files.get(path=WEIGHTS)
    barrier = threading.Barrier(8)

    def record():
        barrier.wait()
        try:
            for _ in range(5):
                access.download_record(user=None, token=None, version=version, file=file, bytes=10, range_start=None,
                                       via="stream")
        finally:
            connection.close()
    threads = [threading.Thread(target=record) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    totals = DownloadTotals.objects.get(model=version.model)
    assert (totals.files, totals.transfers, totals.bytes) == (40, 40, 400) == (Download.objects.count(), 40, 400)
