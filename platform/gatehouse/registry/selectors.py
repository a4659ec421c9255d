"""Reads. Visibility lives here: a closed model does not exist for anyone outside its organization."""
import re

from django.db.models import Prefetch, Q, QuerySet

from gatehouse.accounts.models import Membership, Organization, User
from gatehouse.core.errors import NotFound, PermissionDenied
from gatehouse.registry.models import (
    Dataset, DatasetVersion, DesignationThreshold, Model, ModelVersion, Tier,
)

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def _is_member(user) -> Q:
    if not getattr(user, "is_authenticated", False):
        return Q(pk__in=[])
    if user.is_superuser:
        return Q(pk__isnull=False)  # not Q(): `x | Q()` is just x, which would hide closed models from superusers
    # An uncorrelated IN (subquery): PostgreSQL hashes it once instead of probing per row as EXISTS would.
    return Q(organization_id__in=Membership.objects.filter(user=user).values("organization_id"))


def model_visible_queryset(user) -> QuerySet[Model]:
    """Models the user may know exist: every non-closed model, plus closed ones of their organizations."""
    return Model.objects.filter(~Q(tier=Tier.CLOSED) | _is_member(user))


def model_list(*, user, q: str = "", license: str = "", tier: str = "", task: str = "", designation: str = "",
               organization: str = "", risk: str = "") -> QuerySet[Model]:
    models = model_visible_queryset(user).select_related("organization", "license", "latest_version")
    if q:
        for word in q.split()[:8]:
            models = models.filter(Q(name__icontains=word) | Q(organization__slug__icontains=word)
                                   | Q(summary__icontains=word) | Q(task__icontains=word))
    if license:
        models = models.filter(license__key=license)
    if tier:
        models = models.filter(tier=tier)
    if task:
        models = models.filter(task=task)
    if organization:
        models = models.filter(organization__slug=organization)
    if risk:  # the worst outcome assessed for the latest version
        order = ["below", "cannot_rule_out", "above"]
        if risk not in order:
            return models.none()
        worse = order[order.index(risk) + 1:]
        models = models.filter(latest_version__risk_assessments__outcome=risk).exclude(
            latest_version__risk_assessments__outcome__in=worse).distinct()
    if designation:
        threshold = DesignationThreshold.objects.filter(key=designation).first()
        if threshold is None or not threshold.in_force:
            return models.none()
        field = "cumulative_flops" if threshold.basis == DesignationThreshold.Basis.CUMULATIVE else "own_flops"
        models = models.filter(**{f"latest_version__{field}__gt": threshold.min_flops})
    return models.order_by("-updated_at", "-id")


def dataset_queryset() -> QuerySet[Dataset]:
    """Datasets with their organization, licences and versions (newest first), for lists and pages."""
    return Dataset.objects.select_related("organization").prefetch_related(
        "licenses", Prefetch("versions", queryset=DatasetVersion.objects.order_by("-created_at")))


def model_get(*, user, org: str, name: str) -> Model:
    model = (model_visible_queryset(user).select_related("organization", "license", "latest_version",
                                                         "base_model__organization")
             .filter(organization__slug=org, name=name).first())
    if model is None:
        raise NotFound(f"Model {org}/{name} does not exist or you do not have access to it.")
    return model


def version_resolve(*, model: Model, revision: str = "main", verified_only: bool = True) -> ModelVersion:
    """A version by ref name (main, a tag) or by full commit id."""
    versions = ModelVersion.objects.filter(model=model).select_related("license")
    if verified_only:
        versions = versions.filter(status=ModelVersion.Status.VERIFIED)
    if COMMIT_RE.match(revision):
        version = versions.filter(commit=revision).first()
    else:  # one query: the ref's version through the join (the gate runs this on every download)
        version = versions.filter(refs__model=model, refs__name=revision).first()
    if version is None:
        raise NotFound(f"Revision {revision!r} of {model.repo_id} does not exist"
                       + (" or is not verified yet." if verified_only else "."))
    return version


def version_get(*, user, repo_id: str, revision: str = "main") -> ModelVersion:
    """A verified version by "org/name" and revision, among the models the user can see."""
    org, _, name = repo_id.partition("/")
    return version_resolve(model=model_get(user=user, org=org, name=name), revision=revision or "main")


def is_member(user, organization: Organization) -> bool:
    return bool(getattr(user, "is_authenticated", False)) and (
        user.is_superuser or Membership.objects.filter(user=user, organization=organization).exists())


def organization_for_writer(*, user: User, organization: Organization) -> Membership | None:
    """Writers are the organization's admins and maintainers; everyone else gets a clear 403."""
    if user.is_superuser:
        return None
    membership = Membership.objects.filter(user=user, organization=organization).first()
    if membership is None or not membership.can_write:
        raise PermissionDenied(f"Only maintainers and admins of {organization.slug} can register models or records "
                               "there; ask an admin of the organization for the maintainer role.")
    return membership


def designation_thresholds() -> list[DesignationThreshold]:
    return list(DesignationThreshold.objects.filter(in_force=True))


def designations_for(version: ModelVersion | None, thresholds: list[DesignationThreshold]) -> list[str]:
    if version is None:
        return []
    return [t.key for t in thresholds
            if t.applies_to(own_flops=version.own_flops, cumulative_flops=version.cumulative_flops)]


def version_lineage(version: ModelVersion) -> list[ModelVersion]:
    """The version followed by its ancestors, nearest first. One query per generation (lineages are short)."""
    chain = [version]
    seen = {version.pk}
    current = version
    while current.base_version_id and current.base_version_id not in seen:
        current = ModelVersion.objects.select_related("model__organization").get(pk=current.base_version_id)
        seen.add(current.pk)
        chain.append(current)
    return chain
