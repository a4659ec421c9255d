"""Release governance records: a request to release a version (possibly in stages), the approvers'
decisions, and the releases that bind a version to a tier from a moment on."""
from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from gatehouse.registry.models import Model, ModelVersion, Tier


class Audience(models.TextChoices):
    PUBLIC = "public", "Public"
    GATED_AUTO = "gated-auto", "Gated, automatic approval"
    GATED_MANUAL = "gated-manual", "Gated, manual approval"
    ORGANIZATION = "organization", "Organization only"


class ReleaseRequest(models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        SUBMITTED = "submitted", "Submitted"
        CHANGES_REQUESTED = "changes_requested", "Changes requested"
        APPROVED = "approved", "Approved"
        REJECTED = "rejected", "Rejected"
        WITHDRAWN = "withdrawn", "Withdrawn"

    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="release_requests")
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    # [{"tier": "api", "after_days": 0}, {"tier": "open", "after_days": 90}]: staged widening
    stages = models.JSONField()
    audience = models.CharField(max_length=16, choices=Audience.choices, default=Audience.PUBLIC)
    safeguards_in_place = models.BooleanField(default=False)
    incident_contact = models.CharField(max_length=200, blank=True)
    waivers = models.JSONField(default=list, blank=True)
    notes = models.TextField(blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.DRAFT)
    findings = models.JSONField(default=list, blank=True)
    required_approvals = models.PositiveSmallIntegerField(default=1)
    created_at = models.DateTimeField(default=timezone.now)
    submitted_at = models.DateTimeField(null=True, blank=True)
    decided_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=["draft", "submitted", "changes_requested", "approved",
                                                           "rejected", "withdrawn"]), name="release_request_status_valid"),
            models.CheckConstraint(condition=Q(required_approvals__gte=1), name="release_request_needs_an_approver"),
        ]

    def __str__(self) -> str:
        return f"release request {self.pk} for {self.version}"


class ReleaseApproval(models.Model):
    class Decision(models.TextChoices):
        APPROVE = "approve", "Approve"
        REQUEST_CHANGES = "request_changes", "Request changes"
        REJECT = "reject", "Reject"

    request = models.ForeignKey(ReleaseRequest, on_delete=models.CASCADE, related_name="decisions")
    approver = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    decision = models.CharField(max_length=16, choices=Decision.choices)
    comment = models.TextField(blank=True)
    submission = models.PositiveSmallIntegerField(default=1, help_text="Which submission round this decides")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at"]
        constraints = [models.UniqueConstraint(fields=["request", "approver", "submission"],
                                               name="release_approval_once_per_round")]


class Release(models.Model):
    """From `effective_at` on, `version` is released at `tier` to `audience` (until a later release)."""

    class Status(models.TextChoices):
        SCHEDULED = "scheduled", "Scheduled"
        EFFECTIVE = "effective", "Effective"
        BLOCKED = "blocked", "Blocked at its time by the policy"
        CANCELLED = "cancelled", "Cancelled"

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="releases")
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="releases")
    request = models.ForeignKey(ReleaseRequest, null=True, blank=True, on_delete=models.PROTECT, related_name="releases")
    tier = models.CharField(max_length=8, choices=Tier.choices)
    audience = models.CharField(max_length=16, choices=Audience.choices)
    effective_at = models.DateTimeField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.SCHEDULED)
    reason = models.TextField(blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["effective_at", "id"]
        indexes = [models.Index(fields=["status", "effective_at"])]
        constraints = [
            models.CheckConstraint(condition=Q(tier__in=["closed", "api", "open"]), name="release_tier_valid"),
            models.CheckConstraint(condition=Q(status__in=["scheduled", "effective", "blocked", "cancelled"]),
                                   name="release_status_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.model_id} → {self.tier} at {self.effective_at:%Y-%m-%d %H:%M} ({self.status})"
