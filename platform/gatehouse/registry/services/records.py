"""Datasets, evaluation results and risk assessments recorded against the registry."""
from django.db import IntegrityError, transaction

from gatehouse.accounts.models import Organization
from gatehouse.audit.services import audit_record
from gatehouse.core.errors import Conflict, InvalidInput, clean_or_invalid
from gatehouse.registry.models import (
    Benchmark, Dataset, DatasetVersion, EvaluationResult, License, ModelVersion, RiskAssessment, RiskThreshold,
)
from gatehouse.registry.selectors import organization_for_writer


def dataset_create(*, organization: Organization, actor, name: str, provenance: str, licenses: list[License],
                   **sheet) -> Dataset:
    organization_for_writer(user=actor, organization=organization)
    dataset = Dataset(organization=organization, name=name, provenance=provenance, **sheet)
    clean_or_invalid(dataset, exclude=["organization"], validate_unique=False)
    try:
        with transaction.atomic():
            dataset.save()
            dataset.licenses.set(licenses)
            audit_record(actor=actor, action="dataset.create", target=dataset, data={"id": str(dataset)})
    except IntegrityError:
        raise Conflict(f"Dataset {organization.slug}/{name} already exists.") from None
    return dataset


def dataset_version_create(*, dataset: Dataset, actor, version: str, **facts) -> DatasetVersion:
    organization_for_writer(user=actor, organization=dataset.organization)
    row = DatasetVersion(dataset=dataset, version=version, **facts)
    clean_or_invalid(row, exclude=["dataset"], validate_unique=False)
    try:
        with transaction.atomic():
            row.save()
            audit_record(actor=actor, action="dataset_version.create", target=row,
                         data={"dataset": str(dataset), "version": version})
    except IntegrityError:
        raise Conflict(f"Dataset {dataset} already has a version {version!r}.") from None
    return row


def evaluation_result_record(*, version: ModelVersion, actor, benchmark: Benchmark, metric: str, value: float,
                             **facts) -> EvaluationResult:
    organization_for_writer(user=actor, organization=version.model.organization)
    result = EvaluationResult(version=version, benchmark=benchmark, metric=metric, value=value, **facts)
    clean_or_invalid(result, exclude=["version", "benchmark"], validate_unique=False)
    try:
        with transaction.atomic():
            result.save()
            audit_record(actor=actor, action="evaluation.record", target=result,
                         data={"commit": version.commit, "benchmark": benchmark.key, "metric": metric, "value": value})
    except IntegrityError:
        raise Conflict(f"{benchmark.key}/{metric} by {facts.get('evaluator', '')!r} is already recorded for this "
                       "version.") from None
    return result


def risk_assessment_record(*, version: ModelVersion, actor, threshold: RiskThreshold, outcome: str,
                           mitigation: str, evaluator: str, **facts) -> RiskAssessment:
    organization_for_writer(user=actor, organization=version.model.organization)
    if not threshold.domain.framework.is_active:
        raise InvalidInput(f"{threshold.domain.framework} is not the active version of its framework.")
    assessment = RiskAssessment(version=version, threshold=threshold, outcome=outcome, mitigation=mitigation,
                                evaluator=evaluator, created_by=actor, **facts)
    clean_or_invalid(assessment, exclude=["version", "threshold", "created_by"])
    with transaction.atomic():
        assessment.save()
        audit_record(actor=actor, action="risk_assessment.record", target=assessment,
                     data={"commit": version.commit, "threshold": str(threshold), "outcome": outcome,
                           "mitigation": mitigation})
    return assessment
