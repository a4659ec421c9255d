from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.shortcuts import render
from django.utils.module_loading import import_string

from gatehouse.accounts.models import ApiToken
from gatehouse.accounts.services import api_token_create, api_token_revoke
from gatehouse.core.errors import ApplicationError, NotFound
from gatehouse.registry import selectors
from gatehouse.registry.models import EvaluationResult, License, RiskAssessment, Tier
from gatehouse.web.cards import card_html


SORTS = {"recent": ("-updated_at", "-id"), "name": ("organization__slug", "name")}


def model_list(request):
    """The catalog: search, filters (tier, licence, task, organization, designation), sort, pages."""
    filters = {key: request.GET.get(key, "")[:200] for key in ("q", "tier", "license", "task", "organization",
                                                               "designation")}
    if filters["tier"] not in Tier.values:
        filters["tier"] = ""
    sort = request.GET.get("sort") if request.GET.get("sort") in SORTS else "recent"
    models = selectors.model_list(user=request.user, **filters).order_by(*SORTS[sort])
    page = Paginator(models, 30).get_page(request.GET.get("page"))
    thresholds = selectors.designation_thresholds()
    rows = [(m, selectors.designations_for(m.latest_version, thresholds)) for m in page]
    query = request.GET.copy()
    query.pop("page", None)
    return render(request, "web/model_list.html", {
        "page": page, "rows": rows, "filters": filters, "sort": sort, "tiers": Tier.choices,
        "licenses": License.objects.order_by("key").values_list("key", flat=True), "thresholds": thresholds,
        "query": query.urlencode()})


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
    if version:
        context["evaluations"] = EvaluationResult.objects.filter(version=version).select_related("benchmark")
        context["assessments"] = RiskAssessment.objects.filter(version=version).select_related("threshold__domain__framework")
        context["datasets"] = version.datasets.select_related("organization")
    return render(request, "web/model_detail.html", context)


@login_required
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
