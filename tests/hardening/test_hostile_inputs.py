"""Hostile inputs through the HTTP layer: uploads, JSON bodies, model cards and inference parameters.

Each is refused with a clear 4xx whose message says what to do (our error shape on /api, OpenAI's on /v1) and
nothing is written: no version, no file row, no byte in weight storage, no metered call, nothing sent to an
inference backend. The service-level cases of tests/gatehouse/registry/test_ingest.py are not repeated here.
"""
import json
import pickle
import struct
import zipfile
from html.parser import HTMLParser
from io import BytesIO

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from gatehouse.registry.models import Model, ModelFile, ModelVersion
from releases.models import InferenceBackend, InferenceCall

VERSIONS = "/api/v1/models/aurora/m/versions"
CONFIG = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}).encode()


def _safetensors(header, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


F32_4 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
VALID_SAFETENSORS = _safetensors({"w": F32_4}, b"\0" * 16)


def _upload(client, files: dict[str, bytes], url=VERSIONS, **fields):
    data = {path: SimpleUploadedFile("blob", content) for path, content in files.items()}
    return client.post(url, {**data, **fields}, format="multipart")


def _error(response, status: int) -> str:
    assert response.status_code == status, response.content[:500]
    body = response.json()
    assert set(body) == {"error"} and body["error"]["status"] == status
    assert body["error"]["code"] and body["error"]["message"]
    return body["error"]["message"]


@pytest.fixture
def nothing_written(stored_files):
    def check():
        assert ModelVersion.objects.count() == 0
        assert ModelFile.objects.count() == 0
        assert not Model.objects.filter(organization__slug="aurora", name="m").exists()
        assert stored_files() == []
    return check


@pytest.fixture
def alice_api(aurora, alice, client_for):
    return client_for(alice, ("read", "write"))


def test_a_valid_upload_through_http_is_accepted(alice_api, stored_files):
    """The baseline the refusals below differ from: same client, same helper, a well-formed folder."""
    response = _upload(alice_api, {"config.json": CONFIG, "model.safetensors": VALID_SAFETENSORS})
    assert response.status_code == 202, response.content
    assert sorted(ModelFile.objects.values_list("path", flat=True)) == ["config.json", "model.safetensors"]
    assert len(stored_files()) == 2


# --- safetensors ------------------------------------------------------------------------------------------------

TORCH_LIKE_ZIP = BytesIO()
with zipfile.ZipFile(TORCH_LIKE_ZIP, "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps({"w": [0.0] * 4}))


@pytest.mark.parametrize("blob, expected", [
    (b"\x10\x00\x00", "shorter than the 8-byte header length"),  # truncated inside the length itself
    (struct.pack("<Q", 64) + b'{"w": {"dtype"', "but the file has only"),  # header cut off mid-JSON
    (struct.pack("<Q", 2**63) + b"{}", "more than the"),  # absurd header length
    (_safetensors({"w": {"dtype": "U8", "shape": [1_000_000], "data_offsets": [0, 1_000_000]}}, b"\0" * 16),
     "data region is 16 bytes"),  # offsets past the end of the file
    (_safetensors({"w": {"dtype": "U8", "shape": [2**62, 2**62], "data_offsets": [0, 2**63]}}, b"\0" * 16),
     "needs"),  # offsets and shape far beyond any file
    (pickle.dumps({"w": [0.0] * 64}, protocol=4), "pickle"),  # a pickle renamed to .safetensors
    (pickle.dumps({"w": [0.0] * 64}, protocol=2), "pickle"),
    (TORCH_LIKE_ZIP.getvalue(), "zip archive"),  # torch.save's zip-of-pickles, renamed
])
def test_hostile_safetensors_are_refused_over_http(alice_api, nothing_written, blob, expected):
    message = _error(_upload(alice_api, {"config.json": CONFIG, "model.safetensors": blob}), 400)
    assert expected in message
    assert "safetensors" in message and ("save_file" in message or "convert" in message)  # what to do
    nothing_written()


def test_a_header_over_the_configured_limit_is_refused(alice_api, nothing_written, settings):
    settings.SAFETENSORS_MAX_HEADER_BYTES = 1024
    header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(100)}
    message = _error(_upload(alice_api, {"model.safetensors": _safetensors(header, b"\0" * 100)}), 400)
    assert "more than the 1024-byte limit" in message
    nothing_written()


@pytest.mark.parametrize("path", ["weights.bin.safetensors", "data/blob.json", "tokenizer.model"])
def test_pickle_content_is_refused_whatever_the_file_is_called(alice_api, nothing_written, path):
    message = _error(_upload(alice_api, {"config.json": CONFIG, path: pickle.dumps([1, 2, 3])}), 400)
    assert "pickle" in message and "safetensors" in message
    nothing_written()


# --- archives -----------------------------------------------------------------------------------------------------
# A .zip is refused, not stored as opaque bytes: what is inside would escape everything the registry checks per
# file (paths, hashes, the pickle refusal, safetensors validation) while still reaching every downloader, and
# torch.save's own format is a zip of pickles. A model repository is a folder: upload its files one by one.

@pytest.mark.parametrize("path", ["weights.zip", "sub/Model.ZIP", "model.tar.gz", "model.tgz", "checkpoint.7z"])
def test_archives_are_refused_by_name(alice_api, nothing_written, path):
    archive = BytesIO()
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("../../escape.json", b"{}")
        handle.writestr("model.safetensors", VALID_SAFETENSORS)
    message = _error(_upload(alice_api, {"config.json": CONFIG, path: archive.getvalue()}), 400)
    assert "archive" in message and "one field per file" in message
    nothing_written()


def test_a_zip_under_another_name_is_refused_and_never_unpacked(alice_api, nothing_written, tmp_path):
    archive = BytesIO()
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("../../escape.json", b"{}")
    message = _error(_upload(alice_api, {"config.json": CONFIG, "assets/data.json": archive.getvalue()}), 400)
    assert "zip archive" in message
    nothing_written()
    assert not list(tmp_path.parent.rglob("escape.json"))


# --- file names ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, expected", [
    ("../escape.json", "contains '..'"),
    ("a/../../escape.json", "contains '..'"),
    ("..\uff0f..\uff0fescape.json", "looks like"),  # fullwidth solidus: NFKC turns it into '/'
    ("..\u2215..\u2215escape.json", "lookalike"),  # division slash
    ("sub\u2044model.safetensors", "lookalike"),  # fraction slash
    ("model\u202eNOSJ.safetensors", "invisible or direction"),  # right-to-left override
    ("con\u200dfig.json", "invisible or direction"),  # zero-width joiner
    ("config.json\ufeff", "invisible or direction"),  # byte-order mark
    ("\uff43onfig.json", "looks like 'config.json'"),  # fullwidth c
    ("a" * 256 + ".json", "255 bytes"),
    ("d/" + "\u00e9" * 130 + ".json", "255 bytes"),  # 130 characters but 260 bytes
    ("/".join(["d" * 200] * 3), "longer than"),
])
def test_hostile_file_names_are_refused(alice_api, nothing_written, path, expected):
    message = _error(_upload(alice_api, {"config.json": CONFIG, path: b"{}"}), 400)
    assert expected in message
    assert "rename" in message or "paths must" in message or "use '/'" in message
    nothing_written()


@pytest.mark.parametrize("first, second", [
    ("config.json", "CONFIG.json"),
    ("a/config.json", "a/./config.json"),
])
def test_paths_that_collide_are_refused(alice_api, nothing_written, first, second):
    message = _error(_upload(alice_api, {first: CONFIG, second: CONFIG}), 400)
    assert "duplicates" in message
    nothing_written()


# --- JSON files and bodies ----------------------------------------------------------------------------------------

def test_a_huge_config_json_is_refused(alice_api, nothing_written):
    config = b'{"architectures": ["LlamaForCausalLM"], "pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    message = _error(_upload(alice_api, {"config.json": config}), 400)
    assert "config.json is" in message and "at most" in message and "weights" in message
    nothing_written()


def test_a_deeply_nested_config_json_is_refused(alice_api, nothing_written):
    message = _error(_upload(alice_api, {"config.json": b"[" * 100_000 + b"]" * 100_000}), 400)
    assert "config.json" in message and "nested" in message
    nothing_written()


@pytest.mark.parametrize("lead, newline", [("", "\n"), ("\n\n", "\n"), ("", "\r\n"), ("  \n", "\r\n")])
def test_a_card_whose_yaml_expands_exponentially_is_refused(alice_api, nothing_written, lead, newline):
    """However the front matter is spelled (leading blank lines, CRLF), as long as the card parser reads it."""
    lines = ["---", 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    card = (lead + newline.join(lines + ["---", "# Model"])).encode()
    message = _error(_upload(alice_api, {"README.md": card, "config.json": CONFIG}), 400)
    assert "README.md" in message and "aliases" in message
    nothing_written()


@pytest.fixture
def json_endpoints(aurora, alice, register):
    version = register(aurora, "existing", alice)
    return [("post", "/api/v1/datasets"), ("put", f"/api/v1/models/aurora/existing/card"),
            ("post", f"/api/v1/models/aurora/existing/compute?revision={version.commit}")]


def test_json_bodies_beyond_the_upload_limit_are_refused(alice_api, json_endpoints, settings):
    from gatehouse.registry.models import ComputeRecord, Dataset

    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 64 * 1024
    body = json.dumps({"card": "x" * 100_000, "name": "d", "provenance": "synthetic", "organization": "aurora"})
    for method, url in json_endpoints:
        response = getattr(alice_api, method)(url, body, content_type="application/json")
        message = _error(response, 413)
        assert "65536 bytes" in message
    assert Dataset.objects.count() == 0 and ComputeRecord.objects.count() == 0
    assert Model.objects.get(name="existing").card_text == ""


@pytest.mark.parametrize("depth", [10_000, 200_000])
def test_deeply_nested_json_bodies_are_refused(alice_api, json_endpoints, depth):
    from gatehouse.registry.models import ComputeRecord, Dataset

    body = '{"card": ' + "[" * depth + "]" * depth + "}"
    for method, url in json_endpoints:
        message = _error(getattr(alice_api, method)(url, body, content_type="application/json"), 400)
        assert "nested" in message
    assert Dataset.objects.count() == 0 and ComputeRecord.objects.count() == 0


# --- model cards --------------------------------------------------------------------------------------------------

HOSTILE_CARD = """# Model

<script>alert('XSS-script')</script>
<img src=x onerror="alert('XSS-onerror')">
<svg onload="alert('XSS-svg')"><circle r="1"/></svg>
<iframe src="https://evil.example/XSS-iframe"></iframe>
<p style="background:url(javascript:alert('XSS-style'))">styled</p>
<a href="javascript:alert('XSS-anchor')">raw anchor</a>

[a javascript link](javascript:alert('XSS-mdlink'))
[an encoded one](jAvAsCrIpT&#58;alert('XSS-entity'))
[a data link](data:text/html;base64,PHNjcmlwdD5hbGVydCgnWFNTLWRhdGEnKTwvc2NyaXB0Pg==)
![a data image](data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoJ1hTUy1kYXRhaW1nJyk+)
![an svg image](data:image/png;base64,iVBORw0KGgo=)
<https://fine.example/ok>
[fine](https://fine.example/docs)
"""


class _Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.text_in: dict[str, list[str]] = {}
        self._stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self._stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self._stack:
            while self._stack and self._stack.pop() != tag:
                pass

    def handle_data(self, data):
        if self._stack:
            self.text_in.setdefault(self._stack[-1], []).append(data)


def _assert_nothing_active(html: str):
    parser = _Elements()
    parser.feed(html)
    for tag, attrs in parser.elements:
        assert tag not in ("iframe", "object", "embed") or "XSS" not in str(attrs), (tag, attrs)
        for name, value in attrs.items():
            assert not name.startswith("on") or "XSS" not in (value or ""), (tag, name, value)
            assert "XSS" not in (value or ""), (tag, name, value)
            if name in ("href", "src", "action", "formaction", "xlink:href"):
                assert not (value or "").strip().lower().startswith(("javascript:", "data:", "vbscript:")), (tag, value)
    for tag in ("script", "style", "svg", "iframe"):
        assert "XSS" not in "".join(parser.text_in.get(tag, [])), tag
    assert "https://fine.example/docs" in html  # the card itself was rendered


def test_hostile_markup_in_an_uploaded_card_never_reaches_the_page(aurora, alice, register, client):
    register(aurora, "m", alice, tier="open", body=HOSTILE_CARD)
    response = client.get("/aurora/m")
    assert response.status_code == 200
    _assert_nothing_active(response.content.decode())


def test_hostile_markup_in_an_edited_card_never_reaches_the_page(aurora, alice, register, alice_api, client):
    register(aurora, "m", alice, tier="open")
    response = alice_api.put("/api/v1/models/aurora/m/card", {"card": HOSTILE_CARD}, format="json")
    assert response.status_code == 200, response.content
    page = client.get("/aurora/m")
    assert page.status_code == 200 and "raw anchor" in page.content.decode()
    _assert_nothing_active(page.content.decode())


# --- inference gateway ------------------------------------------------------------------------------------------

@pytest.fixture
def engine(upstream):
    return upstream.requests


@pytest.fixture
def served(aurora, alice, register, token_for, upstream):
    version = register(aurora, "m", alice, tier="api")
    InferenceBackend.objects.create(model=version.model, kind="upstream", url=upstream.url,
                                    upstream_model="tiny")
    return {"Authorization": f"Bearer {token_for(alice, ('inference',))}"}


def _infer(client, headers, endpoint, body):
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body, allow_nan=True)
    return client.post(f"/v1/{endpoint}", raw, content_type="application/json",
                       HTTP_AUTHORIZATION=headers["Authorization"])


def _openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.content[:500]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_a_sane_call_reaches_the_engine_and_is_metered(client, served, engine):
    response = _infer(client, served, "completions", {"model": "aurora/m", "prompt": "hello", "max_tokens": 8,
                                                      "temperature": 0.5, "top_p": 0.9, "n": 1, "stop": ["\n"]})
    assert response.status_code == 200, response.content
    assert len(engine) == 1 and InferenceCall.objects.get().status == 200


COMPLETION = {"model": "aurora/m", "prompt": "hello"}
CHAT = {"model": "aurora/m", "messages": [{"role": "user", "content": "hello"}]}


@pytest.mark.parametrize("endpoint, body, param", [
    ("completions", COMPLETION | {"max_tokens": -1}, "max_tokens"),
    ("completions", COMPLETION | {"max_tokens": 10**12}, "max_tokens"),
    ("completions", COMPLETION | {"max_tokens": "abc"}, "max_tokens"),
    ("completions", COMPLETION | {"max_tokens": True}, "max_tokens"),
    ("chat/completions", CHAT | {"max_completion_tokens": 10**12}, "max_completion_tokens"),
    ("completions", COMPLETION | {"temperature": 1e9}, "temperature"),
    ("completions", COMPLETION | {"temperature": float("nan")}, "temperature"),
    ("completions", COMPLETION | {"temperature": float("inf")}, "temperature"),
    ("chat/completions", CHAT | {"temperature": -1}, "temperature"),
    ("chat/completions", CHAT | {"top_p": 5}, "top_p"),
    ("completions", COMPLETION | {"n": 1000}, "n"),
    ("completions", COMPLETION | {"n": 0}, "n"),
    ("completions", COMPLETION | {"stop": ["x"] * 1000}, "stop"),
    ("completions", COMPLETION | {"stop": 42}, "stop"),
    ("completions", COMPLETION | {"logprobs": 10**6}, "logprobs"),
    ("chat/completions", CHAT | {"logprobs": True, "top_logprobs": 10**6}, "top_logprobs"),
    ("chat/completions", CHAT | {"logprobs": 5}, "logprobs"),
    ("chat/completions", CHAT | {"presence_penalty": 1e300}, "presence_penalty"),
    ("chat/completions", CHAT | {"stream": "yes"}, "stream"),
    ("chat/completions", CHAT | {"stream": True, "stream_options": "include_usage"}, "stream_options"),
    ("chat/completions", CHAT | {"messages": "hello"}, "messages"),
    ("chat/completions", CHAT | {"messages": []}, "messages"),
    ("chat/completions", CHAT | {"messages": [{"role": "user"}]}, "messages"),
    ("chat/completions", CHAT | {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("chat/completions", CHAT | {"messages": ["hello"]}, "messages"),
    ("chat/completions", {"model": "aurora/m"}, "messages"),
    ("completions", {"model": "aurora/m"}, "prompt"),
    ("completions", COMPLETION | {"prompt": {"text": "hello"}}, "prompt"),
    ("completions", COMPLETION | {"prompt": ["a", 1, None]}, "prompt"),
])
def test_absurd_generation_parameters_are_refused(client, served, engine, endpoint, body, param):
    error = _openai_error(_infer(client, served, endpoint, body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"]
    assert engine == [] and InferenceCall.objects.count() == 0


@pytest.mark.parametrize("endpoint, body, status, param", [
    ("completions", '{"model": "aurora/m", "prompt": "' + "x" * (10 * 1024 * 1024) + '"}', 413, "prompt"),
    ("chat/completions", '{"model": "aurora/m", "messages": [{"role": "user", "content": "'
     + "x" * (3 * 1024 * 1024) + '"}]}', 413, "messages"),
    ("completions", '{"model": "aurora/m", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, None),
    ("completions", '{"model": "aurora/m", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("completions", '{"model": "aurora/m", "prompt": "x", "vendor_knob": [1, Infinity]}', 400, "vendor_knob"),
    ("chat/completions", "[1, 2", 400, None),
    # More digits than Python turns into an int: a number too big, not a body that is not JSON.
    ("completions", '{"model": "aurora/m", "prompt": "x", "seed": ' + "9" * 5000 + "}", 400, None),
])
def test_oversized_and_malformed_bodies_are_refused(client, served, engine, endpoint, body, status, param):
    error = _openai_error(_infer(client, served, endpoint, body), status)
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    if "9" * 5000 in body:
        assert "5000 digits" in error["message"]
    assert engine == [] and InferenceCall.objects.count() == 0
