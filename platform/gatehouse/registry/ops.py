"""The registry's Prometheus gauges (GATEHOUSE_METRICS_COLLECTORS): aggregates only, never a model's name."""
from django.db.models import Count

from gatehouse.registry.models import Model, TrainingRun


def metrics():
    for row in TrainingRun.objects.values("status").annotate(n=Count("id")):
        yield "gatehouse_training_runs", "Training runs by status", row["n"], {"status": row["status"]}
    for row in Model.objects.values("tier").annotate(n=Count("id")):
        yield "gatehouse_models", "Models by tier", row["n"], {"tier": row["tier"]}
