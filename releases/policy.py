"""Release policy: pure functions over facts. No database access in here — releases/facts.py gathers the
facts, these rules judge them, so every rule is a table-testable function.

A finding is a blocker (the release cannot proceed) or a warning (approvers should read it), and always says
how to fix it.
"""
from dataclasses import dataclass, field

TIERS = ("closed", "api", "open")
CARD_SECTIONS = {  # what a complete card covers, and the headings that count for it
    "intended use": ("intended use", "uses", "direct use"),
    "limitations": ("limitations", "bias, risks and limitations", "risks"),
    "training data": ("training data", "training details", "training"),
    "evaluation": ("evaluation", "results"),
}
SYSTEMIC_RISK = "eu-systemic-risk"


def more_open(a: str, b: str) -> bool:
    return TIERS.index(a) > TIERS.index(b)


@dataclass(frozen=True)
class LicenseFacts:
    key: str
    commercial_use: bool | None
    restrictions_inherited: bool = False


@dataclass(frozen=True)
class DatasetFacts:
    id: str
    provenance: str
    licenses: tuple[LicenseFacts, ...]
    personal_data_scanned: bool


@dataclass(frozen=True)
class AssessmentFacts:
    domain: str
    rank: int
    outcome: str  # below | cannot_rule_out | above
    mitigation: str  # pre | post
    age_days: float
    max_tier_unmitigated: str
    max_tier_with_safeguards: str


@dataclass(frozen=True)
class BaseFacts:
    repo_id: str
    tier: str
    license: LicenseFacts | None


@dataclass(frozen=True)
class VersionFacts:
    repo_id: str
    license: LicenseFacts | None
    card_headings: frozenset[str]
    datasets: tuple[DatasetFacts, ...]
    compute_recorded: bool
    designations: tuple[str, ...]
    framework: str
    required_domains: tuple[str, ...]
    assessments: tuple[AssessmentFacts, ...]
    base: BaseFacts | None = None
    has_adversarial_evaluation: bool = False
    max_assessment_age_days: int = 180


@dataclass(frozen=True)
class RequestFacts:
    """What the requester asserts; approvers check it."""

    safeguards_in_place: bool = False
    incident_contact: str = ""
    waivers: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str  # blocker | warning
    message: str
    fix: str

    def as_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "message": self.message, "fix": self.fix}


def _blocker(code, message, fix):
    return Finding(code, "blocker", message, fix)


def worst_levels(facts: VersionFacts) -> dict[str, AssessmentFacts]:
    """Per domain, the most severe level that fresh assessments reached; `cannot_rule_out` counts as reached."""
    worst: dict[str, AssessmentFacts] = {}
    for a in facts.assessments:
        if a.age_days > facts.max_assessment_age_days or a.outcome == "below":
            continue
        if a.domain not in worst or a.rank > worst[a.domain].rank:
            worst[a.domain] = a
    return worst


def check_release(facts: VersionFacts, tier: str, request: RequestFacts = RequestFacts()) -> list[Finding]:
    """Every finding for releasing `facts` at `tier`. Closing a model down is always allowed."""
    if tier not in TIERS:
        return [_blocker("tier_unknown", f"Unknown tier {tier!r}.", f"Choose one of {', '.join(TIERS)}.")]
    if tier == "closed":
        return []
    findings: list[Finding] = []
    findings += _license_findings(facts, tier, request)
    findings += _documentation_findings(facts)
    findings += _risk_findings(facts, tier, request)
    findings += _lineage_findings(facts, tier, request)
    findings += _designation_findings(facts, request)
    return findings


def _license_findings(facts, tier, request):
    if facts.license is None:
        return [_blocker("license_missing", f"{facts.repo_id} has no licence.",
                         "Put a licence in the card's YAML (license: …) and register the version again.")]
    found = []
    commercial = facts.license.commercial_use is not False
    if tier == "open" and commercial and "license_incompatible" not in request.waivers:
        nc = sorted({d.id for d in facts.datasets for lic in d.licenses if lic.commercial_use is False})
        if nc:
            found.append(_blocker(
                "license_incompatible",
                f"Licence {facts.license.key} allows commercial use, but non-commercial data trained it: {', '.join(nc)}.",
                "Release under a non-commercial licence, remove that data, or record a legal waiver "
                "(waiver: license_incompatible)."))
    if facts.license.commercial_use is None:
        found.append(Finding("license_unreviewed", "warning", f"Licence {facts.license.key} has unknown commercial terms.",
                             "Have legal review the licence before approval."))
    return found


def _documentation_findings(facts):
    found = []
    headings = {h.lower().strip() for h in facts.card_headings}
    missing = [name for name, aliases in CARD_SECTIONS.items() if not any(a in headings for a in aliases)]
    if missing:
        found.append(_blocker("card_incomplete", f"The model card lacks: {', '.join(missing)}.",
                              "Add those sections to README.md (headings: " + "; ".join(
                                  f"## {CARD_SECTIONS[m][0].title()}" for m in missing) + ")."))
    if not facts.datasets:
        found.append(_blocker("datasets_missing", "No training dataset is recorded for this version.",
                              "List the registered datasets in the card (datasets: [org/name]) or train through "
                              "a platform run."))
    for d in facts.datasets:
        gaps = [what for what, ok in (("provenance", bool(d.provenance)), ("licence", bool(d.licenses)),
                                      ("personal-data scan", d.personal_data_scanned)) if not ok]
        if gaps:
            found.append(_blocker("dataset_undocumented", f"Dataset {d.id} lacks {', '.join(gaps)}.",
                                  f"Complete {d.id}'s datasheet and scan it (a dataset version with its facts)."))
    if not facts.compute_recorded:
        found.append(_blocker("compute_missing", "No training compute is recorded for this version.",
                              "Add a compute record (POST …/compute) or train through a platform run."))
    return found


def _risk_findings(facts, tier, request):
    found = []
    fresh = {a.domain for a in facts.assessments if a.age_days <= facts.max_assessment_age_days}
    stale = {a.domain for a in facts.assessments} - fresh
    for domain in facts.required_domains:
        if domain not in fresh:
            found.append(_blocker(
                "risk_assessment_missing",
                f"No {facts.framework} assessment of {domain} for this version"
                + (f" newer than {facts.max_assessment_age_days} days." if domain in stale else "."),
                f"Record a risk assessment for {domain} (POST …/risk-assessments)."))
    for domain, level in sorted(worst_levels(facts).items()):
        allowed = level.max_tier_with_safeguards if request.safeguards_in_place and level.mitigation == "post" \
            else level.max_tier_unmitigated
        if more_open(tier, allowed):
            outcome = "cannot be ruled out" if level.outcome == "cannot_rule_out" else "is reached"
            found.append(_blocker(
                "risk_level_too_high",
                f"{domain}: level {level.rank} {outcome}; the framework allows at most '{allowed}' "
                + ("with its safeguards." if request.safeguards_in_place else "without safeguards."),
                "Release at a more closed tier, or put the required safeguards in place and record a "
                "post-mitigation assessment showing them." if not request.safeguards_in_place
                else "Release at a more closed tier."))
    return found


def _lineage_findings(facts, tier, request):
    base = facts.base
    if base is None:
        return []
    found = []
    if more_open(tier, base.tier) and "derivative_more_open" not in request.waivers:
        found.append(_blocker("derivative_more_open",
                              f"{facts.repo_id} would be more open ({tier}) than its base {base.repo_id} ({base.tier}).",
                              f"Release at most at '{base.tier}', or get the base owner's approval "
                              "(waiver: derivative_more_open)."))
    if base.license and base.license.restrictions_inherited and (facts.license is None
                                                                 or facts.license.key != base.license.key):
        found.append(_blocker("license_not_inherited",
                              f"Base {base.repo_id} is licensed {base.license.key}, whose restrictions bind derivatives.",
                              f"License {facts.repo_id} under {base.license.key} too."))
    return found


def _designation_findings(facts, request):
    if SYSTEMIC_RISK not in facts.designations:
        return []
    found = [Finding("two_approvers_required", "warning",
                     "EU systemic-risk model (cumulative compute above 1e25 FLOP): two approvers are required.",
                     "Ask a second approver.")]
    if not facts.has_adversarial_evaluation:
        found.append(_blocker("adversarial_evaluation_missing",
                              "Systemic-risk models need adversarial testing on record (EU AI Act Art. 55).",
                              "Record a safety evaluation (red-teaming) for this version."))
    if not request.incident_contact:
        found.append(_blocker("incident_contact_missing",
                              "Systemic-risk models need a serious-incident contact (EU AI Act Art. 55).",
                              "Give an incident contact in the release request."))
    return found


def required_approvals(facts: VersionFacts) -> int:
    return 2 if SYSTEMIC_RISK in facts.designations else 1


def blockers(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "blocker"]


# --- Distribution: who may see a model and download its files --------------------------------------------
CARD_PATH = "README.md"


@dataclass(frozen=True)
class CallerFacts:
    """What the gate knows about the caller for one model. `scopes` is None for a signed-in browser session,
    which carries every permission its user has."""

    authenticated: bool
    is_member: bool = False
    scopes: frozenset[str] | None = None
    grant: str = ""  # "active", "expired" or "revoked" (the caller's most recent grant), "" for none
    grant_at: str = ""  # when it expired or was revoked
    grant_reason: str = ""
    request: str = ""  # the caller's most recent request: "pending", "rejected", "cancelled", ""
    request_at: str = ""  # when it was made (pending) or decided (rejected)
    rejection_reason: str = ""
    retry_after: str = ""  # after a rejection: the first moment a new request is accepted


@dataclass(frozen=True)
class AccessDecision:
    allowed: bool
    status: int = 200
    code: str = ""  # the Hub's X-Error-Code: RepoNotFound or GatedRepo
    message: str = ""


ALLOW = AccessDecision(True)


def may_see(tier: str, caller: CallerFacts) -> bool:
    """A closed model does not exist for anyone outside its organization."""
    return tier != "closed" or caller.is_member


def not_found(repo_id: str) -> AccessDecision:
    return AccessDecision(False, 404, "RepoNotFound",
                          f"Repository not found: {repo_id} does not exist or you do not have access to it. "
                          "If it is yours, pass a token of an account in its organization.")


def needs_grant(audience: str, acceptable_use: bool) -> bool:
    """Gated audiences need an approved grant; so does any model whose acceptable-use policy must be accepted
    (a public one grants at once, on acceptance)."""
    return audience in ("gated-auto", "gated-manual") or acceptable_use


def file_access(*, repo_id: str, tier: str, audience: str, path: str, caller: CallerFacts,
                request_url: str, inference_url: str, acceptable_use: bool = False) -> AccessDecision:
    """May this caller download this file of this model? Every refusal says why and what to do."""
    if not may_see(tier, caller):
        return not_found(repo_id)
    if caller.scopes is not None and "read" not in caller.scopes:
        return AccessDecision(False, 403, "GatedRepo", "This token lacks the 'read' scope needed to download files; "
                                                         "create a token with the read scope.")
    if caller.is_member:
        return ALLOW
    if tier == "api":
        if path == CARD_PATH:
            return ALLOW
        return AccessDecision(False, 403, "GatedRepo",
                              f"{repo_id} is released API-only: its weights cannot be downloaded, only its card. "
                              f"Use the inference API instead (base_url {inference_url}, model {repo_id!r}).")
    if audience == "organization":
        return AccessDecision(False, 403, "GatedRepo", f"{repo_id} is released to its organization's members only.")
    if not needs_grant(audience, acceptable_use):
        return ALLOW
    if not caller.authenticated:
        return AccessDecision(False, 401, "GatedRepo", f"Access to {repo_id} is gated: pass a Gatehouse token "
                              "(token= or HF_TOKEN) of an account with approved access. Request access at "
                              f"{request_url}.")
    if caller.scopes is not None and "gated-read" not in caller.scopes:
        return AccessDecision(False, 403, "GatedRepo", f"{repo_id} is gated and this token lacks the 'gated-read' "
                              "scope; create a token with the scopes read,gated-read.")
    return _granted(repo_id, caller, request_url, "GatedRepo")


def inference_access(*, repo_id: str, tier: str, audience: str, acceptable_use: bool, caller: CallerFacts,
                     request_url: str) -> AccessDecision:
    """May this caller use the model through the inference API? Codes are OpenAI's (model_not_found, …)."""
    if not may_see(tier, caller):
        return AccessDecision(False, 404, "model_not_found", f"The model {repo_id!r} does not exist or you do not have "
                                                             "access to it.")
    if caller.scopes is not None and "inference" not in caller.scopes:
        return AccessDecision(False, 403, "missing_scope", "This token lacks the 'inference' scope; create a token "
                                                           "with the inference scope.")
    if caller.is_member:
        return ALLOW
    if audience == "organization":
        return AccessDecision(False, 403, "model_access_denied",
                              f"{repo_id} is released to its organization's members only.")
    if not needs_grant(audience, acceptable_use):
        return ALLOW
    return _granted(repo_id, caller, request_url, "model_access_denied")


def _granted(repo_id: str, caller: CallerFacts, request_url: str, code: str) -> AccessDecision:
    def gated(status: int, message: str) -> AccessDecision:
        return AccessDecision(False, status, code, message)

    if caller.grant == "active":
        return ALLOW
    if caller.request == "pending":
        return gated(403, f"Your request for access to {repo_id} is pending review since {caller.request_at}. "
                          "You will be notified by email when it is decided.")
    if caller.grant == "revoked":
        reason = f" ({caller.grant_reason})" if caller.grant_reason else ""
        return gated(403, f"Your access to {repo_id} was revoked on {caller.grant_at}{reason}. Contact the model's "
                          "organization if you believe this is a mistake.")
    if caller.grant == "expired":
        return gated(403, f"Your access to {repo_id} expired on {caller.grant_at}. Request access again at "
                          f"{request_url}.")
    if caller.request == "rejected":
        reason = f": {caller.rejection_reason}" if caller.rejection_reason else ""
        again = (f"You can ask again after {caller.retry_after} at {request_url}." if caller.retry_after
                 else f"You can ask again at {request_url}.")
        return gated(403, f"Your request for access to {repo_id} was rejected on {caller.request_at}{reason}. {again}")
    return gated(403, f"Access to {repo_id} needs approval: request access at {request_url} (you will be asked to "
                      "accept its license and acceptable-use policy).")


def listed_paths(*, tier: str, caller: CallerFacts, paths: list[str]) -> list[str]:
    """The file names a caller may list: outsiders of an API-only model see only its card."""
    if tier == "api" and not caller.is_member:
        return [p for p in paths if p == CARD_PATH]
    return paths


def auto_approves(*, audience: str, organizations: list[str], email_domains: list[str], user_organizations: list[str],
                  user_email: str) -> bool:
    """Whether a new access request is approved at once under the model's rules."""
    if audience == "gated-auto":
        return True
    domain = user_email.rpartition("@")[2].lower() if "@" in user_email else ""
    return bool(set(organizations) & set(user_organizations)) or (domain != "" and domain in
                                                                   {d.lower().lstrip("@") for d in email_domains})
