"""Chromium (Playwright) against a live server: a visitor browses the catalog and opens a card; a user requests
gated access, an admin approves it in the reviewers' queue, and the user then sees the download snippet and a
file link that works. Screenshots go to test-output/<test name>/. What a click leads to is checked with Playwright's
expect, which waits for it: the click may return before the next page has arrived."""
import re
import subprocess
from pathlib import Path

import pytest
from playwright.sync_api import expect

from .conftest import free_port, wait_for_http
from .test_hub_clients import tiny_hf_folder

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

SETUP = """
import os
from pathlib import Path
from gatehouse.accounts.models import Membership, Organization, User
from gatehouse.registry.models import License, Model
from gatehouse.registry.services.ingest import files_from_directory, model_version_ingest
from gatehouse.registry.services.versions import model_version_verify
from releases.models import AccessPolicy
alice = User.objects.create_user("alice", "alice@example.com", "pw-alice")
User.objects.create_user("carol", "carol@example.org", "pw-carol")
aurora = Organization.objects.create(slug="aurora", name="Aurora")
Membership.objects.create(user=alice, organization=aurora, role=Membership.Role.ADMIN)
for name, tier in [("tiny-gated", "open"), ("tiny-open", "open"), ("tiny-secret", "closed")]:
    version = model_version_ingest(organization=aurora, name=name, files=files_from_directory(
        Path(os.environ["SETUP_FOLDER"])), user=alice, tier=tier)
    model_version_verify(version_id=version.pk)
Model.objects.filter(name="tiny-gated").update(license=License.objects.get(key="apache-2.0"))
AccessPolicy.objects.create(model=Model.objects.get(name="tiny-gated"), audience="gated-manual",
                            acceptable_use="No weapons work.",
                            request_fields=[{"name": "affiliation", "label": "Affiliation", "required": True}])
"""


@pytest.fixture
def site(deployment, tmp_path):
    env, manage = deployment["env"], deployment["manage"]
    setup = subprocess.run([*manage, "shell", "-c", SETUP], cwd=ROOT, capture_output=True, text=True,
                           env=env | {"SETUP_FOLDER": str(tiny_hf_folder(tmp_path / "src"))})
    assert setup.returncode == 0, setup.stderr
    port = free_port()
    server = subprocess.Popen([*manage, "runserver", f"127.0.0.1:{port}", "--noreload"], env=env, cwd=ROOT,
                              stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    deployment["processes"].append(server)
    base = f"http://127.0.0.1:{port}"
    wait_for_http(base + "/")
    return base


def log_in(browser, base, username, password):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.goto(f"{base}/accounts/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{base}/")
    return page


def test_visitor_browses_the_catalog_and_opens_a_card(site, chromium, screenshots):
    page = chromium.new_page(viewport={"width": 390, "height": 844})  # a phone
    page.goto(site + "/")
    assert page.get_by_role("link", name="aurora/tiny-open").is_visible()
    assert page.get_by_text("aurora/tiny-secret").count() == 0  # closed: not there for visitors
    page.screenshot(path=str(screenshots / "catalog.png"), full_page=True)
    page.get_by_label("Search models").fill("gated")
    page.get_by_role("button", name="Search").click()
    expect(page.get_by_role("link", name="aurora/tiny-open")).to_have_count(0)  # the results, not the catalog
    expect(page.get_by_role("link", name="aurora/tiny-gated")).to_be_visible()
    page.get_by_label("Search models").fill("")
    page.get_by_label("Sort").select_option("name")
    page.get_by_role("button", name="Search").click()
    page.wait_for_url(re.compile(r"[?&]sort=name"))  # the sorted results, loaded (not the page before them)
    links = page.locator("ul.models a").all_inner_texts()
    assert links == sorted(links) and "aurora/tiny-open" in links
    page.screenshot(path=str(screenshots / "catalog-filtered.png"), full_page=True)
    page.get_by_role("link", name="aurora/tiny-open").click()
    page.wait_for_url(site + "/aurora/tiny-open")
    assert page.get_by_role("heading", name="Access").is_visible()
    assert "snapshot_download" in page.content()
    page.screenshot(path=str(screenshots / "card.png"), full_page=True)


def test_gated_access_is_requested_approved_in_the_queue_and_then_downloads(site, chromium, screenshots):
    carol = log_in(chromium, site, "carol", "pw-carol")
    carol.goto(site + "/aurora/tiny-gated")
    assert "/resolve/" not in carol.content()  # no file links before approval
    carol.get_by_role("link", name="Request access").click()
    carol.get_by_label("Affiliation (required)").fill("Northwind Research")
    carol.get_by_label("I accept the apache-2.0 license").check()
    carol.get_by_label("I accept the acceptable-use policy").check()
    carol.screenshot(path=str(screenshots / "1-request-form.png"), full_page=True)
    carol.get_by_role("button", name="Request access").click()
    expect(carol.get_by_text("pending review since")).to_be_visible()
    carol.screenshot(path=str(screenshots / "2-pending.png"), full_page=True)

    alice = log_in(chromium, site, "alice", "pw-alice")
    alice.goto(site + "/releases/access-requests")
    request = alice.locator("section.access-request", has_text="carol")
    assert request.get_by_text("Northwind Research").is_visible() and "Waiting for" in request.inner_text()
    alice.screenshot(path=str(screenshots / "3-queue.png"), full_page=True)
    request.get_by_role("button", name="Approve").click()
    expect(alice.get_by_text("carol's request for aurora/tiny-gated: accepted")).to_be_visible()
    expect(alice.get_by_text("No access requests wait for you")).to_be_visible()

    carol.goto(site + "/aurora/tiny-gated")
    assert 'snapshot_download("aurora/tiny-gated"' in carol.inner_text("div.access-panel")
    link = carol.get_by_role("link", name="config.json", exact=True)
    response = carol.context.request.get(site + link.get_attribute("href"))
    assert response.status == 200 and response.json()["architectures"] == ["LlamaForCausalLM"]
    assert len(response.headers["x-repo-commit"]) == 40
    carol.screenshot(path=str(screenshots / "4-approved.png"), full_page=True)


def test_a_token_is_created_shown_once_works_and_is_revoked(site, chromium, screenshots):
    import httpx

    page = log_in(chromium, site, "carol", "pw-carol")
    page.goto(site + "/accounts/tokens")
    page.get_by_label("Name").fill("laptop")
    page.get_by_role("checkbox", name="read — Read the registry").check()
    page.get_by_role("button", name="Create token").click()
    secret = page.locator("code.token-secret").inner_text().strip()
    page.screenshot(path=str(screenshots / "1-created.png"), full_page=True)
    assert httpx.get(site + "/api/v1/me", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    page.goto(site + "/accounts/tokens")
    assert secret not in page.content()  # shown once
    page.get_by_role("button", name="Revoke laptop").click()
    expect(page.get_by_text("revoked").first).to_be_visible()
    page.screenshot(path=str(screenshots / "2-revoked.png"), full_page=True)
    refused = httpx.get(site + "/api/v1/me", headers={"Authorization": f"Bearer {secret}"})
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]


RELEASE_SETUP = """
import os
from pathlib import Path
from gatehouse.accounts.models import Membership, Organization, User
from gatehouse.accounts.services import api_token_create
from gatehouse.registry.models import Dataset, DatasetVersion, License, Model, RiskThreshold
from gatehouse.registry.services.compute import compute_record_create
from gatehouse.registry.services.ingest import files_from_directory, model_version_ingest
from gatehouse.registry.services.records import risk_assessment_record
from gatehouse.registry.services.versions import model_card_update, model_version_verify
aurora = Organization.objects.get(slug="aurora")
bob = User.objects.create_user("bob", "bob@example.com", "pw-bob")
erin = User.objects.create_user("erin", "erin@example.com", "pw-erin")
Membership.objects.create(user=bob, organization=aurora, role=Membership.Role.MAINTAINER)
Membership.objects.create(user=erin, organization=aurora, role=Membership.Role.APPROVER)
dataset = Dataset.objects.create(organization=aurora, name="corpus", provenance="licensed")
dataset.licenses.set(License.objects.filter(key="mit"))
DatasetVersion.objects.create(dataset=dataset, version="v1", manifest_sha256="a" * 64, documents=10)
folder = Path(os.environ["SETUP_FOLDER"])
readme = folder / "README.md"
readme.write_text("---\\nlicense: mit\\ndatasets:\\n- aurora/corpus\\n---\\n# Coder\\n")
version = model_version_ingest(organization=aurora, name="coder", files=files_from_directory(folder), user=bob,
                               tier="closed")
version = model_version_verify(version_id=version.pk)
model_card_update(model=version.model, actor=bob, text=version.card + (
    "\\n## Intended use\\nResearch.\\n\\n## Limitations\\nMany.\\n\\n## Training data\\nCode.\\n\\n## Evaluation\\nSome.\\n"))
compute_record_create(version=version, actor=bob, hardware="H100-SXM", flops=1e22)
for threshold in RiskThreshold.objects.filter(domain__framework__key="openai-preparedness", domain__category="tracked",
                                              key="high"):
    risk_assessment_record(version=version, actor=bob, threshold=threshold, outcome="below", mitigation="pre",
                           evaluator="internal red team")
print("TOKEN " + api_token_create(user=bob, name="e2e", scopes=["read", "write"]).secret)
"""


def test_a_release_request_is_approved_in_the_queue_and_the_badge_changes(deployment, site, chromium, screenshots,
                                                                          tmp_path):
    import httpx

    setup = subprocess.run([*deployment["manage"], "shell", "-c", RELEASE_SETUP], cwd=ROOT, capture_output=True,
                           text=True, env=deployment["env"] | {"SETUP_FOLDER": str(tiny_hf_folder(tmp_path / "rel"))})
    assert setup.returncode == 0, setup.stderr
    headers = {"Authorization": "Bearer " + setup.stdout.split("TOKEN ", 1)[1].strip()}
    made = httpx.post(site + "/api/v1/release-requests", headers=headers,
                      json={"model": "aurora/coder", "stages": [{"tier": "api"}]})
    assert made.status_code == 201, made.text
    submitted = httpx.post(f"{site}/api/v1/release-requests/{made.json()['id']}/submit", headers=headers)
    assert submitted.json()["status"] == "submitted", submitted.text

    bob = log_in(chromium, site, "bob", "pw-bob")
    bob.goto(site + "/releases/queue")
    assert bob.get_by_text("Nothing awaits your decision").is_visible()  # a maintainer proposes, approvers decide
    erin = log_in(chromium, site, "erin", "pw-erin")
    erin.goto(site + "/aurora/coder")
    assert erin.locator("h1 .badge").inner_text() == "Closed"
    erin.goto(site + "/releases/queue")
    erin.screenshot(path=str(screenshots / "1-queue.png"), full_page=True)
    erin.get_by_label("Comment").fill("Checks pass; API first.")
    erin.get_by_role("button", name="Approve").click()
    expect(erin.get_by_text("approve recorded")).to_be_visible()
    erin.goto(site + "/aurora/coder")
    assert erin.locator("h1 .badge").inner_text() == "API only"
    panel = erin.inner_text("div.access-panel")
    assert "Released API only · Public · since " in panel and "Release history" in panel
    erin.screenshot(path=str(screenshots / "2-released.png"), full_page=True)
