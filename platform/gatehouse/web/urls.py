from django.contrib.auth import views as auth_views
from django.urls import path

from gatehouse.registry.api.urls import SegmentConverter  # noqa: F401  (registers <seg:>)
from gatehouse.web import views

urlpatterns = [
    path("accounts/login/", views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("accounts/tokens", views.tokens, name="web-tokens"),
    path("accounts/profile", views.profile, name="web-profile"),
    path("orgs/<seg:org>", views.organization_detail, name="web-organization"),
    path("", views.model_list, name="web-model-list"),
    path("datasets", views.dataset_list, name="web-dataset-list"),
    path("datasets/<seg:org>/<seg:name>", views.dataset_detail, name="web-dataset-detail"),
    path("licenses", views.license_list, name="web-license-list"),
    path("<seg:org>/<seg:name>", views.model_detail, name="web-model-detail"),
]
