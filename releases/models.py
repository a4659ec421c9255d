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


class AccessPolicy(models.Model):
    """Who may download a model's files beyond its organization: kept in step with the effective release's
    audience by the release services; the request form, rules and durations are set by the owners."""

    model = models.OneToOneField(Model, on_delete=models.CASCADE, related_name="access_policy")
    audience = models.CharField(max_length=16, choices=Audience.choices, default=Audience.PUBLIC)
    # [{"name": "affiliation", "label": "Affiliation", "required": true}, …]: text fields on the request form
    request_fields = models.JSONField(default=list, blank=True)
    acceptable_use = models.TextField(blank=True, help_text="Shown on the request form; accepting it is required")
    # Under manual review, requesters from these organizations or email domains are approved at once.
    auto_approve_organizations = models.JSONField(default=list, blank=True)
    auto_approve_email_domains = models.JSONField(default=list, blank=True)
    grant_days = models.PositiveIntegerField(null=True, blank=True, help_text="Grants expire after; empty: never")
    cooldown_days = models.PositiveIntegerField(default=7, help_text="Wait after a rejection before asking again")
    updated_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"access policy of {self.model_id} ({self.audience})"


class AccessRequest(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        ACCEPTED = "accepted", "Accepted"
        REJECTED = "rejected", "Rejected"
        CANCELLED = "cancelled", "Cancelled"

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="access_requests")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="access_requests")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    fields = models.JSONField(default=dict, blank=True)
    # What the requester accepted: the licence by key and text hash, and the acceptable-use text's hash.
    license_key = models.CharField(max_length=64, blank=True)
    license_sha256 = models.CharField(max_length=64, blank=True)
    acceptable_use_sha256 = models.CharField(max_length=64, blank=True)
    rejection_reason = models.TextField(blank=True)
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    decided_automatically = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    decided_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["model", "status", "created_at"])]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=["pending", "accepted", "rejected", "cancelled"]),
                                   name="access_request_status_valid"),
            # At most one live request per person and model; rejected and cancelled ones stay as history.
            models.UniqueConstraint(fields=["model", "user"], condition=Q(status__in=["pending", "accepted"]),
                                    name="access_request_one_live"),
        ]

    def __str__(self) -> str:
        return f"access request {self.pk} by {self.user_id} for {self.model_id} ({self.status})"


class AccessGrant(models.Model):
    """Permission to download a gated model, for one user or a whole organization."""

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="access_grants")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                             related_name="access_grants")
    organization = models.ForeignKey("accounts.Organization", null=True, blank=True, on_delete=models.CASCADE,
                                     related_name="access_grants")
    request = models.ForeignKey(AccessRequest, null=True, blank=True, on_delete=models.SET_NULL, related_name="grants")
    granted_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    license_key = models.CharField(max_length=64, blank=True)
    license_sha256 = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    revoke_reason = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["model", "user"]), models.Index(fields=["model", "organization"])]
        constraints = [
            models.CheckConstraint(condition=Q(user__isnull=False, organization__isnull=True)
                                   | Q(user__isnull=True, organization__isnull=False),
                                   name="access_grant_one_grantee"),
        ]

    def __str__(self) -> str:
        return f"grant {self.pk} on {self.model_id} to {self.user_id or self.organization_id}"


class Download(models.Model):
    """One metered file transfer: who, with which token, which version and file, how many bytes."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    token = models.ForeignKey("accounts.ApiToken", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="downloads")
    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="downloads")
    path = models.CharField(max_length=500)
    bytes = models.BigIntegerField()
    range_start = models.BigIntegerField(null=True, blank=True)
    via = models.CharField(max_length=16, help_text="stream, x-accel or redirect")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["model", "created_at"]), models.Index(fields=["user", "created_at"])]


class DownloadTotals(models.Model):
    """A model's downloads, added to as each is recorded: what the catalog and the Hub API sort by and report, and
    /metrics adds up. Counting the Download rows on each request instead grew with them: at a million, sorting the
    catalog by downloads took 0.8 s on PostgreSQL and 8.6 s on SQLite, for anyone, signed in or not."""

    model = models.OneToOneField(Model, on_delete=models.CASCADE, primary_key=True, related_name="download_totals")
    files = models.BigIntegerField(default=0, help_text="Whole-file downloads (a range request is part of one)")
    transfers = models.BigIntegerField(default=0, help_text="Every metered transfer, ranges included")
    bytes = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.model_id}: {self.files} downloads"


class ModelFollow(models.Model):
    """Someone who asked to hear when a model's release changes (email on effective releases and downgrades)."""

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="followers")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="follows")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["model", "user"], name="model_follow_once")]


class InferenceBackend(models.Model):
    """Where a model's inference requests go: an engine process the platform runs (`python -m training serve`,
    supervised by `manage.py serve_engines`) or an upstream OpenAI-compatible server such as vLLM."""

    class Kind(models.TextChoices):
        LOCAL = "local", "Local engine process"
        UPSTREAM = "upstream", "Upstream OpenAI-compatible server"

    model = models.OneToOneField(Model, on_delete=models.CASCADE, related_name="inference_backend")
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.LOCAL)
    url = models.URLField(blank=True, help_text="Base URL including /v1; set by the supervisor for local engines")
    upstream_model = models.CharField(max_length=200, blank=True, help_text="The model id at the backend")
    api_key = models.CharField(max_length=200, blank=True, help_text="Sent as a Bearer token to an upstream")
    usage_in_every_chunk = models.BooleanField(
        default=False, help_text="Upstreams: it puts usage in every streamed chunk when asked (vLLM's and SGLang's "
        "stream_options.continuous_usage_stats), so a client that leaves early is metered for its prompt too. Leave off "
        "for a server that refuses options it does not know. Local engines always do it")
    version = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
                                help_text="Local engines: the version loaded (default: the model's latest)")
    enabled = models.BooleanField(default=True)
    updated_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.model_id} → {self.kind} {self.url}"


class InferenceCall(models.Model):
    """One metered call of the inference API; also what quotas count."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    token = models.ForeignKey("accounts.ApiToken", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    organization = models.ForeignKey("accounts.Organization", null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+", help_text="The caller's organization (quotas per organization)")
    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="inference_calls")
    endpoint = models.CharField(max_length=32)
    stream = models.BooleanField(default=False)
    status = models.PositiveSmallIntegerField(default=0, help_text="0 while in flight")
    error_code = models.CharField(max_length=64, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["token", "created_at"]), models.Index(fields=["organization", "created_at"]),
                   models.Index(fields=["model", "created_at"]),
                   # The calls in flight only: what the sweep of abandoned calls reads, a few rows of millions.
                   models.Index(fields=["created_at"], condition=models.Q(status=0), name="releases_call_in_flight")]


class InferenceUsage(models.Model):
    """Calls and tokens per quota scope and UTC day, added to as each call finishes: the daily quota reads this one
    row, and /metrics adds up the rows. Summing the day's calls instead cost time in proportion to them, under the
    scope's lock: at 100,000 calls in a day, 40-60 ms on every call, which capped a busy token or organization at ~20
    calls a second."""

    class Scope(models.TextChoices):
        TOKEN = "token"
        SESSION = "session", "Signed-in session (a user's calls without a token)"
        ORGANIZATION = "organization"

    scope = models.CharField(max_length=16, choices=Scope.choices)
    scope_id = models.BigIntegerField(help_text="The token's, the user's (session) or the organization's id")
    day = models.DateField(help_text="UTC, the day the calls started")
    calls = models.BigIntegerField(default=0, help_text="Finished calls, failed ones included (not those refused before starting)")
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["scope", "scope_id", "day"], name="inference_usage_once")]

    def __str__(self) -> str:
        return f"{self.scope} {self.scope_id} on {self.day}: {self.calls} calls"
