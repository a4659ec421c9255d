from django.conf import settings
from django.core.paginator import Paginator
from django.shortcuts import render
from django.utils.module_loading import import_string

from gatehouse.core.errors import NotFound
from gatehouse.registry import selectors
from gatehouse.registry.models import EvaluationResult, RiskAssessment, Tier
from gatehouse.web.cards import card_html


def model_list(request):
    q = request.GET.get("q", "")[:200]
    tier = request.GET.get("tier", "")
    models = selectors.model_list(user=request.user, q=q, tier=tier if tier in Tier.values else "")
    page = Paginator(models, 30).get_page(request.GET.get("page"))
    thresholds = selectors.designation_thresholds()
    rows = [(m, selectors.designations_for(m.latest_version, thresholds)) for m in page]
    return render(request, "web/model_list.html", {"page": page, "rows": rows, "q": q, "tier": tier,
                                                   "tiers": Tier.choices})


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
