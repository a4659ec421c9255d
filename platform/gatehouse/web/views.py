import math

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import F, Q
from django.db.models.functions import Mod
from django.shortcuts import render
from django.utils.module_loading import import_string
from django.views.decorators.http import require_http_methods, require_safe

from django.contrib.auth import views as auth_views

from gatehouse.accounts.authentication import check_credential_failures, client_address, record_credential_failure
from gatehouse.accounts.models import ApiToken, Organization
from gatehouse.accounts.services import api_token_create, api_token_revoke
from gatehouse.core.errors import ApplicationError, NotFound, Throttled
from gatehouse.registry import selectors
from gatehouse.registry.models import (
    ComputeRecord, EvaluationResult, License, RiskAssessment, Tier, TrainingMetric, TrainingRun,
)
from gatehouse.web.charts import line_chart, lineage_svg, power_law_fit
from gatehouse.web.cards import card_html


SORTS = {"recent": ("-updated_at", "-id"), "name": ("organization__slug", "name")}
CHART_POINTS = 400  # what line_chart draws at most of a series


@require_safe
def model_list(request):
    """The catalog: search, filters (tier, licence, task, organization, designation), sort, pages."""
    filters = {key: request.GET.get(key, "")[:200] for key in ("q", "tier", "license", "task", "organization",
                                                               "designation", "risk")}
    if filters["tier"] not in Tier.values:
        filters["tier"] = ""
    extra_sorts = settings.GATEHOUSE_MODEL_LIST_SORTS
    sort = request.GET.get("sort") if request.GET.get("sort") in {*SORTS, *extra_sorts} else "recent"
    models = selectors.model_list(user=request.user, **filters)
    models = import_string(extra_sorts[sort])(models) if sort in extra_sorts else models.order_by(*SORTS[sort])
    page = Paginator(models, 30).get_page(request.GET.get("page"))
    thresholds = selectors.designation_thresholds()
    rows = [(m, selectors.designations_for(m.latest_version, thresholds)) for m in page]
    query = request.GET.copy()
    query.pop("page", None)
    return render(request, "web/model_list.html", {
        "page": page, "rows": rows, "filters": filters, "sort": sort, "tiers": Tier.choices,
        "sorts": [("recent", "Recently updated"), ("name", "Name")] + [(k, k.capitalize()) for k in extra_sorts],
        "licenses": License.objects.order_by("key").values_list("key", flat=True), "thresholds": thresholds,
        "risks": RiskAssessment.Outcome.choices,
        "query": query.urlencode()})


@require_safe
def model_detail(request, org, name):
    try:
        model = selectors.model_get(user=request.user, org=org, name=name)
    except NotFound:
        return render(request, "web/404.html", {"path": request.path}, status=404)
    version = model.latest_version
    thresholds = selectors.designation_thresholds()
    context = {"model": model, "version": version, "card": card_html(model.card_text or (version.card if version else "")),
               "designations": [t for t in thresholds if version and t.key in selectors.designations_for(version, thresholds)]}
    context["panels"] = [import_string(panel)(request, model) for panel in settings.GATEHOUSE_MODEL_PAGE_PANELS]
    context["loss_chart"], context["run"] = _loss_chart(model, version)
    context["scaling_chart"], context["fit"] = _scaling_chart(model)
    if version is not None:
        chain = list(reversed(selectors.version_lineage(version)))
        context["lineage"] = lineage_svg([(f"{v.model.repo_id}@{v.commit[:8]}", f"/{v.model.repo_id}",
                                           v.cumulative_flops) for v in chain])
    if version:
        context["evaluations"] = EvaluationResult.objects.filter(version=version).select_related("benchmark")
        context["assessments"] = RiskAssessment.objects.filter(version=version).select_related("threshold__domain__framework")
        context["datasets"] = version.datasets.select_related("organization").prefetch_related("licenses", "versions")
        records = list(ComputeRecord.objects.filter(version=version).order_by("created_at"))
        context["compute"] = records
        context["compute_total"] = {
            "flops": sum(r.flops for r in records), "device_hours": sum(r.device_hours for r in records),
            "energy_kwh": sum(r.energy_kwh for r in records), "emissions_kg": sum(r.emissions_kg for r in records),
            "cost_usd": sum(r.cost_usd for r in records)} if records else None
    return render(request, "web/model_detail.html", context)


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def tokens(request):
    """Create a token (its secret is shown once, here), see the others, revoke."""
    context, status = {"scopes": ApiToken.Scope.choices, "secret": None, "error": None}, 200
    if request.method == "POST":
        try:
            if request.POST.get("revoke"):
                token = ApiToken.objects.filter(pk=request.POST["revoke"], user=request.user).first()
                if token is None:
                    raise NotFound("No such token of yours.")
                api_token_revoke(token=token, actor=request.user)
            else:
                days = request.POST.get("expires_in_days", "").strip()
                issued = api_token_create(user=request.user, name=request.POST.get("name", "").strip()[:100],
                                          scopes=request.POST.getlist("scopes"),
                                          expires_in_days=int(days) if days.isdigit() else None)
                context["secret"], context["created"] = issued.secret, issued.token
        except ApplicationError as exc:
            context["error"], status = exc.message, exc.status
    context["tokens"] = ApiToken.objects.filter(user=request.user).order_by("-created_at")
    return render(request, "web/tokens.html", context, status=status)


def _loss_chart(model, version):
    """The loss curve of the run that produced this version, or of the model's run in progress."""
    run = None
    if version is not None:
        run = TrainingRun.objects.filter(result_version=version).first()
    if run is None:
        run = (TrainingRun.objects.filter(organization_id=model.organization_id, model_name=model.name,
                                          status=TrainingRun.Status.RUNNING).order_by("-created_at").first())
    if run is None:
        return "", None
    chart = line_chart({"train loss": _points(run, "step", "loss"),
                        "validation loss": _points(run, "eval", "val_loss")}, x_label="step", y_label="loss")
    return chart, run


def _points(run, kind: str, field: str, limit: int = CHART_POINTS) -> list[tuple[int, float]]:
    """At most ~limit (step, value) points of one series, evenly spaced, thinned by the database: a run logs a row
    per step or few, and loading 100,000 of them to draw 400 took 130 ms, on a page a live run refreshes every 5 s.
    Rows come at a regular interval (the trainer's logging interval), read from the first two: every k-th row is a
    step k intervals on from the one before. The first rows and the last are index seeks on (run, kind, step), not a
    count of them all; the last point is always kept."""
    rows = TrainingMetric.objects.filter(run=run, kind=kind)
    head = list(rows.order_by("step").values_list("step", flat=True)[:2])
    if not head:
        return []
    last = rows.order_by("-step").values_list("step", flat=True)[0]
    interval = head[1] - head[0] if len(head) == 2 else 1
    stride = interval * max(1, math.ceil(((last - head[0]) // interval + 1) / limit))
    picked = rows.annotate(offset=Mod(F("step") - head[0], stride)).filter(Q(offset=0) | Q(step=last))
    return list(picked.order_by("step").values_list("step", field))


def _scaling_chart(model):
    """The organization's finished runs: final loss against training FLOPs on log axes, with a fitted power law."""
    runs = (TrainingRun.objects.filter(organization_id=model.organization_id, status=TrainingRun.Status.SUCCEEDED,
                                       last_loss__isnull=False, result_version__isnull=False)
            .values_list("result_version__own_flops", "last_loss"))
    points = sorted((flops, loss) for flops, loss in runs if flops and flops > 0)
    if len(points) < 2:
        return "", None
    fit = power_law_fit(points)
    series = {"runs": points}
    if fit:
        a, b = fit
        series[f"fit: loss = {a:.3g}·C^{b:.3f}"] = [(points[0][0], a * points[0][0] ** b),
                                                   (points[-1][0], a * points[-1][0] ** b)]
    return line_chart(series, x_label="training FLOPs", y_label="final loss", log_x=True, log_y=True,
                      scatter=("runs",)), fit


@require_safe
def dataset_list(request):
    datasets = selectors.dataset_queryset().order_by("organization__slug", "name")
    return render(request, "web/dataset_list.html", {"datasets": datasets})


@require_safe
def dataset_detail(request, org, name):
    dataset = selectors.dataset_queryset().filter(organization__slug=org, name=name).first()
    if dataset is None:
        return render(request, "web/404.html", {"path": request.path}, status=404)
    # Only the models this visitor may know exist.
    models = selectors.model_visible_queryset(request.user).filter(versions__datasets=dataset).select_related(
        "organization").distinct().order_by("organization__slug", "name")
    return render(request, "web/dataset_detail.html", {"dataset": dataset, "models": models})


@require_safe
def license_list(request):
    return render(request, "web/license_list.html", {"licenses": License.objects.order_by("key")})


@login_required
@require_safe
def profile(request):
    memberships = request.user.memberships.select_related("organization").order_by("organization__slug")
    return render(request, "web/profile.html", {"memberships": memberships})


@require_safe
def organization_detail(request, org):
    organization = Organization.objects.filter(slug=org).first()
    if organization is None:
        return render(request, "web/404.html", {"path": request.path}, status=404)
    models = selectors.model_list(user=request.user, organization=org).order_by("name")
    members = (organization.memberships.select_related("user").order_by("user__username")
               if selectors.is_member(request.user, organization) else None)  # the roster is the members' business
    return render(request, "web/organization.html", {"organization": organization, "models": models,
                                                     "members": members})


class LoginView(auth_views.LoginView):
    """Django's login, refusing (429) an address or a username after too many failed attempts."""

    template_name = "web/login.html"

    def post(self, request, *args, **kwargs):
        keys = [client_address(request), "user:" + request.POST.get("username", "")[:150].lower()]
        try:
            for key in keys:
                check_credential_failures(key)
        except Throttled as exc:
            form = self.get_form()
            return self.render_to_response(self.get_context_data(form=form, throttled=exc.message), status=429)
        response = super().post(request, *args, **kwargs)
        if response.status_code != 302:  # the form was refused: a failed attempt
            for key in keys:
                record_credential_failure(key)
        return response
