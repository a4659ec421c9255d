"""Seed a realistic demo catalog through the real services. Safe to run again: existing rows are kept."""
import sys
import tempfile
from pathlib import Path

from django.core.management.base import BaseCommand
from django.db import transaction

from gatehouse.accounts.models import Membership, Organization, User
from gatehouse.accounts.services import membership_set, organization_create
from gatehouse.registry.demo import write_model_folder
from gatehouse.registry.models import (
    Benchmark, Dataset, DatasetVersion, License, Model, RiskThreshold, TrainingRun,
)
from gatehouse.registry.services.compute import compute_record_create
from gatehouse.registry.services.ingest import files_from_directory, model_version_ingest
from gatehouse.registry.services.training import training_run_create, training_run_execute
from gatehouse.registry.services.records import (
    dataset_create, dataset_version_create, evaluation_result_record, risk_assessment_record,
)
from gatehouse.registry.services.versions import model_version_verify

USERS = [  # username, password, superuser
    ("admin", "gatehouse-admin", True),
    ("alice", "gatehouse-alice", False),
    ("bob", "gatehouse-bob", False),
    ("carol", "gatehouse-carol", False),
]

DATASHEET = {
    "motivation": "Pre-training corpus for general-purpose language models.",
    "composition": "English web pages, reference works and permissively licensed code.",
    "collection": "Crawled with a robots.txt- and TDM-opt-out-respecting crawler, 2024-01 to 2025-06.",
    "preprocessing": "Language identification, exact and near-duplicate removal, PII redaction.",
    "uses": "Language-model pre-training. Not for profiling individuals.",
    "distribution": "Not redistributed; manifest and statistics are published.",
    "maintenance": "Maintained by the data team; takedown requests honoured within 30 days.",
}

BENCHMARKS = [
    ("mmlu", "MMLU", "capability", "multiple-choice"),
    ("hellaswag", "HellaSwag", "capability", "commonsense"),
    ("gsm8k", "GSM8K", "capability", "math"),
    ("wmdp-bio", "WMDP-Bio", "safety", "hazardous-knowledge"),
]

DEMO_NOTE = ("*Demo entry: the weights are tiny random stand-ins and the compute figures are illustrative, "
             "so the catalog shows every tier and designation without gigabytes of files.*")

MODELS = [
    {"repo": "aurora-labs/aurora-7b", "tier": "open", "seed": 1, "summary": "7B base model, open weights",
     "metadata": {"license": "apache-2.0", "pipeline_tag": "text-generation", "language": ["en"],
                  "tags": ["llama", "base"], "datasets": ["aurora-labs/aurora-web"],
                  "model-index": [{"name": "aurora-7b", "results": [
                      {"task": {"type": "text-generation"}, "dataset": {"type": "hellaswag", "name": "HellaSwag"},
                       "metrics": [{"type": "acc_norm", "value": 0.781}]}]}]},
     "compute": {"hardware": "H100-SXM", "device_count": 512, "wall_time_seconds": 14 * 86400,
                 "parameters": 7_000_000_000, "tokens": 8_000_000_000_000, "precision": "bf16", "provider": "Lambda"},
     "evals": [("mmlu", "acc", 0.642, 0.004), ("gsm8k", "exact_match", 0.412, 0.013), ("wmdp-bio", "acc", 0.55, 0.01)]},
    {"repo": "aurora-labs/aurora-7b-instruct", "tier": "api", "seed": 2, "summary": "Instruction-tuned Aurora 7B",
     "metadata": {"license": "apache-2.0", "pipeline_tag": "text-generation", "base_model": "aurora-labs/aurora-7b",
                  "base_model_relation": "finetune", "tags": ["llama", "chat"], "datasets": ["aurora-labs/aurora-chat-sft"]},
     "compute": {"hardware": "H100-SXM", "device_count": 64, "wall_time_seconds": 86400,
                 "parameters": 7_000_000_000, "tokens": 20_000_000_000, "precision": "bf16", "stage": "sft"},
     "evals": [("mmlu", "acc", 0.655, 0.004)]},
    {"repo": "aurora-labs/aurora-frontier", "tier": "closed", "seed": 3, "summary": "Internal frontier research model",
     "metadata": {"license": "other", "license_name": "llama3.1", "pipeline_tag": "text-generation", "tags": ["internal"]},
     "compute": {"hardware": "H100-SXM", "device_count": 16384, "wall_time_seconds": 60 * 86400,
                 "flops": 3.1e25, "flops_method": "hardware", "precision": "bf16"},
     "evals": []},
    {"repo": "northwind-ai/breeze-3b", "tier": "open", "seed": 4, "summary": "Small research model, non-commercial",
     "metadata": {"license": "cc-by-nc-4.0", "pipeline_tag": "text-generation", "tags": ["research"]},
     "compute": {"hardware": "A100-80GB", "device_count": 64, "wall_time_seconds": 5 * 86400,
                 "parameters": 3_000_000_000, "tokens": 1_000_000_000_000},
     "evals": [("mmlu", "acc", 0.48, 0.005)]},
]


class Command(BaseCommand):
    help = "Seed the demo catalog (organizations, users, datasets, models, compute, evaluations, assessments)."

    def add_arguments(self, parser):
        parser.add_argument("--no-training", action="store_true",
                            help="skip the demo's real training runs (about 30 s on a 2-core CPU)")

    def handle(self, *args, no_training=False, **options):
        users = self._users()
        alice, bob, carol = users["alice"], users["bob"], users["carol"]
        orgs = {
            "aurora-labs": self._org("aurora-labs", "Aurora Labs", alice, "Frontier lab building the Aurora family."),
            "northwind-ai": self._org("northwind-ai", "Northwind AI", carol, "Academic research group."),
        }
        if not Membership.objects.filter(user=bob, organization=orgs["aurora-labs"]).exists():
            membership_set(organization=orgs["aurora-labs"], user=bob, role="maintainer", actor=alice)
        for key, name, category, task in BENCHMARKS:
            Benchmark.objects.get_or_create(key=key, defaults={"name": name, "category": category, "task_type": task})
        self._dataset(orgs["aurora-labs"], alice, "aurora-web", "web-scraped", ["cc-by-4.0"], 2_100_000_000, 8_000_000_000_000)
        self._dataset(orgs["aurora-labs"], alice, "aurora-chat-sft", "synthetic", ["apache-2.0"], 1_200_000, 20_000_000_000)
        for spec in MODELS:
            self._model(spec, orgs, users)
        if not no_training:
            self._trained_lineage(orgs["aurora-labs"], alice)
        self.stdout.write(self.style.SUCCESS("Demo catalog ready. Logins (username / password):"))
        for username, password, superuser in USERS:
            role = "superuser, approves releases" if superuser else {
                "alice": "admin of aurora-labs", "bob": "maintainer at aurora-labs",
                "carol": "admin of northwind-ai (outsider to aurora-labs)"}[username]
            self.stdout.write(f"  {username:6} / {password:18} {role}")

    def _trained_lineage(self, org, alice) -> None:
        """Train a small model for real on the Python standard library, then LoRA-fine-tune it: a real
        lineage with measured compute, dataset facts and evaluations, through the platform's own run path."""
        dataset = Dataset.objects.filter(organization=org, name="python-stdlib").first()
        if dataset is None:
            dataset = dataset_create(organization=org, actor=alice, name="python-stdlib", provenance="licensed",
                                     licenses=list(License.objects.filter(key="PSF-2.0")),
                                     summary="The Python standard library's own source files", **DATASHEET)
        version, _ = DatasetVersion.objects.get_or_create(
            dataset=dataset, version=sys.version.split()[0], defaults={"source_uri": "builtin:python-stdlib"})
        options = {"seq_len": 128, "batch_size": 8, "eval_interval": 100, "checkpoint_interval": 200,
                   "max_bytes": 1_500_000, "tokenizer_vocab_size": 2048}
        base = self._run(org, alice, "stdlib-coder", [(version, 1.0)], options, max_steps=400)
        if base is not None:
            self._run(org, alice, "stdlib-coder-lora", [(version, 1.0)], {**options, "lr": 5e-3, "min_lr": 5e-4},
                      max_steps=150, method="lora", base_version=base)

    def _run(self, org, actor, name, datasets, options, *, max_steps, method="full", base_version=None):
        model = Model.objects.filter(organization=org, name=name, latest_version__isnull=False).first()
        if model is not None:
            return model.latest_version
        self.stdout.write(f"Training {org.slug}/{name} ({method}, {max_steps} steps) on the CPU…")
        run = training_run_create(organization=org, model_name=name, actor=actor, datasets=datasets, options=options,
                                  max_steps=max_steps, method=method, base_version=base_version, tier="closed")
        run = training_run_execute(run_id=run.pk, attempt=run.attempt)
        if run.status != TrainingRun.Status.SUCCEEDED:
            self.stderr.write(f"  training run {run.pk} {run.status}: {run.error}")
            return None
        version = model_version_verify(version_id=run.result_version_id)
        Model.objects.filter(pk=version.model_id).update(
            summary="Trained here on the Python standard library" + (" (LoRA adapter)" if method == "lora" else ""))
        self.stdout.write(f"  {org.slug}/{name}@{version.commit[:12]}: loss {run.last_loss:.3f}, {run.tokens:,} tokens")
        return version

    def _users(self) -> dict[str, User]:
        users = {}
        for username, password, superuser in USERS:
            user, created = User.objects.get_or_create(
                username=username, defaults={"email": f"{username}@example.com", "is_superuser": superuser,
                                             "is_staff": superuser})
            if created:
                user.set_password(password)
                user.save(update_fields=["password"])
            users[username] = user
        return users

    def _org(self, slug, name, owner, description) -> Organization:
        return Organization.objects.filter(slug=slug).first() or organization_create(
            slug=slug, name=name, owner=owner, description=description)

    def _dataset(self, org, actor, name, provenance, licenses, documents, tokens) -> Dataset:
        dataset = Dataset.objects.filter(organization=org, name=name).first()
        if dataset is None:
            dataset = dataset_create(organization=org, actor=actor, name=name, provenance=provenance,
                                     licenses=list(License.objects.filter(key__in=licenses)),
                                     summary=f"{name} corpus", opt_out_handling="robots.txt and TDM-Rep honoured",
                                     **DATASHEET)
            dataset_version_create(dataset=dataset, actor=actor, version="2025.06", documents=documents,
                                   tokens=tokens, bytes=tokens * 4, exact_duplicate_rate=0.071,
                                   personal_data_found={"email": 18233, "phone": 4120, "ip_address": 977})
        return dataset

    def _model(self, spec, orgs, users) -> None:
        org_slug, name = spec["repo"].split("/")
        if Model.objects.filter(organization__slug=org_slug, name=name, latest_version__isnull=False).exists():
            return
        owner = users["alice"] if org_slug == "aurora-labs" else users["carol"]
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_model_folder(Path(tmp), metadata=spec["metadata"], seed=spec["seed"],
                                        body=f"# {name}\n\n{spec['summary']}.\n\n{DEMO_NOTE}\n\n## Uses\n\nResearch and "
                                             "product prototyping.\n\n## Limitations\n\nMay produce incorrect text.\n")
            version = model_version_ingest(organization=orgs[org_slug], name=name, files=files_from_directory(folder),
                                           user=owner, message="Demo release", tier=spec["tier"])
        # The worker would verify it too (idempotently); doing it here makes the demo usable at once.
        version = model_version_verify(version_id=version.pk)
        with transaction.atomic():
            Model.objects.filter(pk=version.model_id).update(summary=spec["summary"])
            compute_record_create(version=version, actor=owner, **spec["compute"])
            for key, metric, value, stderr in spec["evals"]:
                evaluation_result_record(version=version, actor=owner, benchmark=Benchmark.objects.get(key=key),
                                         metric=metric, value=value, stderr=stderr, harness="lm-evaluation-harness",
                                         harness_version="0.4.8", evaluator="Aurora evals team" if org_slug == "aurora-labs"
                                         else "Northwind", samples=1000)
            for threshold in RiskThreshold.objects.filter(domain__framework__key="openai-preparedness",
                                                          domain__category="tracked", rank=1):
                outcome = "cannot_rule_out" if name == "aurora-frontier" else "below"
                risk_assessment_record(version=version, actor=owner, threshold=threshold, outcome=outcome,
                                       mitigation="pre", evaluator="Aurora safety team",
                                       elicitation="Best-of-16 sampling with tool-use scaffolding; no fine-tuning.")
