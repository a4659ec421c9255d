"""Training-run API: launch, follow (status, live metrics, logs), cancel. Runs are internal to their
organization: outsiders get 404."""
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.generics import GenericAPIView
from rest_framework.response import Response

from gatehouse.accounts.models import Membership, Organization
from gatehouse.core.errors import InvalidInput, NotAuthenticated, NotFound
from gatehouse.registry import selectors
from gatehouse.registry.models import DatasetVersion, TrainingMetric, TrainingRun, Tier
from gatehouse.registry.services.training import (
    DATA_OPTIONS, RUN_OPTIONS, training_run_cancel, training_run_create,
)


class DatasetChoice(serializers.Serializer):
    dataset = serializers.CharField(help_text="org/name")
    version = serializers.CharField(required=False, help_text="default: the newest version")
    weight = serializers.FloatField(default=1.0)


class BaseChoice(serializers.Serializer):
    model = serializers.CharField(help_text="org/name")
    revision = serializers.CharField(default="main")


class TrainingRunInput(serializers.Serializer):
    organization = serializers.CharField()
    model = serializers.CharField(help_text="name of the model the run registers a version of")
    preset = serializers.CharField(default="debug")
    method = serializers.ChoiceField(["full", "lora", "last-layer", "bias"], default="full")
    base = BaseChoice(required=False)
    datasets = DatasetChoice(many=True)
    max_steps = serializers.IntegerField(min_value=1, required=False)
    token_budget = serializers.IntegerField(min_value=1, required=False)
    options = serializers.DictField(
        required=False, default=dict,
        help_text="the trainer's settings, named as `python -m training train`'s flags with underscores (its --help says "
                  f"what each does): {', '.join(sorted(RUN_OPTIONS))}; and the data's: {', '.join(DATA_OPTIONS)}")
    tier = serializers.ChoiceField(Tier.choices, default=Tier.CLOSED)
    processes = serializers.IntegerField(min_value=1, max_value=64, default=1)
    license = serializers.CharField(required=False, default="", help_text="default: the base's, or the datasets' one")


class TrainingRunSerializer(serializers.ModelSerializer):
    model = serializers.SerializerMethodField()
    base_version = serializers.SerializerMethodField()
    result_version = serializers.CharField(source="result_version.commit", default=None)
    datasets = serializers.SerializerMethodField()
    created_by = serializers.CharField(source="created_by.username")

    class Meta:
        model = TrainingRun
        fields = ["id", "model", "status", "method", "preset", "base_version", "datasets", "config", "processes",
                  "estimated_flops", "estimated_cumulative_flops", "expected_designations", "step", "total_steps",
                  "tokens", "last_loss", "attempt", "cancel_requested", "error", "result_version", "created_by",
                  "created_at", "started_at", "finished_at", "heartbeat_at"]

    def get_model(self, run) -> str:
        return f"{run.organization.slug}/{run.model_name}"

    def get_base_version(self, run) -> dict | None:
        if run.base_version is None:
            return None
        return {"model": run.base_version.model.repo_id, "commit": run.base_version.commit}

    def get_datasets(self, run) -> list[dict]:
        return [{"dataset": str(rd.dataset_version.dataset), "version": rd.dataset_version.version, "weight": rd.weight}
                for rd in run.datasets.all()]


def _runs_for(user):
    runs = TrainingRun.objects.select_related(
        "organization", "created_by", "result_version", "base_version__model__organization").prefetch_related(
        "datasets__dataset_version__dataset__organization")
    if user.is_superuser:
        return runs
    return runs.filter(organization__in=Membership.objects.filter(user=user).values("organization_id"))


def _run_get(request, run_id) -> TrainingRun:
    run = _runs_for(request.user).filter(pk=run_id).first() if request.user.is_authenticated else None
    if run is None:
        raise NotFound(f"Training run {run_id} does not exist or belongs to an organization you are not in.")
    return run


def _dataset_versions(request, choices) -> list[tuple[DatasetVersion, float]]:
    chosen = []
    for choice in choices:
        org, _, name = choice["dataset"].partition("/")
        versions = DatasetVersion.objects.select_related("dataset__organization").filter(
            dataset__organization__slug=org, dataset__name=name)
        version = versions.filter(version=choice["version"]).first() if "version" in choice else versions.order_by(
            "-created_at").first()
        if version is None:
            raise InvalidInput(f"Dataset {choice['dataset']}" + (f" has no version {choice['version']!r}" if "version" in choice
                               else " does not exist or has no versions") + "; see /api/v1/datasets.")
        chosen.append((version, choice["weight"]))
    return chosen


class TrainingRunListApi(GenericAPIView):
    serializer_class = TrainingRunSerializer

    @extend_schema(operation_id="training_runs_list")
    def get(self, request):
        if not request.user.is_authenticated:
            raise NotAuthenticated("Training runs are visible to members of their organization: log in or send a token.")
        page = self.paginate_queryset(_runs_for(request.user))
        return self.get_paginated_response(TrainingRunSerializer(page, many=True).data)

    @extend_schema(request=TrainingRunInput, responses={201: TrainingRunSerializer})
    def post(self, request):
        data = TrainingRunInput(data=request.data)
        data.is_valid(raise_exception=True)
        data = data.validated_data
        organization = Organization.objects.filter(slug=data["organization"]).first()
        if organization is None:
            raise InvalidInput(f"Unknown organization {data['organization']!r}.", fields={"organization": ["unknown"]})
        base_version = None
        if "base" in data:
            base_version = selectors.version_get(user=request.user, repo_id=data["base"]["model"],
                                                 revision=data["base"]["revision"])
        run = training_run_create(
            organization=organization, model_name=data["model"], actor=request.user,
            datasets=_dataset_versions(request, data["datasets"]), preset_name=data["preset"], method=data["method"],
            base_version=base_version, max_steps=data.get("max_steps"), token_budget=data.get("token_budget"),
            options=data["options"], tier=data["tier"], processes=data["processes"], license=data["license"])
        response = Response(TrainingRunSerializer(_runs_for(request.user).get(pk=run.pk)).data,
                            status=status.HTTP_201_CREATED)
        response["Location"] = f"/api/v1/training-runs/{run.pk}"
        return response


class TrainingRunDetailApi(GenericAPIView):
    serializer_class = TrainingRunSerializer

    def get(self, request, run_id):
        return Response(TrainingRunSerializer(_run_get(request, run_id)).data)


class TrainingRunCancelApi(GenericAPIView):
    serializer_class = TrainingRunSerializer

    @extend_schema(request=None)
    def post(self, request, run_id):
        run = training_run_cancel(run=_run_get(request, run_id), actor=request.user)
        return Response(TrainingRunSerializer(_runs_for(request.user).get(pk=run.pk)).data, status=status.HTTP_202_ACCEPTED)


class TrainingRunMetricsApi(GenericAPIView):
    pagination_class = None

    @extend_schema(responses={200: {"type": "object"}})
    def get(self, request, run_id):
        run = _run_get(request, run_id)
        rows = TrainingMetric.objects.filter(run=run).order_by("kind", "step")
        steps = list(rows.filter(kind="step").values("step", "loss", "lr", "tokens", "tokens_per_s", "mfu", "flops",
                                                     "memory_bytes"))
        evals = list(rows.filter(kind="eval").values("step", "val_loss", "val_perplexity"))
        return Response({"run": run.pk, "status": run.status, "steps": steps, "evals": evals})


class TrainingRunLogsApi(GenericAPIView):
    pagination_class = None

    @extend_schema(responses={200: {"type": "object"}})
    def get(self, request, run_id):
        from gatehouse.registry.services.training import training_run_work_dir

        run = _run_get(request, run_id)
        path = training_run_work_dir(run) / "train.log"
        text = path.read_text(errors="replace")[-50000:] if path.exists() else run.log_tail
        return Response({"run": run.pk, "status": run.status, "log": text})
