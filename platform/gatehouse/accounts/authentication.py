from django.conf import settings
from django.utils import timezone
from rest_framework.authentication import BaseAuthentication, get_authorization_header

from gatehouse.accounts.models import ApiToken
from gatehouse.accounts.services import api_token_touch, token_hash
from gatehouse.core import ratelimit
from gatehouse.core.errors import NotAuthenticated
from gatehouse.core.prepared import PreparedQuery


def client_address(request) -> str:
    """The caller's address. Behind GATEHOUSE_TRUSTED_PROXY_HOPS proxies (nginx: 1) it is the address the
    nearest trusted proxy saw, from X-Forwarded-For; otherwise REMOTE_ADDR, and X-Forwarded-For is ignored —
    a client could write anything there."""
    hops = settings.TRUSTED_PROXY_HOPS
    forwarded = [a.strip() for a in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if a.strip()]
    if hops and forwarded:
        return forwarded[-hops] if len(forwarded) >= hops else forwarded[0]
    return request.META.get("REMOTE_ADDR", "") or "unknown"


def check_credential_failures(client: str) -> None:
    """Refuse every credential from an address that sent too many bad ones lately (token guessing)."""
    ratelimit.refuse_when_over(f"bad-credentials:{client}", limit=settings.AUTH_FAILURES_PER_WINDOW,
                               window_seconds=settings.AUTH_FAILURE_WINDOW_SECONDS,
                               message=f"Too many invalid credentials from your address; try again in "
                                       f"{settings.AUTH_FAILURE_WINDOW_SECONDS // 60} minutes.")


def record_credential_failure(client: str) -> None:
    ratelimit.hit(f"bad-credentials:{client}", window_seconds=settings.AUTH_FAILURE_WINDOW_SECONDS)


# Every API call runs this: compiled once (the hash is unique, so no ORDER BY; compiling cost more than running it).
_token_by_hash = PreparedQuery(
    lambda key_hash: ApiToken.objects.select_related("user").filter(key_hash=key_hash).order_by()[:1], key_hash=str)


def token_from_header(header: bytes, *, client: str | None = None) -> ApiToken | None:
    """The active token named by an `Authorization: Bearer …` header, None when there is no header.

    A header that names a bad token fails loudly: a typo must not silently become an anonymous call.
    """
    parts = header.split()
    if not parts or parts[0].lower() != b"bearer":
        return None
    if len(parts) != 2:
        raise NotAuthenticated("Malformed Authorization header; send 'Authorization: Bearer <token>'.")
    if client is not None:
        check_credential_failures(client)
    raw = parts[1].decode("latin-1")
    token = next(iter(_token_by_hash(key_hash=token_hash(raw))), None)
    if token is None:
        if client is not None:
            record_credential_failure(client)
        raise NotAuthenticated("Invalid token. Create one with `manage.py create_token` or in your settings.")
    now = timezone.now()
    if token.revoked_at is not None:
        raise NotAuthenticated(f"Token {token.prefix}… was revoked; create a new one.")
    if token.expires_at is not None and token.expires_at <= now:
        raise NotAuthenticated(f"Token {token.prefix}… expired at {token.expires_at:%Y-%m-%d %H:%M} UTC; create a new one.")
    if not token.user.is_active:
        raise NotAuthenticated("The token's user account is disabled.")
    api_token_touch(token=token, resolution_seconds=settings.API_TOKEN_LAST_USED_RESOLUTION_SECONDS)
    return token


class BearerTokenAuthentication(BaseAuthentication):
    def authenticate(self, request):
        token = token_from_header(get_authorization_header(request), client=client_address(request))
        return (token.user, token) if token else None

    def authenticate_header(self, request):
        return 'Bearer realm="gatehouse"'
