"""Release workflow: draft → submitted → approved / changes requested / rejected → scheduled → effective,
withdrawal before effect, immediate downgrades. The policy is re-checked at submission, at approval and when
a scheduled stage comes due. Every transition is audited and notified."""
from datetime import timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.utils import timezone

from gatehouse.accounts.models import Membership, User
from gatehouse.audit.services import audit_record
from gatehouse.core.errors import Conflict, InvalidInput, PermissionDenied
from gatehouse.core.locks import for_update
from gatehouse.registry.models import Model, ModelVersion, Tier
from gatehouse.registry.selectors import organization_for_writer
from gatehouse.webhooks.services import webhook_emit
from releases import policy
from releases.access import access_policy_set_audience, access_revoke_all
from releases.facts import version_facts
from releases.models import Audience, ModelFollow, Release, ReleaseApproval, ReleaseRequest

DOWNGRADE_WARNING = ("Weights already downloaded cannot be recalled: a downgrade stops new downloads and inference, "
                     "not copies that exist.")
WAIVABLE = {"license_incompatible", "derivative_more_open"}
APPROVER_ROLES = (Membership.Role.ADMIN, Membership.Role.APPROVER)


def _request_facts(request: ReleaseRequest) -> policy.RequestFacts:
    return policy.RequestFacts(safeguards_in_place=request.safeguards_in_place,
                               incident_contact=request.incident_contact, waivers=frozenset(request.waivers))


def release_findings(request: ReleaseRequest) -> list[dict]:
    """Findings for every stage's tier, each tagged with the stage it concerns."""
    facts = version_facts(request.version)
    out = []
    for index, stage in enumerate(request.stages):
        for finding in policy.check_release(facts, stage["tier"], _request_facts(request)):
            out.append(finding.as_dict() | {"stage": index, "tier": stage["tier"]})
    return out


def _blocking(findings: list[dict]) -> list[dict]:
    return [f for f in findings if f["severity"] == "blocker"]


def _validate_stages(stages) -> list[dict]:
    if not isinstance(stages, list) or not stages:
        raise InvalidInput('stages must be a non-empty list like [{"tier": "api", "after_days": 0}].')
    clean, last_day = [], -1
    for stage in stages:
        tier, days = (stage or {}).get("tier"), (stage or {}).get("after_days", 0)
        if tier not in ("api", "open"):
            raise InvalidInput("Each stage's tier must be api or open (closing a model is a downgrade).")
        if not isinstance(days, int) or isinstance(days, bool) or days < 0 or days <= last_day:
            raise InvalidInput("after_days must be whole days, starting at 0 or later and strictly increasing.")
        if clean and not policy.more_open(tier, clean[-1]["tier"]):
            raise InvalidInput("Each later stage must widen access (api, then open).")
        clean.append({"tier": tier, "after_days": days})
        last_day = days
    return clean


def release_request_create(*, version: ModelVersion, actor: User, stages, audience: str = Audience.PUBLIC,
                           safeguards_in_place: bool = False, incident_contact: str = "", waivers=(),
                           notes: str = "") -> ReleaseRequest:
    organization_for_writer(user=actor, organization=version.model.organization)
    if version.status != ModelVersion.Status.VERIFIED:
        raise InvalidInput("Only a verified version can be released.")
    if audience not in Audience.values:
        raise InvalidInput(f"audience must be one of {', '.join(Audience.values)}.")
    unknown = sorted(set(waivers) - WAIVABLE)
    if unknown:
        raise InvalidInput(f"Only these findings can be waived: {', '.join(sorted(WAIVABLE))} (not {', '.join(unknown)}).")
    with transaction.atomic():
        request = ReleaseRequest.objects.create(
            version=version, requested_by=actor, stages=_validate_stages(stages), audience=audience,
            safeguards_in_place=safeguards_in_place, incident_contact=incident_contact[:200],
            waivers=sorted(set(waivers)), notes=notes)
        audit_record(actor=actor, action="release_request.create", target=request,
                     data={"model": version.model.repo_id, "commit": version.commit, "stages": request.stages})
    return request


def release_request_submit(*, request: ReleaseRequest, actor: User) -> ReleaseRequest:
    organization_for_writer(user=actor, organization=request.version.model.organization)
    with transaction.atomic():
        request = for_update(ReleaseRequest.objects).get(pk=request.pk)
        if request.status not in (ReleaseRequest.Status.DRAFT, ReleaseRequest.Status.CHANGES_REQUESTED):
            raise Conflict(f"Release request {request.pk} is {request.status}; only drafts and requests with changes "
                           "requested can be submitted.")
        findings = release_findings(request)
        if _blocking(findings):
            raise InvalidInput("The release cannot be submitted: " + "; ".join(
                f["message"] for f in _blocking(findings)), code="policy_blocked", fields={"findings": findings})
        request.findings = findings
        request.required_approvals = policy.required_approvals(version_facts(request.version))
        request.status, request.submitted_at = ReleaseRequest.Status.SUBMITTED, timezone.now()
        request.save(update_fields=["findings", "required_approvals", "status", "submitted_at"])
        audit_record(actor=actor, action="release_request.submit", target=request,
                     data={"required_approvals": request.required_approvals, "findings": len(findings)})
        _notify_on_commit(request, f"Release request {request.pk} for {request.version.model.repo_id} awaits approval",
                          _approver_emails(request), event="release_request.submitted")
    return request


def approves_for(user: User, organization) -> bool:
    return user.is_superuser or Membership.objects.filter(
        user=user, organization=organization, role__in=APPROVER_ROLES).exists()


def _base_owner(request: ReleaseRequest):
    """The base's organization when this request waives 'derivative_more_open' for another organization's
    base: that owner must approve too (the policy's "unless the base's owner approves")."""
    version = request.version
    if "derivative_more_open" not in request.waivers or not version.base_version_id:
        return None
    owner = version.base_version.model.organization
    return owner if owner.pk != version.model.organization_id else None


def _is_approver(user: User, request: ReleaseRequest) -> bool:
    owner = _base_owner(request)
    return approves_for(user, request.version.model.organization) or (owner is not None and approves_for(user, owner))


def _approvals_complete(request: ReleaseRequest, round_: int) -> bool:
    approvers = list(ReleaseApproval.objects.filter(request=request, submission=round_,
                                                    decision=ReleaseApproval.Decision.APPROVE).select_related("approver"))
    owner = _base_owner(request)
    if owner is not None and not any(approves_for(a.approver, owner) for a in approvers):
        return False
    return len(approvers) >= request.required_approvals


def _submission_round(request: ReleaseRequest) -> int:
    return ReleaseApproval.objects.filter(request=request, decision=ReleaseApproval.Decision.REQUEST_CHANGES).count() + 1


def release_request_decide(*, request: ReleaseRequest, actor: User, decision: str, comment: str = "") -> ReleaseRequest:
    """An approver's decision. The request row is locked, so two approvers racing on the last approval
    produce exactly one transition."""
    if decision not in ReleaseApproval.Decision.values:
        raise InvalidInput(f"decision must be one of {', '.join(ReleaseApproval.Decision.values)}.")
    if not _is_approver(actor, request):
        raise PermissionDenied("Only approvers (the organization's admins and approvers) can decide on releases.")
    if actor.pk == request.requested_by_id:
        raise PermissionDenied("You cannot decide on your own release request; ask another approver.")
    if decision != ReleaseApproval.Decision.APPROVE and not comment.strip():
        raise InvalidInput("Say why: requesting changes or rejecting needs a comment the requester will read.")
    with transaction.atomic():
        request = for_update(ReleaseRequest.objects).select_related("version__model").get(pk=request.pk)
        if request.status != ReleaseRequest.Status.SUBMITTED:
            raise Conflict(f"Release request {request.pk} is {request.status}, not awaiting decisions.")
        round_ = _submission_round(request)
        if ReleaseApproval.objects.filter(request=request, approver=actor, submission=round_).exists():
            raise Conflict("You already decided on this submission.")
        if decision == ReleaseApproval.Decision.APPROVE:
            findings = release_findings(request)  # facts may have changed since submission
            if _blocking(findings):
                raise InvalidInput("The release no longer passes the policy: " + "; ".join(
                    f["message"] for f in _blocking(findings)), code="policy_blocked", fields={"findings": findings})
            request.findings = findings
        ReleaseApproval.objects.create(request=request, approver=actor, decision=decision, comment=comment,
                                       submission=round_)
        audit_record(actor=actor, action=f"release_request.{decision}", target=request, data={"comment": comment[:500]})
        now = timezone.now()
        if decision == ReleaseApproval.Decision.REJECT:
            request.status, request.decided_at = ReleaseRequest.Status.REJECTED, now
        elif decision == ReleaseApproval.Decision.REQUEST_CHANGES:
            request.status = ReleaseRequest.Status.CHANGES_REQUESTED
        elif _approvals_complete(request, round_):
            request.status, request.decided_at = ReleaseRequest.Status.APPROVED, now
            _schedule(request, actor, now)
        request.save(update_fields=["status", "decided_at", "findings"])
        _notify_on_commit(request, f"Release request {request.pk}: {decision.replace('_', ' ')} by {actor.username}",
                          [request.requested_by.email], event=f"release_request.{decision}")
    return request


def _schedule(request: ReleaseRequest, actor: User, now) -> None:
    model = request.version.model
    # An approved plan replaces any stage still waiting from an earlier plan.
    Release.objects.filter(model=model, status=Release.Status.SCHEDULED).update(
        status=Release.Status.CANCELLED, reason=f"superseded by release request {request.pk}")
    for stage in request.stages:
        release = Release.objects.create(model=model, version=request.version, request=request, tier=stage["tier"],
                                          audience=request.audience, created_by=actor,
                                          effective_at=now + timedelta(days=stage["after_days"]))
        audit_record(actor=actor, action="release.schedule", target=release,
                     data={"tier": release.tier, "effective_at": release.effective_at})
        if stage["after_days"] == 0:
            _make_effective(release, actor)


def _make_effective(release: Release, actor) -> None:
    Release.objects.filter(pk=release.pk).update(status=Release.Status.EFFECTIVE)
    Model.objects.filter(pk=release.model_id).update(tier=release.tier, updated_at=timezone.now())
    access_policy_set_audience(model_id=release.model_id, audience=release.audience)
    release.status = Release.Status.EFFECTIVE
    audit_record(actor=actor, action="release.effective", target=release, data={"tier": release.tier})
    _tell_followers(release)


def _tell_followers(release: Release) -> None:
    """Followers who may still see the model after the change (a closed model is its members' business)."""
    followers = ModelFollow.objects.filter(model_id=release.model_id)
    if release.tier == Tier.CLOSED:
        followers = followers.filter(user__memberships__organization__models=release.model_id)
    recipients = sorted({e for e in followers.values_list("user__email", flat=True) if e})
    if not recipients:
        return
    repo_id = Model.objects.filter(pk=release.model_id).select_related("organization").get().repo_id
    subject = f"{repo_id} is now released at tier {release.tier}"
    body = f"{subject} (audience {release.audience}) since {release.effective_at:%Y-%m-%d %H:%M} UTC."
    if release.reason:
        body += f"\nReason: {release.reason}"
    transaction.on_commit(lambda: send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients, fail_silently=True))


def model_follow(*, model: Model, user: User, follow: bool = True) -> bool:
    """Follow (or stop following) a model the user can see; returns whether they follow it now."""
    if follow:
        ModelFollow.objects.get_or_create(model=model, user=user)
    else:
        ModelFollow.objects.filter(model=model, user=user).delete()
    return follow


def releases_apply_due(*, now=None) -> list[Release]:
    """Make scheduled stages effective once due, re-checking the policy at that moment (beat task)."""
    now = now or timezone.now()
    applied = []
    for release_id in Release.objects.filter(status=Release.Status.SCHEDULED, effective_at__lte=now).values_list("pk", flat=True):
        with transaction.atomic():
            release = (for_update(Release.objects).select_related("request", "version__model")
                       .filter(pk=release_id, status=Release.Status.SCHEDULED).first())
            if release is None:
                continue
            facts = version_facts(release.version)
            blockers = policy.blockers(policy.check_release(facts, release.tier, _request_facts(release.request)))
            if blockers:
                reason = "; ".join(f.message for f in blockers)
                Release.objects.filter(pk=release.pk).update(status=Release.Status.BLOCKED, reason=reason[:2000])
                audit_record(actor=None, action="release.blocked", target=release, data={"findings": [f.code for f in blockers]})
                _notify_on_commit(release.request, f"Scheduled release of {release.model.repo_id} at {release.tier} "
                                  f"did not take effect: {reason}",
                                  [release.request.requested_by.email] + _approver_emails(release.request),
                                  event="release.blocked")
                continue
            _make_effective(release, None)
            applied.append(release)
    return applied


def release_request_withdraw(*, request: ReleaseRequest, actor: User) -> ReleaseRequest:
    organization_for_writer(user=actor, organization=request.version.model.organization)
    with transaction.atomic():
        request = for_update(ReleaseRequest.objects).get(pk=request.pk)
        pending = Release.objects.filter(request=request, status=Release.Status.SCHEDULED)
        open_states = (ReleaseRequest.Status.DRAFT, ReleaseRequest.Status.SUBMITTED, ReleaseRequest.Status.CHANGES_REQUESTED)
        if request.status not in open_states and not (request.status == ReleaseRequest.Status.APPROVED and pending.exists()):
            raise Conflict(f"Release request {request.pk} is {request.status} with nothing left to withdraw.")
        cancelled = pending.update(status=Release.Status.CANCELLED, reason="withdrawn")
        request.status = ReleaseRequest.Status.WITHDRAWN
        request.save(update_fields=["status"])
        audit_record(actor=actor, action="release_request.withdraw", target=request, data={"cancelled_stages": cancelled})
    return request


def release_downgrade(*, model: Model, actor: User, tier: str, reason: str) -> Release:
    """Immediate and decided by one approver. Scheduled widenings are cancelled, access grants revoked and
    pending access requests cancelled; the gate refuses the next download. Weights already downloaded cannot
    be recalled."""
    if not approves_for(actor, model.organization):
        raise PermissionDenied("Only approvers (the organization's admins and approvers) can downgrade a release.")
    if tier not in Tier.values or not policy.more_open(model.tier, tier):
        raise InvalidInput(f"A downgrade must go to a more closed tier than the current '{model.tier}'.")
    if not reason.strip():
        raise InvalidInput("Give the reason for the downgrade; it is recorded and sent to the owners.")
    with transaction.atomic():
        model = for_update(Model.objects).get(pk=model.pk)
        Release.objects.filter(model=model, status=Release.Status.SCHEDULED).update(
            status=Release.Status.CANCELLED, reason=f"downgraded to {tier}")
        release = Release.objects.create(model=model, version=model.latest_version, tier=tier,
                                         audience=Audience.ORGANIZATION if tier == Tier.CLOSED else Audience.PUBLIC,
                                         effective_at=timezone.now(), created_by=actor, reason=reason,
                                         status=Release.Status.SCHEDULED)
        _make_effective(release, actor)
        access_revoke_all(model=model, actor=actor, reason=f"model downgraded to {tier}: {reason}")
        audit_record(actor=actor, action="release.downgrade", target=release, data={"tier": tier, "reason": reason[:500]})
        webhook_emit(organization=model.organization, event="release.downgraded",
                     data={"model": model.repo_id, "tier": tier, "reason": reason, "by": actor.username})
    return release


def _approver_emails(request: ReleaseRequest) -> list[str]:
    organizations = [request.version.model.organization_id] + ([_base_owner(request).pk] if _base_owner(request) else [])
    return list(Membership.objects.filter(organization_id__in=organizations, role__in=APPROVER_ROLES)
                .exclude(user=request.requested_by).values_list("user__email", flat=True))


def _notify_on_commit(request: ReleaseRequest, subject: str, recipients: list[str], *, event: str) -> None:
    """Email the people concerned and emit a signed webhook, both after the transaction commits."""
    webhook_emit(organization=request.version.model.organization, event=event, data={
        "request": request.pk, "model": request.version.model.repo_id, "commit": request.version.commit,
        "status": request.status, "stages": request.stages, "summary": subject})
    recipients = sorted({r for r in recipients if r})
    if not recipients:
        return
    body = f"{subject}\n\nRequest {request.pk}: {request.version.model.repo_id}@{request.version.commit[:12]}, " \
           f"stages {request.stages}, status {request.status}."
    transaction.on_commit(lambda: send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients, fail_silently=True))
