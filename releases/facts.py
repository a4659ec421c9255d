"""Gather the facts the pure policy judges, from the registry. The only place the policy touches the database."""
import re

from django.conf import settings
from django.utils import timezone

from gatehouse.registry.models import (
    DatasetVersion, EvaluationResult, ModelVersion, RiskAssessment, RiskDomain, RiskFramework,
)
from gatehouse.registry.selectors import designation_thresholds, designations_for
from releases.policy import AssessmentFacts, BaseFacts, DatasetFacts, LicenseFacts, VersionFacts

_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _license(license) -> LicenseFacts | None:
    return LicenseFacts(license.key, license.commercial_use, license.restrictions_inherited) if license else None


def active_framework() -> RiskFramework | None:
    return RiskFramework.objects.filter(key=settings.RELEASE_RISK_FRAMEWORK, is_active=True).first()


def version_facts(version: ModelVersion) -> VersionFacts:
    model = version.model
    now = timezone.now()
    framework = active_framework()
    domains = list(RiskDomain.objects.filter(framework=framework, category=RiskDomain.Category.TRACKED)
                   .values_list("key", flat=True)) if framework else []
    assessments = tuple(
        AssessmentFacts(domain=a.threshold.domain.key, rank=a.threshold.rank, outcome=a.outcome, mitigation=a.mitigation,
                        age_days=(now - a.assessed_at).total_seconds() / 86400,
                        max_tier_unmitigated=a.threshold.max_tier_unmitigated,
                        max_tier_with_safeguards=a.threshold.max_tier_with_safeguards)
        for a in RiskAssessment.objects.filter(version=version, threshold__domain__framework=framework)
        .select_related("threshold__domain"))
    scanned = set(DatasetVersion.objects.filter(dataset__in=version.datasets.all()).exclude(manifest_sha256="")
                  .values_list("dataset_id", flat=True))
    datasets = tuple(
        DatasetFacts(id=str(d), provenance=d.provenance, licenses=tuple(_license(lic) for lic in d.licenses.all()),
                     personal_data_scanned=d.pk in scanned)
        for d in version.datasets.select_related("organization").prefetch_related("licenses"))
    base = None
    if version.base_version_id:
        base_model = version.base_version.model
        base = BaseFacts(repo_id=base_model.repo_id, tier=base_model.tier, license=_license(base_model.license))
    card = model.card_text or version.card
    return VersionFacts(
        repo_id=model.repo_id, license=_license(version.license), card_headings=frozenset(_HEADING.findall(card)),
        datasets=datasets, compute_recorded=version.compute_records.exists(),
        designations=tuple(designations_for(version, designation_thresholds())),
        framework=f"{framework.key}@{framework.version}" if framework else "no active framework",
        required_domains=tuple(domains), assessments=assessments, base=base,
        has_adversarial_evaluation=EvaluationResult.objects.filter(version=version, benchmark__category="safety").exists(),
        max_assessment_age_days=settings.RELEASE_MAX_ASSESSMENT_AGE_DAYS)
