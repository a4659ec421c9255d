"""Compute records and the cumulative compute that follows a model's lineage."""
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Sum

from gatehouse.audit.services import audit_record
from gatehouse.core.errors import InvalidInput
from gatehouse.core.locks import for_update
from gatehouse.registry.models import ComputeRecord, ModelVersion
from gatehouse.registry.selectors import organization_for_writer


def estimate_flops(*, parameters: int | None, tokens: int | None, flops: float | None, hardware: str,
                   device_count: int, wall_time_seconds: float, utilization: float | None) -> tuple[float, str]:
    """Measured or operation-counted FLOPs win; else devices × time × peak × utilization."""
    if flops is not None:
        return float(flops), ComputeRecord.Method.REPORTED
    if parameters and tokens:
        return 6.0 * parameters * tokens, ComputeRecord.Method.OPERATION_COUNT
    peak = settings.COMPUTE_PRICE_TABLE.get(hardware, {}).get("peak_flops")
    if peak and utilization and wall_time_seconds:
        return device_count * wall_time_seconds * peak * utilization, ComputeRecord.Method.HARDWARE
    raise InvalidInput("Give flops, or parameters and tokens (6·N·D), or a known hardware with wall time and "
                       f"utilization (known hardware: {', '.join(settings.COMPUTE_PRICE_TABLE)}).")


def compute_record_create(*, version: ModelVersion, actor, hardware: str, device_count: int = 1,
                          wall_time_seconds: float = 0.0, flops: float | None = None, flops_method: str | None = None,
                          parameters: int | None = None, tokens: int | None = None, utilization: float | None = None,
                          energy_kwh: float | None = None, precision: str = "", provider: str = "",
                          stage: str = "pretraining") -> ComputeRecord:
    organization_for_writer(user=actor, organization=version.model.organization)
    if device_count < 1:
        raise InvalidInput("device_count must be at least 1.")
    if wall_time_seconds < 0 or (flops is not None and flops < 0) or (energy_kwh is not None and energy_kwh < 0):
        raise InvalidInput("Compute figures cannot be negative.")
    if utilization is not None and not 0 < utilization <= 1:
        raise InvalidInput("utilization is a fraction between 0 and 1.")
    value, method = estimate_flops(parameters=parameters, tokens=tokens, flops=flops, hardware=hardware,
                                   device_count=device_count, wall_time_seconds=wall_time_seconds,
                                   utilization=utilization)
    if flops_method:
        if flops_method not in ComputeRecord.Method.values:
            raise InvalidInput(f"flops_method must be one of {', '.join(ComputeRecord.Method.values)}.")
        method = flops_method
    device_hours = device_count * wall_time_seconds / 3600.0
    prices = settings.COMPUTE_PRICE_TABLE.get(hardware, {})
    if energy_kwh is None:
        energy_kwh = device_hours * prices.get("watts", 0) / 1000.0 * settings.DATACENTER_PUE
    intensity = settings.GRID_INTENSITY_KG_PER_KWH
    cost = Decimal(str(round(device_hours * prices.get("usd_per_hour", 0.0), 2)))
    with transaction.atomic():
        record = ComputeRecord.objects.create(
            version=version, stage=stage, hardware=hardware, device_count=device_count,
            wall_time_seconds=wall_time_seconds, device_hours=device_hours, flops=value, flops_method=method,
            parameters=parameters, tokens=tokens, precision=precision, utilization=utilization,
            energy_kwh=energy_kwh, grid_intensity_kg_per_kwh=intensity, emissions_kg=energy_kwh * intensity,
            cost_usd=cost, provider=provider)
        model_version_recompute_flops(version=version)
        audit_record(actor=actor, action="compute_record.create", target=record,
                     data={"commit": version.commit, "flops": value, "method": method, "hardware": hardware})
    return record


def model_version_recompute_flops(*, version: ModelVersion) -> None:
    """Recompute own and cumulative FLOPs for this version and every version derived from it."""
    pending = [version.pk]
    seen = set()
    while pending:
        pk = pending.pop(0)
        if pk in seen:
            continue
        seen.add(pk)
        current = for_update(ModelVersion.objects).select_related("base_version").get(pk=pk)
        own = ComputeRecord.objects.filter(version=current).aggregate(total=Sum("flops"))["total"] or 0.0
        inherited = current.base_version.cumulative_flops if current.base_version_id else 0.0
        ModelVersion.objects.filter(pk=pk).update(own_flops=own, cumulative_flops=own + inherited)
        pending.extend(ModelVersion.objects.filter(base_version_id=pk).values_list("pk", flat=True))
    version.refresh_from_db(fields=["own_flops", "cumulative_flops"])
