"""Root-level routes of the releases app: the Hub-compatible API (/api/models…, /api/whoami-v2, /{org}/{name}/
resolve/…) and the access-request form of a gated model (/{org}/{name}/access)."""
from django.urls import path

from gatehouse.registry.api.urls import SegmentConverter  # noqa: F401  (registers <seg:>)
from releases import views as pages
from releases.hub import views

MODEL = "api/models/<seg:org>/<seg:name>"

urlpatterns = [
    path("api/models", views.model_index, name="hub-model-index"),
    path("api/whoami-v2", views.whoami, name="hub-whoami"),
    path(MODEL, views.model_info, name="hub-model-info"),
    path(f"{MODEL}/revision/<str:revision>", views.model_info, name="hub-model-info-revision"),
    path(f"{MODEL}/tree/<str:revision>", views.tree, name="hub-tree"),
    path(f"{MODEL}/tree/<str:revision>/<path:path>", views.tree, name="hub-tree-path"),
    path(f"{MODEL}/refs", views.refs, name="hub-refs"),
    path(f"{MODEL}/user-access-request/handle", views.access_request_handle, name="hub-access-handle"),
    path(f"{MODEL}/user-access-request/grant", views.access_grant, name="hub-access-grant"),
    path(f"{MODEL}/user-access-request/<str:status>", views.access_request_list, name="hub-access-list"),
    path("<seg:org>/<seg:name>/resolve/<str:revision>/<path:path>", views.resolve, name="hub-resolve"),
    path("<seg:org>/<seg:name>/access", pages.access_request_page, name="web-access-request"),
]
