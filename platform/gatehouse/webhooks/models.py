from django.db import models
from django.utils import timezone

from gatehouse.accounts.models import Organization


class WebhookEndpoint(models.Model):
    """An organization's receiver of signed event notifications."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="webhooks")
    url = models.URLField(max_length=500)
    secret = models.CharField(max_length=128, help_text="Shared HMAC-SHA256 key; receivers verify X-Gatehouse-Signature")
    events = models.JSONField(default=list, help_text='Event names, or ["*"] for all')
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.organization} → {self.url}"

    def wants(self, event: str) -> bool:
        return self.is_active and ("*" in self.events or event in self.events)


class WebhookDelivery(models.Model):
    """One event to one endpoint, with every attempt's outcome (the delivery log)."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Failed after all retries"

    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=64)
    body = models.TextField(help_text="The exact JSON sent (and signed)")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
