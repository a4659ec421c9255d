"""How the gateway reaches its backends (an engine process of ours, or an upstream such as vLLM): urllib3 connection
pools, one per backend origin, kept alive and shared by the process's threads.

urllib3 rather than httpx (which the webhooks use): the same call to a backend that answers at once costs the
gateway 0.41 ms through a urllib3 pool and 0.88 ms through httpx.Client (loopback, measured side by side), in a
gateway whose whole overhead per call is meant to stay under 5 ms.
"""
import json
import socket
from collections.abc import Iterator

import urllib3
from django.conf import settings

# Any failure to reach a backend or to read its answer: refused, timed out, cut off, not HTTP.
BackendError = (urllib3.exceptions.HTTPError, OSError)
CONNECT_TIMEOUT_SECONDS = 5.0
# Pooled connections to a remote upstream sit idle between calls: TCP keepalive holds them open through NATs and
# firewalls that drop quiet flows, and finds a peer that vanished (httpx instead dropped them after 5 s idle).
_KEEPALIVE = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)] + [
    (socket.IPPROTO_TCP, getattr(socket, name), value)
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)) if hasattr(socket, name)]


class _SendsUnderReadTimeout:
    """urllib3 sends a request under the connect timeout: a 4 MiB prompt to a backend slow to read it (busy, or far
    away) would fail after 5 s. Connected under that timeout, the request is sent under the read timeout, as httpx's
    write timeout had it."""

    def request(self, *args, **kwargs):
        if self.sock is None:
            self.connect()
        self.timeout = settings.INFERENCE_BACKEND_TIMEOUT_SECONDS
        return super().request(*args, **kwargs)


class _Connection(_SendsUnderReadTimeout, urllib3.connection.HTTPConnection):
    pass


class _TLSConnection(_SendsUnderReadTimeout, urllib3.connection.HTTPSConnection):
    pass


class _Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


_pools: urllib3.PoolManager | None = None


def _manager() -> urllib3.PoolManager:
    global _pools
    if _pools is None:
        # Not blocking: past 32 open connections to one backend, more are opened (and closed after use), as a burst
        # of streams needs; never retried (a generation is not idempotent) and never redirected (as httpx).
        _pools = urllib3.PoolManager(
            num_pools=64, maxsize=32, block=False, retries=False,
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_SECONDS, read=settings.INFERENCE_BACKEND_TIMEOUT_SECONDS),
            socket_options=urllib3.connection.HTTPConnection.default_socket_options + _KEEPALIVE)
        _pools.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}
    return _pools


def backend_post(url: str, body: dict, *, api_key: str = "") -> urllib3.BaseHTTPResponse:
    """POST `body` as JSON and return as soon as the answer's headers are in; its body is left to read, whole
    (`read_whole`) or line by line (`line_batches`). Raises one of BackendError."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    # The JSON httpx sent: no NaN or Infinity (not JSON, a backend would refuse it), UTF-8, compact.
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    return _manager().urlopen("POST", url, body=payload, headers=headers, preload_content=False, redirect=False)


def read_whole(response: urllib3.BaseHTTPResponse) -> bytes:
    """The whole body; the connection then goes back to its pool for the next call. Raises one of BackendError when
    the body is cut off (fewer bytes than its Content-Length)."""
    try:
        return response.read()
    finally:
        response.release_conn()


def line_batches(response: urllib3.BaseHTTPResponse) -> Iterator[list[str]]:
    """The body's lines as they arrive (server-sent events), whatever its framing: chunked, or until the connection
    closes; the complete lines of each read together. read1 returns what has come, where read(n) would wait for n
    bytes. Only each new read is split: a long line costs its length, not its length squared."""
    pending: list[bytes] = []  # the pieces of a line not yet ended
    while chunk := response.read1(65536):
        *complete, tail = chunk.split(b"\n")
        if complete:
            complete[0] = b"".join(pending) + complete[0]
            pending = []
            yield [line.rstrip(b"\r").decode("utf-8", "replace") for line in complete]
        if tail:
            pending.append(tail)
    if pending:
        yield [b"".join(pending).rstrip(b"\r").decode("utf-8", "replace")]
