"""Pure release-policy decisions. For now only visibility, which the registry's selectors enforce;
release checks, download and inference decisions arrive with the release-governance issues."""
from gatehouse.registry.models import Tier

VISIBLE_TO_OUTSIDERS = (Tier.API, Tier.OPEN)


def outsiders_may_see(tier: str) -> bool:
    return tier in VISIBLE_TO_OUTSIDERS
