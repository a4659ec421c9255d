"""Verification: a pending version becomes usable only after its stored bytes are checked again."""
import hashlib

from django.conf import settings
from django.core.files.storage import storages
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from gatehouse.audit.services import audit_record
from gatehouse.core.errors import InvalidInput
from gatehouse.core.locks import for_update
from gatehouse.registry.files import inspect_safetensors
from gatehouse.registry.models import Model, ModelRef, ModelVersion

CHUNK = 1024 * 1024


def _check_file(storage, file) -> str | None:
    """None when the stored bytes match the record, else what is wrong."""
    if not storage.exists(file.storage_key):
        return f"{file.path}: stored object {file.storage_key} is missing"
    digest, size = hashlib.sha256(), 0
    with storage.open(file.storage_key, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if file.path.endswith(".safetensors"):
            try:
                inspect_safetensors(fh, size, max_header_bytes=settings.SAFETENSORS_MAX_HEADER_BYTES, name=file.path)
            except InvalidInput as exc:
                return exc.message
    if size != file.size:
        return f"{file.path}: stored size {size} differs from the recorded {file.size}"
    if digest.hexdigest() != file.sha256:
        return f"{file.path}: stored sha256 differs from the recorded one"
    return None


def model_version_verify(*, version_id: int) -> ModelVersion | None:
    """Idempotent: claims a pending version, re-hashes its files, then marks it verified or failed."""
    # A redelivered task may find the version still "verifying" after a crashed worker: check it again.
    claimed = ModelVersion.objects.filter(
        pk=version_id, status__in=[ModelVersion.Status.PENDING, ModelVersion.Status.VERIFYING],
    ).update(status=ModelVersion.Status.VERIFYING)
    if not claimed:
        return ModelVersion.objects.filter(pk=version_id).first()  # already handled, or gone
    version = ModelVersion.objects.select_related("model").get(pk=version_id)
    storage = storages["weights"]
    problems = [p for p in (_check_file(storage, f) for f in version.files.all()) if p]
    now = timezone.now()
    with transaction.atomic():
        claim = ModelVersion.objects.filter(pk=version.pk, status=ModelVersion.Status.VERIFYING)
        if problems:
            if not claim.update(status=ModelVersion.Status.FAILED, error="; ".join(problems)[:5000]):
                return ModelVersion.objects.get(pk=version_id)  # a concurrent run finished first
            audit_record(actor=None, action="model_version.fail", target=version,
                         data={"commit": version.commit, "problems": problems[:20]})
        else:
            if not claim.update(status=ModelVersion.Status.VERIFIED, verified_at=now):
                return ModelVersion.objects.get(pk=version_id)
            _publish_as_latest(version=version, now=now)
            audit_record(actor=None, action="model_version.verify", target=version,
                         data={"repo_id": version.model.repo_id, "commit": version.commit})
    version.refresh_from_db()
    return version


def _publish_as_latest(*, version: ModelVersion, now) -> None:
    """Point `main` and the model's summary facts at this version unless a newer one is already there."""
    model = for_update(Model.objects).get(pk=version.model_id)
    current = model.latest_version
    if current is not None and current.created_at > version.created_at:
        return
    ModelRef.objects.update_or_create(model=model, name="main",
                                      defaults={"kind": ModelRef.Kind.BRANCH, "version": version, "updated_at": now})
    metadata = version.card_metadata or {}
    base = version.base_version.model if version.base_version_id else None
    tags = metadata.get("tags") or []
    Model.objects.filter(pk=model.pk).update(
        latest_version=version, updated_at=now, license=version.license,
        task=str(metadata.get("pipeline_tag") or model.task)[:64],
        tags=[str(t) for t in tags] if isinstance(tags, list) else [str(tags)],
        base_model=base, base_model_relation=(metadata.get("base_model_relation") or "finetune") if base else "",
    )


def model_ref_set(*, model: Model, name: str, version: ModelVersion, actor) -> ModelRef:
    """Create or move a tag. `main` moves only through verification."""
    if name == "main":
        raise InvalidInput("'main' always points at the newest verified version; choose another tag name.")
    if version.model_id != model.pk or version.status != ModelVersion.Status.VERIFIED:
        raise InvalidInput("Tags can only point at a verified version of the same model.")
    with transaction.atomic():
        ref, _ = ModelRef.objects.update_or_create(
            model=model, name=name, defaults={"kind": ModelRef.Kind.TAG, "version": version, "updated_at": timezone.now()})
        audit_record(actor=actor, action="model_ref.set", target=ref, data={"name": name, "commit": version.commit})
    return ref


def model_card_update(*, model: Model, actor, text: str) -> Model:
    """Edit the card people read. Recorded facts stay facts: the YAML may not claim another licence or base."""
    from gatehouse.registry.selectors import organization_for_writer
    from gatehouse.registry.services.ingest import parse_card

    organization_for_writer(user=actor, organization=model.organization)
    if len(text) > 1_000_000:
        raise InvalidInput("The card is larger than 1 MB.")
    facts = parse_card(text, user=actor) if text.strip() else None
    if facts is not None:
        if facts.license is not None and facts.license.pk != model.license_id:
            raise InvalidInput(f"The card names licence {facts.license.key}, but {model.repo_id} is recorded under "
                               f"{model.license.key if model.license else 'no licence'}; register a new version to "
                               "change the licence.")
        if facts.base_model is not None and facts.base_model.pk != model.base_model_id:
            raise InvalidInput("The card names another base model than the recorded lineage; lineage comes from "
                               "the versions, not from the card text.")
    with transaction.atomic():
        Model.objects.filter(pk=model.pk).update(card_text=text, updated_at=timezone.now())
        audit_record(actor=actor, action="model.card_update", target=model, data={"characters": len(text)})
    model.refresh_from_db()
    return model
