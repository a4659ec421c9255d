"""The OpenAI-compatible gateway (/v1): the stock `openai` client works with base_url=<gatehouse>/v1 and a
Gatehouse token. Each call is authenticated, judged by releases.policy.inference_access (tier, gating,
acceptable use, the token's `inference` scope), held to quotas, metered, and forwarded to the model's backend
(an engine process of ours or an upstream such as vLLM). Streams are relayed chunk by chunk, unbuffered.
This module never imports torch. Every answer under /v1, errors included (an unknown path, a wrong method, a bug),
uses OpenAI's shape: {"error": {message, type, param, code}}, so the client raises its own exception with our message.
"""
import functools
import json
import logging

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.handlers.wsgi import WSGIRequest
from django.http import JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from gatehouse.accounts.authentication import client_address, token_from_header
from gatehouse.core.badinput import contains_unstorable_text
from gatehouse.core.errors import NotAuthenticated, Throttled
from gatehouse.core.prepared import PreparedQuery
from gatehouse.core.unavailable import dependency_down
from gatehouse.registry.models import Model
from gatehouse.registry.selectors import model_visible_queryset
from releases import access, policy
from releases.inference.backend import BackendError, backend_post, line_batches, read_whole
from releases.inference.metering import QuotaRefusal, inference_call_admit, inference_call_finish, quota_organization
from releases.inference.params import InvalidParameter, check_engine_support, check_generation_parameters
from releases.models import InferenceBackend

log = logging.getLogger("gatehouse.inference")
TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
         404: "invalid_request_error", 405: "invalid_request_error", 411: "invalid_request_error",
         413: "invalid_request_error", 422: "invalid_request_error",
         429: "rate_limit_exceeded", 500: "server_error", 502: "upstream_error", 503: "server_error"}
# What a backend answering these to the gateway means: the caller was authenticated and authorized by us already, so
# it is our backend's configuration that is wrong (its api_key, its upstream_model or URL), for an administrator to
# fix. Passed through, they would tell the caller that their own key is wrong or that a model we list does not exist.
MISCONFIGURED = {401: "its api_key", 403: "its api_key", 404: "its upstream_model or URL"}
MAX_BODY_BYTES = 4 * 1024 * 1024


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
        @functools.wraps(view)
        def wrapper(request, *args, **kwargs):
            if request.method not in methods:  # not Django's empty 405: the client shows our message
                return OpenAIError(405, f"{request.method} is not allowed on {request.path}; use "
                                        f"{' or '.join(methods)}.", "method_not_allowed",
                                   headers={"Allow": ", ".join(methods)}).response()
            try:
                return view(request, *args, **kwargs)
            except OpenAIError as exc:
                return exc.response()
            except Exception as exc:
                if dependency_down(exc):
                    raise  # the database or broker is down: UnavailableMiddleware answers 503 with Retry-After
                # A bug: Django's HTML 500 page would reach the client as an unreadable error.
                log.exception("inference gateway: unexpected error on %s %s", request.method, request.path)
                return OpenAIError(500, "The gateway failed unexpectedly; the error has been logged.",
                                   "internal_error").response()
        return wrapper
    return decorate


@csrf_exempt
def no_route(request, path=""):
    """Any other path under /v1: a JSON 404, not the web site's HTML page (nor a model page for org "v1")."""
    return OpenAIError(404, f"No endpoint {request.method} {request.path}. This gateway serves GET /v1/models, "
                            "GET /v1/models/{id}, POST /v1/completions and POST /v1/chat/completions.",
                       "unknown_url").response()


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
                "access_policy__cooldown_days", "inference_backend__id", "inference_backend__kind",
                "inference_backend__url", "inference_backend__upstream_model", "inference_backend__api_key",
                "inference_backend__usage_in_every_chunk", "inference_backend__enabled")


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
    # No name holds a NUL or an unpaired surrogate, and a database refuses either in a query (a 500): such an id
    # names no model.
    storable = org and name and not contains_unstorable_text(model_id)
    model = next(iter(_served_model(org=org, name=name)), None) if storable else None
    if model is None and storable and model_visible_queryset(user).filter(organization__slug=org, name=name).exists():
        # One the caller can see on its page: "does not exist" would be false. (One it cannot see answers as below.)
        raise OpenAIError(404, f"{model_id} is not served by the inference API: no inference backend is enabled for "
                               "it. Its organization's administrators can enable one.", "model_not_served",
                          param="model")
    if model is None:  # a closed model is judged below, by the policy, and answers exactly like this
        shown = model_id if len(model_id or "") <= 200 else model_id[:200] + "…"  # not a megabyte id back
        raise OpenAIError(404, f"The model {shown!r} does not exist or you do not have access to it.",
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
        raw = _chunked_body(request, limit) if not declared and _is_chunked(request) else request.body
    except RequestDataTooBig:
        raise too_large from None
    if len(raw) > limit:
        raise too_large
    try:
        body = json.loads(raw or b"{}", parse_int=_json_int)  # NaN and Infinity parse, refused by parameter below
    except HugeNumber as exc:
        raise OpenAIError(400, f"The body holds a number of {exc.digits} digits; numbers may have at most "
                               f"{MAX_DIGITS}.", "invalid_value") from None
    except (ValueError, RecursionError):
        raise OpenAIError(400, "The body must be a JSON object (not nested without bound).", "invalid_json") from None
    # A WSGI server closes every response it sent, in a finally; Django's ASGI handler does not when the client has
    # gone, and the call would stay in flight, unmetered.
    return generate(request, endpoint, user=user, token=token, body=body,
                    meter_after_sending=isinstance(request, WSGIRequest))


def _is_chunked(request) -> bool:
    return "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower()


def _chunked_body(request, limit: int) -> bytes:
    """A body sent without Content-Length (Transfer-Encoding: chunked; nginx passes such bodies on unbuffered).
    Django reads only up to Content-Length, so it would see no body at all. Gunicorn decodes the chunks and marks
    its input as ending with the body (wsgi.input_terminated); a server that does not would leave a read waiting on
    the open connection, so there the caller is asked for a Content-Length instead."""
    if not request.META.get("wsgi.input_terminated"):
        raise OpenAIError(411, "This server reads request bodies by their length: send the JSON body with a "
                               "Content-Length header, not chunked.", "length_required")
    return request.META["wsgi.input"].read(limit + 1)


MAX_DIGITS = 4300  # Python's own limit on converting digits to an int (sys.get_int_max_str_digits)


class HugeNumber(ValueError):
    def __init__(self, digits: int):
        super().__init__(digits)
        self.digits = digits


def _json_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_DIGITS:
        raise HugeNumber(digits)
    return int(text)


def generate(request, endpoint: str, *, user, token, body, meter_after_sending: bool = False):
    """One completion or chat call for an authenticated caller (a token, or None for a signed-in session). With
    `meter_after_sending`, a whole (not streamed) answer is metered when the server closes the response it sent."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise OpenAIError(400, "Name the model: {\"model\": \"org/name\", …}.", "invalid_value", param="model")
    organization_ids = access.user_organization_ids(user)
    model = _model_for(request, body["model"], user, token, organization_ids)
    backend: InferenceBackend = model.inference_backend
    latest = model.latest_version
    try:
        check_generation_parameters(endpoint, body, context_length=latest.context_length if latest else None)
        if backend.kind == InferenceBackend.Kind.LOCAL:  # an upstream (vLLM) gets them untouched
            check_engine_support(body)
    except InvalidParameter as exc:
        raise OpenAIError(400, exc.message, exc.code, param=exc.param) from None
    if not backend.url:
        raise OpenAIError(503, f"The engine for {model.repo_id} is not running yet; retry shortly.",
                          "engine_unavailable", headers={"Retry-After": "5"})
    stream = bool(body.get("stream"))
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    # Which usage the client asked for: none, the last chunk's ("last"), or every chunk's ("every", vLLM's option).
    wants_usage = ("every" if options.get("continuous_usage_stats") else "last") if options.get("include_usage") else ""
    upstream_body = body | {"model": backend.upstream_model or model.repo_id}
    if stream:  # we always ask for usage upstream, to meter; the client sees it only if it asked
        # The usage chunk comes last: usage in every chunk too, where the backend can, so a client that leaves early
        # is metered for its prompt as well (our engine; vLLM and SGLang when their backend says so).
        every_chunk = backend.kind == InferenceBackend.Kind.LOCAL or backend.usage_in_every_chunk
        extra = {"continuous_usage_stats": True} if every_chunk else {}
        upstream_body["stream_options"] = options | {"include_usage": True} | extra
    call = inference_call_admit(user=user, token=token, organization_id=quota_organization(model, organization_ids),
                                model=model, endpoint=endpoint, stream=stream)
    if isinstance(call, QuotaRefusal):
        retry = {"Retry-After": str(call.retry_after)}
        if call.code == "insufficient_quota":
            retry["x-should-retry"] = "false"
        raise OpenAIError(429, call.message, call.code, headers=retry)
    try:
        return _forward(call, model, backend, endpoint, upstream_body, stream=stream, wants_usage=wants_usage,
                        meter_after_sending=meter_after_sending)
    except Exception:  # a bug or an answer not foreseen: the row must not stay "in flight" (status 0) forever
        inference_call_finish(call, status=500, error_code="internal_error")  # a no-op for a call finished already
        raise


def _forward(call, model: Model, backend: InferenceBackend, endpoint: str, upstream_body: dict, *, stream: bool,
             wants_usage: str, meter_after_sending: bool):
    """Send the call to the backend and answer with what it answers; every outcome finishes the call's row."""
    try:
        upstream = backend_post(backend.url.rstrip("/") + "/" + endpoint, upstream_body, api_key=backend.api_key)
    except BackendError:
        inference_call_finish(call, status=503, error_code="engine_unavailable")
        raise OpenAIError(503, f"The engine for {model.repo_id} is not answering; retry shortly.",
                          "engine_unavailable", headers={"Retry-After": "5"}) from None
    if upstream.status == 200 and stream:
        response = StreamingHttpResponse(_relay(upstream, call, model.repo_id, wants_usage),
                                         content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once

        def never_relayed():
            # A client gone before the first event: the relay never ran, so its own cleanup did not either. Close
            # the engine's stream (it cancels) and finish the row. Runs after the relay's close, a no-op then.
            upstream.close()
            inference_call_finish(call, status=499, error_code="client_disconnected")
        response._resource_closers.append(never_relayed)  # Django's hook for what close() must release
        return response
    try:
        payload = json.loads(read_whole(upstream) or b"{}")
    except (*BackendError, ValueError):  # cut off while sending its body, or not JSON
        payload = None
        upstream.close()
    if upstream.status != 200:
        raise _upstream_refusal(call, model, upstream, payload)
    if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list):
        inference_call_finish(call, status=502, error_code="engine_bad_answer")
        raise OpenAIError(502, f"The engine for {model.repo_id} sent an answer that is not a completion; retry "
                               "shortly.", "engine_bad_answer")
    usage = payload.get("usage")
    payload["model"] = model.repo_id
    response = JsonResponse(payload)
    if meter_after_sending:
        # The caller does not wait for the bookkeeping (a transaction, ~0.5 ms): the server closes every response
        # after sending it (gunicorn in a finally; Django's test client too), and closing it meters the call.
        def meter():
            try:
                inference_call_finish(call, status=200, usage=usage)
            except Exception:  # Django's close() would swallow it unseen
                log.exception("inference gateway: metering call %s after sending its answer failed", call.pk)
        response._resource_closers.append(meter)
    else:  # a page that reads the answer and renders its own (the playground without JavaScript)
        inference_call_finish(call, status=200, usage=usage)
    return response


def _error_of(payload) -> dict:
    """A backend's error object: OpenAI's {"error": {...}}, or vLLM's own top-level {"object": "error", ...}."""
    if isinstance(payload, dict):
        if isinstance(payload.get("error"), dict):
            return payload["error"]
        if payload.get("object") == "error":
            return payload
    return {}


def _text(value) -> str | None:
    return value if isinstance(value, str) and value else None  # vLLM's code is the HTTP status, an int


def _upstream_refusal(call, model: Model, upstream, payload) -> OpenAIError:
    error, status = _error_of(payload), upstream.status
    message = _text(error.get("message")) or f"The engine answered {status}."
    if status in MISCONFIGURED:
        log.warning("inference backend of %s answered %s: %s", model.repo_id, status, message[:500])
        inference_call_finish(call, status=502, error_code=f"upstream_{status}")
        return OpenAIError(502, f"The inference backend of {model.repo_id} is misconfigured: it refused the gateway "
                                f"(HTTP {status}). An administrator must fix {MISCONFIGURED[status]}; retrying will "
                                "not help until then.", "backend_misconfigured")
    # The caller's own (bad parameters: 400, 422), a rate limit (429), or a busy engine (503, its queue full): passed
    # on with their Retry-After, so the client backs off as the engine asks. Any other failure is a bad gateway.
    passed = 400 <= status < 500 or status == 503
    code = _text(error.get("code")) or ("engine_error" if passed else f"upstream_{status}")
    inference_call_finish(call, status=status if passed else 502, error_code=code)
    headers = {"Retry-After": upstream.headers["Retry-After"]} if "Retry-After" in upstream.headers else {}
    return OpenAIError(status if passed else 502, message, code, param=_text(error.get("param")),
                       headers=headers)


def _error_event(message: str, code: str) -> bytes:
    """OpenAI's mid-stream failure: the client raises openai.APIError with this object as its body."""
    error = {"message": message, "type": "server_error", "param": None, "code": code}
    return f"data: {json.dumps({'error': error})}\n\n".encode()


def _content_chunks(event: dict) -> int:
    """The choices of a chunk that carry generated text. Our engine and vLLM send one per token (ours now and then a
    few tokens in one, held back while they could start a stop sequence), so this counts completion tokens, from
    below, when no usage chunk came: a client that leaves early must not have its tokens for free."""
    choices = event.get("choices")
    if not isinstance(choices, list):
        return 0
    return sum(1 for c in choices if isinstance(c, dict) and (
        (isinstance(c.get("delta"), dict) and c["delta"].get("content")) or c.get("text")))


def _relay(upstream, call, repo_id: str, wants_usage: str):
    """Relay server-sent events as they come; meter from the usage chunk (else from the chunks relayed); a client
    that leaves closes us. An answer is complete only with `data: [DONE]`: a stream that ends without it was cut
    short, and the client is told so (an error event) rather than left to take what it got for the whole answer."""
    usage, status, error_code, done, generated, answered = None, 200, "", False, 0, False
    try:
        # The events that came in one read go out in one write: a backend ahead of us (a loaded gateway) costs a
        # send per read, not per token; one that is not is relayed event by event, as before.
        for batch in line_batches(upstream):
            out = []
            for line in batch:
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    out.append(b"data: [DONE]\n\n")
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                if error := _error_of(event):  # relayed in OpenAI's shape, whichever the backend used
                    status, error_code = 502, _text(error.get("code")) or "engine_error"
                    out.append(_error_event(_text(error.get("message")) or "The engine failed while generating.",
                                            error_code))
                    continue
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"]
                    if not event.get("choices"):  # the closing usage chunk: the answer was whole
                        answered = True
                        if not wants_usage:
                            continue
                    elif wants_usage != "every":
                        del event["usage"]  # asked of the engine for metering, not by this client
                generated += _content_chunks(event)
                if "model" in event:
                    event["model"] = repo_id
                out.append(f"data: {json.dumps(event)}\n\n".encode())
            if out:
                yield b"".join(out)
            if done:
                break
        if not done and status == 200:
            status, error_code = 502, "engine_incomplete"
            yield _error_event("The engine's answer ended before it was complete; retry.", error_code)
    except BackendError:
        status, error_code = 502, "engine_disconnected"
        yield _error_event("The engine stopped in the middle of the answer.", error_code)
    except Exception:
        log.exception("inference gateway: unexpected error relaying a stream for %s", repo_id)
        status, error_code = 500, "internal_error"
        yield _error_event("The gateway failed in the middle of the answer; the error has been logged.", error_code)
    finally:
        upstream.close()  # also when the client went away: the engine sees the disconnect and cancels
        if status == 200 and not done and not answered:  # the client left before the end
            status, error_code = 499, "client_disconnected"
        inference_call_finish(call, status=status, error_code=error_code,
                              usage=usage or {"completion_tokens": generated})
