"""The approver queue: server-rendered, for people who decide on releases."""
from django.contrib import messages
from django.db.models import Q
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import path
from django.views.decorators.http import require_POST

from gatehouse.accounts.models import Membership
from gatehouse.core.errors import ApplicationError
from gatehouse.registry.models import ComputeRecord, RiskAssessment
from gatehouse.registry.selectors import designation_thresholds, designations_for
from releases.models import Release, ReleaseRequest
from releases.services import APPROVER_ROLES, release_request_decide


def _queue_for(user):
    queue = ReleaseRequest.objects.filter(status=ReleaseRequest.Status.SUBMITTED).select_related(
        "version__model__organization", "version__model__license", "version__license", "requested_by"
    ).prefetch_related("decisions__approver", "version__datasets__organization", "version__datasets__licenses")
    if user.is_superuser:
        return list(queue.order_by("submitted_at"))
    mine = Membership.objects.filter(user=user, role__in=APPROVER_ROLES).values("organization_id")
    candidates = queue.filter(Q(version__model__organization__in=mine)
                              | Q(version__base_version__model__organization__in=mine)).order_by("submitted_at")
    mine_ids = set(mine.values_list("organization_id", flat=True))
    # Base owners see only the derivatives that ask, by waiver, to be more open than their base.
    return [r for r in candidates if r.version.model.organization_id in mine_ids
            or "derivative_more_open" in r.waivers]


@login_required
def queue(request):
    thresholds = designation_thresholds()
    items = []
    for release_request in _queue_for(request.user):
        version, model = release_request.version, release_request.version.model
        current = Release.objects.filter(model=model, status=Release.Status.EFFECTIVE).select_related("version").last()
        items.append({
            "request": release_request, "version": version, "model": model, "current": current,
            "designations": designations_for(version, thresholds),
            "compute": ComputeRecord.objects.filter(version=version),
            "assessments": RiskAssessment.objects.filter(version=version).select_related("threshold__domain__framework"),
            "own_request": release_request.requested_by_id == request.user.pk,
        })
    return render(request, "releases/queue.html", {"items": items})


@login_required
@require_POST
def decide(request, request_id):
    release_request = get_object_or_404(ReleaseRequest, pk=request_id)
    try:
        release_request_decide(request=release_request, actor=request.user, decision=request.POST.get("decision", ""),
                               comment=request.POST.get("comment", ""))
        messages.success(request, f"Release request {request_id}: {request.POST.get('decision', '').replace('_', ' ')} recorded.")
    except ApplicationError as exc:
        messages.error(request, f"Release request {request_id}: {exc.message}")
    return redirect("release-queue")


urlpatterns = [
    path("queue", queue, name="release-queue"),
    path("requests/<int:request_id>/decide", decide, name="release-decide"),
]
