from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from gatehouse.core import ops

urlpatterns = [
    # Browsers ask for it on pages that name no icon (the API docs, the admin): no 404 in their consoles.
    path("favicon.ico", RedirectView.as_view(url=static("web/favicon.svg"), permanent=True)),
    path("healthz", ops.healthz, name="healthz"),
    path("readyz", ops.readyz, name="readyz"),
    path("metrics", ops.metrics, name="metrics"),  # nginx keeps it internal (infra/nginx.conf)
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/v1/", include("gatehouse.registry.api.urls")),
    path("api/v1/", include("gatehouse.accounts.api")),
    path("api/v1/", include("gatehouse.webhooks.api")),
    path("api/v1/", include("releases.api")),  # project wiring: the releases app builds on gatehouse
    path("api/v1/", include("releases.access_api")),
    path("releases/", include("releases.views")),
    path("v1/", include("releases.inference.urls")),  # OpenAI-compatible inference gateway
    path("", include("releases.hub.urls")),  # Hub-compatible API and resolve, before the web pages
    path("", include("gatehouse.web.urls")),
]

handler404 = "gatehouse.core.views.not_found"
handler500 = "gatehouse.core.views.server_error"
