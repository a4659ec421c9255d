"""The releases app's contributions to /metrics and /readyz (wired in by settings): downloads and tokens
served, in aggregate, and whether the local inference engines answer."""
import httpx
from django.db.models import Sum

from releases.models import DownloadTotals, InferenceBackend, InferenceUsage


def metrics():
    downloads = DownloadTotals.objects.aggregate(n=Sum("transfers"), bytes=Sum("bytes"))  # a row a model
    yield "gatehouse_downloads", "Metered file downloads", downloads["n"] or 0, {}
    yield "gatehouse_download_bytes", "Bytes of metered downloads", downloads["bytes"] or 0, {}
    # Each call counts on its token's or its session's row (and its organization's too, left out here): a row per
    # token and day, not per call.
    tokens = InferenceUsage.objects.filter(scope__in=("token", "session")).aggregate(
        n=Sum("calls"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
    yield "gatehouse_inference_calls", "Metered inference calls, finished", tokens["n"] or 0, {}
    yield "gatehouse_tokens_served", "Tokens through the inference API", tokens["prompt"] or 0, {"kind": "prompt"}
    yield "gatehouse_tokens_served", "Tokens through the inference API", tokens["completion"] or 0, {"kind": "completion"}


def readiness_checks():
    """Engines are not required: without one, only inference answers 503 (with Retry-After)."""
    def engines() -> str:
        urls = list(InferenceBackend.objects.filter(enabled=True, kind=InferenceBackend.Kind.LOCAL)
                    .values_list("url", flat=True))
        down = sum(1 for url in urls if not url or not engine_healthy(url))
        if down:
            raise RuntimeError(f"{down} of {len(urls)} local engines not answering")
        return f"ok ({len(urls)} local)"
    return {"engines": (engines, False)}


def engine_healthy(base_url: str, timeout: float = 2) -> bool:
    """Whether an engine (its OpenAI base URL, …/v1) answers its /health."""
    try:
        return httpx.get(base_url.rstrip("/").removesuffix("/v1") + "/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False
