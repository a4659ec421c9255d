import hashlib
import json

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
    prepared = prepare([], tmp_path / "out", vocab_size=300, val_fraction=0.0, groups=[
        InputGroup("org/alpha", [a], weight=2.0, license="CC-BY-4.0"),
        InputGroup("org/beta", [b], weight=0.5, license="MIT")])
    alpha, beta = prepared.manifest["groups"]
    assert (alpha["documents"], alpha["documents_kept"], alpha["exact_duplicates_removed"]) == (40, 40, 0)
    assert (beta["documents"], beta["documents_kept"], beta["exact_duplicates_removed"]) == (41, 40, 1)
    assert beta["personal_data_found"]["email"] == 40 * 5 and alpha["personal_data_found"]["email"] == 0
    assert alpha["train_tokens_weighted"] == 2 * alpha["tokens"]
    assert 0.25 * beta["tokens"] < beta["train_tokens_weighted"] < 0.75 * beta["tokens"]
    assert prepared.manifest["splits"]["train"]["tokens"] == alpha["train_tokens_weighted"] + beta["train_tokens_weighted"]
    assert prepared.manifest["license"] == "CC-BY-4.0, MIT"
    with pytest.raises(DataError, match="mixture weight must be positive"):
        prepare([], tmp_path / "bad", groups=[InputGroup("x", [a], weight=0)])
