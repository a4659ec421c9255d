from django.urls import path

from gatehouse.registry.api.urls import SegmentConverter  # noqa: F401  (registers <seg:>)
from gatehouse.web import views

urlpatterns = [
    path("", views.model_list, name="web-model-list"),
    path("<seg:org>/<seg:name>", views.model_detail, name="web-model-detail"),
]
