"""Who am I, and my API tokens. Token secrets are returned once, at creation."""
from django.urls import path
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.generics import GenericAPIView
from rest_framework.response import Response

from gatehouse.accounts.models import ApiToken
from gatehouse.accounts.permissions import caller_scopes
from gatehouse.accounts.services import ALL_SCOPES, api_token_create, api_token_revoke
from gatehouse.core.errors import NotAuthenticated, NotFound


class TokenSerializer(serializers.ModelSerializer):
    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "scopes", "created_at", "expires_at", "revoked_at", "last_used_at"]


class TokenInput(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    scopes = serializers.ListField(child=serializers.ChoiceField(ALL_SCOPES), min_length=1)
    expires_in_days = serializers.IntegerField(min_value=1, max_value=3650, required=False, allow_null=True, default=None)


class MeApi(GenericAPIView):
    permission_classes = []  # any valid token may ask who it belongs to, whatever its scopes

    @extend_schema(responses={200: {"type": "object"}})
    def get(self, request):
        if not request.user.is_authenticated:
            raise NotAuthenticated("Not logged in: send 'Authorization: Bearer <token>'.")
        memberships = request.user.memberships.select_related("organization").order_by("organization__slug")
        scopes = caller_scopes(request)
        return Response({
            "username": request.user.username,
            "email": request.user.email,
            "is_staff": request.user.is_staff,
            "organizations": [{"slug": m.organization.slug, "role": m.role} for m in memberships],
            "token": {"prefix": request.auth.prefix, "scopes": sorted(scopes),
                      "expires_at": request.auth.expires_at} if scopes is not None else None,
        })


class TokenListApi(GenericAPIView):
    """Managing tokens needs a browser session or a token with the `admin` scope."""

    serializer_class = TokenSerializer
    required_scope = "admin"

    def get(self, request):
        page = self.paginate_queryset(ApiToken.objects.filter(user=request.user))
        return self.get_paginated_response(TokenSerializer(page, many=True).data)

    @extend_schema(request=TokenInput, responses={201: {"type": "object"}})
    def post(self, request):
        data = TokenInput(data=request.data)
        data.is_valid(raise_exception=True)
        issued = api_token_create(user=request.user, name=data.validated_data["name"],
                                  scopes=data.validated_data["scopes"],
                                  expires_in_days=data.validated_data["expires_in_days"])
        body = TokenSerializer(issued.token).data | {"token": issued.secret}
        return Response(body, status=status.HTTP_201_CREATED)


class TokenDetailApi(GenericAPIView):
    serializer_class = TokenSerializer
    required_scope = "admin"

    def delete(self, request, token_id):
        token = ApiToken.objects.filter(pk=token_id, user=request.user).first()
        if token is None:
            raise NotFound("No such token among yours.")
        api_token_revoke(token=token, actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


urlpatterns = [
    path("me", MeApi.as_view(), name="me"),
    path("tokens", TokenListApi.as_view(), name="token-list"),
    path("tokens/<int:token_id>", TokenDetailApi.as_view(), name="token-detail"),
]
