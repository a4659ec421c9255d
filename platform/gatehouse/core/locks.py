"""How services lock rows they are about to change."""
from django.db.models import QuerySet


def for_update(queryset: QuerySet) -> QuerySet:
    """Lock the selected rows of this model only (OF self, never rows of joined relations) and FOR NO KEY UPDATE:
    a plain FOR UPDATE also blocks the foreign-key checks of other transactions' inserts that reference these rows,
    which deadlocked with the audit log's lock under concurrent decisions (the load test found it). No-op on
    SQLite, which serializes writers anyway."""
    return queryset.select_for_update(of=("self",), no_key=True)
