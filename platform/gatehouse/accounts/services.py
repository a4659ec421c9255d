import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from gatehouse.accounts.models import ApiToken, Membership, Organization, User
from gatehouse.audit.services import audit_record
from gatehouse.core.errors import InvalidInput, NotFound, PermissionDenied, clean_or_invalid

TOKEN_PREFIX = "gh_"
ALL_SCOPES = [choice.value for choice in ApiToken.Scope]


def token_hash(raw: str) -> str:
    # Tokens carry 256 bits of randomness, so a fast hash is enough (no password stretching needed).
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    token: ApiToken
    secret: str


def parse_scopes(text: str) -> list[str]:
    scopes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in scopes if s not in ALL_SCOPES]
    if unknown:
        raise InvalidInput(f"Unknown scope(s) {', '.join(unknown)}; choose from {', '.join(ALL_SCOPES)}.")
    if not scopes:
        raise InvalidInput(f"Give at least one scope from {', '.join(ALL_SCOPES)}.")
    return sorted(set(scopes), key=ALL_SCOPES.index)


def api_token_create(*, user: User, name: str, scopes: list[str], expires_in_days: int | None = None,
                     actor: User | None = None) -> IssuedToken:
    if expires_in_days is not None and expires_in_days <= 0:
        raise InvalidInput("Expiry must be a positive number of days.")
    unknown = [s for s in scopes if s not in ALL_SCOPES]
    if unknown or not scopes:
        raise InvalidInput(f"Scopes must be a non-empty subset of {', '.join(ALL_SCOPES)}.")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires_at = timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None
    with transaction.atomic():
        token = ApiToken.objects.create(
            user=user, name=name or "token", prefix=secret[: len(TOKEN_PREFIX) + 6],
            key_hash=token_hash(secret), scopes=scopes, expires_at=expires_at,
        )
        audit_record(actor=actor or user, action="token.create", target=token,
                     data={"user": user.username, "scopes": scopes, "expires_at": expires_at})
    return IssuedToken(token=token, secret=secret)


def api_token_revoke(*, token: ApiToken, actor: User) -> ApiToken:
    if token.user_id != actor.pk and not actor.is_superuser:
        raise PermissionDenied("You can only revoke your own tokens.")
    with transaction.atomic():
        updated = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
        if updated:
            audit_record(actor=actor, action="token.revoke", target=token, data={"user": token.user.username})
    token.refresh_from_db()
    return token


def api_token_touch(*, token: ApiToken, resolution_seconds: int) -> None:
    """Record last use, at most once per `resolution_seconds`, so reads don't each cost a write."""
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at > timedelta(seconds=resolution_seconds):
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now


def organization_create(*, slug: str, name: str, owner: User, description: str = "") -> Organization:
    with transaction.atomic():
        org = Organization(slug=slug, name=name, description=description)
        clean_or_invalid(org)
        org.save()
        Membership.objects.create(user=owner, organization=org, role=Membership.Role.ADMIN)
        audit_record(actor=owner, action="organization.create", target=org, data={"slug": slug})
    return org


def membership_set(*, organization: Organization, user: User, role: str, actor: User) -> Membership:
    if role not in Membership.Role.values:
        raise InvalidInput(f"Role must be one of {', '.join(Membership.Role.values)}.")
    with transaction.atomic():
        membership, _ = Membership.objects.update_or_create(
            user=user, organization=organization, defaults={"role": role})
        audit_record(actor=actor, action="membership.set", target=membership,
                     data={"user": user.username, "organization": organization.slug, "role": role})
    return membership


def user_get_by_username(username: str) -> User:
    try:
        return User.objects.get(username=username)
    except User.DoesNotExist:
        raise NotFound(f"No user named {username!r}.") from None
