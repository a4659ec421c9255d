from rest_framework.permissions import SAFE_METHODS, BasePermission

from gatehouse.accounts.models import ApiToken
from gatehouse.core.errors import NotAuthenticated, PermissionDenied


def caller_scopes(request) -> set[str] | None:
    """The scopes a caller holds: a token's own, or None for a browser session (no limit)."""
    return set(request.auth.scopes) if isinstance(request.auth, ApiToken) else None


class HasScope(BasePermission):
    """Reads need `read` (anonymous reads see public data); writes need a login and `write`.

    A view may name another scope with `required_scope`. Object visibility is the selectors' job.
    """

    def has_permission(self, request, view) -> bool:
        safe = request.method in SAFE_METHODS
        scope = getattr(view, "required_scope", None) or ("read" if safe else "write")
        if not request.user.is_authenticated:
            if safe and scope == "read":
                return True
            raise NotAuthenticated("Authentication required: send 'Authorization: Bearer <token>'.")
        scopes = caller_scopes(request)
        if scopes is not None and scope not in scopes:
            raise PermissionDenied(
                f"This token lacks the '{scope}' scope; create a token with --scopes {scope}.",
                code="missing_scope",
            )
        return True
