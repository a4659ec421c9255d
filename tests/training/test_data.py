import hashlib
import json
import re

import numpy as np
import pytest
from transformers import AutoTokenizer

from training.data import DataError, TokenStream, prepare, scan_personal_data
from training.tokenizer import EOS, load_tokenizer

PERSONAL = """Contact jane.doe@example.com or ops@corp.example.org.
Call +1 415-555-0132 or (212) 555-0199.
Servers 10.0.0.12 and 192.168.1.254. are up; 999.1.1.1 is not an address, nor are 3.11.7 and 1.2.3.4.5.
key AKIAIOSFODNN7EXAMPLE and token ghp_abcdefghijklmnopqrstuvwxyz0123456789 leaked.
-----BEGIN RSA PRIVATE KEY-----
"""


def test_personal_data_is_counted_by_kind():
    counts = {}
    scan_personal_data(PERSONAL, counts, redact=False)
    assert counts == {"email": 2, "phone": 2, "ip_address": 2, "secret_key": 3}


def test_redaction_replaces_each_find():
    counts = {}
    text = scan_personal_data(PERSONAL, counts, redact=True)
    assert "jane.doe@example.com" not in text and text.count("<EMAIL>") == 2
    assert text.count("<PHONE>") == 2 and text.count("<IP_ADDRESS>") == 2 and text.count("<SECRET>") == 3
    assert "999.1.1.1" in text and "3.11.7" in text and "1.2.3.4.5" in text


def _corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    body = "def f(x):\n    return x * 2\n" * 40
    (src / "a.txt").write_text(body + "mail me: someone@example.com\n")
    (src / "b.txt").write_text(body + "mail me: someone@example.com\n")  # exact duplicate of a.txt
    (src / "c.md").write_text("# Notes\n" + "the quick brown fox jumps over the lazy dog\n" * 60)
    rows = [{"text": "hello world " * 50}, {"text": "hello world " * 50}, {"text": "server at 10.1.2.3 " * 20}]
    (src / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return src


def test_prepare_writes_shards_and_an_honest_manifest(tmp_path):
    src = _corpus(tmp_path)
    prepared = prepare([src], tmp_path / "out", vocab_size=300, val_fraction=0.2, license="CC-BY-4.0")
    m = prepared.manifest
    assert m["documents"] == 6 and m["documents_kept"] == 4
    assert m["exact_duplicates_removed"] == 2 and m["exact_duplicate_rate"] == pytest.approx(2 / 6)
    assert m["personal_data_found"] == {"email": 1, "phone": 0, "ip_address": 20, "secret_key": 0}
    assert [s["path"].rsplit("/", 1)[1] for s in m["sources"]] == ["a.txt", "b.txt", "c.md", "d.jsonl"]
    for source in m["sources"]:
        with open(source["path"], "rb") as fh:
            assert source["sha256"] == hashlib.sha256(fh.read()).hexdigest()
        assert source["license"] == "CC-BY-4.0"
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 4
    assert m["splits"]["val"]["documents"] >= 1
    for split in m["splits"].values():
        for shard in split["shards"]:
            data = np.fromfile(tmp_path / "out" / shard["file"], dtype=np.uint16)
            assert data.size == shard["tokens"]
            assert shard["sha256"] == hashlib.sha256((tmp_path / "out" / shard["file"]).read_bytes()).hexdigest()
    assert m["tokens"] == m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]


def test_tokenizer_round_trips_and_loads_with_auto_tokenizer(data_dir):
    text = "def main(argv):\n    return {'ok': True}  # ünïcode ✓\n"
    ours = load_tokenizer(data_dir)
    assert ours.decode(ours.encode(text).ids) == text
    hf = AutoTokenizer.from_pretrained(str(data_dir), local_files_only=True)
    assert hf.encode(text) == ours.encode(text).ids
    assert hf.decode(hf.encode(text)) == text
    assert hf.eos_token == EOS and hf.pad_token == "<|pad|>"
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>\nhi<|endoftext|>\n<|assistant|>\n"


def test_stream_is_deterministic_and_shifted(data_dir):
    a = TokenStream(data_dir, "train", 32, seed=7)
    b = TokenStream(data_dir, "train", 32, seed=7)
    x1, y1 = a.batch(100, 4)
    x2, y2 = b.batch(100, 4)
    assert torch_equal(x1, x2) and torch_equal(y1, y2)
    assert torch_equal(x1[:, 1:], y1[:, :-1])
    assert not torch_equal(a.batch(0, 4)[0], TokenStream(data_dir, "train", 32, seed=8).batch(0, 4)[0])


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n') and p / "bad.jsonl", "bad.jsonl:2 is not valid JSON"),
    (lambda p: (p / "f.jsonl").write_text('{"body": "x"}\n') and p / "f.jsonl", "has no string field 'text'"),
])
def test_bad_inputs_fail_clearly(tmp_path, setup, message):
    with pytest.raises(DataError, match=message):
        prepare([setup(tmp_path)], tmp_path / "out", vocab_size=300)


def test_truncated_shard_is_refused(tmp_path):
    prepared = prepare([_corpus(tmp_path)], tmp_path / "out", vocab_size=300)
    shard = tmp_path / "out" / prepared.manifest["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match="is missing or truncated; prepare the data again"):
        TokenStream(tmp_path / "out", "train", 16, seed=0)


def test_cli_prepare_one_line_errors(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "training", "prepare", str(tmp_path / "nope"), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {tmp_path / 'nope'} does not exist"


def test_mixture_weights_and_per_dataset_facts(tmp_path):
    from training.data import InputGroup

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for i in range(40):
        (a / f"{i}.txt").write_text(f"alpha document number {i} " * 20)
        (b / f"{i}.txt").write_text(f"beta document {i} with mail b{i}@example.com " * 5)
    (b / "dup.txt").write_text("alpha document number 3 " * 20)  # duplicates a/3.txt across datasets
    prepared = prepare([], tmp_path / "out", vocab_size=300, val_fraction=0.1, groups=[
        InputGroup("org/alpha", [a], weight=2.0, license="CC-BY-4.0"),
        InputGroup("org/beta", [b], weight=0.5, license="MIT")])
    alpha, beta = prepared.manifest["groups"]
    assert (alpha["documents"], alpha["documents_kept"], alpha["exact_duplicates_removed"]) == (40, 40, 0)
    assert (beta["documents"], beta["documents_kept"], beta["exact_duplicates_removed"]) == (41, 40, 1)
    assert beta["personal_data_found"]["email"] == 40 * 5 and alpha["personal_data_found"]["email"] == 0
    assert 0 < alpha["train_tokens"] < alpha["tokens"]  # the rest is in the validation split, never repeated
    assert alpha["train_tokens_weighted"] == 2 * alpha["train_tokens"]
    assert 0.25 * beta["train_tokens"] < beta["train_tokens_weighted"] < 0.75 * beta["train_tokens"]
    assert prepared.manifest["splits"]["train"]["tokens"] == alpha["train_tokens_weighted"] + beta["train_tokens_weighted"]
    assert prepared.manifest["license"] == "CC-BY-4.0, MIT"
    for weight in (0, -1, float("inf"), float("nan")):
        with pytest.raises(DataError, match="mixture weight must be a positive number"):
            prepare([], tmp_path / "bad", groups=[InputGroup("x", [a], weight=weight)])
    assert not (tmp_path / "bad").exists()


@pytest.fixture
def work(tmp_path):
    """A folder of the test's own, so that "nothing else was written" can be checked: the suite's conftest also
    makes a storage folder in tmp_path."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


# --- personal data: what else is found, and what code is left alone ---

KEY_BODY = ["MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun",
            "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK"]
PRIVATE_KEY = "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(KEY_BODY) + "\n-----END RSA PRIVATE KEY-----\n"


def test_a_private_key_is_one_secret_from_begin_to_end():
    counts = {}
    text = scan_personal_data("before\n" + PRIVATE_KEY + "after\n", counts, redact=True)
    assert counts["secret_key"] == 1 and text == "before\n<SECRET>\nafter\n"
    cut_short = scan_personal_data("-----BEGIN PRIVATE KEY-----\n" + "\n".join(KEY_BODY) + "\nthe end\n", {},
                                   redact=True)
    assert cut_short == "<SECRET>\nthe end\n"  # no END line: the body still goes


def test_international_phones_aws_secrets_and_ipv6_are_found():
    text = ("Call +44 20 7946 0958 or +49 30 1234567.\n"
            "aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
            'AWS_SECRET_ACCESS_KEY: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"\n'
            "hosts 2001:db8::8a2e:370:7334, fe80::1 and 2001:0db8:85a3:0000:0000:8a2e:0370:7334\n")
    counts = {}
    redacted = scan_personal_data(text, counts, redact=True)
    assert counts == {"email": 0, "phone": 2, "ip_address": 3, "secret_key": 2}
    assert redacted == ("Call <PHONE> or <PHONE>.\n<SECRET>\n<SECRET>\n"
                        "hosts <IP_ADDRESS>, <IP_ADDRESS> and <IP_ADDRESS>\n")


def test_code_that_looks_like_personal_data_is_left_alone():
    code = ("evens, backwards, step = x[0::2], s[::-1], a[1::2]\n"
            "started = '12:30:45'  # see Example:: and version 3.11.7\n"
            "mask = +4294967296 + 1e+10; order_id = 4155550100\n"
            "loopback = '::1'; mac = '00:1a:2b:3c:4d:5e'\n")
    counts = {}
    assert scan_personal_data(code, counts, redact=True) == code
    assert counts == {"email": 0, "phone": 0, "ip_address": 0, "secret_key": 0}


# --- mixture files ---

@pytest.mark.parametrize("spec, message", [
    ([{"name": "A", "paths": "/tmp/x"}], r"dataset 1 \(A\): paths must be a non-empty list of strings, not '/tmp/x'"),
    ([{"name": "A", "paths": []}], "paths must be a non-empty list of strings, not"),
    ([{"name": "A", "paths": ["/tmp/x", 3]}], "paths must be a non-empty list of strings"),
    ([{"name": "A", "paths": ["/tmp/x"], "weight": "inf"}], "weight must be a positive number, not 'inf'"),
    ('[{"name": "A", "paths": ["/tmp/x"], "weight": Infinity}]', "weight must be a positive number, not inf"),
    ('[{"name": "A", "paths": ["/tmp/x"], "weight": NaN}]', "weight must be a positive number, not nan"),
    ([{"name": "A", "paths": ["/tmp/x"], "weight": 0}], "weight must be a positive number, not 0"),
    ([{"name": "A", "paths": ["/tmp/x"], "weight": True}], "weight must be a positive number, not True"),
    ([{"name": "", "paths": ["/tmp/x"]}], "dataset 1: name must be a non-empty string, not ''"),
    ([{"paths": ["/tmp/x"]}], "dataset 1: name must be a non-empty string, not None"),
    ([{"name": "A", "paths": ["/a"]}, {"name": "A", "paths": ["/b"]}], "dataset 2: name 'A' is given twice"),
    ([{"name": "A", "paths": ["/a"], "weigth": 2}], r"dataset 1 has unknown keys \['weigth'\]"),
    ([{"name": "A", "paths": ["/a"], "license": ["MIT"]}], "license must be a string"),
    (["A"], "dataset 1 is not an object"),
    ([], "expected a non-empty JSON list"),
    ('{"name": "A"', "is not valid JSON"),
])
def test_a_mixture_file_that_does_not_say_what_to_read_is_refused_before_anything_is_written(work, capsys,
                                                                                           spec, message):
    from training.cli import main

    mixture = work / "m.json"
    mixture.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    assert main(["prepare", "--mixture", str(mixture), "--out", str(work / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --mixture {mixture}") and re.search(message, err)
    assert sorted(p.name for p in work.iterdir()) == ["m.json"]


def test_a_good_mixture_file_keeps_each_datasets_licence(work, capsys):
    from training.cli import main

    a, b = _docs(work / "a", 6, "alpha"), _docs(work / "b", 6, "beta")
    mixture = work / "m.json"
    mixture.write_text(json.dumps([{"name": "A", "paths": [str(a)], "weight": 2, "license": "MIT"},
                                   {"name": "B", "paths": [str(b)], "license": "CC-BY-4.0"}]))
    assert main(["prepare", "--mixture", str(mixture), "--out", str(work / "out"), "--vocab-size", "300"]) == 0
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    assert [(g["name"], g["weight"], g["license"]) for g in manifest["groups"]] == [("A", 2.0, "MIT"),
                                                                                  ("B", 1.0, "CC-BY-4.0")]
    assert manifest["license"] == "CC-BY-4.0, MIT"


# --- one kind of input at a time: a licence given for one must not relabel another's files ---

@pytest.mark.parametrize("extra, message", [
    (["--demo-corpus", "stdlib"], "input paths and --demo-corpus cannot be combined: to combine datasets, each with "
                                  "its own licence, list them in a --mixture file"),
    (["--mixture", "m.json"], "input paths and --mixture cannot be combined: to combine datasets, each with its "
                              "own licence, list them in a --mixture file"),
])
def test_the_demo_corpus_or_a_mixture_with_input_paths_is_refused(work, capsys, extra, message):
    from training.cli import main

    mine = _docs(work / "mine", 3, "my own words")
    assert main(["prepare", str(mine), "--license", "CC-BY-NC-4.0", "--out", str(work / "out"), *extra]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (work / "out").exists()


def test_a_licence_for_the_demo_corpus_is_refused(work, capsys):
    from training.cli import main

    assert main(["prepare", "--demo-corpus", "stdlib", "--license", "MIT", "--out", str(work / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: --license is for input paths: --demo-corpus stdlib is PSF-2.0")
    assert not (work / "out").exists()


# --- where the output goes ---

def _docs(folder, count, words="document"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{i}.txt").write_text(f"{words} number {i} " * 30)
    return folder


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_out_folder_that_is_not_a_prepared_dataset_is_left_untouched(work):
    src = _docs(work / "src", 4)
    export = work / "export"  # an exported model: it also holds tokenizer.json and manifest.json
    export.mkdir()
    (export / "tokenizer.json").write_text("{}")
    (export / "manifest.json").write_text(json.dumps({"format_version": 1, "files": {}}))
    project = work / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    for out in (export, project):
        before = _tree(out)
        with pytest.raises(DataError, match=f"--out {out} is not empty and holds no earlier prepared dataset"):
            prepare([src], out, vocab_size=300)
        assert _tree(out) == before
    with pytest.raises(DataError, match="is a file: give an empty or new folder"):
        prepare([src], project / "notes.txt", vocab_size=300)
    assert sorted(p.name for p in work.iterdir()) == ["export", "project", "src"]  # no temporary folder left


def test_preparing_again_replaces_an_earlier_dataset_whole(work):
    src, out = _docs(work / "src", 4), work / "out"
    prepare([src], out, vocab_size=300)
    (out / "val_001.bin").write_bytes(b"stale")  # a shard the new dataset does not have
    (work / "out").mkdir(exist_ok=True)
    prepared = prepare([src], out, vocab_size=320)
    assert prepared.manifest["tokenizer"]["vocab_size"] <= 320
    assert json.loads((out / "manifest.json").read_text())["tokenizer"] == prepared.manifest["tokenizer"]
    assert not (out / "val_001.bin").exists()
    assert sorted(p.name for p in work.iterdir()) == ["out", "src"]
    empty = work / "empty"
    empty.mkdir()
    assert prepare([src], empty, vocab_size=300).manifest["documents"] == 4


def test_an_out_inside_an_input_folder_is_never_read_as_input(work):
    src = _docs(work / "src", 4)
    first = prepare([src], src / "prepared", vocab_size=300).manifest
    second = prepare([src], src / "prepared", vocab_size=300).manifest  # its manifest and tokenizer are .json files
    assert first["documents"] == second["documents"] == 4
    assert [s["path"] for s in second["sources"]] == [s["path"] for s in first["sources"]]
    before = _tree(src)
    with pytest.raises(DataError, match=f"input {src / 'prepared'} is inside --out"):
        prepare([src / "prepared"], src / "prepared", vocab_size=300)
    assert _tree(src) == before


def test_an_interrupted_prepare_leaves_the_earlier_dataset_and_no_temporary_folder(work, monkeypatch):
    import training.data as data

    src, out = _docs(work / "src", 4), work / "out"
    prepare([src], out, vocab_size=300)
    before = _tree(out)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the shards are being written

    monkeypatch.setattr(data, "_write_split", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], out, vocab_size=320)
    assert _tree(out) == before
    with pytest.raises(KeyboardInterrupt):
        prepare([src], work / "new", vocab_size=320)
    assert sorted(p.name for p in work.iterdir()) == ["out", "src"]


# --- too little data, and settings that cannot train ---

@pytest.mark.parametrize("files, message", [
    ({"empty.txt": ""}, "found 0 documents with text after removing exact duplicates; training needs at least 2"),
    ({"one.txt": "only one document here"}, "found 1 document with text"),
    ({"one.txt": "one", "blank.txt": " \n\t\n", "same.txt": "one"}, "found 1 document with text"),
    ({"rows.jsonl": '{"text": "one"}\n{"text": "   "}\n'}, "found 1 document with text"),
])
def test_too_few_documents_to_train_on_are_refused(work, files, message):
    src = work / "src"
    src.mkdir()
    for name, text in files.items():
        (src / name).write_text(text)
    with pytest.raises(DataError, match=message):
        prepare([src], work / "out", vocab_size=300)
    assert sorted(p.name for p in work.iterdir()) == ["src"]


def test_an_empty_file_is_listed_but_is_no_document(work):
    src = _docs(work / "src", 3)
    (src / "blank.txt").write_text("\n  \n")
    m = prepare([src], work / "out", vocab_size=300).manifest
    assert m["documents"] == 3 and m["splits"]["train"]["documents"] >= 1 and m["splits"]["val"]["documents"] >= 1
    assert {s["path"].rsplit("/", 1)[1]: s["documents"] for s in m["sources"]}["blank.txt"] == 0


@pytest.mark.parametrize("options, message", [
    (dict(val_fraction=0.0), "--val-fraction must be above 0 and at most 0.5, not 0.0"),
    (dict(val_fraction=0.6), "--val-fraction must be above 0 and at most 0.5, not 0.6"),
    (dict(val_fraction=float("nan")), "--val-fraction must be above 0 and at most 0.5, not nan"),
    (dict(max_bytes=0), "--max-bytes must be a positive integer, not 0"),
    (dict(max_bytes=-5), "--max-bytes must be a positive integer, not -5"),
])
def test_settings_that_cannot_make_a_trainable_dataset_are_refused(work, options, message):
    src = _docs(work / "src", 4)
    with pytest.raises(DataError, match=message):
        prepare([src], work / "out", vocab_size=300, **options)
    assert sorted(p.name for p in work.iterdir()) == ["src"]


# --- reading: JSONL lines, encodings, binary files ---

def test_jsonl_records_end_at_newlines_only_and_a_bom_is_not_text(work):
    src = work / "src"
    src.mkdir()
    texts = ["first\u2028line\u2029break\x85next " * 10, "second record " * 10, "third, ünïcode ✓ " * 10]
    body = "\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\r\n"
    (src / "rows.jsonl").write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    (src / "bom.txt").write_bytes(b"\xef\xbb\xbf" + b"a text file with a byte order mark " * 10)
    m = prepare([src], work / "out", vocab_size=300).manifest
    assert {s["path"].rsplit("/", 1)[1]: s["documents"] for s in m["sources"]} == {"bom.txt": 1, "rows.jsonl": 3}
    assert all(s["undecodable_bytes"] == 0 for s in m["sources"])
    ids = np.concatenate([np.fromfile(work / "out" / shard["file"], dtype=np.uint16)
                          for split in m["splits"].values() for shard in split["shards"]])
    decoded = load_tokenizer(work / "out").decode(ids.tolist(), skip_special_tokens=False)
    assert texts[0] in decoded and "\ufeff" not in decoded


def test_undecodable_bytes_are_counted_and_binary_files_in_folders_skipped(work, capsys):
    from training.cli import main

    src = _docs(work / "src", 3)
    (src / "latin1.txt").write_bytes("café crème brûlée ".encode("latin-1") * 10)  # 4 bytes a copy are not UTF-8
    (src / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert main(["prepare", str(src), "--out", str(work / "out"), "--vocab-size", "300"]) == 0
    m = json.loads((work / "out" / "manifest.json").read_text())
    sources = {s["path"].rsplit("/", 1)[1]: s for s in m["sources"]}
    assert (sources["latin1.txt"]["undecodable_bytes"], sources["latin1.txt"]["documents"]) == (40, 1)
    assert (sources["image.txt"]["skipped"], sources["image.txt"]["documents"]) == ("binary", 0)
    assert sources["0.txt"]["undecodable_bytes"] == 0 and sources["0.txt"]["skipped"] == ""
    assert m["documents"] == 4
    err = capsys.readouterr().err
    assert err == (f"warning: 40 bytes that are not UTF-8 (read as U+FFFD) in 1 files; 1 binary files skipped: "
                   f"see sources in {work / 'out' / 'manifest.json'}\n")


def test_a_binary_file_given_by_name_is_refused(work):
    src = _docs(work / "src", 3)
    (work / "model.bin").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(DataError, match=f"{work / 'model.bin'} is binary \\(it holds NUL bytes\\)"):
        prepare([src, work / "model.bin"], work / "out", vocab_size=300)
    assert not (work / "out").exists()


# --- loading a manifest that is cut short ---

def test_a_manifest_missing_its_splits_is_one_clear_error(work):
    prepare([_docs(work / "src", 4)], work / "out", vocab_size=300)
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    del manifest["splits"]
    (work / "out" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest.json is not a complete dataset manifest \(KeyError: 'splits'\)"):
        TokenStream(work / "out", "train", 16, seed=0)
