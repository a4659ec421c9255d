"""Fixed-window counters in the cache, for abuse controls (credential guessing, access-request spam).

Counts live in Django's cache: set GATEHOUSE_CACHE_URL (redis://…) so every web process shares them; the
default local-memory cache counts per process. A window starts with the first hit and lasts `window_seconds`.
A cache that is down does not take logins and API calls down with it: the limits are not enforced meanwhile
(logged), everything else is.
"""
import logging

from django.core.cache import cache

from gatehouse.core.errors import Throttled


log = logging.getLogger("gatehouse.ratelimit")


def hits(key: str) -> int:
    try:
        return cache.get(f"gatehouse:rate:{key}", 0)
    except Exception as exc:  # the cache server is unreachable: fail open, see the module's docstring
        log.warning("rate limit not checked, the cache is unavailable: %s", exc)
        return 0


def hit(key: str, *, window_seconds: int) -> int:
    """Count one hit; returns the count in the current window."""
    key = f"gatehouse:rate:{key}"
    try:
        cache.add(key, 0, timeout=window_seconds)
        try:
            return cache.incr(key)
        except ValueError:  # the window ended between add and incr
            cache.set(key, 1, timeout=window_seconds)
            return 1
    except Exception as exc:  # the cache server is unreachable: fail open, see the module's docstring
        log.warning("rate limit hit not counted, the cache is unavailable: %s", exc)
        return 0


def refuse_when_over(key: str, *, limit: int, window_seconds: int, message: str) -> None:
    """Raise Throttled (429 with Retry-After) once `limit` hits were counted in the window."""
    if hits(key) >= limit:
        raise Throttled(message, retry_after=window_seconds)
