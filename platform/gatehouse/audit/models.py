from django.db import models


class AppendOnlyQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise TypeError("The audit log is append-only.")

    def delete(self):
        raise TypeError("The audit log is append-only.")


class AuditEvent(models.Model):
    """One row of the append-only audit log; `hash` chains it to the row before.

    No foreign keys on purpose: a cascade or SET_NULL elsewhere must never rewrite history,
    so the actor and target are stored as plain values.
    """

    GENESIS = "0" * 64

    created_at = models.DateTimeField()
    actor_id = models.BigIntegerField(null=True, blank=True)
    actor_label = models.CharField(max_length=150, blank=True)
    action = models.CharField(max_length=64, db_index=True)
    target_type = models.CharField(max_length=64, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    # Canonical JSON text, not a JSONField: jsonb rewrites numbers (3.36e+23 comes back as an integer),
    # which would break the hash. What is stored is exactly what was hashed.
    data = models.TextField(default="{}")
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["target_type", "target_id"])]
        # Two writers that read the same tail would fork the chain; the second one fails instead.
        constraints = [models.UniqueConstraint(fields=["prev_hash"], name="audit_chain_no_fork")]

    def __str__(self) -> str:
        return f"#{self.pk} {self.action} {self.target_type}:{self.target_id}"

    @property
    def payload(self) -> dict:
        import json

        return json.loads(self.data)

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise TypeError("The audit log is append-only.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise TypeError("The audit log is append-only.")
