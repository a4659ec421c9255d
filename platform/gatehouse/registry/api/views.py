"""Registry API. Each view parses, authorizes (selectors hide what the caller may not see), calls one
service or selector, and serializes."""
from django.db.models import Prefetch
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.generics import GenericAPIView
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response

from gatehouse.accounts.models import Organization
from gatehouse.core.api import validated
from gatehouse.core.errors import InvalidInput, NotFound
from gatehouse.registry import selectors
from gatehouse.registry.api import serializers as s
from gatehouse.registry.models import (
    Benchmark, ComputeRecord, Dataset, DesignationThreshold, EvaluationResult, EvaluatorKind, License, ModelRef,
    ModelVersion, RiskAssessment, RiskFramework, RiskThreshold, Tier,
)
from gatehouse.registry.services.compute import compute_record_create
from gatehouse.registry.services.evaluations import evaluations_import
from gatehouse.registry.services.versions import model_card_update
from gatehouse.registry.services.ingest import IncomingFile, model_version_ingest
from gatehouse.registry.services.records import (
    dataset_create, dataset_version_create, evaluation_result_record, risk_assessment_record,
)

REVISION = OpenApiParameter("revision", str, description="Ref name (default main) or full 40-hex commit id")


def _revision(request) -> str:
    return request.query_params.get("revision") or "main"


class ModelListApi(GenericAPIView):
    serializer_class = s.ModelListSerializer

    @extend_schema(operation_id="models_list", parameters=[
        OpenApiParameter("q", str, description="Words matched against name, organization, summary, task"),
        OpenApiParameter("license", str), OpenApiParameter("tier", str, enum=Tier.values),
        OpenApiParameter("task", str), OpenApiParameter("organization", str),
        OpenApiParameter("designation", str, description="A designation threshold key, e.g. eu-systemic-risk"),
    ])
    def get(self, request):
        params = request.query_params
        tier = params.get("tier", "")
        if tier and tier not in Tier.values:
            raise InvalidInput(f"tier must be one of {', '.join(Tier.values)}.", fields={"tier": ["invalid choice"]})
        models = selectors.model_list(user=request.user, q=params.get("q", "")[:200], license=params.get("license", ""),
                                      tier=tier, task=params.get("task", ""), organization=params.get("organization", ""),
                                      designation=params.get("designation", ""))
        page = self.paginate_queryset(models.values(*s.LIST_FIELDS))
        return self.get_paginated_response(s.model_list_rows(page, selectors.designation_thresholds()))


class ModelDetailApi(GenericAPIView):
    serializer_class = s.ModelDetailSerializer

    def get(self, request, org, name):
        model = selectors.model_get(user=request.user, org=org, name=name)
        model.refs_prefetched = list(ModelRef.objects.filter(model=model).select_related("version"))
        model.datasets_prefetched = (list(model.latest_version.datasets.select_related("organization"))
                                     if model.latest_version else [])
        context = {"thresholds": selectors.designation_thresholds()}
        return Response(s.ModelDetailSerializer(model, context=context).data)


def _versions_for(request, model):
    versions = ModelVersion.objects.filter(model=model).select_related(
        "created_by", "license", "base_version__model__organization")
    if not selectors.is_member(request.user, model.organization):
        versions = versions.filter(status=ModelVersion.Status.VERIFIED)  # outsiders see only usable versions
    return versions.order_by("-created_at", "-id")


class VersionListApi(GenericAPIView):
    serializer_class = s.VersionSerializer
    parser_classes = [MultiPartParser]

    @extend_schema(operation_id="model_versions_list")
    def get(self, request, org, name):
        model = selectors.model_get(user=request.user, org=org, name=name)
        page = self.paginate_queryset(_versions_for(request, model))
        return self.get_paginated_response(s.VersionSerializer(page, many=True).data)

    @extend_schema(
        request={"multipart/form-data": {"type": "object", "additionalProperties": {"type": "string", "format": "binary"}}},
        responses={202: s.VersionSerializer},
        description="Upload a Hugging Face-style model folder: one multipart file field per file, the field "
                    "name being its path (e.g. `-F config.json=@config.json`). Optional text fields `message` and "
                    "`tier` (for a new model). The version is pending until verified.")
    def post(self, request, org, name):
        organization = Organization.objects.filter(slug=org).first()
        if organization is None:
            raise NotFound(f"Organization {org!r} does not exist.")
        files = []
        for path in request.FILES:
            uploads = request.FILES.getlist(path)
            if len(uploads) > 1:
                raise InvalidInput(f"File path {path!r} appears {len(uploads)} times in the upload.")
            upload = uploads[0]
            files.append(IncomingFile(path=path, size=upload.size, open=lambda upload=upload: _reopen(upload)))
        tier = request.data.get("tier") or None
        if tier and tier not in Tier.values:
            raise InvalidInput(f"tier must be one of {', '.join(Tier.values)}.")
        version = model_version_ingest(organization=organization, name=name, files=files, user=request.user,
                                       message=request.data.get("message", ""), tier=tier)
        response = Response(s.VersionSerializer(version).data, status=status.HTTP_202_ACCEPTED)
        response["Location"] = f"/api/v1/models/{org}/{name}/versions/{version.commit}"
        return response


class _Reopened:
    """Context manager over an uploaded file that rewinds it and leaves it open for Django to clean up."""

    def __init__(self, upload):
        self.upload = upload

    def __enter__(self):
        self.upload.seek(0)
        return self.upload

    def __exit__(self, *exc):
        return False


def _reopen(upload):
    return _Reopened(upload)


class VersionDetailApi(GenericAPIView):
    serializer_class = s.VersionDetailSerializer

    def get(self, request, org, name, commit):
        model = selectors.model_get(user=request.user, org=org, name=name)
        version = _versions_for(request, model).filter(commit=commit).prefetch_related(
            "files", Prefetch("datasets", queryset=Dataset.objects.select_related("organization"))).first()
        if version is None:
            raise NotFound(f"{model.repo_id} has no version {commit}.")
        version.designation_keys = selectors.designations_for(version, selectors.designation_thresholds())
        return Response(s.VersionDetailSerializer(version).data)


class _VersionScopedApi(GenericAPIView):
    """GET lists a child record of the version named by ?revision= (default main)."""

    def version(self, request, org, name) -> ModelVersion:
        model = selectors.model_get(user=request.user, org=org, name=name)
        return selectors.version_resolve(model=model, revision=_revision(request))


class FileListApi(_VersionScopedApi):
    serializer_class = s.ModelFileSerializer

    @extend_schema(parameters=[REVISION])
    def get(self, request, org, name):
        version = self.version(request, org, name)
        page = self.paginate_queryset(version.files.order_by("path"))
        return self.get_paginated_response(s.ModelFileSerializer(page, many=True).data)


class ComputeApi(_VersionScopedApi):
    serializer_class = s.ComputeRecordSerializer

    @extend_schema(parameters=[REVISION], responses=s.ComputeSummarySerializer)
    def get(self, request, org, name):
        version = self.version(request, org, name)
        records = ComputeRecord.objects.filter(version=version)
        thresholds = selectors.designation_thresholds()
        return Response({
            "commit": version.commit, "own_flops": version.own_flops, "cumulative_flops": version.cumulative_flops,
            "designations": selectors.designations_for(version, thresholds),
            "records": s.ComputeRecordSerializer(records, many=True).data,
        })

    @extend_schema(parameters=[REVISION], request=s.ComputeRecordInput, responses={201: s.ComputeRecordSerializer})
    def post(self, request, org, name):
        version = self.version(request, org, name)
        data = validated(s.ComputeRecordInput, request)
        record = compute_record_create(version=version, actor=request.user, **data)
        return Response(s.ComputeRecordSerializer(record).data, status=status.HTTP_201_CREATED)


class EvaluationApi(_VersionScopedApi):
    serializer_class = s.EvaluationResultSerializer

    @extend_schema(parameters=[REVISION])
    def get(self, request, org, name):
        version = self.version(request, org, name)
        results = EvaluationResult.objects.filter(version=version).select_related("benchmark")
        page = self.paginate_queryset(results)
        return self.get_paginated_response(s.EvaluationResultSerializer(page, many=True).data)

    @extend_schema(parameters=[REVISION], request=s.EvaluationResultInput, responses={201: s.EvaluationResultSerializer})
    def post(self, request, org, name):
        version = self.version(request, org, name)
        data = validated(s.EvaluationResultInput, request)
        benchmark = Benchmark.objects.filter(key=data.pop("benchmark")).first()
        if benchmark is None:
            raise InvalidInput("Unknown benchmark; list them at /api/v1/benchmarks.", fields={"benchmark": ["unknown"]})
        result = evaluation_result_record(version=version, actor=request.user, benchmark=benchmark, **data)
        return Response(s.EvaluationResultSerializer(result).data, status=status.HTTP_201_CREATED)


class RiskAssessmentApi(_VersionScopedApi):
    serializer_class = s.RiskAssessmentSerializer

    @extend_schema(parameters=[REVISION])
    def get(self, request, org, name):
        version = self.version(request, org, name)
        assessments = RiskAssessment.objects.filter(version=version).select_related("threshold__domain__framework")
        page = self.paginate_queryset(assessments)
        return self.get_paginated_response(s.RiskAssessmentSerializer(page, many=True).data)

    @extend_schema(parameters=[REVISION], request=s.RiskAssessmentInput, responses={201: s.RiskAssessmentSerializer})
    def post(self, request, org, name):
        version = self.version(request, org, name)
        data = validated(s.RiskAssessmentInput, request)
        threshold = RiskThreshold.objects.select_related("domain__framework").filter(
            domain__framework__key=data.pop("framework"), domain__framework__is_active=True,
            domain__key=data.pop("domain"), key=data.pop("threshold")).first()
        if threshold is None:
            raise InvalidInput("No such framework/domain/threshold in an active framework; see /api/v1/risk-frameworks.")
        assessment = risk_assessment_record(version=version, actor=request.user, threshold=threshold, **data)
        return Response(s.RiskAssessmentSerializer(assessment).data, status=status.HTTP_201_CREATED)


class ModelDatasetsApi(_VersionScopedApi):
    serializer_class = s.DatasetSerializer
    pagination_class = None  # a version lists few datasets: one plain array

    @extend_schema(parameters=[REVISION], responses=s.DatasetSerializer(many=True))
    def get(self, request, org, name):
        version = self.version(request, org, name)
        datasets = selectors.dataset_queryset().filter(model_versions=version)
        return Response(s.DatasetSerializer(datasets, many=True).data)


class LineageApi(_VersionScopedApi):
    @extend_schema(parameters=[REVISION], responses=s.LineageSerializer)
    def get(self, request, org, name):
        version = self.version(request, org, name)
        chain = selectors.version_lineage(version)
        visible = set(selectors.model_visible_queryset(request.user).filter(
            pk__in=[v.model_id for v in chain]).values_list("pk", flat=True))
        ancestors = []
        for child, entry in zip(chain, chain[1:]):
            ancestors.append({
                "model": entry.model.repo_id if entry.model_id in visible else None,
                "commit": entry.commit if entry.model_id in visible else None,
                "relation": child.model.base_model_relation or "finetune",
                "own_flops": entry.own_flops, "cumulative_flops": entry.cumulative_flops,
            })
        derived = selectors.model_visible_queryset(request.user).filter(base_model=version.model).select_related(
            "organization").order_by("organization__slug", "name")
        return Response({
            "model": version.model.repo_id, "commit": version.commit,
            "own_flops": version.own_flops, "cumulative_flops": version.cumulative_flops,
            "ancestors": ancestors,
            "derivatives": [{"model": m.repo_id, "relation": m.base_model_relation} for m in derived],
        })


class DatasetListApi(GenericAPIView):
    serializer_class = s.DatasetSerializer

    @extend_schema(operation_id="datasets_list",
                   parameters=[OpenApiParameter("organization", str), OpenApiParameter("provenance", str)])
    def get(self, request):
        datasets = selectors.dataset_queryset().order_by("organization__slug", "name")
        if request.query_params.get("organization"):
            datasets = datasets.filter(organization__slug=request.query_params["organization"])
        if request.query_params.get("provenance"):
            datasets = datasets.filter(provenance=request.query_params["provenance"])
        page = self.paginate_queryset(datasets)
        return self.get_paginated_response(s.DatasetSerializer(page, many=True).data)

    @extend_schema(request=s.DatasetInput, responses={201: s.DatasetSerializer})
    def post(self, request):
        data = validated(s.DatasetInput, request)
        organization = Organization.objects.filter(slug=data.pop("organization")).first()
        if organization is None:
            raise InvalidInput("Unknown organization.", fields={"organization": ["unknown"]})
        keys = data.pop("licenses")
        licenses = list(License.objects.filter(key__in=keys))
        missing = sorted(set(keys) - {lic.key for lic in licenses})
        if missing:
            raise InvalidInput(f"Unknown licence(s): {', '.join(missing)}; see /api/v1/licenses.")
        dataset = dataset_create(organization=organization, actor=request.user, licenses=licenses, **data)
        return Response(s.DatasetSerializer(selectors.dataset_queryset().get(pk=dataset.pk)).data, status=status.HTTP_201_CREATED)


def _dataset_get(org, name) -> Dataset:
    dataset = selectors.dataset_queryset().filter(organization__slug=org, name=name).first()
    if dataset is None:
        raise NotFound(f"Dataset {org}/{name} does not exist.")
    return dataset


class DatasetDetailApi(GenericAPIView):
    serializer_class = s.DatasetSerializer

    def get(self, request, org, name):
        return Response(s.DatasetSerializer(_dataset_get(org, name)).data)


class DatasetVersionCreateApi(GenericAPIView):
    serializer_class = s.DatasetVersionSerializer

    @extend_schema(request=s.DatasetVersionInput, responses={201: s.DatasetVersionSerializer})
    def post(self, request, org, name):
        dataset = _dataset_get(org, name)
        data = validated(s.DatasetVersionInput, request)
        row = dataset_version_create(dataset=dataset, actor=request.user, **data)
        return Response(s.DatasetVersionSerializer(row).data, status=status.HTTP_201_CREATED)


class LicenseListApi(GenericAPIView):
    serializer_class = s.LicenseSerializer
    pagination_class = None

    @extend_schema(operation_id="licenses_list", responses=s.LicenseSerializer(many=True))
    def get(self, request):
        return Response(s.LicenseSerializer(License.objects.order_by("key"), many=True).data)


class LicenseDetailApi(GenericAPIView):
    serializer_class = s.LicenseSerializer

    def get(self, request, key):
        license = License.objects.filter(key=key).first()
        if license is None:
            raise NotFound(f"No licence {key!r}; see /api/v1/licenses.")
        return Response(s.LicenseSerializer(license).data)


class RiskFrameworkListApi(GenericAPIView):
    serializer_class = s.RiskFrameworkSerializer
    pagination_class = None

    @extend_schema(responses=s.RiskFrameworkSerializer(many=True))
    def get(self, request):
        frameworks = RiskFramework.objects.prefetch_related("domains__thresholds").order_by("key", "version")
        return Response(s.RiskFrameworkSerializer(frameworks, many=True).data)


class DesignationThresholdListApi(GenericAPIView):
    serializer_class = s.DesignationThresholdSerializer
    pagination_class = None

    @extend_schema(responses=s.DesignationThresholdSerializer(many=True))
    def get(self, request):
        return Response(s.DesignationThresholdSerializer(DesignationThreshold.objects.all(), many=True).data)


class BenchmarkListApi(GenericAPIView):
    pagination_class = None

    @extend_schema(responses={200: {"type": "array", "items": {"type": "object"}}})
    def get(self, request):
        rows = Benchmark.objects.order_by("key").values("key", "name", "category", "task_type", "higher_is_better")
        return Response(list(rows))


class EvaluationImportInput(serializers.Serializer):
    format = serializers.ChoiceField(["lm-eval", "model-index"])
    data = serializers.JSONField(help_text="The lm-evaluation-harness results file, or a model-index list")
    evaluator = serializers.CharField(max_length=200, required=False, default="")
    evaluator_kind = serializers.ChoiceField(EvaluatorKind.choices, default=EvaluatorKind.INTERNAL)
    evidence_url = serializers.URLField(required=False, default="")


class EvaluationImportApi(_VersionScopedApi):
    serializer_class = s.EvaluationResultSerializer

    @extend_schema(parameters=[REVISION], request=EvaluationImportInput,
                   responses={201: s.EvaluationResultSerializer(many=True)})
    def post(self, request, org, name):
        version = self.version(request, org, name)
        data = validated(EvaluationImportInput, request)
        results = evaluations_import(version=version, actor=request.user, **data)
        return Response(s.EvaluationResultSerializer(results, many=True).data, status=status.HTTP_201_CREATED)


class CardInput(serializers.Serializer):
    card = serializers.CharField(allow_blank=True, trim_whitespace=False,
                                 help_text="Markdown with optional YAML metadata; empty restores the generated card")


class ModelCardApi(GenericAPIView):
    serializer_class = s.ModelDetailSerializer

    @extend_schema(request=CardInput, responses={200: s.ModelDetailSerializer})
    def put(self, request, org, name):
        model = selectors.model_get(user=request.user, org=org, name=name)
        model_card_update(model=model, actor=request.user, text=validated(CardInput, request)["card"])
        return ModelDetailApi().get(request, org, name)
