from decimal import Decimal

import pytest

from gatehouse.audit.models import AuditEvent
from gatehouse.core.errors import InvalidInput
from gatehouse.registry.models import ComputeRecord, DesignationThreshold
from gatehouse.registry.selectors import designation_thresholds, designations_for
from gatehouse.registry.services.compute import compute_record_create


def _designations(version):
    version.refresh_from_db()
    return designations_for(version, designation_thresholds())


def test_reference_thresholds_are_named_and_sourced(db):
    rows = list(DesignationThreshold.objects.values_list("key", "min_flops", "basis"))
    assert rows == [("eu-gpai", 1e23, "cumulative"), ("eu-systemic-risk", 1e25, "cumulative"),
                    ("ca-frontier", 1e26, "cumulative")]
    assert all(t.source_url.startswith("https://") and t.instrument for t in DesignationThreshold.objects.all())


def test_cumulative_compute_follows_a_three_deep_lineage(aurora, alice, register):
    base = register(aurora, "base", alice)
    compute_record_create(version=base, actor=alice, hardware="H100-SXM", flops=6e24)
    middle = register(aurora, "middle", alice, metadata={"base_model": "aurora/base"})
    compute_record_create(version=middle, actor=alice, hardware="H100-SXM", flops=3e24)
    leaf = register(aurora, "leaf", alice, metadata={"base_model": "aurora/middle", "base_model_relation": "adapter"})
    compute_record_create(version=leaf, actor=alice, hardware="H100-SXM", flops=2e24)
    for version in (base, middle, leaf):
        version.refresh_from_db()
    assert (base.own_flops, base.cumulative_flops) == (6e24, 6e24)
    assert (middle.own_flops, middle.cumulative_flops) == (3e24, pytest.approx(9e24, rel=1e-12))
    assert (leaf.own_flops, leaf.cumulative_flops) == (2e24, pytest.approx(1.1e25, rel=1e-12))
    assert _designations(middle) == ["eu-gpai"]
    assert _designations(leaf) == ["eu-gpai", "eu-systemic-risk"]  # only the lineage pushes it over 1e25
    assert leaf.model.base_model.name == "middle" and leaf.model.base_model_relation == "adapter"


def test_compute_added_to_a_base_later_flows_down_to_descendants(aurora, alice, register):
    base = register(aurora, "base", alice)
    child = register(aurora, "child", alice, metadata={"base_model": "aurora/base"})
    grandchild = register(aurora, "grandchild", alice, metadata={"base_model": "aurora/child"})
    compute_record_create(version=grandchild, actor=alice, hardware="CPU", flops=1.0)
    compute_record_create(version=base, actor=alice, hardware="H100-SXM", flops=2e26)
    grandchild.refresh_from_db()
    assert grandchild.cumulative_flops == pytest.approx(2e26 + 1.0, rel=1e-12)
    assert _designations(grandchild) == ["eu-gpai", "eu-systemic-risk", "ca-frontier"]


@pytest.mark.parametrize("flops, expected", [
    (1e23, []),  # "greater than": exactly at the threshold is not designated
    (1.0000001e23, ["eu-gpai"]),
    (1e25, ["eu-gpai"]),
    (2e25, ["eu-gpai", "eu-systemic-risk"]),
    (1e26, ["eu-gpai", "eu-systemic-risk"]),
    (1.5e26, ["eu-gpai", "eu-systemic-risk", "ca-frontier"]),
])
def test_designation_thresholds_are_strictly_greater_than(aurora, alice, register, flops, expected):
    version = register(aurora, "m", alice)
    compute_record_create(version=version, actor=alice, hardware="H100-SXM", flops=flops)
    assert _designations(version) == expected


def test_thresholds_are_data_not_code(aurora, alice, register):
    version = register(aurora, "m", alice)
    compute_record_create(version=version, actor=alice, hardware="H100-SXM", flops=5e24)
    assert _designations(version) == ["eu-gpai"]
    DesignationThreshold.objects.filter(key="eu-systemic-risk").update(min_flops=1e24)  # the law moves
    assert _designations(version) == ["eu-gpai", "eu-systemic-risk"]
    DesignationThreshold.objects.filter(key="eu-gpai").update(in_force=False)
    assert _designations(version) == ["eu-systemic-risk"]


def test_flops_energy_emissions_and_cost_are_derived(aurora, alice, register, settings):
    settings.GRID_INTENSITY_KG_PER_KWH = 0.5
    settings.DATACENTER_PUE = 1.0
    version = register(aurora, "m", alice)
    record = compute_record_create(version=version, actor=alice, hardware="H100-SXM", device_count=8,
                                   wall_time_seconds=3600, parameters=1_000_000, tokens=2_000_000)
    assert record.flops == 6 * 1_000_000 * 2_000_000
    assert record.flops_method == ComputeRecord.Method.OPERATION_COUNT
    assert record.device_hours == 8.0
    assert record.energy_kwh == pytest.approx(8 * 0.7)
    assert record.emissions_kg == pytest.approx(8 * 0.7 * 0.5)
    assert record.cost_usd == Decimal("20.00")
    hardware = compute_record_create(version=version, actor=alice, hardware="H100-SXM", device_count=2,
                                     wall_time_seconds=100, utilization=0.5)
    assert hardware.flops == pytest.approx(2 * 100 * 989e12 * 0.5)
    assert hardware.flops_method == ComputeRecord.Method.HARDWARE


@pytest.mark.parametrize("kwargs, message", [
    ({"hardware": "abacus"}, "Give flops, or parameters and tokens"),
    ({"hardware": "CPU", "flops": -1.0}, "cannot be negative"),
    ({"hardware": "CPU", "flops": 1.0, "device_count": 0}, "device_count must be at least 1"),
    ({"hardware": "CPU", "flops": 1.0, "utilization": 1.5}, "utilization is a fraction"),
    ({"hardware": "CPU", "flops": 1.0, "flops_method": "guess"}, "flops_method must be one of"),
])
def test_bad_compute_records_are_refused(aurora, alice, register, kwargs, message):
    version = register(aurora, "m", alice)
    events_before = AuditEvent.objects.count()
    with pytest.raises(InvalidInput, match=message):
        compute_record_create(version=version, actor=alice, **kwargs)
    assert ComputeRecord.objects.count() == 0
    assert AuditEvent.objects.count() == events_before
    version.refresh_from_db()
    assert version.cumulative_flops == 0.0
