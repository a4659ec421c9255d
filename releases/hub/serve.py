"""Sending a file's bytes: Range requests answered with 206, local files streamed with sendfile (or handed to
nginx with X-Accel-Redirect when configured), S3 objects redirected to a short-lived presigned URL. Nothing
here reads a whole file into memory."""
import re
from dataclasses import dataclass

from django.conf import settings
from django.core.files.storage import storages
from django.http import FileResponse, HttpResponse, StreamingHttpResponse

from gatehouse.registry.models import ModelFile

RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Served:
    response: HttpResponse
    bytes: int  # what the body carries (0 for HEAD and redirects)
    range_start: int | None
    via: str  # stream, x-accel, redirect


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for one `bytes=` range; None for no or an unsupported (multi-)range header."""
    match = RANGE_RE.match(header.strip()) if header else None
    if not match or (not match[1] and not match[2]):
        return None
    if not match[1]:  # suffix: the last n bytes
        length = int(match[2])
        if length == 0:
            raise RangeNotSatisfiable
        return max(0, size - length), size - 1
    first = int(match[1])
    last = min(int(match[2]), size - 1) if match[2] else size - 1
    if first >= size or last < first:
        raise RangeNotSatisfiable
    return first, last


def _local_path(storage, key: str) -> str | None:
    try:
        return storage.path(key)
    except NotImplementedError:  # object storage
        return None


def _read_range(path: str, first: int, length: int):
    with open(path, "rb") as fh:
        fh.seek(first)
        while length > 0:
            chunk = fh.read(min(CHUNK, length))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk


def serve_file(request, file: ModelFile, headers: dict) -> Served:
    """The answer to HEAD or GET of one file, metadata headers included."""
    storage = storages["weights"]
    path = _local_path(storage, file.storage_key)
    if path is None:
        # The client GETs this URL without our Authorization header, so it must authorise itself: presigned.
        url = storage.url(file.storage_key, parameters={
            "ResponseContentDisposition": f'attachment; filename="{file.path.rsplit("/", 1)[-1]}"'},
            expire=settings.GATEHOUSE_PRESIGNED_SECONDS)
        response = HttpResponse(status=302, headers=headers | {"Location": url})
        return Served(response, 0, None, "redirect")
    try:
        span = parse_range(request.headers.get("Range", ""), file.size)
    except RangeNotSatisfiable:
        response = HttpResponse(status=416, headers=headers | {"Content-Range": f"bytes */{file.size}"})
        return Served(response, 0, None, "stream")
    first, last = span if span else (0, file.size - 1)
    length = max(0, last - first + 1)
    status = 206 if span else 200
    if span:
        headers = headers | {"Content-Range": f"bytes {first}-{last}/{file.size}"}
    if request.method == "HEAD":
        response = HttpResponse(status=status, headers=headers, content_type="application/octet-stream")
        response["Content-Length"] = str(length)
        return Served(response, 0, first if span else None, "stream")
    if settings.GATEHOUSE_ACCEL_REDIRECT_PREFIX:
        # nginx serves the bytes (and the Range) from its internal location; we only decided who may.
        response = HttpResponse(headers=headers | {
            "X-Accel-Redirect": settings.GATEHOUSE_ACCEL_REDIRECT_PREFIX.rstrip("/") + "/" + file.storage_key},
            content_type="application/octet-stream")
        return Served(response, length, first if span else None, "x-accel")
    if span:
        response = StreamingHttpResponse(_read_range(path, first, length), status=206, headers=headers,
                                         content_type="application/octet-stream")
        response["Content-Length"] = str(length)
    else:
        # FileResponse hands the open file to the server's wsgi.file_wrapper: sendfile where the server has it.
        response = FileResponse(open(path, "rb"), headers=headers, content_type="application/octet-stream")
        response.block_size = CHUNK  # servers without sendfile copy in blocks of this size (Django's 4 KiB is slow)
        response["Content-Length"] = str(file.size)
    return Served(response, length, first if span else None, "stream")
