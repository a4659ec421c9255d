"""The OpenAI-compatible gateway (/v1): the stock `openai` client works with base_url=<gatehouse>/v1 and a
Gatehouse token. Each call is authenticated, judged by releases.policy.inference_access (tier, gating,
acceptable use, the token's `inference` scope), held to quotas, metered, and forwarded to the model's backend
(an engine process of ours or an upstream such as vLLM). Streams are relayed chunk by chunk, unbuffered.
This module never imports torch. Errors use OpenAI's shape: {"error": {message, type, param, code}}.
"""
import json

import httpx
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from gatehouse.accounts.authentication import client_address, token_from_header
from gatehouse.core.errors import NotAuthenticated, Throttled
from gatehouse.core.prepared import PreparedQuery
from gatehouse.registry.models import Model
from gatehouse.registry.selectors import model_visible_queryset
from releases import access, policy
from releases.inference.metering import inference_call_finish, inference_call_start, quota_check
from releases.inference.params import InvalidParameter, check_generation_parameters
from releases.models import InferenceBackend

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
         404: "invalid_request_error", 429: "rate_limit_exceeded", 503: "server_error"}
MAX_BODY_BYTES = 4 * 1024 * 1024
_backend_client: httpx.Client | None = None


def backend_client() -> httpx.Client:
    """One pooled client per process: a new one per call costs more than the call (TLS setup, no keep-alive)."""
    global _backend_client
    if _backend_client is None:
        _backend_client = httpx.Client(timeout=httpx.Timeout(settings.INFERENCE_BACKEND_TIMEOUT_SECONDS, connect=5.0),
                                       limits=httpx.Limits(max_connections=256, max_keepalive_connections=32))
    return _backend_client


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, code: str, *, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers or {}

    def response(self) -> JsonResponse:
        type_ = "insufficient_quota" if self.code == "insufficient_quota" else TYPES.get(self.status, "api_error")
        response = JsonResponse({"error": {"message": self.message, "type": type_, "param": self.param,
                                           "code": self.code}}, status=self.status)
        for key, value in self.headers.items():
            response[key] = value
        return response


def openai_view(methods):
    def decorate(view):
        @csrf_exempt
        @require_http_methods(methods)
        def wrapper(request, *args, **kwargs):
            try:
                return view(request, *args, **kwargs)
            except OpenAIError as exc:
                return exc.response()
        wrapper.__name__ = view.__name__
        return wrapper
    return decorate


def _caller(request):
    """Bearer token only: the openai client always sends one, and browser sessions get no CSRF-free writes."""
    try:
        token = token_from_header(request.headers.get("Authorization", "").encode("latin-1", "replace"),
                                  client=client_address(request))
    except NotAuthenticated as exc:
        raise OpenAIError(401, exc.message, "invalid_api_key") from None
    except Throttled as exc:
        raise OpenAIError(429, exc.message, "rate_limit_exceeded",
                          headers={"Retry-After": str(exc.retry_after), "x-should-retry": "false"}) from None
    if token is None:
        raise OpenAIError(401, "Pass a Gatehouse token as the API key (Authorization: Bearer <token>).",
                          "invalid_api_key")
    return token.user, token


def _decide(request, model: Model, user, token, organization_ids) -> policy.AccessDecision:
    facts = access.caller_facts(user=user, token=token, model=model, organization_ids=organization_ids)
    access_policy = access.access_policy_of(model)
    return policy.inference_access(repo_id=model.repo_id, tier=model.tier, audience=access_policy.audience,
                                   acceptable_use=bool(access_policy.acceptable_use), caller=facts,
                                   request_url=access.access_request_url(request, model))


# Only what a call reads: the ORM's cost here is compiling the SQL, and it grows with every column selected (the
# model's card text, every policy and backend column), which made this one query a fifth of the gateway's overhead.
_CALL_FIELDS = ("id", "name", "tier", "created_at", "organization__id", "organization__slug",
                "latest_version__id", "latest_version__context_length",
                "access_policy__id", "access_policy__audience", "access_policy__acceptable_use",
                "access_policy__cooldown_days", "inference_backend__id", "inference_backend__url",
                "inference_backend__upstream_model", "inference_backend__api_key", "inference_backend__enabled")


def _for_calls(models):
    return models.select_related("organization", "access_policy", "inference_backend", "latest_version") \
        .only(*_CALL_FIELDS)


def _served_models(user):
    return _for_calls(model_visible_queryset(user).filter(inference_backend__enabled=True)) \
        .order_by("organization__slug", "name")


def backend_served(model: Model) -> bool:
    return InferenceBackend.objects.filter(model=model, enabled=True).exists()


def _model_object(model: Model) -> dict:
    return {"id": model.repo_id, "object": "model", "created": int(model.created_at.timestamp()),
            "owned_by": model.organization.slug}


@openai_view(["GET"])
def models(request):
    """Exactly the models this caller may use."""
    user, token = _caller(request)
    organization_ids = access.user_organization_ids(user)
    usable = [m for m in _served_models(user) if _decide(request, m, user, token, organization_ids).allowed]
    return JsonResponse({"object": "list", "data": [_model_object(m) for m in usable]})


# (organization, name) is unique: no ORDER BY needed. Compiled once: compiling it cost the ORM ten times running it.
_served_model = PreparedQuery(lambda org, name: _for_calls(Model.objects.filter(
    organization__slug=org, name=name, inference_backend__enabled=True)).order_by()[:1], org=str, name=str)


def _model_for(request, model_id: str, user, token, organization_ids) -> Model:
    org, _, name = (model_id or "").partition("/")
    model = next(iter(_served_model(org=org, name=name)), None) if org and name else None
    if model is None:  # a closed model is judged below, by the policy, and answers exactly like this
        raise OpenAIError(404, f"The model {model_id!r} does not exist or you do not have access to it.",
                          "model_not_found", param="model")
    decision = _decide(request, model, user, token, organization_ids)
    if not decision.allowed:
        raise OpenAIError(decision.status, decision.message, decision.code, param="model")
    return model


@openai_view(["GET"])
def model_detail(request, model_id: str):
    user, token = _caller(request)
    return JsonResponse(_model_object(_model_for(request, model_id, user, token, access.user_organization_ids(user))))


@openai_view(["POST"])
def completions(request):
    return _generate(request, "completions")


@openai_view(["POST"])
def chat_completions(request):
    return _generate(request, "chat/completions")


def _generate(request, endpoint: str):
    user, token = _caller(request)
    limit = min(MAX_BODY_BYTES, settings.DATA_UPLOAD_MAX_MEMORY_SIZE or MAX_BODY_BYTES)
    too_large = OpenAIError(413, f"The request body is larger than {limit} bytes; shorten the "
                                 f"{'prompt' if endpoint == 'completions' else 'messages'}.", "request_too_large",
                            param="prompt" if endpoint == "completions" else "messages")
    declared = request.META.get("CONTENT_LENGTH") or ""
    if declared.isdigit() and int(declared) > limit:
        raise too_large  # refused before reading a byte of it
    try:
        raw = request.body
    except RequestDataTooBig:
        raise too_large from None
    if len(raw) > limit:
        raise too_large
    try:
        body = json.loads(raw or b"{}")  # NaN and Infinity parse here and are refused by parameter below
    except (ValueError, RecursionError):
        raise OpenAIError(400, "The body must be a JSON object (not nested without bound).", "invalid_json") from None
    return generate(request, endpoint, user=user, token=token, body=body)


def generate(request, endpoint: str, *, user, token, body):
    """One completion or chat call for an authenticated caller (a token, or None for a signed-in session)."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise OpenAIError(400, "Name the model: {\"model\": \"org/name\", …}.", "invalid_value", param="model")
    organization_ids = access.user_organization_ids(user)
    model = _model_for(request, body["model"], user, token, organization_ids)
    latest = model.latest_version
    try:
        check_generation_parameters(endpoint, body, context_length=latest.context_length if latest else None)
    except InvalidParameter as exc:
        raise OpenAIError(400, exc.message, exc.code, param=exc.param) from None
    organization_id = organization_ids[0] if organization_ids else None
    refusal = quota_check(user=user, token=token, organization_id=organization_id)
    if refusal:
        retry = {"Retry-After": str(refusal.retry_after)}
        if refusal.code == "insufficient_quota":
            retry["x-should-retry"] = "false"
        raise OpenAIError(429, refusal.message, refusal.code, headers=retry)
    backend: InferenceBackend = model.inference_backend
    if not backend.url:
        raise OpenAIError(503, f"The engine for {model.repo_id} is not running yet; retry shortly.",
                          "engine_unavailable", headers={"Retry-After": "5"})
    stream = bool(body.get("stream"))
    wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    upstream_body = body | {"model": backend.upstream_model or model.repo_id}
    if stream:  # we always ask for usage upstream, to meter; the client sees it only if it asked
        upstream_body["stream_options"] = (body.get("stream_options") or {}) | {"include_usage": True}
    call = inference_call_start(user=user, token=token, organization_id=organization_id, model=model,
                                endpoint=endpoint, stream=stream)
    headers = {"Authorization": f"Bearer {backend.api_key}"} if backend.api_key else {}
    url = backend.url.rstrip("/") + "/" + endpoint
    client = backend_client()
    try:
        upstream = client.send(client.build_request("POST", url, json=upstream_body, headers=headers), stream=True)
    except httpx.HTTPError:
        inference_call_finish(call, status=503, error_code="engine_unavailable")
        raise OpenAIError(503, f"The engine for {model.repo_id} is not answering; retry shortly.",
                          "engine_unavailable", headers={"Retry-After": "5"}) from None
    if upstream.status_code != 200 or not stream:
        try:
            payload = json.loads(upstream.read() or b"{}")
        except ValueError:
            payload = {}
        finally:
            upstream.close()
        if upstream.status_code != 200:
            error = payload.get("error") if isinstance(payload.get("error"), dict) else {}
            inference_call_finish(call, status=upstream.status_code, error_code=str(error.get("code") or ""))
            status = upstream.status_code if 400 <= upstream.status_code < 500 else 502
            return OpenAIError(status, error.get("message") or f"The engine answered {upstream.status_code}.",
                               str(error.get("code") or "engine_error"), param=error.get("param")).response()
        inference_call_finish(call, status=200, usage=payload.get("usage"))
        payload["model"] = model.repo_id
        return JsonResponse(payload)
    response = StreamingHttpResponse(_relay(upstream, call, model.repo_id, wants_usage),
                                     content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


def _relay(upstream, call, repo_id: str, wants_usage: bool):
    """Relay server-sent events as they come; meter from the usage chunk; a client that leaves closes us."""
    usage, status, error_code = None, 200, ""
    try:
        for line in upstream.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data != "[DONE]":
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                if isinstance(event.get("error"), dict):
                    status, error_code = 502, str(event["error"].get("code") or "engine_error")
                if event.get("usage"):
                    usage = event["usage"]
                    if not event.get("choices") and not wants_usage:
                        continue
                if "model" in event:
                    event["model"] = repo_id
                data = json.dumps(event)
            yield f"data: {data}\n\n".encode()
    except httpx.HTTPError:
        status, error_code = 502, "engine_disconnected"
        yield (b'data: {"error": {"message": "The engine stopped in the middle of the answer.", '
               b'"type": "server_error", "param": null, "code": "engine_disconnected"}}\n\n')
    finally:
        upstream.close()  # also when the client went away: the engine sees the disconnect and cancels
        inference_call_finish(call, status=status if usage or status != 200 else 499, usage=usage,
                              error_code=error_code or ("" if usage else "client_disconnected"))
