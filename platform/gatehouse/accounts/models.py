from django.contrib.auth.models import AbstractUser
from django.core.validators import RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

SLUG_RE = r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$"
slug_validator = RegexValidator(
    SLUG_RE, "Use letters, digits, '-', '_' or '.', starting and ending with a letter or digit (max 96)."
)


class User(AbstractUser):
    """Gatehouse's user. A custom model from day one so it can grow without a painful swap."""


class Organization(models.Model):
    """A namespace that owns models and datasets: the `org` in `org/name`."""

    slug = models.CharField(max_length=96, unique=True, validators=[slug_validator])
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    website = models.URLField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["slug"]
        constraints = [models.CheckConstraint(condition=Q(slug__regex=SLUG_RE), name="organization_slug_format")]

    def __str__(self) -> str:
        return self.slug


class Membership(models.Model):
    class Role(models.TextChoices):
        ADMIN = "admin", "Admin"  # manages members and approves within the organization
        APPROVER = "approver", "Approver"  # approves release requests (never their own)
        MAINTAINER = "maintainer", "Maintainer"  # registers models, versions, datasets
        MEMBER = "member", "Member"  # sees the organization's closed models

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "organization"], name="membership_unique"),
            models.CheckConstraint(condition=Q(role__in=["admin", "approver", "maintainer", "member"]),
                                   name="membership_role_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.organization} ({self.role})"

    @property
    def can_write(self) -> bool:
        return self.role in (self.Role.ADMIN, self.Role.MAINTAINER)


class ApiToken(models.Model):
    """A bearer token. Only its sha256 is stored; the secret is shown once, at creation."""

    class Scope(models.TextChoices):
        READ = "read", "Read the registry"
        GATED_READ = "gated-read", "Download gated weights you were granted"
        INFERENCE = "inference", "Call the hosted inference API"
        WRITE = "write", "Register models, versions and records"
        ADMIN = "admin", "Administer organizations and releases"

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, db_index=True)  # shown in listings to recognise a token
    key_hash = models.CharField(max_length=64, unique=True)
    scopes = models.JSONField(default=list)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def is_active(self, now=None) -> bool:
        now = now or timezone.now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)
