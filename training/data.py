"""Data preparation and loading.

`prepare` reads text files, folders and JSONL, removes exact-duplicate documents, counts (and optionally
redacts) personal data, splits train/validation by a stable hash, trains or reuses a tokenizer, and writes
memory-mapped token shards plus manifest.json. `TokenStream` serves deterministic batches from the shards;
its position is one integer, so a resumed run sees exactly the batches it would have seen.
"""
import hashlib
import json
import os
import re
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.files import sha256_file
from training.tokenizer import EOS, load_tokenizer, save_tokenizer, train_tokenizer

FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".csv", ".html", ".tex")
SHARD_TOKENS = 64 * 1024 * 1024

# Personal data and secrets. Conservative patterns: a false "found" is cheaper than a missed key.
PII_PATTERNS = {
    "email": re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"),
    # A sentence may end right after a number ("call 415-555-0100."), a version number may not (1.2.3.4.5).
    "phone": re.compile(r"(?<![\w.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w|\.\d)"),
    "ip_address": re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?!\w|\.\d)"),
    "secret_key": re.compile(
        r"\b(?:AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36}|hf_[A-Za-z0-9]{34}|sk-[A-Za-z0-9_-]{20,}"
        r"|xox[abpr]-[A-Za-z0-9-]{10,})\b|-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}
REDACTIONS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip_address": "<IP_ADDRESS>", "secret_key": "<SECRET>"}


class DataError(ValueError):
    """Input data that cannot be prepared or loaded; the message says what to fix."""


@dataclass
class Source:
    path: str
    sha256: str
    bytes: int
    documents: int = 0
    license: str = ""


@dataclass
class Prepared:
    directory: Path
    manifest: dict = field(default_factory=dict)


def scan_personal_data(text: str, counts: dict[str, int], *, redact: bool) -> str:
    for kind, pattern in PII_PATTERNS.items():
        text, found = pattern.subn(REDACTIONS[kind], text) if redact else (text, len(pattern.findall(text)))
        counts[kind] = counts.get(kind, 0) + found
    return text


def read_documents(paths: list[Path], *, text_field: str, license: str, max_bytes: int | None):
    """Yield (source, document text) pairs; one document per text file, one per JSONL line."""
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl",)))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path} does not exist")
    if not files:
        raise DataError("no input files found (looked for " + ", ".join(TEXT_SUFFIXES + (".jsonl",)) + ")")
    total = 0
    for file in files:
        size = file.stat().st_size
        if max_bytes is not None and total + size > max_bytes and total > 0:
            break
        total += size
        source = Source(path=str(file), sha256=sha256_file(file), bytes=size, license=license)
        raw = file.read_bytes().decode("utf-8", errors="replace")
        if file.suffix == ".jsonl":
            for number, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{file}:{number} is not valid JSON") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise DataError(f"{file}:{number} has no string field {text_field!r} (set --text-field)")
                source.documents += 1
                yield source, record[text_field]
        else:
            source.documents += 1
            yield source, raw


def _is_validation(text: str, fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


@dataclass
class InputGroup:
    """One dataset of a mixture: its files, its licence and its weight (how often each training document is
    repeated: 2.0 twice, 0.5 half of them, chosen by a stable hash)."""

    name: str
    paths: list[Path]
    weight: float = 1.0
    license: str = ""


def _repeats(text: str, weight: float) -> int:
    whole, fraction = int(weight), weight - int(weight)
    digest = hashlib.blake2b(b"mix" + text.encode("utf-8", errors="replace"), digest_size=8).digest()
    return whole + (1 if int.from_bytes(digest, "big") / 2**64 < fraction else 0)


def prepare(paths: list[Path], out: Path, *, vocab_size: int = 2048, val_fraction: float = 0.05,
            tokenizer_from: Path | None = None, redact: bool = False, license: str = "", text_field: str = "text",
            max_bytes: int | None = None, seq_len_hint: int = 2048, description: str = "",
            groups: list[InputGroup] | None = None) -> Prepared:
    """Prepare `paths` as one dataset, or a weighted mixture of `groups` with facts kept per group."""
    if not 0 <= val_fraction < 1:
        raise DataError("--val-fraction must be at least 0 and below 1")
    groups = groups or [InputGroup(name="data", paths=list(paths), license=license)]
    for group in groups:
        if not group.weight > 0:
            raise DataError(f"dataset {group.name!r}: mixture weight must be positive, not {group.weight}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[bytes] = set()
    stats = [{"name": g.name, "weight": g.weight, "license": g.license, "documents": 0, "documents_kept": 0,
              "exact_duplicates_removed": 0, "bytes": 0, "personal_data_found": {k: 0 for k in PII_PATTERNS},
              "tokens": 0, "train_tokens_weighted": 0, "sources": {}} for g in groups]
    train_docs, val_docs = [], []
    for index, group in enumerate(groups):
        stat = stats[index]
        for source, text in read_documents(group.paths, text_field=text_field, license=group.license,
                                           max_bytes=max_bytes):
            stat["sources"][source.path] = source
            stat["documents"] += 1
            key = hashlib.sha256(text.encode("utf-8", errors="replace")).digest()
            if key in seen:
                stat["exact_duplicates_removed"] += 1
                continue
            seen.add(key)
            stat["documents_kept"] += 1
            stat["bytes"] += len(text.encode("utf-8", errors="replace"))
            text = scan_personal_data(text, stat["personal_data_found"], redact=redact)
            (val_docs if _is_validation(text, val_fraction) else train_docs).append((index, text))
    if not train_docs:
        raise DataError("no training documents left after de-duplication and the validation split")
    if val_fraction > 0 and not val_docs:
        val_docs.append(train_docs.pop())  # tiny corpora: keep at least one validation document

    if tokenizer_from is not None:
        tokenizer = load_tokenizer(tokenizer_from)
    else:
        tokenizer = train_tokenizer((text for _, text in train_docs), vocab_size)
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise DataError(f"the tokenizer has no {EOS} token")
    # The folder is about to change: until the new manifest is written last, it must not claim to be complete.
    (out / "manifest.json").unlink(missing_ok=True)
    save_tokenizer(tokenizer, out, model_max_length=seq_len_hint)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32

    weights = [g.weight for g in groups]
    splits = {"train": _write_split(out, "train", train_docs, tokenizer, eos, dtype, stats, weights=weights),
              "val": _write_split(out, "val", val_docs, tokenizer, eos, dtype, stats, weights=None)}
    tokenizer_sha = sha256_file(out / "tokenizer.json")
    for stat in stats:
        stat["sources"] = [vars(s) for s in sorted(stat["sources"].values(), key=lambda s: s.path)]
        stat["exact_duplicate_rate"] = stat["exact_duplicates_removed"] / max(1, stat["documents"])
    source_rows = [row for stat in stats for row in stat["sources"]]
    pii = {kind: sum(stat["personal_data_found"][kind] for stat in stats) for kind in PII_PATTERNS}
    documents = sum(stat["documents"] for stat in stats)
    duplicates = sum(stat["exact_duplicates_removed"] for stat in stats)
    manifest = {
        "format_version": FORMAT_VERSION, "kind": "gatehouse.training.dataset", "created_at": time.time(),
        "description": description, "license": license or ", ".join(sorted({g.license for g in groups if g.license})),
        "content_sha256": hashlib.sha256("".join(s["sha256"] for s in source_rows).encode()).hexdigest(),
        "sources": source_rows, "documents": documents, "documents_kept": documents - duplicates,
        "bytes": sum(stat["bytes"] for stat in stats), "exact_duplicates_removed": duplicates,
        "exact_duplicate_rate": duplicates / max(1, documents),
        "personal_data_found": pii, "personal_data_redacted": redact,
        "tokenizer": {"vocab_size": tokenizer.get_vocab_size(), "sha256": tokenizer_sha, "eos_token_id": eos,
                      "trained_here": tokenizer_from is None},
        "token_dtype": np.dtype(dtype).name, "splits": splits,
        "tokens": sum(s["tokens"] for s in splits.values()), "groups": stats,
    }
    # Written last and renamed into place: its presence says the folder is complete (a retry reuses it).
    (out / "manifest.json.tmp").write_text(json.dumps(manifest, indent=2))
    os.replace(out / "manifest.json.tmp", out / "manifest.json")
    return Prepared(directory=out, manifest=manifest)


def _write_split(out: Path, split: str, docs: list[tuple[int, str]], tokenizer, eos: int, dtype, stats: list[dict],
                 *, weights: list[float] | None) -> dict:
    """Tokenize each document once; with mixture weights, write it as many times as its weight says."""
    shards, buffer, count, written = [], [], 0, 0

    def flush():
        nonlocal buffer, count
        if not buffer:
            return
        name = f"{split}_{len(shards):03d}.bin"
        array = np.concatenate(buffer).astype(dtype)
        array.tofile(out / name)
        shards.append({"file": name, "tokens": int(array.size), "sha256": sha256_file(out / name)})
        buffer, count = [], 0

    for start in range(0, len(docs), 1024):
        chunk = docs[start:start + 1024]
        for (group, text), encoding in zip(chunk, tokenizer.encode_batch([text for _, text in chunk])):
            ids = np.asarray(encoding.ids + [eos], dtype=np.int64)
            stats[group]["tokens"] += ids.size
            repeats = 1 if weights is None else _repeats(text, weights[group])
            if weights is not None:
                stats[group]["train_tokens_weighted"] += ids.size * repeats
            for _ in range(repeats):
                buffer.append(ids)
                count += ids.size
            written += repeats
            if count >= SHARD_TOKENS:
                flush()
    flush()
    return {"documents": written, "tokens": sum(s["tokens"] for s in shards), "shards": shards}


def stdlib_corpus() -> tuple[list[Path], str]:
    """The Python standard library's own sources: present on every machine, licensed PSF-2.0. Its folder may hold
    site-packages (third-party code under other licences): only the standard library's own entries are taken."""
    root = Path(sysconfig.get_paths()["stdlib"])
    installed = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    entries = [p for p in sorted(root.iterdir()) if p.name not in ("site-packages", "dist-packages")
               and p.resolve() not in installed and (p.is_dir() or p.suffix == ".py")]
    return entries, "PSF-2.0"


def load_manifest(directory: Path) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.exists():
        raise DataError(f"{path} not found: run `python -m training prepare` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{path} is not valid JSON") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} has format_version {manifest.get('format_version')!r}; expected {FORMAT_VERSION}")
    return manifest


class TokenStream:
    """Fixed-length training windows drawn from memory-mapped shards in a seeded order.

    Window w covers T + 1 tokens of one shard (inputs and shifted targets).
    Sequence number s (counted over the whole run) maps to window perm_epoch[s % windows] with
    epoch = s // windows; so the data position is the single integer `cursor`.
    """

    def __init__(self, directory: Path, split: str, seq_len: int, *, seed: int, shuffle: bool = True):
        manifest = load_manifest(directory)
        if split not in manifest["splits"]:
            raise DataError(f"{directory} has no {split!r} split")
        dtype = np.dtype(manifest["token_dtype"])
        arrays = []
        for shard in manifest["splits"][split]["shards"]:
            path = Path(directory) / shard["file"]
            if not path.exists() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise DataError(f"{path} is missing or truncated; prepare the data again")
            arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        # Windows never straddle shards, so no shard is ever copied into memory.
        self.shards = arrays
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        per_shard = [max(0, (len(a) - 1) // seq_len) for a in arrays]
        self.shard_starts = np.cumsum([0] + per_shard)
        self.windows = int(self.shard_starts[-1])
        if self.windows < 1:
            raise DataError(f"the {split} split has {sum(len(a) for a in arrays)} tokens, too few for one window "
                            f"of {seq_len}; use a shorter --seq-len or more data")
        self._epoch, self._perm = None, None
        self.vocab_size = manifest["tokenizer"]["vocab_size"]

    def _window(self, sequence: int) -> int:
        epoch, index = divmod(sequence, self.windows)
        if not self.shuffle:
            return index
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._epoch = torch.randperm(self.windows, generator=generator), epoch
        return int(self._perm[index])

    def batch(self, first_sequence: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for sequence in range(first_sequence, first_sequence + batch_size):
            window = self._window(sequence)
            shard = int(np.searchsorted(self.shard_starts, window, side="right")) - 1
            start = (window - int(self.shard_starts[shard])) * self.seq_len
            rows.append(torch.from_numpy(self.shards[shard][start:start + self.seq_len + 1].astype(np.int64)))
        data = torch.stack(rows)
        # Contiguous, so that pinning them makes an asynchronous copy to a GPU: a strided tensor is first cloned
        # to pageable memory, and a copy from there waits for everything queued on the stream.
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()
