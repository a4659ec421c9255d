"""Pure checks on what an uploader hands us: file paths and safetensors headers. No Django models."""
import json
import math
import posixpath
import struct
import unicodedata
from typing import BinaryIO

from gatehouse.core.errors import InvalidInput

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".7z", ".rar", ".gz",
                    ".bz2", ".xz", ".zst")
MAX_PATH_LENGTH = 500
MAX_NAME_BYTES = 255  # one path component, in UTF-8: what ext4, XFS, APFS and S3 tooling accept
# Characters that look like '/', '\' or '.' without being them (and that NFKC leaves alone): a path shown with
# them reads as another path.
LOOKALIKE_SEPARATORS = {"\u2215": "division slash", "\u2044": "fraction slash", "\u29f8": "big solidus",
                        "\u2571": "box-drawing diagonal", "\u29f5": "reverse solidus operator",
                        "\u29f9": "big reverse solidus", "\u2024": "one dot leader", "\u2216": "set minus"}
PICKLE_MAGIC = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")

# Bytes per element for every dtype the safetensors format defines.
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
# Sub-byte types: numel must be a multiple of this and the byte size is numel * bits / 8.
SAFETENSORS_SUBBYTE_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def normalize_path(raw: str) -> str:
    """A repository-relative POSIX path, or InvalidInput saying what is wrong with it."""
    if not raw or not raw.strip():
        raise InvalidInput("A file path is empty.")
    if any(ord(ch) < 32 or ch == "\x7f" for ch in raw):
        raise InvalidInput(f"File path {raw!r} contains control characters.")
    if "\\" in raw:
        raise InvalidInput(f"File path {raw!r} uses backslashes; use '/' as the separator.")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise InvalidInput(f"File path {raw!r} is absolute; paths must be relative to the model folder.")
    for ch in raw:
        if unicodedata.category(ch) in ("Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            raise InvalidInput(f"File path {raw!r} contains the invisible or direction-changing character "
                               f"U+{ord(ch):04X} ({unicodedata.name(ch, 'unnamed')}), which makes a name display "
                               "as another; rename the file using visible characters only.")
        if ch in LOOKALIKE_SEPARATORS:
            raise InvalidInput(f"File path {raw!r} contains U+{ord(ch):04X} ({LOOKALIKE_SEPARATORS[ch]}), a lookalike "
                               "of '/', '\\' or '.'; rename the file, using '/' only between folders.")
    compatible = unicodedata.normalize("NFKC", raw)
    if compatible != raw:
        raise InvalidInput(f"File path {raw!r} uses compatibility characters (fullwidth or styled forms): it looks like "
                           f"{compatible!r}; rename it to {compatible!r} (paths must be NFKC-normalized).")
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(f"File path {raw!r} contains '..'; paths must stay inside the model folder.")
    if not parts:
        raise InvalidInput(f"File path {raw!r} names no file.")
    path = posixpath.join(*parts)
    if len(path) > MAX_PATH_LENGTH:
        raise InvalidInput(f"File path {path[:60]!r}… is longer than {MAX_PATH_LENGTH} characters; rename it or "
                           "flatten its folders.")
    for part in parts:
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise InvalidInput(f"File or folder name {part[:40]!r}… is {len(part.encode('utf-8'))} bytes in UTF-8; "
                               f"names may be at most {MAX_NAME_BYTES} bytes: rename it.")
    return path


def refuse_archive(path: str) -> None:
    """Archives are refused, never stored or unpacked: their contents would escape every per-file check."""
    if path.lower().endswith(ARCHIVE_SUFFIXES):
        raise InvalidInput(
            f"{path} is an archive. Gatehouse stores model folders file by file (each hashed and checked) and never "
            "unpacks archives: extract it locally and upload its files, one field per file named by its path.",
            code="archive_refused",
        )


def refuse_opaque_content(head: bytes, path: str) -> None:
    """Refuse a file whose first (nine) bytes are a pickle or a zip archive, whatever it is called (a renamed
    pytorch_model.bin, torch.save's zip of pickles, an archive)."""
    stem = path.rsplit(".", 1)[0]
    if head[8:9] == b"{":
        # A safetensors file: its 8-byte header length is followed by the JSON header. Lengths like 0x280 begin
        # with the bytes of a pickle's protocol marker, and no pickle or zip has '{' there.
        return
    if head.startswith(PICKLE_MAGIC):
        raise InvalidInput(
            f"{path} is a pickle, which can run arbitrary code when loaded, whatever its name; convert it to "
            f"safetensors (safetensors.torch.save_file(state_dict, '{stem}.safetensors')) and upload that instead.",
            code="pickle_refused")
    if head.startswith(ZIP_MAGIC):
        raise InvalidInput(
            f"{path} is a zip archive (PyTorch's torch.save format is one: a zip of pickles). Archives are never "
            "unpacked or stored: convert weights to safetensors (safetensors.torch.save_file), and upload other "
            "files one field per file named by its path.", code="archive_refused")


def refuse_pickle(path: str) -> None:
    if path.lower().endswith(PICKLE_SUFFIXES):
        stem = path.rsplit(".", 1)[0]
        raise InvalidInput(
            f"{path} is a pickle-based format, which can run arbitrary code when loaded; convert it to "
            f"safetensors (safetensors.torch.save_file(state_dict, '{stem}.safetensors')) and upload that instead.",
            code="pickle_refused",
        )


def inspect_safetensors(fh: BinaryIO, size: int, *, max_header_bytes: int, name: str = "file") -> dict:
    """Validate a safetensors file's header against its size without reading the tensor data.

    Returns {"tensors", "parameters", "dtypes", "metadata"}; raises InvalidInput on anything inconsistent.
    """
    def bad(reason: str) -> InvalidInput:
        return InvalidInput(f"{name} is not a valid safetensors file: {reason}. Re-export it with the safetensors "
                            "library (safetensors.torch.save_file) and upload it again.", code="invalid_safetensors")

    if size < 8:
        raise bad(f"it is {size} bytes, shorter than the 8-byte header length")
    fh.seek(0)
    head = fh.read(9)
    refuse_opaque_content(head, name)
    (header_len,) = struct.unpack("<Q", head[:8])
    fh.seek(8)
    if header_len > max_header_bytes:
        raise bad(f"its header claims {header_len} bytes, more than the {max_header_bytes}-byte limit")
    if 8 + header_len > size:
        raise bad(f"its header claims {header_len} bytes but the file has only {size - 8} after the length")
    raw = fh.read(header_len)
    if len(raw) != header_len:
        raise bad("the header is truncated")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"the header is not UTF-8 JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("__metadata__ must map strings to strings")

    data_size = size - 8 - header_len
    spans, parameters, dtypes = [], 0, set()
    for tensor_name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {tensor_name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES and dtype not in SAFETENSORS_SUBBYTE_BITS:
            raise bad(f"tensor {tensor_name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise bad(f"tensor {tensor_name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            raise bad(f"tensor {tensor_name!r} has invalid data_offsets {offsets!r}")
        numel = math.prod(shape)
        if dtype in SAFETENSORS_SUBBYTE_BITS:
            expected = numel * SAFETENSORS_SUBBYTE_BITS[dtype] // 8
        else:
            expected = numel * SAFETENSORS_DTYPES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise bad(f"tensor {tensor_name!r} ({dtype} {shape}) needs {expected} bytes but its offsets "
                      f"span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], tensor_name))
        parameters += numel
        dtypes.add(dtype)

    # The data region must be tiled exactly: no gaps, no overlaps, nothing past the end.
    position = 0
    for begin, end, tensor_name in sorted(spans):
        if begin != position:
            raise bad(f"tensor {tensor_name!r} starts at byte {begin}, expected {position} (gap or overlap)")
        position = end
    if position != data_size:
        raise bad(f"the tensors cover {position} bytes but the data region is {data_size} bytes")
    return {"tensors": len(spans), "parameters": parameters, "dtypes": sorted(dtypes), "metadata": metadata}
