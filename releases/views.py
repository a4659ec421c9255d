"""Server-rendered pages of the releases app: the release and access-request queues, a model's access form,
downgrade page and playground, the model page's access panel, and the caller's own requests and usage."""
import functools
import json

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Count, Q, Sum
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.urls import path, reverse
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from gatehouse.accounts.models import Membership
from gatehouse.core.errors import ApplicationError
from gatehouse.registry.models import ComputeRecord, RiskAssessment
from gatehouse.registry.selectors import designation_thresholds, designations_for, model_get
from gatehouse.registry.api.urls import SegmentConverter  # noqa: F401  (registers <seg:>)
from releases import access, policy
from releases.inference.views import OpenAIError, backend_served, generate
from releases.models import AccessRequest, Download, InferenceCall, Release, ReleaseRequest
from releases.services import (
    APPROVER_ROLES, DOWNGRADE_WARNING, approves_for, release_downgrade, release_request_decide,
)


def with_visible_model(view):
    """Pages of one model: the view gets the model the user may see; anyone else gets the 404 page."""
    @functools.wraps(view)
    def wrapper(request, org, name):
        try:
            model = model_get(user=request.user, org=org, name=name)
        except ApplicationError:
            return render(request, "web/404.html", {"path": request.path}, status=404)
        return view(request, model)
    return wrapper


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
@require_safe
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


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
@with_visible_model
def access_request_page(request, model):
    """The form built from the model's request fields, with the license and acceptable-use text to accept."""
    access_policy = access.access_policy_of(model)
    facts = access.caller_facts(user=request.user, token=None, model=model)
    form_errors, values, status = {}, {}, 200
    if request.method == "POST":
        values = {f["name"]: request.POST.get(f["name"], "") for f in access_policy.request_fields}
        try:
            created = access.access_request_create(model=model, user=request.user, fields=values,
                                                   accept_license=request.POST.get("accept_license") == "on",
                                                   accept_acceptable_use=request.POST.get("accept_acceptable_use") == "on")
            if created.status == AccessRequest.Status.ACCEPTED:
                messages.success(request, f"Access to {model.repo_id} granted.")
            else:
                messages.success(request, f"Your request for {model.repo_id} was sent to its reviewers.")
            return redirect("web-access-request", org=model.organization.slug, name=model.name)
        except ApplicationError as exc:
            messages.error(request, exc.message)
            form_errors, status = exc.fields, exc.status
    latest = AccessRequest.objects.filter(model=model, user=request.user).order_by("-created_at", "-id").first()
    return render(request, "releases/access_request.html", {
        "model": model, "policy": access_policy, "facts": facts, "latest": latest, "errors": form_errors,
        "values": values, "gated": model.tier != "closed" and policy.needs_grant(access_policy.audience,
                                                               bool(access_policy.acceptable_use))},
        status=status)


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
@with_visible_model
def downgrade_page(request, model):
    """Close a model further at once (open → API → closed), with the reason and the warning that copies stay."""
    if not approves_for(request.user, model.organization):
        return render(request, "releases/downgrade.html", {"model": model, "forbidden": True}, status=403)
    status = 200
    if request.method == "POST":
        try:
            release_downgrade(model=model, actor=request.user, tier=request.POST.get("tier", ""),
                              reason=request.POST.get("reason", ""))
            messages.success(request, f"{model.repo_id} is now {request.POST.get('tier')}. {DOWNGRADE_WARNING}")
            return redirect("release-downgrade", org=model.organization.slug, name=model.name)
        except ApplicationError as exc:
            messages.error(request, exc.message)
            status = exc.status
    tiers = [t for t in ("api", "closed") if policy.more_open(model.tier, t)]
    return render(request, "releases/downgrade.html", {"model": model, "tiers": tiers, "warning": DOWNGRADE_WARNING},
                  status=status)


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
@with_visible_model
def playground(request, model):
    """Try a model the signed-in user may use, and copy the `openai` snippet that does the same. Anyone else is told
    why they may not and what to do instead of getting a form (and a snippet) that can only be refused."""
    if request.method == "POST" and request.headers.get("Accept", "").startswith("text/event-stream"):
        return _playground_stream(request, model)
    context = {"model": model, "base_url": request.build_absolute_uri("/v1"), "message": "", "answer": None,
               "error": None, "max_tokens": 64, "temperature": 0.7}
    if not backend_served(model):
        context["unavailable"] = (f"{model.repo_id} is not served by the inference API: no inference backend is "
                                  "enabled for it. Its organization's administrators can enable one.")
        return render(request, "releases/playground.html", context, status=404)
    access_policy = access.access_policy_of(model)
    decision = policy.inference_access(
        repo_id=model.repo_id, tier=model.tier, audience=access_policy.audience,
        acceptable_use=bool(access_policy.acceptable_use), request_url=access.access_request_url(request, model),
        caller=access.caller_facts(user=request.user, token=None, model=model))
    if not decision.allowed:  # the decision's message says why and what to do (request access, accept the policy)
        context["unavailable"] = decision.message
        if policy.needs_grant(access_policy.audience, bool(access_policy.acceptable_use)):
            context["access_url"] = reverse("web-access-request", args=[model.organization.slug, model.name])
        return render(request, "releases/playground.html", context, status=decision.status)
    status = 200
    if request.method == "POST":
        # The form comes back as it was typed, whatever is wrong with it.
        context.update(message=request.POST.get("message", ""), max_tokens=request.POST.get("max_tokens", ""),
                       temperature=request.POST.get("temperature", ""))
        try:
            body = _playground_body(model, request.POST)
        except ValueError as exc:  # not a number at all: the gateway's range checks say the rest
            context["error"] = str(exc)
            return render(request, "releases/playground.html", context, status=400)
        try:
            response = generate(request, "chat/completions", user=request.user, token=None, body=body)
            payload = json.loads(response.content)
            choice = (payload.get("choices") or [None])[0] if response.status_code == 200 else None
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                context["answer"] = message["content"]
                context["usage"] = payload.get("usage")
            elif response.status_code == 200:  # a backend answering chat in another shape (a completion's, say)
                context["error"], status = ("The model's backend answered without a chat message; retry, or tell "
                                            f"{model.organization.slug}'s administrators."), 502
            else:
                context["error"], status = payload["error"]["message"], response.status_code
        except OpenAIError as exc:
            context["error"], status = exc.message, exc.status
    return render(request, "releases/playground.html", context, status=status)


def _playground_stream(request, model):
    """playground.js posts the form asking for text/event-stream: the answer as it is generated (the gateway's own
    stream, relayed as it comes, usage last), or why not as OpenAI's error JSON, whose message the page shows. The
    gateway makes every check the page makes (served, tier, gating, acceptable use, quotas)."""
    try:
        body = _playground_body(model, request.POST)
    except ValueError as exc:
        return OpenAIError(400, str(exc), "invalid_value").response()
    try:
        return generate(request, "chat/completions", user=request.user, token=None,
                        body=body | {"stream": True, "stream_options": {"include_usage": True}})
    except OpenAIError as exc:
        return exc.response()


def _playground_body(model, form) -> dict:
    """The chat call the playground's form asks for; ValueError names a field that is not a number."""
    numbers = {"max_tokens": _form_number(form.get("max_tokens", ""), int, 64, "Max tokens"),
               "temperature": _form_number(form.get("temperature", ""), float, 0.7, "Temperature")}
    return {"model": model.repo_id, "messages": [{"role": "user", "content": form.get("message", "")}], **numbers}


def _form_number(text: str, kind, default, label: str):
    """A number field of the playground's form: its default when left empty."""
    if not text.strip():
        return default
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{label} must be {'a whole number' if kind is int else 'a number'}; got {text[:40]!r}.") \
            from None


def sort_by_downloads(models):
    """The catalog's "downloads" sort (GATEHOUSE_MODEL_LIST_SORTS): whole-file downloads, most first."""
    return models.annotate(download_count=access.downloads_of_model()).order_by("-download_count", "-updated_at", "-id")


def model_page_panel(request, model) -> str:
    """The model page's "Access" panel (wired in by settings.GATEHOUSE_MODEL_PAGE_PANELS, since gatehouse's
    pages know nothing of releases): what the caller may do, and how — files with sizes and hashes and the
    huggingface_hub snippet when downloads are allowed, the request-access state when they need approval,
    the openai snippet and playground when the model is served, and the downgrade page for approvers."""
    version = model.latest_version
    access_policy = access.access_policy_of(model)
    facts = access.caller_facts(user=request.user, token=None, model=model)
    base = request.build_absolute_uri("/").rstrip("/")
    request_url = access.access_request_url(request, model)
    downloads = policy.file_access(repo_id=model.repo_id, tier=model.tier, audience=access_policy.audience,
                                   path="model.safetensors", caller=facts, request_url=request_url,
                                   inference_url=f"{base}/v1", acceptable_use=bool(access_policy.acceptable_use))
    inference = policy.inference_access(repo_id=model.repo_id, tier=model.tier, audience=access_policy.audience,
                                        acceptable_use=bool(access_policy.acceptable_use), caller=facts,
                                        request_url=request_url)
    backend = backend_served(model)
    needs_request = model.tier != "closed" and not facts.is_member and policy.needs_grant(
        access_policy.audience, bool(access_policy.acceptable_use))
    return render_to_string("releases/model_panel.html", {
        "model": model, "version": version, "facts": facts, "downloads": downloads, "needs_request": needs_request,
        "files": version.files.order_by("path") if version and downloads.allowed else [],
        "backend": backend, "served": backend and inference.allowed, "base": base,
        "approver": request.user.is_authenticated and approves_for(request.user, model.organization),
        "history": Release.objects.filter(model=model).exclude(status=Release.Status.CANCELLED)
        .select_related("version").order_by("-effective_at", "-id")[:10],
        "since": Release.objects.filter(model=model, status=Release.Status.EFFECTIVE).order_by("-effective_at").first(),
        "audience": access_policy.get_audience_display()}, request=request)


def _reviewable_requests(user):
    pending = AccessRequest.objects.filter(status=AccessRequest.Status.PENDING).select_related(
        "user", "model__organization", "model__license")
    if not user.is_superuser:
        reviewed = Membership.objects.filter(user=user, role__in=[Membership.Role.ADMIN, Membership.Role.MAINTAINER])
        pending = pending.filter(model__organization__in=reviewed.values("organization_id"))
    return pending.order_by("created_at", "id")


@login_required
@require_safe
def access_queue(request):
    """Reviewers' queue of access requests: oldest first, with how long each has waited."""
    return render(request, "releases/access_queue.html", {"items": list(_reviewable_requests(request.user))})


@login_required
@require_POST
def access_decide(request, request_id):
    item = AccessRequest.objects.select_related("model__organization", "user").filter(pk=request_id).first()
    if item is None:
        messages.error(request, f"Access request {request_id} does not exist.")
        return redirect("access-queue")
    try:
        access.access_request_decide(request=item, actor=request.user, status=request.POST.get("status", ""),
                                     reason=request.POST.get("reason", ""))
        messages.success(request, f"{item.user.username}'s request for {item.model.repo_id}: "
                                  f"{request.POST.get('status')}.")
    except ApplicationError as exc:
        messages.error(request, f"Access request {request_id}: {exc.message}")
    return redirect("access-queue")


@login_required
@require_safe
def my_access_and_usage(request):
    """My access requests and what I used: downloads (files, bytes) and inference (calls, tokens), per model."""
    requests = AccessRequest.objects.filter(user=request.user).select_related("model__organization").order_by(
        "-created_at")
    downloads = (Download.objects.filter(user=request.user).values("model__organization__slug", "model__name")
                 .annotate(files=Count("id"), bytes=Sum("bytes")).order_by("-bytes"))
    inference = (InferenceCall.objects.filter(user=request.user).values("model__organization__slug", "model__name")
                 .annotate(calls=Count("id"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
                 .order_by("-calls"))
    return render(request, "releases/mine.html", {"requests": requests, "downloads": downloads,
                                                  "inference": inference})


urlpatterns = [
    path("queue", queue, name="release-queue"),
    path("requests/<int:request_id>/decide", decide, name="release-decide"),
    path("models/<seg:org>/<seg:name>/downgrade", downgrade_page, name="release-downgrade"),
    path("models/<seg:org>/<seg:name>/playground", playground, name="model-playground"),
    path("access-requests", access_queue, name="access-queue"),
    path("mine", my_access_and_usage, name="my-usage"),
    path("access-requests/<int:request_id>/decide", access_decide, name="access-decide"),
]
