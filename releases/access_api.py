"""Access to gated models through our REST API: people request access (a `gated-read` token is enough),
reviewers (the organization's admins and maintainers, `write` scope) decide, grant and revoke, and set the
request form and approval rules. The same actions exist on the Hub-compatible endpoints and the web form."""
from django.urls import path
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.generics import GenericAPIView
from rest_framework.response import Response

from gatehouse.accounts.models import Organization, User
from gatehouse.core.api import validated
from gatehouse.core.errors import InvalidInput, NotAuthenticated, NotFound, PermissionDenied
from gatehouse.registry import selectors
from gatehouse.registry.api.urls import SegmentConverter  # noqa: F401  (registers <seg:>)
from releases import access
from releases.models import AccessGrant, AccessPolicy, AccessRequest


class AccessRequestSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model.repo_id")
    user = serializers.CharField(source="user.username")
    decided_by = serializers.CharField(source="decided_by.username", default=None)
    waiting_seconds = serializers.SerializerMethodField()

    class Meta:
        model = AccessRequest
        fields = ["id", "model", "user", "status", "fields", "license_key", "license_sha256", "acceptable_use_sha256",
                  "rejection_reason", "decided_by", "decided_automatically", "created_at", "decided_at",
                  "waiting_seconds"]

    def get_waiting_seconds(self, obj) -> int | None:
        """How long a pending request has waited for a reviewer."""
        return int((timezone.now() - obj.created_at).total_seconds()) if obj.status == "pending" else None


class AccessGrantSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model.repo_id")
    user = serializers.CharField(source="user.username", default=None)
    organization = serializers.CharField(source="organization.slug", default=None)
    granted_by = serializers.CharField(source="granted_by.username", default=None)
    active = serializers.SerializerMethodField()

    class Meta:
        model = AccessGrant
        fields = ["id", "model", "user", "organization", "granted_by", "license_key", "license_sha256", "created_at",
                  "expires_at", "revoked_at", "revoke_reason", "active"]

    def get_active(self, obj) -> bool:
        return obj.revoked_at is None and (obj.expires_at is None or obj.expires_at > timezone.now())


class AccessPolicySerializer(serializers.ModelSerializer):
    class Meta:
        model = AccessPolicy
        fields = ["audience", "request_fields", "acceptable_use", "auto_approve_organizations",
                  "auto_approve_email_domains", "grant_days", "cooldown_days", "updated_at"]
        read_only_fields = ["audience", "updated_at"]


class AccessRequestInput(serializers.Serializer):
    fields = serializers.DictField(child=serializers.CharField(allow_blank=True, max_length=2000), default=dict)
    accept_license = serializers.BooleanField(default=False)
    accept_acceptable_use = serializers.BooleanField(default=False)


class AccessDecisionInput(serializers.Serializer):
    status = serializers.ChoiceField(["accepted", "rejected", "pending"])
    reason = serializers.CharField(required=False, default="", allow_blank=True, max_length=2000)


class AccessGrantInput(serializers.Serializer):
    user = serializers.CharField(required=False)
    organization = serializers.CharField(required=False)
    expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)


class AccessRevokeInput(serializers.Serializer):
    reason = serializers.CharField(max_length=2000)


def _signed_in(request) -> None:
    if not request.user.is_authenticated:
        raise NotAuthenticated("Log in or send a token: access requests belong to a person.")


def _reviewed_model(request, org, name):
    _signed_in(request)
    model = selectors.model_get(user=request.user, org=org, name=name)
    if not access.can_review(request.user, model):
        raise PermissionDenied(f"Only admins and maintainers of {model.organization.slug} review access to "
                               f"{model.repo_id}.")
    return model


class ModelAccessRequestsApi(GenericAPIView):
    serializer_class = AccessRequestSerializer

    def get_permissions(self):
        self.required_scope = "gated-read" if self.request.method == "POST" else "read"
        return super().get_permissions()

    @extend_schema(operation_id="model_access_requests_list", parameters=[
        OpenApiParameter("status", str, enum=list(AccessRequest.Status.values))])
    def get(self, request, org, name):
        """Reviewers' queue, oldest first, with how long each request has waited."""
        model = _reviewed_model(request, org, name)
        items = access.access_requests_for_review(model=model, status=request.query_params.get("status", "pending"))
        page = self.paginate_queryset(items)
        return self.get_paginated_response(AccessRequestSerializer(page, many=True).data)

    @extend_schema(request=AccessRequestInput, responses={201: AccessRequestSerializer})
    def post(self, request, org, name):
        _signed_in(request)
        model = selectors.model_get(user=request.user, org=org, name=name)
        created = access.access_request_create(model=model, user=request.user, **validated(AccessRequestInput, request))
        return Response(AccessRequestSerializer(created).data, status=status.HTTP_201_CREATED)


class MyAccessRequestsApi(GenericAPIView):
    serializer_class = AccessRequestSerializer

    def get(self, request):
        _signed_in(request)
        items = AccessRequest.objects.filter(user=request.user).select_related(
            "model__organization", "user", "decided_by").order_by("-created_at", "-id")
        page = self.paginate_queryset(items)
        return self.get_paginated_response(AccessRequestSerializer(page, many=True).data)


class AccessRequestDecisionApi(GenericAPIView):
    serializer_class = AccessRequestSerializer

    @extend_schema(request=AccessDecisionInput)
    def post(self, request, request_id):
        _signed_in(request)
        item = access.get_request(request_id=request_id)
        selectors.model_get(user=request.user, org=item.model.organization.slug, name=item.model.name)
        data = validated(AccessDecisionInput, request)
        decided = access.access_request_decide(request=item, actor=request.user, status=data["status"],
                                               reason=data["reason"])
        return Response(AccessRequestSerializer(decided).data)


class ModelAccessGrantsApi(GenericAPIView):
    serializer_class = AccessGrantSerializer

    def get(self, request, org, name):
        model = _reviewed_model(request, org, name)
        grants = AccessGrant.objects.filter(model=model).select_related(
            "model__organization", "user", "organization", "granted_by")
        page = self.paginate_queryset(grants)
        return self.get_paginated_response(AccessGrantSerializer(page, many=True).data)

    @extend_schema(request=AccessGrantInput, responses={201: AccessGrantSerializer})
    def post(self, request, org, name):
        model = _reviewed_model(request, org, name)
        data = validated(AccessGrantInput, request)
        user = organization = None
        if data.get("user"):
            user = User.objects.filter(username=data["user"]).first()
            if user is None:
                raise InvalidInput(f"No user named {data['user']!r}.", fields={"user": "unknown"})
        if data.get("organization"):
            organization = Organization.objects.filter(slug=data["organization"]).first()
            if organization is None:
                raise InvalidInput(f"No organization {data['organization']!r}.", fields={"organization": "unknown"})
        grant = access.access_grant_create(model=model, actor=request.user, user=user, organization=organization,
                                           expires_at=data["expires_at"])
        return Response(AccessGrantSerializer(grant).data, status=status.HTTP_201_CREATED)


class AccessGrantRevokeApi(GenericAPIView):
    serializer_class = AccessGrantSerializer

    @extend_schema(request=AccessRevokeInput)
    def post(self, request, grant_id):
        _signed_in(request)
        grant = AccessGrant.objects.select_related("model__organization").filter(pk=grant_id).first()
        if grant is None or not access.can_review(request.user, grant.model):
            raise NotFound(f"Grant {grant_id} does not exist or is not one you review.")
        revoked = access.access_grant_revoke(grant=grant, actor=request.user, **validated(AccessRevokeInput, request))
        return Response(AccessGrantSerializer(revoked).data)


class AccessPolicyApi(GenericAPIView):
    serializer_class = AccessPolicySerializer
    pagination_class = None

    def get(self, request, org, name):
        model = selectors.model_get(user=request.user, org=org, name=name)
        return Response(AccessPolicySerializer(access.access_policy_of(model)).data)

    @extend_schema(request=AccessPolicySerializer)
    def patch(self, request, org, name):
        model = _reviewed_model(request, org, name)
        serializer = AccessPolicySerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        updated = access.access_policy_update(model=model, actor=request.user, **serializer.validated_data)
        return Response(AccessPolicySerializer(updated).data)


M = "models/<seg:org>/<seg:name>"
urlpatterns = [
    path(f"{M}/access-requests", ModelAccessRequestsApi.as_view(), name="model-access-requests"),
    path(f"{M}/access-grants", ModelAccessGrantsApi.as_view(), name="model-access-grants"),
    path(f"{M}/access-policy", AccessPolicyApi.as_view(), name="model-access-policy"),
    path("access-requests/mine", MyAccessRequestsApi.as_view(), name="my-access-requests"),
    path("access-requests/<int:request_id>/decision", AccessRequestDecisionApi.as_view(), name="access-request-decide"),
    path("access-grants/<int:grant_id>/revoke", AccessGrantRevokeApi.as_view(), name="access-grant-revoke"),
]
