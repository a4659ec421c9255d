"""Ingest a Hugging Face-style model folder as a new, pending model version.

Files stream into weight storage with their sha256 computed on the way; nothing is held whole in
memory. Every refusal happens before the database is touched, and a failure after the first byte is
stored removes what was stored: a failed ingest leaves no version and no orphan files.
"""
import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

import yaml
from django.conf import settings
from django.core.files import File
from django.core.files.storage import storages
from django.db import IntegrityError, transaction
from huggingface_hub import ModelCard
from huggingface_hub.repocard import REGEX_YAML_BLOCK

from gatehouse.accounts.models import Organization, User
from gatehouse.audit.services import audit_record
from gatehouse.core.errors import Conflict, InvalidInput, clean_or_invalid
from gatehouse.core.locks import for_update
from gatehouse.core.unavailable import ServiceUnavailable
from gatehouse.registry.files import (
    inspect_safetensors, normalize_path, refuse_archive, refuse_opaque_content, refuse_pickle,
)
from gatehouse.registry.models import BaseRelation, Dataset, EvaluationResult, License, Model, ModelFile, ModelVersion
from gatehouse.registry.services.evaluations import evaluation_rows_record, parse_model_index
from gatehouse.registry.selectors import organization_for_writer, model_visible_queryset

MAX_FILES = 1000
CHUNK = 1024 * 1024


@dataclass
class IncomingFile:
    """One file to ingest: its path in the repository, its size and how to open it for reading."""

    path: str
    size: int
    open: Callable[[], BinaryIO]


@dataclass
class _Stored:
    path: str
    size: int
    sha256: str
    storage_key: str
    safetensors: dict | None = None


@dataclass
class CardFacts:
    text: str = ""
    metadata: dict = field(default_factory=dict)
    license: License | None = None
    datasets: list[Dataset] = field(default_factory=list)
    base_model: Model | None = None
    base_relation: str = ""
    eval_results: list = field(default_factory=list)


class _HashingFile(File):
    """A File whose reads feed a sha256, so storage backends hash while they copy."""

    def __init__(self, fh: BinaryIO, name: str):
        super().__init__(fh, name=name)
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0

    def seek(self, offset, whence=os.SEEK_SET):
        if offset == 0 and whence == os.SEEK_SET:  # backends rewind before copying; start over
            self.sha256 = hashlib.sha256()
            self.bytes_read = 0
        return self.file.seek(offset, whence)

    def read(self, size=-1):
        data = self.file.read(size)
        self.sha256.update(data)
        self.bytes_read += len(data)
        return data


def files_from_directory(directory: Path) -> list[IncomingFile]:
    """The files of a local model folder. Symlinks are refused: they could point anywhere on the host."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidInput(f"{directory} is not a directory.")
    incoming = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d not in (".git", ".cache"))
        for name in sorted(names):
            full = Path(root) / name
            relative = full.relative_to(directory).as_posix()
            if full.is_symlink():
                raise InvalidInput(f"{relative} is a symbolic link; copy the real file into the folder instead.")
            incoming.append(IncomingFile(path=relative, size=full.stat().st_size,
                                         open=lambda full=full: open(full, "rb")))
    return incoming


def commit_id(repo_id: str, files: list[tuple[str, int, str]]) -> str:
    """A 40-hex id derived from the repository name and each file's path, size and sha256."""
    digest = hashlib.sha1(f"gatehouse-commit-v1\n{repo_id}\n".encode())
    for path, size, sha256 in sorted(files):
        digest.update(f"{path}\0{size}\0{sha256}\n".encode())
    return digest.hexdigest()


def _check_paths(files: list[IncomingFile]) -> list[IncomingFile]:
    if not files:
        raise InvalidInput("No files given; a model version needs at least config.json or a weights file.")
    if len(files) > MAX_FILES:
        raise InvalidInput(f"{len(files)} files given; a version may hold at most {MAX_FILES}.")
    seen: dict[str, str] = {}
    checked = []
    for item in files:
        path = normalize_path(item.path)
        refuse_pickle(path)
        refuse_archive(path)
        key = path.casefold()  # case-insensitive filesystems (macOS, Windows) would merge these on download
        if key in seen:
            raise InvalidInput(f"File path {item.path!r} duplicates {seen[key]!r} (paths differing only in case or "
                               "'.' segments name one file on many systems); rename or drop one.")
        seen[key] = item.path
        checked.append(IncomingFile(path=path, size=item.size, open=item.open))
    return checked


def _read_small(item: IncomingFile, limit: int = 4 * 1024 * 1024) -> str:
    if item.size > limit:
        raise InvalidInput(f"{item.path} is {item.size} bytes; text metadata files may be at most {limit} bytes. "
                           f"Keep {item.path} to metadata (architecture, card): weights and data belong in "
                           "safetensors files.")
    with item.open() as fh:
        data = fh.read(limit + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{item.path} is not UTF-8 text.") from None


def parse_card(text: str, *, user: User) -> CardFacts:
    """Read the card's YAML metadata into records; unknown references are refused with what to do."""
    facts = CardFacts(text=text)
    _refuse_yaml_aliases(text)
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidInput(f"README.md's YAML metadata is invalid: {exc}".strip()) from None
    except RecursionError:
        raise InvalidInput("README.md's YAML metadata is nested too deeply; flatten it.") from None
    metadata = card.data.to_dict()
    facts.metadata = json.loads(json.dumps(metadata, default=str))

    license_key = metadata.get("license")
    if license_key == "other":
        license_key = metadata.get("license_name") or "other"
    if license_key:
        if not isinstance(license_key, str):
            raise InvalidInput("README.md: 'license' must be a single licence id.")
        facts.license = License.objects.filter(key=license_key).first()
        if facts.license is None:
            known = ", ".join(License.objects.values_list("key", flat=True)[:30])
            raise InvalidInput(f"README.md names licence {license_key!r}, which the registry does not know. "
                               f"Use one of: {known}; or ask an administrator to add it.")

    dataset_ids = metadata.get("datasets") or []
    if isinstance(dataset_ids, str):
        dataset_ids = [dataset_ids]
    for dataset_id in dataset_ids:
        org, _, name = str(dataset_id).partition("/")
        dataset = Dataset.objects.filter(organization__slug=org, name=name).first() if name else None
        if dataset is None:
            raise InvalidInput(f"README.md lists dataset {dataset_id!r}, which is not registered. Register it "
                               "first (POST /api/v1/datasets) or remove it from the card's 'datasets'.")
        facts.datasets.append(dataset)

    base = metadata.get("base_model")
    if isinstance(base, list):
        if len(base) != 1:
            raise InvalidInput("README.md: merges of several base models are not supported yet; name one base_model.")
        base = base[0]
    if base:
        org, _, name = str(base).partition("/")
        facts.base_model = model_visible_queryset(user).filter(organization__slug=org, name=name).first()
        if facts.base_model is None:
            raise InvalidInput(f"README.md names base_model {base!r}, which is not a model you can see here. "
                               "Register the base model first or fix the id.")
        relation = metadata.get("base_model_relation") or BaseRelation.FINETUNE
        if relation not in BaseRelation.values:
            raise InvalidInput(f"README.md: base_model_relation {relation!r} must be one of "
                               f"{', '.join(BaseRelation.values)}.")
        facts.base_relation = relation

    if metadata.get("model-index"):
        try:
            facts.eval_results = parse_model_index(metadata["model-index"])
        except InvalidInput as exc:
            raise InvalidInput(f"README.md: {exc.message}") from None
    return facts


def _refuse_yaml_aliases(text: str) -> None:
    """Aliases (*name) let a few lines of YAML expand into billions of values once the metadata is copied or
    serialized ("billion laughs"); cards never need them."""
    match = REGEX_YAML_BLOCK.search(text or "")  # the block ModelCard will parse, found the way it finds it
    if not match:
        return
    try:
        for token in yaml.scan(match.group(2)):
            if isinstance(token, yaml.AliasToken):
                raise InvalidInput("README.md's YAML metadata uses aliases (*name), which are not accepted in cards "
                                   "(they can expand without bound); write the values out instead.")
    except yaml.YAMLError:
        return  # reported with its line by the parser proper


def _architecture_facts(config_text: str | None) -> dict:
    if config_text is None:
        return {"config": {}, "architecture": "", "context_length": None}
    try:
        config = json.loads(config_text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"config.json is not valid JSON: {exc}.") from None
    except ValueError as exc:
        raise InvalidInput(f"config.json is not valid JSON: {exc}; write numbers as numbers.") from None
    except RecursionError:
        raise InvalidInput("config.json is nested too deeply to be a model configuration; flatten it.") from None
    if not isinstance(config, dict):
        raise InvalidInput("config.json must be a JSON object.")
    architectures = config.get("architectures") or []
    context = config.get("max_position_embeddings") or config.get("n_positions") or config.get("n_ctx")
    return {
        "config": config,
        "architecture": architectures[0] if architectures and isinstance(architectures[0], str) else config.get("model_type", ""),
        "context_length": context if isinstance(context, int) and context > 0 else None,
    }


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _sniff(files: list[IncomingFile]) -> None:
    """Look at each file's first bytes before anything is stored: pickles and archives are refused by content."""
    for item in files:
        with item.open() as fh:
            head = fh.read(9)
        refuse_opaque_content(head, item.path)


def _store(files: list[IncomingFile], *, prefix: str, stored: list[_Stored]) -> None:
    storage = storages["weights"]
    max_header = settings.SAFETENSORS_MAX_HEADER_BYTES
    for item in files:
        with item.open() as fh:
            facts = None
            if item.path.endswith(".safetensors"):
                facts = inspect_safetensors(fh, item.size, max_header_bytes=max_header, name=item.path)
                fh.seek(0)
            hashing = _HashingFile(fh, name=item.path)
            try:
                key = storage.save(f"{prefix}/{item.path}", hashing)
            except Exception as exc:
                # The backend may leave the half-written object behind (FileSystemStorage does): remove it too.
                # The prefix is this upload's own, so the name cannot be anyone else's file.
                _delete_quietly(storage, f"{prefix}/{item.path}")
                if isinstance(exc, OSError) or exc.__class__.__module__.startswith(("botocore", "boto3")):
                    raise ServiceUnavailable(f"Weight storage failed while writing {item.path}; nothing was "
                                             "registered. Retry the upload shortly.", component="storage") from exc
                raise
            stored.append(_Stored(path=item.path, size=hashing.bytes_read, sha256=hashing.sha256.hexdigest(),
                                  storage_key=key, safetensors=facts))
            if hashing.bytes_read != item.size:
                raise InvalidInput(f"{item.path} changed while it was read ({item.size} bytes expected, "
                                   f"{hashing.bytes_read} read); upload it again.")


def _delete_quietly(storage, key: str) -> None:
    try:
        storage.delete(key)
    except Exception:  # storage still failing: log and go on with the rest (the original error matters more)
        logging.getLogger(__name__).exception("could not delete %s after a failed ingest", key)


def _delete_stored(stored: list[_Stored]) -> None:
    storage = storages["weights"]
    for item in stored:
        _delete_quietly(storage, item.storage_key)


def model_version_ingest(*, organization: Organization, name: str, files: list[IncomingFile], user: User,
                         message: str = "", tier: str | None = None,
                         base_version: ModelVersion | None = None) -> ModelVersion:
    """Create `organization/name` if needed and a pending version holding `files`.

    The version becomes usable only after the verification task (queued on commit) verifies it.
    `base_version` pins the exact base a fine-tune started from (by default the card's base model's latest).
    """
    organization_for_writer(user=user, organization=organization)
    files = _check_paths(files)
    by_path = {item.path: item for item in files}
    card = parse_card(_read_small(by_path["README.md"]), user=user) if "README.md" in by_path else CardFacts()
    arch = _architecture_facts(_read_small(by_path["config.json"]) if "config.json" in by_path else None)
    model_probe = Model(organization=organization, name=name)
    clean_or_invalid(model_probe, exclude=["organization", "tier", "license", "base_model", "latest_version"],
                           validate_unique=False, validate_constraints=False)

    _sniff(files)
    stored: list[_Stored] = []
    prefix = f"models/{organization.slug}/{name}/{uuid.uuid4().hex}"
    try:
        _store(files, prefix=prefix, stored=stored)
        repo_id = f"{organization.slug}/{name}"
        commit = commit_id(repo_id, [(s.path, s.size, s.sha256) for s in stored])
        with transaction.atomic():
            model, created = for_update(Model.objects).get_or_create(
                organization=organization, name=name, defaults={"tier": tier or Model._meta.get_field("tier").default})
            if ModelVersion.objects.filter(model=model, commit=commit).exists():
                raise Conflict(f"{repo_id} already has a version with exactly these files (commit {commit}).",
                               code="duplicate_version")
            if base_version is not None and card.base_model and card.base_model.pk != base_version.model_id:
                raise InvalidInput(f"README.md names base_model {card.base_model.repo_id}, not "
                                   f"{base_version.model.repo_id} which this version was trained from.")
            base_version = base_version or (card.base_model.latest_version if card.base_model else None)
            if card.base_model and base_version is None:
                raise InvalidInput(f"base_model {card.base_model.repo_id} has no verified version yet; wait for it.")
            parameters = sum(s.safetensors["parameters"] for s in stored if s.safetensors) or None
            version = ModelVersion.objects.create(
                model=model, commit=commit, message=message[:300], card=card.text, card_metadata=card.metadata,
                license=card.license, base_version=base_version, architecture=arch["architecture"][:100],
                parameters=parameters, context_length=arch["context_length"], config=arch["config"],
                total_bytes=sum(s.size for s in stored), created_by=user,
                own_flops=0.0, cumulative_flops=base_version.cumulative_flops if base_version else 0.0,
            )
            version.datasets.set(card.datasets)
            ModelFile.objects.bulk_create([
                ModelFile(version=version, path=s.path, size=s.size, sha256=s.sha256, storage_key=s.storage_key,
                          safetensors=s.safetensors) for s in stored])
            _record_card_evaluations(version=version, results=card.eval_results)
            if created:
                audit_record(actor=user, action="model.create", target=model, data={"repo_id": repo_id, "tier": model.tier})
            audit_record(actor=user, action="model_version.ingest", target=version,
                         data={"repo_id": repo_id, "commit": commit, "files": len(stored),
                               "bytes": version.total_bytes})
            from gatehouse.registry.tasks import verify_model_version_task

            # robust: the version is committed even if the broker is down now; the stranded-work sweep queues
            # its verification later (gatehouse.core.redelivery). Never delete committed files over a publish.
            transaction.on_commit(lambda: verify_model_version_task.delay(version.pk), robust=True)
    except IntegrityError:
        _delete_stored(stored)
        raise Conflict(f"{organization.slug}/{name} was changed by another upload at the same time; retry.",
                       code="concurrent_upload") from None
    except BaseException:
        _delete_stored(stored)
        raise
    return version


def _record_card_evaluations(*, version: ModelVersion, results: list[dict]) -> None:
    keys = [(r["task"], r["metric"], r.get("source_name")) for r in results]
    if len(set(keys)) != len(keys):
        raise InvalidInput("README.md: model-index lists the same benchmark and metric twice.")
    evaluation_rows_record(version=version, rows=results, source=EvaluationResult.Source.MODEL_INDEX)
