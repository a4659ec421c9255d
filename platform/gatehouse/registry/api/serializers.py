"""Output and input shapes of the registry API. Outputs read only what the selectors prefetched."""
from rest_framework import serializers

from gatehouse.registry.models import (
    ComputeRecord, Dataset, DatasetVersion, DesignationThreshold, EvaluationResult, EvaluatorKind, License, Model,
    ModelFile, ModelRef, ModelVersion, RiskAssessment, RiskDomain, RiskFramework, RiskThreshold,
)


class LicenseSerializer(serializers.ModelSerializer):
    class Meta:
        model = License
        fields = ["key", "name", "version", "url", "osi_approved", "commercial_use", "use_restrictions", "aup_url",
                  "attribution_required", "attribution_text", "restrictions_inherited", "text", "text_sha256"]


class LicenseSummarySerializer(serializers.ModelSerializer):
    class Meta:
        model = License
        fields = ["key", "name", "osi_approved", "commercial_use", "restrictions_inherited"]


class VersionSummarySerializer(serializers.ModelSerializer):
    class Meta:
        model = ModelVersion
        fields = ["commit", "created_at", "verified_at", "architecture", "parameters", "context_length",
                  "total_bytes", "own_flops", "cumulative_flops"]


class ModelListSerializer(serializers.ModelSerializer):
    id = serializers.CharField(source="repo_id")
    organization = serializers.CharField(source="organization.slug")
    license = serializers.CharField(source="license.key", allow_null=True, default=None)
    latest_version = VersionSummarySerializer(allow_null=True)
    designations = serializers.SerializerMethodField()

    class Meta:
        model = Model
        fields = ["id", "organization", "name", "summary", "tier", "task", "tags", "license", "latest_version",
                  "designations", "created_at", "updated_at"]

    def get_designations(self, model) -> list[str]:
        from gatehouse.registry.selectors import designations_for

        return designations_for(model.latest_version, self.context["thresholds"])


class RefSerializer(serializers.ModelSerializer):
    commit = serializers.CharField(source="version.commit")

    class Meta:
        model = ModelRef
        fields = ["name", "kind", "commit", "updated_at"]


class DatasetSummarySerializer(serializers.ModelSerializer):
    id = serializers.SerializerMethodField()

    class Meta:
        model = Dataset
        fields = ["id", "summary", "provenance"]

    def get_id(self, dataset) -> str:
        return f"{dataset.organization.slug}/{dataset.name}"


class ModelDetailSerializer(ModelListSerializer):
    license = LicenseSummarySerializer(allow_null=True)
    base_model = serializers.CharField(source="base_model.repo_id", allow_null=True, default=None)
    card = serializers.SerializerMethodField()
    card_edited = serializers.SerializerMethodField()
    refs = RefSerializer(many=True, source="refs_prefetched")
    datasets = DatasetSummarySerializer(many=True, source="datasets_prefetched")

    class Meta(ModelListSerializer.Meta):
        fields = ModelListSerializer.Meta.fields + ["base_model", "base_model_relation", "card", "card_edited", "refs",
                                                    "datasets"]

    def get_card(self, model) -> str:
        return model.card_text or (model.latest_version.card if model.latest_version else "")

    def get_card_edited(self, model) -> bool:
        return bool(model.card_text)


class ModelFileSerializer(serializers.ModelSerializer):
    class Meta:
        model = ModelFile
        fields = ["path", "size", "sha256", "safetensors"]


class VersionSerializer(serializers.ModelSerializer):
    created_by = serializers.CharField(source="created_by.username", allow_null=True, default=None)
    license = serializers.CharField(source="license.key", allow_null=True, default=None)
    base_version = serializers.SerializerMethodField()

    class Meta:
        model = ModelVersion
        fields = ["commit", "status", "error", "message", "created_by", "created_at", "verified_at", "license",
                  "base_version", "architecture", "parameters", "context_length", "total_bytes", "own_flops",
                  "cumulative_flops"]

    def get_base_version(self, version) -> dict | None:
        base = version.base_version
        if base is None:
            return None
        return {"model": f"{base.model.organization.slug}/{base.model.name}", "commit": base.commit}


class VersionDetailSerializer(VersionSerializer):
    files = ModelFileSerializer(many=True)
    datasets = DatasetSummarySerializer(many=True)
    designations = serializers.ListField(child=serializers.CharField(), source="designation_keys")

    class Meta(VersionSerializer.Meta):
        fields = VersionSerializer.Meta.fields + ["designations", "config", "card_metadata", "datasets", "files"]


class ComputeRecordSerializer(serializers.ModelSerializer):
    class Meta:
        model = ComputeRecord
        fields = ["id", "stage", "hardware", "device_count", "wall_time_seconds", "device_hours", "flops",
                  "flops_method", "parameters", "tokens", "precision", "utilization", "energy_kwh",
                  "grid_intensity_kg_per_kwh", "emissions_kg", "cost_usd", "provider", "created_at"]


class ComputeRecordInput(serializers.Serializer):
    hardware = serializers.CharField(max_length=100)
    device_count = serializers.IntegerField(min_value=1, default=1)
    wall_time_seconds = serializers.FloatField(min_value=0, default=0.0)
    flops = serializers.FloatField(min_value=0, required=False, allow_null=True, default=None)
    flops_method = serializers.ChoiceField(ComputeRecord.Method.choices, required=False, allow_null=True, default=None)
    parameters = serializers.IntegerField(min_value=1, required=False, allow_null=True, default=None)
    tokens = serializers.IntegerField(min_value=1, required=False, allow_null=True, default=None)
    utilization = serializers.FloatField(min_value=0, max_value=1, required=False, allow_null=True, default=None)
    energy_kwh = serializers.FloatField(min_value=0, required=False, allow_null=True, default=None)
    precision = serializers.CharField(max_length=16, required=False, default="")
    provider = serializers.CharField(max_length=100, required=False, default="")
    stage = serializers.CharField(max_length=64, required=False, default="pretraining")


class EvaluationResultSerializer(serializers.ModelSerializer):
    benchmark = serializers.CharField(source="benchmark.key")
    benchmark_name = serializers.CharField(source="benchmark.name")
    category = serializers.CharField(source="benchmark.category")

    class Meta:
        model = EvaluationResult
        fields = ["id", "benchmark", "benchmark_name", "category", "metric", "value", "stderr", "samples",
                  "dataset_split", "harness", "harness_version", "evaluator", "evaluator_kind", "evidence_url",
                  "source", "evaluated_at"]


class EvaluationResultInput(serializers.Serializer):
    benchmark = serializers.SlugField(max_length=100)
    metric = serializers.CharField(max_length=64)
    value = serializers.FloatField()
    stderr = serializers.FloatField(min_value=0, required=False, allow_null=True, default=None)
    samples = serializers.IntegerField(min_value=0, required=False, allow_null=True, default=None)
    dataset_split = serializers.CharField(max_length=64, required=False, default="")
    harness = serializers.CharField(max_length=100, required=False, default="")
    harness_version = serializers.CharField(max_length=32, required=False, default="")
    evaluator = serializers.CharField(max_length=200, required=False, default="")
    evaluator_kind = serializers.ChoiceField(EvaluatorKind.choices, default=EvaluatorKind.INTERNAL)
    evidence_url = serializers.URLField(required=False, default="")


class RiskAssessmentSerializer(serializers.ModelSerializer):
    framework = serializers.SerializerMethodField()
    domain = serializers.CharField(source="threshold.domain.key")
    threshold = serializers.CharField(source="threshold.key")
    threshold_name = serializers.CharField(source="threshold.name")

    class Meta:
        model = RiskAssessment
        fields = ["id", "framework", "domain", "threshold", "threshold_name", "outcome", "mitigation", "elicitation",
                  "evaluator", "evaluator_kind", "evidence_url", "notes", "assessed_at"]

    def get_framework(self, assessment) -> str:
        framework = assessment.threshold.domain.framework
        return f"{framework.key}@{framework.version}"


class RiskAssessmentInput(serializers.Serializer):
    framework = serializers.SlugField()
    domain = serializers.SlugField()
    threshold = serializers.SlugField()
    outcome = serializers.ChoiceField(RiskAssessment.Outcome.choices)
    mitigation = serializers.ChoiceField(RiskAssessment.Mitigation.choices)
    evaluator = serializers.CharField(max_length=200)
    evaluator_kind = serializers.ChoiceField(EvaluatorKind.choices, default=EvaluatorKind.INTERNAL)
    elicitation = serializers.CharField(required=False, default="")
    evidence_url = serializers.URLField(required=False, default="")
    notes = serializers.CharField(required=False, default="")


class DatasetVersionSerializer(serializers.ModelSerializer):
    class Meta:
        model = DatasetVersion
        fields = ["version", "manifest_sha256", "documents", "tokens", "bytes", "exact_duplicate_rate",
                  "personal_data_found", "created_at"]


class DatasetSerializer(serializers.ModelSerializer):
    id = serializers.SerializerMethodField()
    organization = serializers.CharField(source="organization.slug")
    licenses = serializers.SlugRelatedField(many=True, read_only=True, slug_field="key")
    versions = DatasetVersionSerializer(many=True)

    class Meta:
        model = Dataset
        fields = ["id", "organization", "name", "summary", "provenance", "licenses", "datasheet_complete",
                  *Dataset.DATASHEET_SECTIONS, "opt_out_handling", "versions", "created_at"]

    def get_id(self, dataset) -> str:
        return f"{dataset.organization.slug}/{dataset.name}"


class DatasetInput(serializers.Serializer):
    organization = serializers.CharField()
    name = serializers.CharField(max_length=96)
    provenance = serializers.ChoiceField(Dataset.Provenance.choices)
    licenses = serializers.ListField(child=serializers.CharField(), default=list)
    summary = serializers.CharField(max_length=300, required=False, default="")
    opt_out_handling = serializers.CharField(required=False, default="")
    motivation = serializers.CharField(required=False, default="")
    composition = serializers.CharField(required=False, default="")
    collection = serializers.CharField(required=False, default="")
    preprocessing = serializers.CharField(required=False, default="")
    uses = serializers.CharField(required=False, default="")
    distribution = serializers.CharField(required=False, default="")
    maintenance = serializers.CharField(required=False, default="")


class DatasetVersionInput(serializers.Serializer):
    version = serializers.CharField(max_length=64)
    manifest_sha256 = serializers.RegexField(r"^[0-9a-f]{64}$", required=False, default="")
    documents = serializers.IntegerField(min_value=0, default=0)
    tokens = serializers.IntegerField(min_value=0, default=0)
    bytes = serializers.IntegerField(min_value=0, default=0)
    exact_duplicate_rate = serializers.FloatField(min_value=0, max_value=1, default=0.0)
    personal_data_found = serializers.DictField(child=serializers.IntegerField(min_value=0), default=dict)


class RiskThresholdSerializer(serializers.ModelSerializer):
    class Meta:
        model = RiskThreshold
        fields = ["key", "name", "rank", "description", "required_safeguards"]


class RiskDomainSerializer(serializers.ModelSerializer):
    thresholds = RiskThresholdSerializer(many=True)

    class Meta:
        model = RiskDomain
        fields = ["key", "name", "category", "description", "thresholds"]


class RiskFrameworkSerializer(serializers.ModelSerializer):
    domains = RiskDomainSerializer(many=True)

    class Meta:
        model = RiskFramework
        fields = ["key", "name", "publisher", "version", "published_on", "source_url", "is_active", "domains"]


class DesignationThresholdSerializer(serializers.ModelSerializer):
    class Meta:
        model = DesignationThreshold
        fields = ["key", "name", "instrument", "min_flops", "basis", "consequence", "source_url", "in_force",
                  "effective_from"]


class LineageEntrySerializer(serializers.Serializer):
    model = serializers.CharField(allow_null=True, help_text="null when the caller may not see that model")
    commit = serializers.CharField(allow_null=True, help_text="null when the caller may not see that model")
    relation = serializers.CharField()
    own_flops = serializers.FloatField()
    cumulative_flops = serializers.FloatField()


class DerivativeSerializer(serializers.Serializer):
    model = serializers.CharField()
    relation = serializers.CharField()


class LineageSerializer(serializers.Serializer):
    """GET …/lineage: the version, the chain of its bases (nearest first) and the visible derived models."""

    model = serializers.CharField()
    commit = serializers.CharField()
    own_flops = serializers.FloatField()
    cumulative_flops = serializers.FloatField()
    ancestors = LineageEntrySerializer(many=True)
    derivatives = DerivativeSerializer(many=True)


class ComputeSummarySerializer(serializers.Serializer):
    """GET …/compute: the version's compute totals, the designations they trigger and every record."""

    commit = serializers.CharField()
    own_flops = serializers.FloatField()
    cumulative_flops = serializers.FloatField()
    designations = serializers.ListField(child=serializers.CharField())
    records = ComputeRecordSerializer(many=True)


LIST_FIELDS = ("organization__slug", "name", "summary", "tier", "task", "tags", "license__key", "created_at",
               "updated_at", "latest_version__commit", "latest_version__created_at", "latest_version__verified_at",
               "latest_version__architecture", "latest_version__parameters", "latest_version__context_length",
               "latest_version__total_bytes", "latest_version__own_flops", "latest_version__cumulative_flops")


def _iso(value):
    if value is None:
        return None
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def model_list_rows(rows, thresholds: list[DesignationThreshold]) -> list[dict]:
    """The list endpoint's items, shaped like ModelListSerializer, built from `.values(*LIST_FIELDS)` rows.

    Lists are the hottest read; a nested ModelSerializer per row cost more than the queries did, and
    values() also keeps large per-version text (cards, configs) out of the list query.
    """
    items = []
    for row in rows:
        latest = None
        if row["latest_version__commit"] is not None:
            own, cumulative = row["latest_version__own_flops"], row["latest_version__cumulative_flops"]
            latest = {
                "commit": row["latest_version__commit"], "created_at": _iso(row["latest_version__created_at"]),
                "verified_at": _iso(row["latest_version__verified_at"]),
                "architecture": row["latest_version__architecture"], "parameters": row["latest_version__parameters"],
                "context_length": row["latest_version__context_length"],
                "total_bytes": row["latest_version__total_bytes"], "own_flops": own, "cumulative_flops": cumulative,
            }
        items.append({
            "id": f"{row['organization__slug']}/{row['name']}", "organization": row["organization__slug"],
            "name": row["name"], "summary": row["summary"], "tier": row["tier"], "task": row["task"],
            "tags": row["tags"], "license": row["license__key"], "latest_version": latest,
            "designations": [t.key for t in thresholds
                             if latest and t.applies_to(own_flops=own, cumulative_flops=cumulative)],
            "created_at": _iso(row["created_at"]), "updated_at": _iso(row["updated_at"]),
        })
    return items
