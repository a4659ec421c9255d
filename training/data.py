"""Data preparation and loading.

`prepare` reads text files, folders and JSONL, removes exact-duplicate documents, counts (and optionally
redacts) personal data, splits train/validation by a stable hash, trains or reuses a tokenizer, and writes
memory-mapped token shards plus manifest.json. `TokenStream` serves deterministic batches from the shards;
its position is one integer, so a resumed run sees exactly the batches it would have seen.
"""
import hashlib
import json
import math
import re
import shutil
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.files import check_replaceable, replace_folder, sha256_file
from training.tokenizer import EOS, load_tokenizer, save_tokenizer, train_tokenizer

FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".csv", ".html", ".tex")
SHARD_TOKENS = 64 * 1024 * 1024

# Personal data and secrets. Conservative patterns: a false "found" is cheaper than a missed key. The demo corpus is
# Python source, so each pattern must also leave code alone: version numbers, slices, times, numeric literals.

# IPv6: all eight groups, or one "::" with three groups or more or with a four-digit group ("fe80::1"). Code is full
# of short "::" forms (x[1::2], "Example::") and of times (12:30:45), which this leaves alone; so are "::1" and forms
# that start or end with "::", which name no one host.
_GROUP = "[0-9A-Fa-f]{1,4}"
# Every form starts with a group and a colon: checked first, it spares the rest at most positions (a third faster).
_IPV6 = (rf"(?<![\w:.])(?={_GROUP}:)(?:(?:{_GROUP}:){{7}}{_GROUP}"
         r"|(?=[0-9A-Fa-f:]*(?<![0-9A-Fa-f])[0-9A-Fa-f]{4}(?![0-9A-Fa-f])|(?:[0-9A-Fa-f]{1,4}::?){2}[0-9A-Fa-f])"
         rf"(?:{_GROUP}:){{1,6}}(?::{_GROUP}){{1,6}})(?![\w:])")

PII_PATTERNS = {
    "email": re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"),
    # A sentence may end right after a number ("call 415-555-0100."), a version number may not (1.2.3.4.5).
    # International numbers ("+44 20 7946 0958") are 8 to 15 digits after the "+", split by single spaces, dots or
    # dashes, with a space or dash after the country code: "+4294967296" is a number in code. An unsplit run of digits
    # ("4155550100") is as likely an id or a count, so it is left alone.
    "phone": re.compile(r"(?<![\w.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w|\.\d)"
                        r"|(?=\+)(?<![\w+])\+(?=\d{1,3}[ -])\d(?:[ .-]?\d){7,14}(?![ .-]?\d|\w)"),
    "ip_address": re.compile(
        r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?!\w|\.\d)|" + _IPV6),
    "secret_key": re.compile(
        r"\b(?:AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36}|hf_[A-Za-z0-9]{34}|sk-[A-Za-z0-9_-]{20,}"
        r"|xox[abpr]-[A-Za-z0-9-]{10,})\b"
        # An AWS secret key is 40 characters with no prefix of its own: only the name it is assigned to gives it away.
        r"|(?i:(?:aws_?)?secret_?access_?key)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])[\"']?"
        # A private key is one secret from BEGIN to END; one cut off before its END still loses the lines of its body.
        r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
        r"(?:[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----|(?:\r?\n[A-Za-z0-9+/=]{16,})*)"),
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
    undecodable_bytes: int = 0  # not UTF-8: each was read as U+FFFD
    skipped: str = ""  # why a file found in a folder was not read ("binary")


@dataclass
class Prepared:
    directory: Path
    manifest: dict = field(default_factory=dict)


def scan_personal_data(text: str, counts: dict[str, int], *, redact: bool) -> str:
    for kind, pattern in PII_PATTERNS.items():
        text, found = pattern.subn(REDACTIONS[kind], text) if redact else (text, len(pattern.findall(text)))
        counts[kind] = counts.get(kind, 0) + found
    return text


def _decode(data: bytes) -> tuple[str, int]:
    """The text, and how many bytes were not UTF-8 (each read as U+FFFD). A BOM at the start is not text."""
    try:
        return data.decode("utf-8-sig"), 0
    except UnicodeDecodeError:
        escaped = data.decode("utf-8-sig", errors="surrogateescape")
        return data.decode("utf-8-sig", errors="replace"), sum(1 for c in escaped if "\udc80" <= c <= "\udcff")


def _inside(path: Path, folders: list[Path]) -> bool:
    return any(path.resolve().is_relative_to(folder) for folder in folders)


def read_documents(paths: list[Path], *, text_field: str, license: str, max_bytes: int | None,
                   exclude: tuple[Path, ...] = ()):
    """Yield (source, document text) pairs: one document per text file, one per JSONL line. A file that holds no
    document (empty, or binary in a folder) is yielded once with None, so that the manifest still lists it.
    Files under `exclude` (the output being written) are never read."""
    exclude = [Path(folder).resolve() for folder in exclude]
    files: list[tuple[Path, bool]] = []  # (file, given by name)
    for path in paths:
        path = Path(path)
        if path.exists() and _inside(path, exclude):
            raise DataError(f"input {path} is inside --out, which prepare replaces: give another --out")
        if path.is_dir():
            files.extend((p, False) for p in sorted(path.rglob("*")) if p.is_file()
                         and p.suffix in TEXT_SUFFIXES + (".jsonl",) and not _inside(p, exclude))
        elif path.is_file():
            files.append((path, True))
        else:
            raise DataError(f"{path} does not exist")
    if not files:
        raise DataError("no input files found (looked for " + ", ".join(TEXT_SUFFIXES + (".jsonl",)) + ")")
    total = 0
    for file, named in files:
        size = file.stat().st_size
        if max_bytes is not None and total + size > max_bytes and total > 0:
            break
        data = file.read_bytes()
        source = Source(path=str(file), sha256=hashlib.sha256(data).hexdigest(), bytes=size, license=license)
        if b"\0" in data:  # no text file holds NUL bytes: an image, an archive, a UTF-16 file
            if named:
                raise DataError(f"{file} is binary (it holds NUL bytes): give text or JSONL files")
            source.skipped = "binary"
            yield source, None
            continue
        total += size
        raw, source.undecodable_bytes = _decode(data)
        if file.suffix == ".jsonl":
            # Records end at "\n" only: str.splitlines() would also break inside strings at U+2028 and the like.
            for number, line in enumerate(raw.split("\n"), 1):
                line = line.removesuffix("\r")
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{file}:{number} is not valid JSON") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise DataError(f"{file}:{number} has no string field {text_field!r} (set --text-field)")
                if record[text_field].strip():
                    source.documents += 1
                    yield source, record[text_field]
        elif raw.strip():
            source.documents += 1
            yield source, raw
        if not source.documents:
            yield source, None


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


def load_mixture(path: Path) -> list[InputGroup]:
    """A --mixture file: a JSON list of {"name", "paths", "weight", "license"}, one entry per dataset."""
    try:
        spec = json.loads(Path(path).read_text())
    except OSError as exc:
        raise DataError(f"--mixture {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise DataError(f"--mixture {path} is not valid JSON ({exc})") from None
    if not isinstance(spec, list) or not spec:
        raise DataError(f'--mixture {path}: expected a non-empty JSON list of {{"name", "paths", "weight", "license"}}')
    groups = []
    for number, entry in enumerate(spec, 1):
        where = f"--mixture {path}: dataset {number}"
        if not isinstance(entry, dict):
            raise DataError(f'{where} is not an object {{"name", "paths", "weight", "license"}}')
        unknown = sorted(set(entry) - {"name", "paths", "weight", "license"})
        if unknown:  # a misspelt "weigth" would otherwise be dropped without a word
            raise DataError(f"{where} has unknown keys {unknown} (expected name, paths, weight, license)")
        name, paths = entry.get("name"), entry.get("paths")
        weight, license = entry.get("weight", 1), entry.get("license", "")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: name must be a non-empty string, not {name!r}")
        if name in (g.name for g in groups):
            raise DataError(f"{where}: name {name!r} is given twice")
        # A string would be read a character at a time: "/tmp/x" would scan "/".
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
            raise DataError(f"{where} ({name}): paths must be a non-empty list of strings, not {paths!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0 < weight < math.inf):
            raise DataError(f"{where} ({name}): weight must be a positive number, not {weight!r}")
        if not isinstance(license, str):
            raise DataError(f"{where} ({name}): license must be a string, not {license!r}")
        groups.append(InputGroup(name=name, paths=[Path(p) for p in paths], weight=float(weight), license=license))
    return groups


def _repeats(text: str, weight: float) -> int:
    whole, fraction = int(weight), weight - int(weight)
    digest = hashlib.blake2b(b"mix" + text.encode("utf-8", errors="replace"), digest_size=8).digest()
    return whole + (1 if int.from_bytes(digest, "big") / 2**64 < fraction else 0)


def prepare(paths: list[Path], out: Path, *, vocab_size: int = 2048, val_fraction: float = 0.05,
            tokenizer_from: Path | None = None, redact: bool = False, license: str = "", text_field: str = "text",
            max_bytes: int | None = None, seq_len_hint: int = 2048, description: str = "",
            groups: list[InputGroup] | None = None) -> Prepared:
    """Prepare `paths` as one dataset, or a weighted mixture of `groups` with facts kept per group."""
    # Training checks its loss on the validation split, so an empty one would only be refused later, by `train`.
    if not 0 < val_fraction <= 0.5:
        raise DataError(f"--val-fraction must be above 0 and at most 0.5, not {val_fraction}")
    if max_bytes is not None and max_bytes < 1:
        raise DataError(f"--max-bytes must be a positive integer, not {max_bytes}")
    groups = groups or [InputGroup(name="data", paths=list(paths), license=license)]
    for group in groups:
        if not (math.isfinite(group.weight) and group.weight > 0):
            raise DataError(f"dataset {group.name!r}: mixture weight must be a positive number, not {group.weight}")
    out = Path(out)
    check_replaceable(out, earlier="prepared dataset", error=DataError, label=f"--out {out}",
                      is_earlier=lambda m: m.get("kind") == "gatehouse.training.dataset" and "splits" in m)
    # Written beside --out and renamed over it at the end: a failed or interrupted run leaves --out as it was.
    target = out.resolve()
    tmp = target.with_name(f".{target.name}.preparing")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run that was killed
    try:
        manifest = _prepare_into(tmp, groups, exclude=(out, tmp), vocab_size=vocab_size, val_fraction=val_fraction,
                                 tokenizer_from=tokenizer_from, redact=redact, text_field=text_field,
                                 max_bytes=max_bytes, seq_len_hint=seq_len_hint, description=description)
        replace_folder(tmp, target)  # an empty --out, or an earlier dataset
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(directory=out, manifest=manifest)


def _prepare_into(tmp: Path, groups: list[InputGroup], *, exclude: tuple[Path, ...], vocab_size: int,
                  val_fraction: float, tokenizer_from: Path | None, redact: bool, text_field: str,
                  max_bytes: int | None, seq_len_hint: int, description: str) -> dict:
    """Read, de-duplicate, split and tokenize the groups into the new folder `tmp`; return the manifest written."""
    seen: set[bytes] = set()
    stats = [{"name": g.name, "weight": g.weight, "license": g.license, "documents": 0, "documents_kept": 0,
              "exact_duplicates_removed": 0, "bytes": 0, "personal_data_found": {k: 0 for k in PII_PATTERNS},
              "tokens": 0, "train_tokens": 0, "train_tokens_weighted": 0, "sources": {}} for g in groups]
    train_docs, val_docs = [], []
    for index, group in enumerate(groups):
        stat = stats[index]
        for source, text in read_documents(group.paths, text_field=text_field, license=group.license,
                                           max_bytes=max_bytes, exclude=exclude):
            stat["sources"][source.path] = source
            if text is None:
                continue
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
    kept = len(train_docs) + len(val_docs)
    if kept < 2:
        raise DataError(f"found {kept} document{'' if kept == 1 else 's'} with text after removing exact duplicates; "
                        "training needs at least 2 (one to train on, one to validate on)")
    # Tiny corpora: each split keeps a document, whatever the hash says.
    if not val_docs:
        val_docs.append(train_docs.pop())
    if not train_docs:
        train_docs.append(val_docs.pop())

    if tokenizer_from is not None:
        tokenizer = load_tokenizer(tokenizer_from)
    else:
        tokenizer = train_tokenizer((text for _, text in train_docs), vocab_size)
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise DataError(f"the tokenizer has no {EOS} token")
    tmp.mkdir(parents=True)
    save_tokenizer(tokenizer, tmp, model_max_length=seq_len_hint)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32

    weights = [g.weight for g in groups]
    splits = {"train": _write_split(tmp, "train", train_docs, tokenizer, eos, dtype, stats, weights=weights),
              "val": _write_split(tmp, "val", val_docs, tokenizer, eos, dtype, stats, weights=None)}
    tokenizer_sha = sha256_file(tmp / "tokenizer.json")
    for stat in stats:
        stat["sources"] = [vars(s) for s in sorted(stat["sources"].values(), key=lambda s: s.path)]
        stat["exact_duplicate_rate"] = stat["exact_duplicates_removed"] / max(1, stat["documents"])
    source_rows = [row for stat in stats for row in stat["sources"]]
    pii = {kind: sum(stat["personal_data_found"][kind] for stat in stats) for kind in PII_PATTERNS}
    documents = sum(stat["documents"] for stat in stats)
    duplicates = sum(stat["exact_duplicates_removed"] for stat in stats)
    manifest = {
        "format_version": FORMAT_VERSION, "kind": "gatehouse.training.dataset", "created_at": time.time(),
        "description": description, "license": ", ".join(sorted({g.license for g in groups if g.license})),
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
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


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
                stats[group]["train_tokens"] += ids.size
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
        try:
            dtype = np.dtype(manifest["token_dtype"])
            self.vocab_size = int(manifest["tokenizer"]["vocab_size"])
            splits = manifest["splits"]
            shards = None if split not in splits else [(Path(directory) / shard["file"], int(shard["tokens"]))
                                                       for shard in splits[split]["shards"]]
        except (KeyError, TypeError, ValueError) as exc:  # a manifest edited by hand, or cut short
            raise DataError(f"{Path(directory) / 'manifest.json'} is not a complete dataset manifest "
                            f"({exc.__class__.__name__}: {exc}); prepare the data again") from None
        if shards is None:
            raise DataError(f"{directory} has no {split!r} split")
        arrays = []
        for path, tokens in shards:
            if not path.exists() or path.stat().st_size != tokens * dtype.itemsize:
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
