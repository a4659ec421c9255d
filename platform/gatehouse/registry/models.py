"""The registry's records: what a model is, what it was trained on, what it cost, how it scored.

Derived facts (commit ids, cumulative compute, designations) are computed by services, never typed in.
"""
from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from gatehouse.accounts.models import SLUG_RE, Organization, slug_validator

SHA256_RE = r"^[0-9a-f]{64}$"
COMMIT_RE = r"^[0-9a-f]{40}$"


class License(models.Model):
    key = models.CharField(max_length=64, unique=True, help_text="Hub/SPDX-like id, e.g. apache-2.0")
    name = models.CharField(max_length=200)
    version = models.CharField(max_length=32, blank=True)
    url = models.URLField(blank=True)
    text = models.TextField(blank=True, help_text="The licence text, or its summary with a link to the full text")
    text_sha256 = models.CharField(max_length=64, blank=True, help_text="Which text was accepted")
    osi_approved = models.BooleanField(default=False)
    commercial_use = models.BooleanField(null=True, help_text="None: unknown, needs legal review")
    use_restrictions = models.TextField(blank=True, help_text="Acceptable-use policy or field-of-use limits")
    aup_url = models.URLField(blank=True)
    attribution_required = models.BooleanField(default=False)
    attribution_text = models.CharField(max_length=300, blank=True)
    restrictions_inherited = models.BooleanField(
        default=False, help_text="Derivatives must carry the same use restrictions")

    class Meta:
        ordering = ["key"]

    def __str__(self) -> str:
        return self.key


class Dataset(models.Model):
    class Provenance(models.TextChoices):
        WEB_SCRAPED = "web-scraped", "Web-scraped"
        LICENSED = "licensed", "Licensed from a third party"
        SYNTHETIC = "synthetic", "Synthetic"
        USER_DATA = "user-data", "User data"
        PUBLIC_DOMAIN = "public-domain", "Public domain"
        MIXED = "mixed", "Mixed"

    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="datasets")
    name = models.CharField(max_length=96, validators=[slug_validator])
    summary = models.CharField(max_length=300, blank=True)
    provenance = models.CharField(max_length=16, choices=Provenance.choices)
    licenses = models.ManyToManyField(License, blank=True, related_name="datasets")
    # Datasheet sections (Gebru et al.)
    motivation = models.TextField(blank=True)
    composition = models.TextField(blank=True)
    collection = models.TextField(blank=True)
    preprocessing = models.TextField(blank=True)
    uses = models.TextField(blank=True)
    distribution = models.TextField(blank=True)
    maintenance = models.TextField(blank=True)
    opt_out_handling = models.TextField(blank=True, help_text="How text-and-data-mining opt-outs were honoured")
    created_at = models.DateTimeField(default=timezone.now)

    DATASHEET_SECTIONS = ("motivation", "composition", "collection", "preprocessing", "uses",
                          "distribution", "maintenance")

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "name"], name="dataset_unique_name"),
            models.CheckConstraint(condition=Q(name__regex=SLUG_RE), name="dataset_name_format"),
        ]

    def __str__(self) -> str:
        return f"{self.organization.slug}/{self.name}"

    @property
    def datasheet_complete(self) -> bool:
        return all(getattr(self, section).strip() for section in self.DATASHEET_SECTIONS)

    @property
    def datasheet_items(self) -> list[tuple[str, str]]:
        """(section title, text) in datasheet order, for pages."""
        return [(section.replace("_", " ").capitalize(), getattr(self, section)) for section in self.DATASHEET_SECTIONS]


class DatasetVersion(models.Model):
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="versions")
    version = models.CharField(max_length=64)
    manifest_sha256 = models.CharField(max_length=64, blank=True)
    documents = models.BigIntegerField(default=0)
    tokens = models.BigIntegerField(default=0)
    bytes = models.BigIntegerField(default=0)
    exact_duplicate_rate = models.FloatField(default=0.0, help_text="Share of documents removed as exact duplicates")
    personal_data_found = models.JSONField(default=dict, blank=True, help_text='Counts by kind, e.g. {"email": 3}')
    source_uri = models.CharField(
        max_length=500, blank=True,
        help_text="Where training runs read the documents: builtin:python-stdlib, or file:///… under GATEHOUSE_DATA_ROOT")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["dataset", "version"], name="dataset_version_unique"),
            models.CheckConstraint(condition=Q(documents__gte=0) & Q(tokens__gte=0) & Q(bytes__gte=0),
                                   name="dataset_version_counts_nonnegative"),
            models.CheckConstraint(condition=Q(exact_duplicate_rate__gte=0) & Q(exact_duplicate_rate__lte=1),
                                   name="dataset_version_duplicate_rate_fraction"),
            models.CheckConstraint(condition=Q(manifest_sha256="") | Q(manifest_sha256__regex=SHA256_RE),
                                   name="dataset_version_manifest_sha256"),
        ]

    def __str__(self) -> str:
        return f"{self.dataset}@{self.version}"


class Tier(models.TextChoices):
    CLOSED = "closed", "Closed"
    API = "api", "API only"
    OPEN = "open", "Open weights"


class BaseRelation(models.TextChoices):
    FINETUNE = "finetune", "Fine-tune"
    ADAPTER = "adapter", "Adapter"
    QUANTIZED = "quantized", "Quantized"
    MERGE = "merge", "Merge"
    DISTILLATION = "distillation", "Distillation"


# Meta.ordering uses local fields only: ordering through a relation makes Django resolve the related
# model's ordering on every query (a measurable cost on the hot list and detail paths).


class Model(models.Model):
    """A repository `org/name`. Its facts at any point in time live on its versions."""

    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="models")
    name = models.CharField(max_length=96, validators=[slug_validator])
    summary = models.CharField(max_length=300, blank=True)
    tier = models.CharField(max_length=8, choices=Tier.choices, default=Tier.CLOSED)
    task = models.CharField(max_length=64, blank=True, help_text="pipeline_tag, e.g. text-generation")
    tags = models.JSONField(default=list, blank=True)
    license = models.ForeignKey(License, null=True, blank=True, on_delete=models.PROTECT, related_name="models")
    base_model = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="derivatives")
    base_model_relation = models.CharField(max_length=16, choices=BaseRelation.choices, blank=True)
    # An edited card (the generated one is the latest version's README.md); empty means "not edited".
    card_text = models.TextField(blank=True)
    # The newest verified version; kept by services so lists need no per-row subquery.
    latest_version = models.OneToOneField("ModelVersion", null=True, blank=True, on_delete=models.SET_NULL,
                                          related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "name"], name="model_unique_name"),
            models.CheckConstraint(condition=Q(name__regex=SLUG_RE), name="model_name_format"),
            models.CheckConstraint(condition=Q(tier__in=["closed", "api", "open"]), name="model_tier_valid"),
            models.CheckConstraint(
                condition=Q(base_model__isnull=True, base_model_relation="")
                | Q(base_model__isnull=False, base_model_relation__in=BaseRelation.values),
                name="model_base_relation_consistent"),
            models.CheckConstraint(condition=~Q(base_model=F("id")), name="model_not_own_base"),
        ]
        indexes = [models.Index(fields=["tier"]), models.Index(fields=["task"]), models.Index(fields=["-updated_at", "-id"], name="model_recent_first")]

    def __str__(self) -> str:
        return self.repo_id

    @property
    def repo_id(self) -> str:
        return f"{self.organization.slug}/{self.name}"


class ModelVersion(models.Model):
    """One immutable snapshot of a model's files. `commit` is derived from the files' content."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending verification"
        VERIFYING = "verifying", "Verifying"
        VERIFIED = "verified", "Verified"
        FAILED = "failed", "Verification failed"

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="versions")
    commit = models.CharField(max_length=40)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING)
    error = models.TextField(blank=True)
    message = models.CharField(max_length=300, blank=True)
    card = models.TextField(blank=True, help_text="README.md as uploaded, YAML metadata included")
    card_metadata = models.JSONField(default=dict, blank=True, help_text="The card's parsed YAML metadata")
    license = models.ForeignKey(License, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    base_version = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="derived_versions")
    datasets = models.ManyToManyField(Dataset, blank=True, related_name="model_versions")
    architecture = models.CharField(max_length=100, blank=True)
    parameters = models.BigIntegerField(null=True, blank=True)
    context_length = models.IntegerField(null=True, blank=True)
    config = models.JSONField(default=dict, blank=True)
    total_bytes = models.BigIntegerField(default=0)
    # Own compute plus the base version's cumulative compute (kept by compute services).
    own_flops = models.FloatField(default=0.0)
    cumulative_flops = models.FloatField(default=0.0)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    verified_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        get_latest_by = "created_at"
        constraints = [
            models.UniqueConstraint(fields=["model", "commit"], name="model_version_unique_commit"),
            models.CheckConstraint(condition=Q(commit__regex=COMMIT_RE), name="model_version_commit_format"),
            models.CheckConstraint(condition=Q(status__in=["pending", "verifying", "verified", "failed"]),
                                   name="model_version_status_valid"),
            models.CheckConstraint(condition=Q(own_flops__gte=0) & Q(cumulative_flops__gte=F("own_flops")),
                                   name="model_version_flops_consistent"),
            models.CheckConstraint(condition=Q(parameters__isnull=True) | Q(parameters__gte=0),
                                   name="model_version_parameters_nonnegative"),
            models.CheckConstraint(condition=Q(status="verified", verified_at__isnull=False)
                                   | ~Q(status="verified"), name="model_version_verified_has_time"),
        ]

    def __str__(self) -> str:
        return f"{self.model_id}@{self.commit[:10]}"

    def save(self, *args, **kwargs):
        # A verified version is immutable: its commit id promises these exact files and facts.
        # (Derived totals and status move through conditional UPDATEs in the services, not save().)
        if self.pk and ModelVersion.objects.filter(pk=self.pk, status=self.Status.VERIFIED).exists():
            raise ValueError(f"{self} is verified and immutable; register a new version instead.")
        super().save(*args, **kwargs)

    @property
    def is_usable(self) -> bool:
        return self.status == self.Status.VERIFIED


class ModelFile(models.Model):
    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="files")
    path = models.CharField(max_length=500)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    storage_key = models.CharField(max_length=700)
    # Parsed safetensors header facts: {"tensors": n, "dtypes": [...], "parameters": n}
    safetensors = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["path"]
        constraints = [
            models.UniqueConstraint(fields=["version", "path"], name="model_file_unique_path"),
            models.CheckConstraint(condition=Q(size__gte=0), name="model_file_size_nonnegative"),
            models.CheckConstraint(condition=Q(sha256__regex=SHA256_RE), name="model_file_sha256_format"),
        ]

    def __str__(self) -> str:
        return self.path


class ModelRef(models.Model):
    class Kind(models.TextChoices):
        BRANCH = "branch", "Branch"
        TAG = "tag", "Tag"

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="refs")
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=8, choices=Kind.choices)
    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="refs")
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["kind", "name"]
        constraints = [
            models.UniqueConstraint(fields=["model", "name"], name="model_ref_unique_name"),
            models.CheckConstraint(condition=Q(name__regex=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
                                   & ~Q(name__regex=r"^[0-9a-f]{40}$"), name="model_ref_name_format"),
        ]

    def __str__(self) -> str:
        return f"{self.model_id}:{self.name}"


class ComputeRecord(models.Model):
    """What one training stage of a version cost. FLOPs are measured by the trainer or estimated."""

    class Method(models.TextChoices):
        OPERATION_COUNT = "operation-count", "6·N·D + attention (operation counting)"
        HARDWARE = "hardware", "devices × time × peak × utilization"
        REPORTED = "reported", "Reported by the provider"

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="compute_records")
    stage = models.CharField(max_length=64, default="pretraining")
    hardware = models.CharField(max_length=100)
    device_count = models.PositiveIntegerField(default=1)
    wall_time_seconds = models.FloatField(default=0.0)
    device_hours = models.FloatField(default=0.0)
    flops = models.FloatField()
    flops_method = models.CharField(max_length=20, choices=Method.choices)
    parameters = models.BigIntegerField(null=True, blank=True, help_text="N used for operation counting")
    tokens = models.BigIntegerField(null=True, blank=True, help_text="D used for operation counting")
    precision = models.CharField(max_length=16, blank=True)
    utilization = models.FloatField(null=True, blank=True, help_text="Model-FLOPs utilisation, 0–1")
    energy_kwh = models.FloatField(default=0.0)
    grid_intensity_kg_per_kwh = models.FloatField(default=0.0)
    emissions_kg = models.FloatField(default=0.0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=2, default=0)
    provider = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(flops__gte=0) & Q(energy_kwh__gte=0) & Q(emissions_kg__gte=0)
                                   & Q(device_hours__gte=0) & Q(wall_time_seconds__gte=0) & Q(cost_usd__gte=0),
                                   name="compute_record_nonnegative"),
            models.CheckConstraint(condition=Q(device_count__gte=1), name="compute_record_devices_positive"),
            models.CheckConstraint(condition=Q(utilization__isnull=True) | (Q(utilization__gt=0) & Q(utilization__lte=1)),
                                   name="compute_record_utilization_fraction"),
        ]

    def __str__(self) -> str:
        return f"{self.version} {self.stage}: {self.flops:.2e} FLOP"


class DesignationThreshold(models.Model):
    """A legal or policy compute threshold. Data, not code: edit it in the admin when the law moves."""

    class Basis(models.TextChoices):
        CUMULATIVE = "cumulative", "Cumulative along the lineage"
        OWN = "own", "This version's own training only"

    key = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    instrument = models.CharField(max_length=200)
    min_flops = models.FloatField(help_text="Designated when compute is strictly greater than this")
    basis = models.CharField(max_length=12, choices=Basis.choices, default=Basis.CUMULATIVE)
    consequence = models.TextField(blank=True)
    source_url = models.URLField()
    in_force = models.BooleanField(default=True)
    effective_from = models.DateField(null=True, blank=True)

    class Meta:
        ordering = ["min_flops", "key"]
        constraints = [models.CheckConstraint(condition=Q(min_flops__gt=0), name="designation_threshold_positive")]

    def __str__(self) -> str:
        return f"{self.key} (> {self.min_flops:.0e} FLOP)"

    def applies_to(self, *, own_flops: float, cumulative_flops: float) -> bool:
        value = cumulative_flops if self.basis == self.Basis.CUMULATIVE else own_flops
        return self.in_force and value > self.min_flops


class Benchmark(models.Model):
    class Category(models.TextChoices):
        CAPABILITY = "capability", "Capability"
        SAFETY = "safety", "Safety"

    key = models.SlugField(max_length=100, unique=True)
    name = models.CharField(max_length=200)
    category = models.CharField(max_length=12, choices=Category.choices, default=Category.CAPABILITY)
    task_type = models.CharField(max_length=100, blank=True)
    description = models.TextField(blank=True)
    higher_is_better = models.BooleanField(default=True)

    class Meta:
        ordering = ["key"]

    def __str__(self) -> str:
        return self.key


class EvaluatorKind(models.TextChoices):
    INTERNAL = "internal", "Internal"
    THIRD_PARTY = "third-party", "Third party"


class EvaluationResult(models.Model):
    class Source(models.TextChoices):
        MANUAL = "manual", "Entered"
        MODEL_INDEX = "model-index", "Model card model-index"
        LM_EVAL = "lm-eval", "lm-evaluation-harness results"

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="evaluations")
    benchmark = models.ForeignKey(Benchmark, on_delete=models.PROTECT, related_name="results")
    metric = models.CharField(max_length=64)
    value = models.FloatField()
    stderr = models.FloatField(null=True, blank=True)
    samples = models.PositiveIntegerField(null=True, blank=True)
    dataset_split = models.CharField(max_length=64, blank=True)
    harness = models.CharField(max_length=100, blank=True)
    harness_version = models.CharField(max_length=32, blank=True)
    evaluator = models.CharField(max_length=200, blank=True)
    evaluator_kind = models.CharField(max_length=12, choices=EvaluatorKind.choices, default=EvaluatorKind.INTERNAL)
    evidence_url = models.URLField(blank=True)
    source = models.CharField(max_length=12, choices=Source.choices, default=Source.MANUAL)
    evaluated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["version", "benchmark", "metric", "evaluator"],
                                    name="evaluation_result_unique"),
            models.CheckConstraint(condition=Q(stderr__isnull=True) | Q(stderr__gte=0), name="evaluation_stderr_nonnegative"),
        ]

    def __str__(self) -> str:
        return f"{self.version} {self.benchmark_id} {self.metric}={self.value}"


class RiskFramework(models.Model):
    key = models.SlugField(max_length=64)
    name = models.CharField(max_length=200)
    publisher = models.CharField(max_length=100)
    version = models.CharField(max_length=32)
    published_on = models.DateField(null=True, blank=True)
    source_url = models.URLField(blank=True)
    is_active = models.BooleanField(default=True, help_text="Release checks use the active version")

    class Meta:
        ordering = ["key", "-published_on"]
        constraints = [
            models.UniqueConstraint(fields=["key", "version"], name="risk_framework_unique_version"),
            models.UniqueConstraint(fields=["key"], condition=Q(is_active=True), name="risk_framework_one_active"),
        ]

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


class RiskDomain(models.Model):
    class Category(models.TextChoices):
        TRACKED = "tracked", "Tracked"
        RESEARCH = "research", "Research / watched"

    framework = models.ForeignKey(RiskFramework, on_delete=models.CASCADE, related_name="domains")
    key = models.SlugField(max_length=64)
    name = models.CharField(max_length=200)
    category = models.CharField(max_length=10, choices=Category.choices, default=Category.TRACKED)
    description = models.TextField(blank=True)

    class Meta:
        ordering = ["key"]
        constraints = [models.UniqueConstraint(fields=["framework", "key"], name="risk_domain_unique")]

    def __str__(self) -> str:
        return f"{self.framework.key}:{self.key}"


class RiskThreshold(models.Model):
    """A named capability level within a domain (High, Critical, CBRN-3, a CCL…), ordered by rank."""

    domain = models.ForeignKey(RiskDomain, on_delete=models.CASCADE, related_name="thresholds")
    key = models.SlugField(max_length=64)
    name = models.CharField(max_length=200)
    rank = models.PositiveSmallIntegerField(help_text="Higher is more severe")
    description = models.TextField(blank=True)
    required_safeguards = models.TextField(blank=True)
    # The most open release tier a model at this level may have, without and with the required safeguards.
    max_tier_unmitigated = models.CharField(max_length=8, choices=Tier.choices, default=Tier.CLOSED)
    max_tier_with_safeguards = models.CharField(max_length=8, choices=Tier.choices, default=Tier.API)

    class Meta:
        ordering = ["rank"]
        constraints = [
            models.UniqueConstraint(fields=["domain", "key"], name="risk_threshold_unique_key"),
            models.UniqueConstraint(fields=["domain", "rank"], name="risk_threshold_unique_rank"),
        ]

    def __str__(self) -> str:
        return f"{self.domain}:{self.key}"


class RiskAssessment(models.Model):
    class Outcome(models.TextChoices):
        BELOW = "below", "Below threshold"
        CANNOT_RULE_OUT = "cannot_rule_out", "Cannot rule out"
        ABOVE = "above", "Above threshold"

    class Mitigation(models.TextChoices):
        PRE = "pre", "Pre-mitigation"
        POST = "post", "Post-mitigation"

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="risk_assessments")
    threshold = models.ForeignKey(RiskThreshold, on_delete=models.PROTECT, related_name="assessments")
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    mitigation = models.CharField(max_length=4, choices=Mitigation.choices)
    elicitation = models.TextField(blank=True, help_text="Scaffolding, fine-tuning, tools used to elicit capability")
    evaluator = models.CharField(max_length=200)
    evaluator_kind = models.CharField(max_length=12, choices=EvaluatorKind.choices, default=EvaluatorKind.INTERNAL)
    evidence_url = models.URLField(blank=True)
    notes = models.TextField(blank=True)
    assessed_at = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")

    class Meta:
        ordering = ["-assessed_at"]
        constraints = [
            models.CheckConstraint(condition=Q(outcome__in=["below", "cannot_rule_out", "above"]),
                                   name="risk_assessment_outcome_valid"),
            models.CheckConstraint(condition=Q(mitigation__in=["pre", "post"]), name="risk_assessment_mitigation_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.version} {self.threshold}: {self.outcome} ({self.mitigation})"


class TrainingRun(models.Model):
    """A training or fine-tuning run launched by the platform; its facts are recorded, never typed in."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="training_runs")
    model_name = models.CharField(max_length=96, validators=[slug_validator])
    tier = models.CharField(max_length=8, choices=Tier.choices, default=Tier.CLOSED)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    preset = models.CharField(max_length=32, blank=True)
    method = models.CharField(max_length=12, default="full")
    base_version = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    config = models.JSONField(default=dict, help_text="Trainer options (python -m training train flags)")
    processes = models.PositiveSmallIntegerField(default=1)
    estimated_flops = models.FloatField(default=0.0)
    estimated_cumulative_flops = models.FloatField(default=0.0)
    expected_designations = models.JSONField(default=list, blank=True)
    attempt = models.PositiveIntegerField(default=0)
    cancel_requested = models.BooleanField(default=False)
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    tokens = models.BigIntegerField(default=0)
    last_loss = models.FloatField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    log_tail = models.TextField(blank=True)
    result_version = models.OneToOneField(ModelVersion, null=True, blank=True, on_delete=models.SET_NULL,
                                          related_name="training_run")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=["queued", "running", "succeeded", "failed", "cancelled"]),
                                   name="training_run_status_valid"),
            models.CheckConstraint(condition=Q(method__in=["full", "lora", "last-layer", "bias"]),
                                   name="training_run_method_valid"),
            models.CheckConstraint(condition=Q(method="full") | Q(base_version__isnull=False),
                                   name="training_run_adaptation_has_base"),
            models.CheckConstraint(condition=Q(processes__gte=1), name="training_run_processes_positive"),
        ]
        indexes = [models.Index(fields=["status", "heartbeat_at"])]

    def __str__(self) -> str:
        return f"run {self.pk} → {self.organization_id}/{self.model_name} ({self.status})"

    @property
    def repo_id(self) -> str:
        return f"{self.organization.slug}/{self.model_name}"


class TrainingRunDataset(models.Model):
    run = models.ForeignKey(TrainingRun, on_delete=models.CASCADE, related_name="datasets")
    dataset_version = models.ForeignKey(DatasetVersion, on_delete=models.PROTECT, related_name="training_runs")
    weight = models.FloatField(default=1.0)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["run", "dataset_version"], name="training_run_dataset_unique"),
            models.CheckConstraint(condition=Q(weight__gt=0), name="training_run_dataset_weight_positive"),
        ]


class TrainingMetric(models.Model):
    """One point of a run's live series, as the trainer reported it (events.jsonl)."""

    run = models.ForeignKey(TrainingRun, on_delete=models.CASCADE, related_name="metrics")
    kind = models.CharField(max_length=8)  # step | eval
    step = models.PositiveIntegerField()
    loss = models.FloatField(null=True, blank=True)
    lr = models.FloatField(null=True, blank=True)
    tokens = models.BigIntegerField(null=True, blank=True)
    tokens_per_s = models.FloatField(null=True, blank=True)
    mfu = models.FloatField(null=True, blank=True)
    flops = models.FloatField(null=True, blank=True)
    memory_bytes = models.BigIntegerField(null=True, blank=True)
    val_loss = models.FloatField(null=True, blank=True)
    val_perplexity = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["kind", "step"]
        constraints = [models.UniqueConstraint(fields=["run", "kind", "step"], name="training_metric_unique")]
