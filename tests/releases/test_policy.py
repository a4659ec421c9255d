"""The release policy as a table: tier x worst risk outcome x licences x designation x lineage -> findings."""
from dataclasses import replace

import pytest

from releases.policy import (
    AssessmentFacts, BaseFacts, DatasetFacts, LicenseFacts, RequestFacts, VersionFacts, check_release,
    required_approvals,
)

APACHE = LicenseFacts("apache-2.0", True)
NC = LicenseFacts("cc-by-nc-4.0", False)
LLAMA = LicenseFacts("llama3.1", True, restrictions_inherited=True)
DOMAINS = ("biological-chemical", "cybersecurity", "ai-self-improvement")


def assessment(domain, outcome="below", rank=1, mitigation="pre", age=10):
    return AssessmentFacts(domain, rank, outcome, mitigation, age, "closed", "api")


COMPLETE = VersionFacts(
    repo_id="aurora/m", license=APACHE,
    card_headings=frozenset({"Intended use", "Limitations", "Training data", "Evaluation"}),
    datasets=(DatasetFacts("aurora/web", "web-scraped", (APACHE,), True),),
    compute_recorded=True, designations=(), framework="openai-preparedness@2", required_domains=DOMAINS,
    assessments=tuple(assessment(d) for d in DOMAINS))


def codes(findings):
    return [(f.code, f.severity) for f in findings]


RISKY = tuple(assessment(d) for d in DOMAINS[1:]) + (assessment("biological-chemical", "cannot_rule_out"),)
RISKY_POST = tuple(assessment(d) for d in DOMAINS[1:]) + (assessment("biological-chemical", "above", mitigation="post"),)
CRITICAL = tuple(assessment(d) for d in DOMAINS[1:]) + (
    assessment("biological-chemical", "below", rank=1), replace(assessment("cybersecurity", "above", rank=2),
                                                                max_tier_with_safeguards="closed"))


@pytest.mark.parametrize("tier, changes, request_facts, expected", [
    # complete facts
    ("open", {}, RequestFacts(), []),
    ("api", {}, RequestFacts(), []),
    ("closed", {"license": None, "compute_recorded": False}, RequestFacts(), []),  # closing down is always allowed
    # worst risk outcome
    ("open", {"assessments": RISKY}, RequestFacts(), [("risk_level_too_high", "blocker")]),
    ("api", {"assessments": RISKY}, RequestFacts(), [("risk_level_too_high", "blocker")]),
    ("api", {"assessments": RISKY}, RequestFacts(safeguards_in_place=True), [("risk_level_too_high", "blocker")]),
    ("api", {"assessments": RISKY_POST}, RequestFacts(safeguards_in_place=True), []),
    ("open", {"assessments": RISKY_POST}, RequestFacts(safeguards_in_place=True), [("risk_level_too_high", "blocker")]),
    ("api", {"assessments": CRITICAL}, RequestFacts(safeguards_in_place=True), [("risk_level_too_high", "blocker")]),
    ("open", {"assessments": tuple(assessment(d, age=400) for d in DOMAINS)}, RequestFacts(),
     [("risk_assessment_missing", "blocker")] * 3),
    ("open", {"assessments": tuple(assessment(d) for d in DOMAINS[:2])}, RequestFacts(),
     [("risk_assessment_missing", "blocker")]),
    # licences
    ("open", {"license": None}, RequestFacts(), [("license_missing", "blocker")]),
    ("open", {"datasets": (DatasetFacts("aurora/nc", "licensed", (NC,), True),)}, RequestFacts(),
     [("license_incompatible", "blocker")]),
    ("api", {"datasets": (DatasetFacts("aurora/nc", "licensed", (NC,), True),)}, RequestFacts(), []),
    ("open", {"license": NC, "datasets": (DatasetFacts("aurora/nc", "licensed", (NC,), True),)}, RequestFacts(), []),
    ("open", {"datasets": (DatasetFacts("aurora/nc", "licensed", (NC,), True),)},
     RequestFacts(waivers=frozenset({"license_incompatible"})), []),
    ("open", {"license": LicenseFacts("other", None)}, RequestFacts(), [("license_unreviewed", "warning")]),
    # documentation
    ("open", {"card_headings": frozenset({"Uses", "Training"})}, RequestFacts(), [("card_incomplete", "blocker")]),
    ("open", {"datasets": ()}, RequestFacts(), [("datasets_missing", "blocker")]),
    ("open", {"datasets": (DatasetFacts("aurora/raw", "", (), False),)}, RequestFacts(),
     [("dataset_undocumented", "blocker")]),
    ("open", {"compute_recorded": False}, RequestFacts(), [("compute_missing", "blocker")]),
    # designation
    ("open", {"designations": ("eu-gpai", "eu-systemic-risk")}, RequestFacts(),
     [("two_approvers_required", "warning"), ("adversarial_evaluation_missing", "blocker"),
      ("incident_contact_missing", "blocker")]),
    ("open", {"designations": ("eu-gpai", "eu-systemic-risk"), "has_adversarial_evaluation": True},
     RequestFacts(incident_contact="safety@aurora.example"), [("two_approvers_required", "warning")]),
    ("open", {"designations": ("eu-gpai",)}, RequestFacts(), []),
    # lineage
    ("open", {"base": BaseFacts("aurora/base", "api", APACHE)}, RequestFacts(), [("derivative_more_open", "blocker")]),
    ("api", {"base": BaseFacts("aurora/base", "api", APACHE)}, RequestFacts(), []),
    ("open", {"base": BaseFacts("aurora/base", "api", APACHE)}, RequestFacts(waivers=frozenset({"derivative_more_open"})), []),
    ("api", {"base": BaseFacts("meta/llama", "open", LLAMA)}, RequestFacts(), [("license_not_inherited", "blocker")]),
    ("api", {"base": BaseFacts("meta/llama", "open", LLAMA), "license": LLAMA}, RequestFacts(), []),
])
def test_policy_table(tier, changes, request_facts, expected):
    assert codes(check_release(replace(COMPLETE, **changes), tier, request_facts)) == expected


def test_findings_say_what_is_wrong_and_how_to_fix_it():
    facts = replace(COMPLETE, card_headings=frozenset({"Intended use"}), assessments=RISKY)
    card, risk = check_release(facts, "open")
    assert card.message == "The model card lacks: limitations, training data, evaluation."
    assert "## Limitations" in card.fix
    assert risk.message.startswith("biological-chemical: level 1 cannot be ruled out; the framework allows at most 'closed'")
    assert "post-mitigation assessment" in risk.fix


def test_required_approvals_follow_designation():
    assert required_approvals(COMPLETE) == 1
    assert required_approvals(replace(COMPLETE, designations=("eu-gpai", "eu-systemic-risk"))) == 2


def test_unknown_tier():
    assert codes(check_release(COMPLETE, "public")) == [("tier_unknown", "blocker")]
