"""Admin views. Derived facts (commits, hashes, FLOP totals) are read-only here: services compute them."""
from django.contrib import admin

from gatehouse.registry import models as m


@admin.register(m.License)
class LicenseAdmin(admin.ModelAdmin):
    list_display = ["key", "name", "version", "osi_approved", "commercial_use", "restrictions_inherited"]
    search_fields = ["key", "name"]


class DatasetVersionInline(admin.TabularInline):
    model = m.DatasetVersion
    extra = 0


@admin.register(m.Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ["__str__", "provenance", "created_at"]
    list_filter = ["provenance"]
    search_fields = ["name", "organization__slug"]
    inlines = [DatasetVersionInline]


class ModelFileInline(admin.TabularInline):
    model = m.ModelFile
    extra = 0
    can_delete = False
    readonly_fields = ["path", "size", "sha256", "storage_key", "safetensors"]

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(m.Model)
class ModelAdmin(admin.ModelAdmin):
    list_display = ["repo_id", "tier", "task", "license", "updated_at"]
    list_filter = ["tier", "task", "license"]
    search_fields = ["name", "organization__slug", "summary"]
    readonly_fields = ["latest_version", "created_at", "updated_at"]
    list_select_related = ["organization", "license"]


@admin.register(m.ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ["__str__", "status", "parameters", "cumulative_flops", "created_at"]
    list_filter = ["status"]
    inlines = [ModelFileInline]

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in m.ModelVersion._meta.fields] + ["datasets"]  # versions are immutable


@admin.register(m.ComputeRecord)
class ComputeRecordAdmin(admin.ModelAdmin):
    list_display = ["version", "stage", "hardware", "device_count", "flops", "flops_method", "energy_kwh"]

    def has_change_permission(self, request, obj=None):
        return False  # records feed cumulative compute; add new ones through the API instead


@admin.register(m.DesignationThreshold)
class DesignationThresholdAdmin(admin.ModelAdmin):
    list_display = ["key", "name", "min_flops", "basis", "in_force", "effective_from"]


admin.site.register(m.Benchmark)
admin.site.register(m.EvaluationResult)
admin.site.register(m.RiskAssessment)


class RiskThresholdInline(admin.TabularInline):
    model = m.RiskThreshold
    extra = 0


@admin.register(m.RiskDomain)
class RiskDomainAdmin(admin.ModelAdmin):
    list_display = ["__str__", "name", "category"]
    inlines = [RiskThresholdInline]


class RiskDomainInline(admin.TabularInline):
    model = m.RiskDomain
    extra = 0


@admin.register(m.RiskFramework)
class RiskFrameworkAdmin(admin.ModelAdmin):
    list_display = ["key", "name", "version", "published_on", "is_active"]
    inlines = [RiskDomainInline]
