from django.urls import path, register_converter

from gatehouse.registry.api import training as t
from gatehouse.registry.api import views as v


class SegmentConverter:
    """An org, model or dataset name: letters, digits, '.', '_' and '-' (unlike `slug`, dots allowed)."""

    regex = r"[A-Za-z0-9][A-Za-z0-9._-]*"

    def to_python(self, value):
        return value

    def to_url(self, value):
        return value


register_converter(SegmentConverter, "seg")

M = "models/<seg:org>/<seg:name>"
urlpatterns = [
    path("models", v.ModelListApi.as_view(), name="model-list"),
    path(f"{M}", v.ModelDetailApi.as_view(), name="model-detail"),
    path(f"{M}/card", v.ModelCardApi.as_view(), name="model-card"),
    path(f"{M}/versions", v.VersionListApi.as_view(), name="version-list"),
    path(f"{M}/versions/<str:commit>", v.VersionDetailApi.as_view(), name="version-detail"),
    path(f"{M}/files", v.FileListApi.as_view(), name="model-files"),
    path(f"{M}/compute", v.ComputeApi.as_view(), name="model-compute"),
    path(f"{M}/evaluations", v.EvaluationApi.as_view(), name="model-evaluations"),
    path(f"{M}/risk-assessments", v.RiskAssessmentApi.as_view(), name="model-risk-assessments"),
    path(f"{M}/datasets", v.ModelDatasetsApi.as_view(), name="model-datasets"),
    path(f"{M}/lineage", v.LineageApi.as_view(), name="model-lineage"),
    path("datasets", v.DatasetListApi.as_view(), name="dataset-list"),
    path("datasets/<seg:org>/<seg:name>", v.DatasetDetailApi.as_view(), name="dataset-detail"),
    path("datasets/<seg:org>/<seg:name>/versions", v.DatasetVersionCreateApi.as_view(), name="dataset-versions"),
    path("licenses", v.LicenseListApi.as_view(), name="license-list"),
    path("licenses/<str:key>", v.LicenseDetailApi.as_view(), name="license-detail"),
    path("benchmarks", v.BenchmarkListApi.as_view(), name="benchmark-list"),
    path("risk-frameworks", v.RiskFrameworkListApi.as_view(), name="risk-framework-list"),
    path("training-runs", t.TrainingRunListApi.as_view(), name="training-run-list"),
    path("training-runs/<int:run_id>", t.TrainingRunDetailApi.as_view(), name="training-run-detail"),
    path("training-runs/<int:run_id>/cancel", t.TrainingRunCancelApi.as_view(), name="training-run-cancel"),
    path("training-runs/<int:run_id>/metrics", t.TrainingRunMetricsApi.as_view(), name="training-run-metrics"),
    path("training-runs/<int:run_id>/logs", t.TrainingRunLogsApi.as_view(), name="training-run-logs"),
    path(f"{M}/evaluations/import", v.EvaluationImportApi.as_view(), name="model-evaluations-import"),
    path("designation-thresholds", v.DesignationThresholdListApi.as_view(), name="designation-threshold-list"),
]
