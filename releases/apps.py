from django.apps import AppConfig


class ReleasesConfig(AppConfig):
    """Release governance and distribution: tiers, release and access requests, Hub and inference endpoints."""

    name = "releases"
    label = "releases"
