"""Release governance API. Drafting, submitting and withdrawing need `write`; decisions and downgrades need
`admin` (and the approver role). Requests are visible to members of the model's organization only."""
from django.urls import path
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.generics import GenericAPIView
from rest_framework.response import Response

from gatehouse.accounts.models import Membership
from gatehouse.core.api import validated
from gatehouse.core.errors import NotAuthenticated, NotFound
from gatehouse.registry import selectors
from gatehouse.registry.api.urls import SegmentConverter  # noqa: F401  (registers <seg:>)
from releases import policy
from releases.facts import version_facts
from releases.models import Audience, Release, ReleaseApproval, ReleaseRequest
from releases.services import (
    DOWNGRADE_WARNING, model_follow, release_downgrade, release_findings, release_request_create,
    release_request_decide, release_request_submit, release_request_withdraw,
)


class StageSerializer(serializers.Serializer):
    tier = serializers.ChoiceField(["api", "open"])
    after_days = serializers.IntegerField(min_value=0, default=0)


class RequestInput(serializers.Serializer):
    model = serializers.CharField(help_text="org/name")
    revision = serializers.CharField(default="main")
    stages = StageSerializer(many=True)
    audience = serializers.ChoiceField(Audience.choices, default=Audience.PUBLIC)
    safeguards_in_place = serializers.BooleanField(default=False)
    incident_contact = serializers.CharField(required=False, default="", allow_blank=True)
    waivers = serializers.ListField(child=serializers.CharField(), default=list)
    notes = serializers.CharField(required=False, default="", allow_blank=True)


class DecisionInput(serializers.Serializer):
    decision = serializers.ChoiceField(ReleaseApproval.Decision.choices)
    comment = serializers.CharField(required=False, default="", allow_blank=True)


class DowngradeInput(serializers.Serializer):
    tier = serializers.ChoiceField(["closed", "api"])
    reason = serializers.CharField()


class DecisionSerializer(serializers.ModelSerializer):
    approver = serializers.CharField(source="approver.username")

    class Meta:
        model = ReleaseApproval
        fields = ["approver", "decision", "comment", "submission", "created_at"]


class ReleaseSerializer(serializers.ModelSerializer):
    commit = serializers.CharField(source="version.commit")

    class Meta:
        model = Release
        fields = ["id", "commit", "tier", "audience", "effective_at", "status", "reason", "request", "created_at"]


class RequestSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="version.model.repo_id")
    commit = serializers.CharField(source="version.commit")
    requested_by = serializers.CharField(source="requested_by.username")
    decisions = DecisionSerializer(many=True)
    releases = ReleaseSerializer(many=True)

    class Meta:
        model = ReleaseRequest
        fields = ["id", "model", "commit", "status", "stages", "audience", "safeguards_in_place", "incident_contact",
                  "waivers", "notes", "findings", "required_approvals", "requested_by", "decisions", "releases",
                  "created_at", "submitted_at", "decided_at"]


def _requests_for(user):
    requests = ReleaseRequest.objects.select_related("version__model__organization", "requested_by").prefetch_related(
        "decisions__approver", "releases__version")
    if user.is_superuser:
        return requests
    return requests.filter(version__model__organization__in=Membership.objects.filter(user=user).values("organization_id"))


def _request_get(request, request_id) -> ReleaseRequest:
    if not request.user.is_authenticated:
        raise NotAuthenticated("Log in or send a token to see release requests.")
    found = _requests_for(request.user).filter(pk=request_id).first()
    if found is None:
        raise NotFound(f"Release request {request_id} does not exist or belongs to an organization you are not in.")
    return found


def _detail(request, pk, code=status.HTTP_200_OK) -> Response:
    return Response(RequestSerializer(_requests_for(request.user).get(pk=pk)).data, status=code)


class RequestListApi(GenericAPIView):
    serializer_class = RequestSerializer

    @extend_schema(operation_id="release_requests_list", parameters=[OpenApiParameter("status", str)])
    def get(self, request):
        if not request.user.is_authenticated:
            raise NotAuthenticated("Log in or send a token to see release requests.")
        requests = _requests_for(request.user)
        if request.query_params.get("status"):
            requests = requests.filter(status=request.query_params["status"])
        page = self.paginate_queryset(requests)
        return self.get_paginated_response(RequestSerializer(page, many=True).data)

    @extend_schema(request=RequestInput, responses={201: RequestSerializer})
    def post(self, request):
        data = validated(RequestInput, request)
        version = selectors.version_get(user=request.user, repo_id=data.pop("model"), revision=data.pop("revision"))
        created = release_request_create(version=version, actor=request.user,
                                         stages=[dict(s) for s in data.pop("stages")], **data)
        ReleaseRequest.objects.filter(pk=created.pk).update(findings=release_findings(created))  # a preview
        response = _detail(request, created.pk, status.HTTP_201_CREATED)
        response["Location"] = f"/api/v1/release-requests/{created.pk}"
        return response


class RequestDetailApi(GenericAPIView):
    serializer_class = RequestSerializer

    def get(self, request, request_id):
        return Response(RequestSerializer(_request_get(request, request_id)).data)


class RequestSubmitApi(GenericAPIView):
    serializer_class = RequestSerializer

    @extend_schema(request=None)
    def post(self, request, request_id):
        release_request_submit(request=_request_get(request, request_id), actor=request.user)
        return _detail(request, request_id)


class RequestWithdrawApi(GenericAPIView):
    serializer_class = RequestSerializer

    @extend_schema(request=None)
    def post(self, request, request_id):
        release_request_withdraw(request=_request_get(request, request_id), actor=request.user)
        return _detail(request, request_id)


class RequestDecisionApi(GenericAPIView):
    serializer_class = RequestSerializer
    required_scope = "admin"

    @extend_schema(request=DecisionInput)
    def post(self, request, request_id):
        data = validated(DecisionInput, request)
        release_request_decide(request=_request_get(request, request_id), actor=request.user, **data)
        return _detail(request, request_id)


class ModelReleasesApi(GenericAPIView):
    serializer_class = ReleaseSerializer
    pagination_class = None

    @extend_schema(responses={200: {"type": "object"}})
    def get(self, request, org, name):
        model = selectors.model_get(user=request.user, org=org, name=name)
        releases = Release.objects.filter(model=model).select_related("version").order_by("effective_at", "id")
        return Response({"model": model.repo_id, "tier": model.tier,
                         "releases": ReleaseSerializer(releases, many=True).data})


class ReleaseChecksApi(GenericAPIView):
    pagination_class = None

    @extend_schema(parameters=[OpenApiParameter("tier", str, enum=["api", "open"]), OpenApiParameter("revision", str)],
                   responses={200: {"type": "object"}})
    def get(self, request, org, name):
        """What the policy would say today about releasing this version at `tier` (a dry run)."""
        model = selectors.model_get(user=request.user, org=org, name=name)
        if not selectors.is_member(request.user, model.organization):
            raise NotFound(f"Release checks of {model.repo_id} are visible to its organization only.")
        version = selectors.version_resolve(model=model, revision=request.query_params.get("revision") or "main")
        tier = request.query_params.get("tier", "open")
        facts = version_facts(version)
        findings = policy.check_release(facts, tier)
        return Response({"model": model.repo_id, "commit": version.commit, "tier": tier,
                         "required_approvals": policy.required_approvals(facts),
                         "findings": [f.as_dict() for f in findings]})


class DowngradeApi(GenericAPIView):
    serializer_class = ReleaseSerializer
    required_scope = "admin"

    @extend_schema(request=DowngradeInput, responses={201: ReleaseSerializer})
    def post(self, request, org, name):
        model = selectors.model_get(user=request.user, org=org, name=name)
        release = release_downgrade(model=model, actor=request.user, **validated(DowngradeInput, request))
        return Response(ReleaseSerializer(release).data | {"warning": DOWNGRADE_WARNING}, status=status.HTTP_201_CREATED)


class FollowApi(GenericAPIView):
    """Follow a model to get an email when its release changes (effective releases, downgrades)."""
    pagination_class = None

    @extend_schema(request=None, responses={200: {"type": "object"}})
    def post(self, request, org, name):
        model = selectors.model_get(user=request.user, org=org, name=name)
        return Response({"model": model.repo_id, "following": model_follow(model=model, user=request.user)})

    @extend_schema(request=None, responses={200: {"type": "object"}})
    def delete(self, request, org, name):
        model = selectors.model_get(user=request.user, org=org, name=name)
        return Response({"model": model.repo_id,
                         "following": model_follow(model=model, user=request.user, follow=False)})


M = "models/<seg:org>/<seg:name>"
urlpatterns = [
    path("release-requests", RequestListApi.as_view(), name="release-request-list"),
    path("release-requests/<int:request_id>", RequestDetailApi.as_view(), name="release-request-detail"),
    path("release-requests/<int:request_id>/submit", RequestSubmitApi.as_view(), name="release-request-submit"),
    path("release-requests/<int:request_id>/withdraw", RequestWithdrawApi.as_view(), name="release-request-withdraw"),
    path("release-requests/<int:request_id>/decisions", RequestDecisionApi.as_view(), name="release-request-decide"),
    path(f"{M}/releases", ModelReleasesApi.as_view(), name="model-releases"),
    path(f"{M}/release-checks", ReleaseChecksApi.as_view(), name="model-release-checks"),
    path(f"{M}/downgrade", DowngradeApi.as_view(), name="model-downgrade"),
    path(f"{M}/follow", FollowApi.as_view(), name="model-follow"),
]
