"""Webhook endpoints and their delivery log, managed by an organization's admins (token scope `admin`)."""
from django.urls import path
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.generics import GenericAPIView
from rest_framework.response import Response

from gatehouse.accounts.models import Membership, Organization
from gatehouse.core.errors import NotFound, PermissionDenied
from gatehouse.registry.api.urls import SegmentConverter  # noqa: F401  (registers <seg:>)
from gatehouse.webhooks.models import WebhookDelivery, WebhookEndpoint
from gatehouse.webhooks.services import webhook_endpoint_create


class EndpointInput(serializers.Serializer):
    # A CharField: the service checks the URL itself, so each refusal says exactly why (an SSRF risk, a bad
    # spelling, a missing host) instead of URLField's "Enter a valid URL."
    url = serializers.CharField(max_length=500)
    events = serializers.ListField(child=serializers.CharField(max_length=64), min_length=1, default=["*"])


class EndpointSerializer(serializers.ModelSerializer):
    class Meta:
        model = WebhookEndpoint
        fields = ["id", "url", "events", "is_active", "created_at"]


class DeliverySerializer(serializers.ModelSerializer):
    class Meta:
        model = WebhookDelivery
        fields = ["id", "event", "status", "attempts", "last_status_code", "last_error", "next_attempt_at",
                  "delivered_at", "created_at"]


def _admin_org(request, org: str) -> Organization:
    organization = Organization.objects.filter(slug=org).first()
    if organization is None:
        raise NotFound(f"Organization {org!r} does not exist.")
    if not (request.user.is_superuser or Membership.objects.filter(
            user=request.user, organization=organization, role=Membership.Role.ADMIN).exists()):
        raise PermissionDenied(f"Only admins of {org} manage its webhooks.")
    return organization


class EndpointListApi(GenericAPIView):
    serializer_class = EndpointSerializer
    required_scope = "admin"

    @extend_schema(operation_id="webhooks_list")
    def get(self, request, org):
        page = self.paginate_queryset(WebhookEndpoint.objects.filter(organization=_admin_org(request, org)).order_by("id"))
        return self.get_paginated_response(EndpointSerializer(page, many=True).data)

    @extend_schema(request=EndpointInput, responses={201: {"type": "object"}})
    def post(self, request, org):
        """The signing secret is returned once, here."""
        organization = _admin_org(request, org)
        data = EndpointInput(data=request.data)
        data.is_valid(raise_exception=True)
        endpoint = webhook_endpoint_create(actor=request.user, organization=organization, **data.validated_data)
        return Response(EndpointSerializer(endpoint).data | {"secret": endpoint.secret}, status=status.HTTP_201_CREATED)


class DeliveryListApi(GenericAPIView):
    serializer_class = DeliverySerializer
    required_scope = "admin"

    def get(self, request, org, endpoint_id):
        endpoint = WebhookEndpoint.objects.filter(organization=_admin_org(request, org), pk=endpoint_id).first()
        if endpoint is None:
            raise NotFound("No such webhook endpoint.")
        page = self.paginate_queryset(endpoint.deliveries.all())
        return self.get_paginated_response(DeliverySerializer(page, many=True).data)


urlpatterns = [
    path("organizations/<seg:org>/webhooks", EndpointListApi.as_view(), name="webhook-list"),
    path("organizations/<seg:org>/webhooks/<int:endpoint_id>/deliveries", DeliveryListApi.as_view(),
         name="webhook-deliveries"),
]
