"""Gated access: the facts the gate judges (selectors) and the services that change who may download
(access requests, grants, the model's access policy, metered downloads). policy.py decides; this module
reads and writes. Every change is audited and notified (email to the people concerned, signed webhook)."""
import hashlib
from datetime import timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import lazy

from gatehouse.accounts.models import Membership, Organization, User
from gatehouse.audit.services import audit_record
from gatehouse.core import ratelimit
from gatehouse.core.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from gatehouse.core.locks import for_update
from gatehouse.core.prepared import PreparedQuery, counters_add
from gatehouse.registry.models import Model, ModelFile, ModelVersion, Tier
from gatehouse.webhooks.services import webhook_emit
from releases import policy
from releases.models import AccessGrant, AccessPolicy, AccessRequest, Audience, Download, DownloadTotals

MAX_FIELD_CHARS = 2000


def _day(moment) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest() if text else ""


# --- Selectors ---------------------------------------------------------------------------------------------

def access_policy_of(model: Model) -> AccessPolicy:
    """The model's policy; a model never released through the workflow is public at its tier."""
    try:
        return model.access_policy
    except AccessPolicy.DoesNotExist:
        return AccessPolicy(model=model, audience=Audience.PUBLIC)


# Compiled once: every API and inference call asks (see gatehouse.core.prepared).
_organization_ids = PreparedQuery(
    lambda user_id: Membership.objects.filter(user_id=user_id).values_list("organization_id", flat=True), user_id=int)


def user_organization_ids(user) -> list[int]:
    if not getattr(user, "is_authenticated", False):
        return []
    return _organization_ids(user_id=user.pk)


def caller_facts(*, user, token, model: Model, organization_ids: list[int] | None = None) -> policy.CallerFacts:
    """Memberships, then — only for a model that needs a grant — the latest grant and the latest request."""
    if not getattr(user, "is_authenticated", False):
        return policy.CallerFacts(authenticated=False)
    scopes = frozenset(token.scopes) if token is not None else None
    organization_ids = user_organization_ids(user) if organization_ids is None else organization_ids
    if user.is_superuser or model.organization_id in organization_ids:
        return policy.CallerFacts(authenticated=True, is_member=True, scopes=scopes)
    access_policy = access_policy_of(model)
    if not policy.needs_grant(access_policy.audience, bool(access_policy.acceptable_use)):
        return policy.CallerFacts(authenticated=True, scopes=scopes)
    now = timezone.now()
    # The caller's grants, the user's and their organizations' apart: each an index seek, and a caller holds few. As
    # one OR (or with the active test's OR on expiry), SQLite read every grant of the model: 28 ms at 100,000 of
    # them, on every gated download and call.
    mine = [Q(user=user)] + ([Q(organization_id__in=organization_ids)] if organization_ids else [])
    grants = [grant for q in mine for grant in AccessGrant.objects.filter(q, model=model).order_by()]
    if any(grant.revoked_at is None and (grant.expires_at is None or grant.expires_at > now) for grant in grants):
        return policy.CallerFacts(authenticated=True, scopes=scopes, grant="active")
    grant_state = grant_at = grant_reason = ""
    latest = max(grants, key=lambda grant: (grant.created_at, grant.id), default=None)
    if latest is not None:
        if latest.revoked_at is not None:
            grant_state, grant_at, grant_reason = "revoked", _day(latest.revoked_at), latest.revoke_reason
        else:
            grant_state, grant_at = "expired", _day(latest.expires_at)
    request = AccessRequest.objects.filter(model=model, user=user).order_by("-created_at", "-id").first()
    request_state = request_at = rejection = retry = ""
    if request is not None and request.status in (AccessRequest.Status.PENDING, AccessRequest.Status.REJECTED):
        request_state = request.status
        request_at = _day(request.created_at if request.status == AccessRequest.Status.PENDING else request.decided_at)
        if request.status == AccessRequest.Status.REJECTED:
            rejection = request.rejection_reason
            again = _retry_after(request, access_policy)
            retry = _day(again) if again and again > now else ""
    return policy.CallerFacts(authenticated=True, scopes=scopes, grant=grant_state, grant_at=grant_at,
                              grant_reason=grant_reason, request=request_state, request_at=request_at,
                              rejection_reason=rejection, retry_after=retry)


def _license_facts(model: Model) -> dict:
    """Which licence text a request or grant accepted: its key and the sha256 of its text."""
    license = model.license
    if license is None:
        return {"license_key": "", "license_sha256": ""}
    return {"license_key": license.key, "license_sha256": license.text_sha256 or sha256_text(license.text)}


def _request_url(request, model: Model) -> str:
    return request.build_absolute_uri(reverse("web-access-request", args=[model.organization.slug, model.name]))


# Where a refusal sends people to ask for access: the model's request form. Lazy, built only where a refusal's message
# or a page uses it: reversing the URL was ~6% of the gateway's own time in an allowed inference call.
access_request_url = lazy(_request_url, str)


def _retry_after(request: AccessRequest, access_policy: AccessPolicy):
    return request.decided_at + timedelta(days=access_policy.cooldown_days) if request.decided_at else None


def can_review(user, model: Model) -> bool:
    """Reviewers of a model's access requests: its organization's admins and maintainers."""
    if user.is_superuser:
        return True
    membership = Membership.objects.filter(user=user, organization_id=model.organization_id).first()
    return membership is not None and membership.can_write


def _require_reviewer(user, model: Model) -> None:
    if not can_review(user, model):
        raise PermissionDenied(f"Only admins and maintainers of {model.organization.slug} review access to "
                               f"{model.repo_id}.")


def access_requests_for_review(*, model: Model, status: str) -> list[AccessRequest]:
    if status not in AccessRequest.Status.values:
        raise InvalidInput(f"status must be one of {', '.join(AccessRequest.Status.values)}.")
    return list(AccessRequest.objects.filter(model=model, status=status).select_related("user")
                .order_by("created_at", "id"))


# --- Services ----------------------------------------------------------------------------------------------

def access_policy_set_audience(*, model_id: int, audience: str) -> None:
    """Called by the release services when a release takes effect (a downgrade included). Downloads are judged
    against it on every request, so grants of a model that is no longer open stop working at once."""
    AccessPolicy.objects.update_or_create(model_id=model_id, defaults={"audience": audience,
                                                                       "updated_at": timezone.now()})


def access_policy_update(*, model: Model, actor: User, **changes) -> AccessPolicy:
    _require_reviewer(actor, model)
    allowed = {"request_fields", "acceptable_use", "auto_approve_organizations", "auto_approve_email_domains",
               "grant_days", "cooldown_days"}
    unknown = sorted(set(changes) - allowed)
    if unknown:
        raise InvalidInput(f"Unknown field(s) {', '.join(unknown)}; the audience changes only through a release.")
    fields = changes.get("request_fields")
    if fields is not None and (not isinstance(fields, list) or not all(
            isinstance(f, dict) and isinstance(f.get("name"), str) and f["name"].isidentifier() for f in fields)):
        raise InvalidInput('request_fields must be a list like [{"name": "affiliation", "label": "Affiliation", '
                           '"required": true}] with identifier names.')
    with transaction.atomic():
        access_policy, _ = AccessPolicy.objects.get_or_create(model=model)
        for key, value in changes.items():
            setattr(access_policy, key, value)
        access_policy.updated_at = timezone.now()
        access_policy.save()
        audit_record(actor=actor, action="access_policy.update", target=access_policy, data=changes)
    return access_policy


def access_request_create(*, model: Model, user: User, fields: dict | None, accept_license: bool,
                          accept_acceptable_use: bool) -> AccessRequest:
    """Ask for access to a gated model. Approved at once when the policy's rules say so.

    Each person may make ACCESS_REQUESTS_PER_USER_PER_WINDOW requests per window, across all models: reviewers
    are people, and a script filing requests for every gated model would bury them."""
    ratelimit.refuse_when_over(
        f"access-requests:{user.pk}", limit=settings.ACCESS_REQUESTS_PER_USER_PER_WINDOW,
        window_seconds=settings.ACCESS_REQUEST_WINDOW_SECONDS,
        message=f"You made {settings.ACCESS_REQUESTS_PER_USER_PER_WINDOW} access requests in the last "
                f"{settings.ACCESS_REQUEST_WINDOW_SECONDS // 60} minutes, the most allowed; wait for the reviewers' "
                f"answers, or try again later.")
    access_policy = access_policy_of(model)
    if model.tier == Tier.CLOSED or not policy.needs_grant(access_policy.audience, bool(access_policy.acceptable_use)):
        raise InvalidInput(f"{model.repo_id} needs no approval: there is nothing to request.")
    if model.organization_id in user_organization_ids(user) or user.is_superuser:
        raise InvalidInput(f"You are a member of {model.organization.slug} and already have access.")
    fields = _clean_fields(access_policy, fields or {})
    if model.license_id and not accept_license:
        raise InvalidInput(f"Accept the license ({model.license.key}) to request access: send accept_license=true.",
                           fields={"accept_license": "required"})
    if access_policy.acceptable_use and not accept_acceptable_use:
        raise InvalidInput("Accept the acceptable-use policy to request access: send accept_acceptable_use=true.",
                           fields={"accept_acceptable_use": "required"})
    now = timezone.now()
    with transaction.atomic():
        previous = (for_update(AccessRequest.objects).filter(model=model, user=user)
                    .order_by("-created_at", "-id").first())
        if previous is not None:
            _check_can_ask_again(previous, access_policy, model, user, now)
        try:
            with transaction.atomic():
                request = AccessRequest.objects.create(
                    model=model, user=user, fields=fields, **_license_facts(model),
                    acceptable_use_sha256=sha256_text(access_policy.acceptable_use), created_at=now)
        except IntegrityError:
            raise Conflict(f"You already have a request for {model.repo_id}.") from None
        audit_record(actor=user, action="access_request.create", target=request, data={"model": model.repo_id})
        transaction.on_commit(lambda: ratelimit.hit(f"access-requests:{user.pk}",
                                                    window_seconds=settings.ACCESS_REQUEST_WINDOW_SECONDS))
        organizations = list(Organization.objects.filter(memberships__user=user).values_list("slug", flat=True))
        if access_policy.audience == Audience.PUBLIC or policy.auto_approves(audience=access_policy.audience, organizations=access_policy.auto_approve_organizations,
                                email_domains=access_policy.auto_approve_email_domains,
                                user_organizations=organizations, user_email=user.email or ""):
            _accept(request, actor=None, access_policy=access_policy, now=now)
        else:
            _notify(model, "access_request.created", request,
                    subject=f"Access request for {model.repo_id} from {user.username}",
                    recipients=_reviewer_emails(model))
    return request


def _clean_fields(access_policy: AccessPolicy, fields: dict) -> dict:
    if not isinstance(fields, dict):
        raise InvalidInput("fields must be an object of the request form's answers.")
    known = {f["name"]: f for f in access_policy.request_fields}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise InvalidInput(f"Unknown form field(s) {', '.join(unknown)}; this form asks for "
                           f"{', '.join(known) or 'nothing'}.", fields={k: "unknown" for k in unknown})
    clean, missing = {}, {}
    for name, spec in known.items():
        value = fields.get(name, "")
        if not isinstance(value, str | bool):
            raise InvalidInput(f"Field {name} must be text.", fields={name: "invalid"})
        value = value.strip() if isinstance(value, str) else value
        if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            raise InvalidInput(f"Field {name} is longer than {MAX_FIELD_CHARS} characters.", fields={name: "too_long"})
        if spec.get("required") and value in ("", False):
            missing[name] = "required"
        clean[name] = value
    if missing:
        raise InvalidInput(f"Fill in the required field(s) {', '.join(missing)}.", fields=missing)
    return clean


def _check_can_ask_again(previous: AccessRequest, access_policy: AccessPolicy, model: Model, user: User, now) -> None:
    Status = AccessRequest.Status
    if previous.status == Status.PENDING:
        raise Conflict(f"Your request for {model.repo_id} is already pending review since {_day(previous.created_at)}.")
    if previous.status == Status.ACCEPTED:
        if _active_grants(model, user=user).exists():
            raise Conflict(f"You already have access to {model.repo_id}.")
        # Its grant expired or was revoked: the accepted request becomes history and a new one may be made.
        AccessRequest.objects.filter(pk=previous.pk).update(status=Status.CANCELLED)
    if previous.status == Status.REJECTED:
        again = _retry_after(previous, access_policy)
        if again and again > now:
            raise Conflict(f"Your request for {model.repo_id} was rejected on {_day(previous.decided_at)}; you can ask "
                           f"again after {_day(again)}.")


def _active_grants(model: Model, *, user: User | None = None, request: AccessRequest | None = None):
    now = timezone.now()
    grants = AccessGrant.objects.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now), model=model,
                                        revoked_at__isnull=True)
    if user is not None:
        grants = grants.filter(user=user)
    if request is not None:
        grants = grants.filter(request=request)
    return grants


def _accept(request: AccessRequest, *, actor: User | None, access_policy: AccessPolicy, now) -> AccessGrant:
    request.status, request.decided_at = AccessRequest.Status.ACCEPTED, now
    request.decided_by, request.decided_automatically = actor, actor is None
    request.rejection_reason = ""
    request.save(update_fields=["status", "decided_at", "decided_by", "decided_automatically", "rejection_reason"])
    expires = now + timedelta(days=access_policy.grant_days) if access_policy.grant_days else None
    grant = AccessGrant.objects.create(model=request.model, user=request.user, request=request, granted_by=actor,
                                       license_key=request.license_key, license_sha256=request.license_sha256,
                                       created_at=now, expires_at=expires)
    audit_record(actor=actor, action="access_request.accept", target=request,
                 data={"grant": grant.pk, "automatic": actor is None, "expires_at": expires})
    _notify(request.model, "access_request.approved", request, subject=f"Access to {request.model.repo_id} approved",
            recipients=[request.user.email])
    return grant


def access_request_decide(*, request: AccessRequest, actor: User, status: str, reason: str = "") -> AccessRequest:
    """Accept, reject, or put back to pending (the Hub's "cancel"). Leaving "accepted" revokes its grant."""
    model = request.model
    _require_reviewer(actor, model)
    Status = AccessRequest.Status
    if status not in (Status.ACCEPTED, Status.REJECTED, Status.PENDING):
        raise InvalidInput("status must be accepted, rejected or pending.")
    reason = (reason or "").strip()
    if len(reason) > MAX_FIELD_CHARS:
        raise InvalidInput(f"The reason is longer than {MAX_FIELD_CHARS} characters.")
    now = timezone.now()
    with transaction.atomic():
        request = (for_update(AccessRequest.objects)
                   .select_related("user", "model__organization").get(pk=request.pk))
        if request.status == status:
            raise Conflict(f"Request {request.pk} is already {status}.")
        if request.status == Status.CANCELLED:
            raise Conflict(f"Request {request.pk} was cancelled; the requester can ask again.")
        if request.status == Status.ACCEPTED:
            _revoke(_active_grants(model, request=request), actor=actor, reason=reason or f"request set to {status}",
                    now=now)
        if status == Status.ACCEPTED:
            if AccessRequest.objects.filter(model=model, user=request.user, status=Status.PENDING).exclude(
                    pk=request.pk).exists():
                raise Conflict("The requester has a newer pending request; decide that one.")
            _accept(request, actor=actor, access_policy=access_policy_of(model), now=now)
            return request
        request.status, request.decided_by, request.decided_automatically = status, actor, False
        request.decided_at = now if status == Status.REJECTED else None
        request.rejection_reason = reason if status == Status.REJECTED else ""
        try:
            with transaction.atomic():
                request.save(update_fields=["status", "decided_by", "decided_automatically", "decided_at",
                                            "rejection_reason"])
        except IntegrityError:
            raise Conflict("The requester already has another live request for this model.") from None
        audit_record(actor=actor, action=f"access_request.{status}", target=request, data={"reason": reason[:500]})
        if status == Status.REJECTED:
            _notify(model, "access_request.rejected", request, subject=f"Access to {model.repo_id} rejected",
                    recipients=[request.user.email], reason=reason)
    return request


def access_grant_create(*, model: Model, actor: User, user: User | None = None,
                        organization: Organization | None = None, expires_at=None) -> AccessGrant:
    """A reviewer grants access directly, to a person (recorded as an accepted request) or a whole organization."""
    _require_reviewer(actor, model)
    if (user is None) == (organization is None):
        raise InvalidInput("Grant to exactly one of a user or an organization.")
    access_policy = access_policy_of(model)
    if model.tier == Tier.CLOSED or not policy.needs_grant(access_policy.audience, bool(access_policy.acceptable_use)):
        raise InvalidInput(f"{model.repo_id} needs no approval; grants apply to gated releases.")
    now = timezone.now()
    if expires_at is not None and expires_at <= now:
        raise InvalidInput("expires_at must be in the future.")
    license_facts = _license_facts(model)
    with transaction.atomic():
        if organization is not None:
            grant = AccessGrant.objects.create(model=model, organization=organization, granted_by=actor,
                                               created_at=now, expires_at=expires_at, **license_facts)
            audit_record(actor=actor, action="access_grant.create", target=grant,
                         data={"organization": organization.slug, "expires_at": expires_at})
            return grant
        if model.organization_id in user_organization_ids(user) or user.is_superuser:
            raise InvalidInput(f"{user.username} is a member of {model.organization.slug} and already has access.")
        if _active_grants(model, user=user).exists():
            raise Conflict(f"{user.username} already has access to {model.repo_id}.")
        AccessRequest.objects.filter(model=model, user=user, status__in=["pending", "accepted"]).update(
            status=AccessRequest.Status.CANCELLED)
        request = AccessRequest.objects.create(model=model, user=user, status=AccessRequest.Status.ACCEPTED,
                                               decided_by=actor, decided_at=now, created_at=now, **license_facts)
        grant = AccessGrant.objects.create(model=model, user=user, request=request, granted_by=actor, created_at=now,
                                           expires_at=expires_at, **license_facts)
        audit_record(actor=actor, action="access_grant.create", target=grant,
                     data={"user": user.username, "expires_at": expires_at})
        _notify(model, "access_request.approved", request, subject=f"Access to {model.repo_id} granted",
                recipients=[user.email])
    return grant


def access_grant_revoke(*, grant: AccessGrant, actor: User, reason: str) -> AccessGrant:
    """Effective on the caller's next request: the gate reads grants on every request."""
    _require_reviewer(actor, grant.model)
    if not (reason or "").strip():
        raise InvalidInput("Give the reason for the revocation; the grantee is told.")
    with transaction.atomic():
        grant = (for_update(AccessGrant.objects)
                 .select_related("model__organization", "user").get(pk=grant.pk))
        if grant.revoked_at is not None:
            raise Conflict(f"Grant {grant.pk} was already revoked on {_day(grant.revoked_at)}.")
        _revoke(AccessGrant.objects.filter(pk=grant.pk), actor=actor, reason=reason.strip(), now=timezone.now())
        grant.refresh_from_db()
    return grant


def _revoke(grants, *, actor: User, reason: str, now) -> None:
    for grant in grants.select_related("model__organization", "user", "request"):
        AccessGrant.objects.filter(pk=grant.pk).update(revoked_at=now, revoked_by=actor, revoke_reason=reason[:2000])
        audit_record(actor=actor, action="access_grant.revoke", target=grant, data={"reason": reason[:500]})
        webhook_emit(organization=grant.model.organization, event="access_grant.revoked", data={
            "grant": grant.pk, "model": grant.model.repo_id, "reason": reason,
            "user": grant.user.username if grant.user else None,
            "organization": grant.organization.slug if grant.organization_id else None})
        if grant.user is not None:
            _mail_on_commit(f"Access to {grant.model.repo_id} revoked", f"Reason: {reason}", [grant.user.email])


def access_revoke_all(*, model: Model, actor: User, reason: str) -> int:
    """On a downgrade: active grants are revoked and pending requests cancelled, so re-opening the model later
    never silently restores old access. Presigned S3 links already handed out live until they expire
    (GATEHOUSE_PRESIGNED_SECONDS); nothing can recall bytes already downloaded."""
    now = timezone.now()
    grants = _active_grants(model)
    count = grants.count()
    _revoke(grants, actor=actor, reason=reason, now=now)
    cancelled = AccessRequest.objects.filter(model=model, status=AccessRequest.Status.PENDING).update(
        status=AccessRequest.Status.CANCELLED, decided_at=now, decided_by=actor)
    if count or cancelled:
        audit_record(actor=actor, action="access.revoke_all", target=model,
                     data={"grants_revoked": count, "requests_cancelled": cancelled, "reason": reason[:500]})
    return count


def download_record(*, user, token, version: ModelVersion, file: ModelFile, bytes: int, range_start: int | None,
                    via: str) -> Download:
    """The transfer's row and the model's totals, together or not at all."""
    with transaction.atomic():
        download = Download.objects.create(user=user if getattr(user, "is_authenticated", False) else None,
                                           token=token, model_id=version.model_id, version=version, path=file.path,
                                           bytes=bytes, range_start=range_start, via=via)
        counters_add(DownloadTotals, keys=("model",), counts=("files", "transfers", "bytes"),
                     rows=[(version.model_id, int(range_start is None), 1, bytes)])
    return download


def downloads_of_model():
    """A model's whole-file downloads, as an annotation of a Model queryset: its totals row, no count of rows."""
    return Coalesce(F("download_totals__files"), 0)


# --- Notifications -----------------------------------------------------------------------------------------

def _reviewer_emails(model: Model) -> list[str]:
    return list(Membership.objects.filter(organization_id=model.organization_id,
                                          role__in=[Membership.Role.ADMIN, Membership.Role.MAINTAINER])
                .values_list("user__email", flat=True))


def _notify(model: Model, event: str, request: AccessRequest, *, subject: str, recipients: list[str],
            reason: str = "") -> None:
    webhook_emit(organization=model.organization, event=event, data={
        "request": request.pk, "model": model.repo_id, "user": request.user.username, "status": request.status,
        "automatic": request.decided_automatically, "reason": reason or None})
    body = f"{subject}.\n\nRequest {request.pk} by {request.user.username} for {model.repo_id}: {request.status}."
    if reason:
        body += f"\nReason: {reason}"
    _mail_on_commit(subject, body, recipients)


def _mail_on_commit(subject: str, body: str, recipients: list[str]) -> None:
    recipients = sorted({r for r in recipients if r})
    if recipients:
        transaction.on_commit(lambda: send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients,
                                                fail_silently=True))


def get_request(*, request_id: int) -> AccessRequest:
    request = AccessRequest.objects.select_related("model__organization", "user").filter(pk=request_id).first()
    if request is None:
        raise NotFound(f"Access request {request_id} does not exist.")
    return request
