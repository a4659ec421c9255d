"""Hugging Face Hub-compatible endpoints, so the stock `huggingface_hub` and `transformers` clients work with
HF_ENDPOINT pointed at Gatehouse. The protocol as those clients use it: reference/hub-and-inference-protocols.md.

Every 4xx carries X-Error-Code and X-Error-Message headers (HEAD has no body, and the client maps errors from
the headers). Every file route goes through `_file_gate`, which asks releases.policy.file_access.
"""
import functools
import json

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from gatehouse.accounts.authentication import client_address, token_from_header
from gatehouse.accounts.models import User
from gatehouse.core.badinput import JSON_MESSAGE, contains_unstorable_text
from gatehouse.core.errors import ApplicationError, NotAuthenticated, NotFound
from gatehouse.registry.models import Model, ModelFile, ModelRef, ModelVersion
from gatehouse.registry.selectors import model_list, version_resolve
from releases import access, policy
from releases.hub.serve import serve_file
from releases.models import AccessRequest, Audience, DownloadTotals

GATED = {Audience.GATED_AUTO: "auto", Audience.GATED_MANUAL: "manual"}


class HubError(Exception):
    def __init__(self, status: int, code: str, message: str, *, commit: str = ""):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


def _header_safe(text: str) -> str:
    return " ".join(text.split()).encode("latin-1", "replace").decode("latin-1")[:1000]


def hub_error_response(status: int, code: str, message: str, *, commit: str = "") -> HttpResponse:
    response = JsonResponse({"error": message}, status=status)
    if code:
        response["X-Error-Code"] = code
    response["X-Error-Message"] = _header_safe(message)
    if commit:
        response["X-Repo-Commit"] = commit
    return response


def hub_view(methods=("GET",)):
    def decorate(view):
        @csrf_exempt
        @require_http_methods(list(methods))
        @functools.wraps(view)
        def wrapper(request, *args, **kwargs):
            try:
                return view(request, *args, **kwargs)
            except HubError as exc:
                return hub_error_response(exc.status, exc.code, exc.message, commit=exc.commit)
            except NotAuthenticated as exc:
                # The client shows "Invalid user token" for a 401 with this message; ours follows it.
                return hub_error_response(401, "", f"Invalid credentials in Authorization header: {exc.message}")
            except ApplicationError as exc:
                response = hub_error_response(exc.status, "", exc.message)
                if getattr(exc, "retry_after", None):
                    response["Retry-After"] = str(exc.retry_after)
                return response
        return wrapper
    return decorate


class Caller:
    def __init__(self, request):
        header = request.headers.get("Authorization", "").encode("latin-1", "replace")
        self.token = token_from_header(header, client=client_address(request))
        self.user = self.token.user if self.token else request.user
        self.organization_ids = access.user_organization_ids(self.user)

    def facts(self, model: Model) -> policy.CallerFacts:
        return access.caller_facts(user=self.user, token=self.token, model=model,
                                   organization_ids=self.organization_ids)


def _visible_model(caller: Caller, org: str, name: str) -> tuple[Model, policy.CallerFacts]:
    model = (Model.objects.select_related("organization", "license", "access_policy", "latest_version")
             .filter(organization__slug=org, name=name).first())
    repo_id = f"{org}/{name}"
    if model is None:
        raise HubError(404, "RepoNotFound", policy.not_found(repo_id).message)
    facts = caller.facts(model)
    if not policy.may_see(model.tier, facts):
        raise HubError(404, "RepoNotFound", policy.not_found(repo_id).message)
    return model, facts


def _version(model: Model, revision: str) -> ModelVersion:
    try:
        return version_resolve(model=model, revision=revision)
    except NotFound:
        pass
    try:
        waiting = version_resolve(model=model, revision=revision, verified_only=False)
    except NotFound:
        raise HubError(404, "RevisionNotFound", f"Revision {revision!r} does not exist in {model.repo_id}; "
                                                 "use 'main', a tag or a full 40-character commit id.") from None
    raise HubError(404, "RevisionNotFound", f"Revision {revision!r} of {model.repo_id} is not verified yet "
                                             f"(status: {waiting.status}); it can be downloaded once it is.")


def _next_link(request, key: str, value: int) -> str:
    """The Link header the client follows verbatim for the next page."""
    params = request.GET.copy()
    params[key] = str(value)
    return f'<{request.build_absolute_uri(request.path)}?{params.urlencode()}>; rel="next"'


def _iso(moment) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _file_headers(version: ModelVersion, file: ModelFile) -> dict:
    etag = f'"{file.sha256}"'
    return {"X-Repo-Commit": version.commit, "ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": str(file.size),
            "Accept-Ranges": "bytes", "Cache-Control": "private, max-age=0, must-revalidate"}


@hub_view(methods=("GET", "HEAD"))
def resolve(request, org: str, name: str, revision: str, path: str):
    caller = Caller(request)
    model, facts = _visible_model(caller, org, name)
    version = _version(model, revision)
    request_url, inference_url = access.access_request_url(request, model), request.build_absolute_uri("/v1")
    access_policy = access.access_policy_of(model)
    decision = policy.file_access(repo_id=model.repo_id, tier=model.tier, audience=access_policy.audience, path=path,
                                  caller=facts, request_url=request_url, inference_url=inference_url,
                                  acceptable_use=bool(access_policy.acceptable_use))
    if not decision.allowed:
        raise HubError(decision.status, decision.code, decision.message, commit=version.commit)
    file = ModelFile.objects.filter(version=version, path=path).first()
    if file is None:
        raise HubError(404, "EntryNotFound", f"{path} does not exist in {model.repo_id} at {version.commit}.",
                       commit=version.commit)
    served = serve_file(request, file, _file_headers(version, file))
    if request.method == "GET" and served.response.status_code in (200, 206, 302):
        access.download_record(user=caller.user, token=caller.token, version=version, file=file,
                               bytes=served.bytes if served.via != "redirect" else file.size,
                               range_start=served.range_start, via=served.via)
    return served.response


def _gated_value(model: Model):
    audience = access.access_policy_of(model).audience
    return GATED.get(audience, False) if model.tier == "open" else False


def _model_summary(model: Model, downloads: int = 0) -> dict:
    version = model.latest_version
    return {"_id": f"gatehouse-{model.pk}", "id": model.repo_id, "modelId": model.repo_id,
            "author": model.organization.slug, "sha": version.commit if version else None,
            "lastModified": _iso(model.updated_at), "createdAt": _iso(model.created_at),
            "private": model.tier == "closed", "gated": _gated_value(model), "disabled": False,
            "downloads": downloads, "likes": 0, "tags": list(model.tags or []),
            "pipeline_tag": model.task or None, "library_name": "transformers",
            "gatehouse": {"tier": model.tier, "audience": access.access_policy_of(model).audience,
                          "license": model.license.key if model.license_id else None}}


@hub_view()
def model_index(request):
    """HfApi.list_models: search, author, limit; only models the caller may know exist; paginated by Link."""
    caller = Caller(request)
    try:
        offset = max(0, int(request.GET.get("offset", 0)))
        limit = min(int(request.GET.get("limit") or settings.GATEHOUSE_HUB_PAGE_SIZE), settings.GATEHOUSE_HUB_PAGE_SIZE)
    except ValueError:
        raise HubError(400, "", "offset and limit must be integers.") from None
    models = model_list(user=caller.user, q=request.GET.get("search", ""), organization=request.GET.get("author", "")
                        ).select_related("access_policy").annotate(download_count=access.downloads_of_model())
    if request.GET.get("sort") == "downloads":
        models = models.order_by("-download_count", "-id")
    page = list(models[offset:offset + limit + 1])
    response = JsonResponse([_model_summary(m, m.download_count) for m in page[:limit]], safe=False)
    if len(page) > limit:  # the client follows Link and stops by itself once it has `limit` models
        response["Link"] = _next_link(request, "offset", offset + limit)
    return response


@hub_view()
def model_info(request, org: str, name: str, revision: str = "main"):
    caller = Caller(request)
    model, facts = _visible_model(caller, org, name)
    version = _version(model, revision)
    files = list(ModelFile.objects.filter(version=version).order_by("path"))
    listed = set(policy.listed_paths(tier=model.tier, caller=facts, paths=[f.path for f in files]))
    blobs = request.GET.get("blobs") in ("1", "true", "True")
    siblings = []
    for f in files:
        if f.path not in listed:
            continue
        entry = {"rfilename": f.path}
        if blobs:
            entry |= {"size": f.size, "blobId": f.sha256[:40], "lfs": {"size": f.size, "sha256": f.sha256,
                                                                       "pointerSize": 134}}
        siblings.append(entry)
    downloads = DownloadTotals.objects.filter(model=model).values_list("files", flat=True).first() or 0
    body = _model_summary(model, downloads) | {
        "sha": version.commit, "lastModified": _iso(version.verified_at or version.created_at),
        "cardData": version.card_metadata or {}, "siblings": siblings,
        "config": {"architectures": [version.architecture]} if version.architecture else {},
        "usedStorage": sum(f.size for f in files if f.path in listed)}
    return JsonResponse(body)


def _tree_entries(files: list[ModelFile], base: str, recursive: bool) -> list[dict]:
    prefix = f"{base.strip('/')}/" if base.strip("/") else ""
    entries, folders = [], set()
    for f in files:
        if not f.path.startswith(prefix):
            continue
        rest = f.path[len(prefix):]
        parts = rest.split("/")
        for depth in range(1, len(parts)):
            folder = prefix + "/".join(parts[:depth])
            if (recursive or depth == 1) and folder not in folders:
                folders.add(folder)
                entries.append({"type": "directory", "path": folder, "oid": "0" * 40, "size": 0})
        if recursive or len(parts) == 1:
            entries.append({"type": "file", "path": f.path, "size": f.size, "oid": f.sha256[:40],
                            "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134}})
    return sorted(entries, key=lambda e: e["path"])


@hub_view()
def tree(request, org: str, name: str, revision: str, path: str = ""):
    caller = Caller(request)
    model, facts = _visible_model(caller, org, name)
    version = _version(model, revision)
    files = list(ModelFile.objects.filter(version=version).order_by("path"))
    listed = set(policy.listed_paths(tier=model.tier, caller=facts, paths=[f.path for f in files]))
    entries = _tree_entries([f for f in files if f.path in listed], path,
                            request.GET.get("recursive") in ("1", "true", "True"))
    if path.strip("/") and not entries:
        raise HubError(404, "EntryNotFound", f"{path} does not exist in {model.repo_id} at {version.commit}.",
                       commit=version.commit)
    try:
        offset = max(0, int(request.GET.get("cursor", 0)))
    except ValueError:
        raise HubError(400, "", "cursor must be an integer.") from None
    size = settings.GATEHOUSE_HUB_PAGE_SIZE
    response = JsonResponse(entries[offset:offset + size], safe=False)
    if offset + size < len(entries):
        response["Link"] = _next_link(request, "cursor", offset + size)
    return response


@hub_view()
def refs(request, org: str, name: str):
    caller = Caller(request)
    model, _ = _visible_model(caller, org, name)
    refs = ModelRef.objects.filter(model=model, version__status=ModelVersion.Status.VERIFIED).select_related("version")
    out = {"branches": [], "tags": [], "converts": []}
    for ref in refs:
        kind = "branches" if ref.kind == ModelRef.Kind.BRANCH else "tags"
        prefix = "refs/heads/" if kind == "branches" else "refs/tags/"
        out[kind].append({"name": ref.name, "ref": prefix + ref.name, "targetCommit": ref.version.commit})
    if request.GET.get("include_prs"):
        out["pullRequests"] = []
    return JsonResponse(out)


@hub_view()
def whoami(request):
    caller = Caller(request)
    user = caller.user
    if not getattr(user, "is_authenticated", False):
        raise HubError(401, "", "Invalid credentials in Authorization header: pass a Gatehouse token.")
    organizations = user.memberships.select_related("organization").order_by("organization__slug")
    scopes = caller.token.scopes if caller.token else ["read", "gated-read", "inference", "write"]
    return JsonResponse({
        "type": "user", "id": str(user.pk), "name": user.username, "fullname": user.get_full_name() or user.username,
        "email": user.email, "orgs": [{"type": "org", "name": m.organization.slug, "fullname": m.organization.name,
                                       "roleInOrg": m.role} for m in organizations],
        "auth": {"type": "access_token", "accessToken": {
            "displayName": caller.token.name if caller.token else "browser session",
            "role": "write" if "write" in scopes else "read", "scopes": scopes}}})


# --- Access-request management (HfApi.list_*_access_requests, accept/reject/cancel, grant_access) ------------

def _reviewed_model(request, org: str, name: str) -> tuple[Caller, Model]:
    caller = Caller(request)
    # A token, never a browser session: these routes take POSTs without CSRF tokens, as the Hub's do.
    if caller.token is None:
        raise HubError(401, "", "Invalid credentials in Authorization header: pass a Gatehouse token.")
    model, _ = _visible_model(caller, org, name)
    if caller.token is not None and "admin" not in caller.token.scopes and "write" not in caller.token.scopes:
        raise HubError(403, "", "Reviewing access requests needs a token with the write or admin scope.")
    if not access.can_review(caller.user, model):
        raise HubError(403, "", f"Only admins and maintainers of {model.organization.slug} review access requests.")
    return caller, model


def _request_json(item: AccessRequest) -> dict:
    return {"user": {"user": item.user.username, "fullname": item.user.get_full_name() or item.user.username,
                     "email": item.user.email},
            "requestId": str(item.pk), "status": item.status, "timestamp": _iso(item.created_at),
            "fields": item.fields or {}, "rejectionReason": item.rejection_reason or None}


@hub_view()
def access_request_list(request, org: str, name: str, status: str):
    _, model = _reviewed_model(request, org, name)
    items = access.access_requests_for_review(model=model, status=status)
    return JsonResponse([_request_json(item) for item in items], safe=False)


def _json_body(request) -> dict:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        raise HubError(400, "", "The body must be JSON.") from None
    if not isinstance(body, dict):
        raise HubError(400, "", "The body must be a JSON object.")
    if contains_unstorable_text(body):
        raise HubError(400, "", JSON_MESSAGE)
    return body


def _request_for(model: Model, body: dict) -> AccessRequest:
    if body.get("requestId"):
        item = AccessRequest.objects.filter(model=model, pk=str(body["requestId"])).select_related("user").first() \
            if str(body["requestId"]).isdigit() else None
    elif body.get("user"):
        item = (AccessRequest.objects.filter(model=model, user__username=body["user"])
                .exclude(status=AccessRequest.Status.CANCELLED).select_related("user").order_by("-created_at").first())
    else:
        raise HubError(400, "", "Name the request with 'user' or 'requestId'.")
    if item is None:
        raise HubError(404, "", f"No access request for {body.get('user') or body.get('requestId')} on {model.repo_id}.")
    return item


@hub_view(methods=("POST",))
def access_request_handle(request, org: str, name: str):
    caller, model = _reviewed_model(request, org, name)
    body = _json_body(request)
    item = _request_for(model, body)
    access.access_request_decide(request=item, actor=caller.user, status=str(body.get("status", "")),
                                 reason=body.get("rejectionReason") or "")
    return JsonResponse({"status": "ok"})


@hub_view(methods=("POST",))
def access_grant(request, org: str, name: str):
    caller, model = _reviewed_model(request, org, name)
    body = _json_body(request)
    user = User.objects.filter(username=str(body.get("user", ""))).first()
    if user is None:
        raise HubError(404, "", f"No user named {body.get('user')!r}.")
    grant = access.access_grant_create(model=model, actor=caller.user, user=user)
    return JsonResponse({"status": "ok", "grant": grant.pk})
