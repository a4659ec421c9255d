"""The stock `openai` client against a live Gatehouse server whose gateway forwards to a real engine process
(`python -m training serve`, registered as an OpenAI-compatible backend): listings, completions, chat,
streaming with usage, the client's own exceptions where they belong, quotas, and metering that matches."""
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.releases.upstream import FakeUpstream, chat_chunk

from .conftest import free_port, wait_for_http
from .test_hub_clients import tiny_hf_folder

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e
RPM = 8

SETUP = """
import json, os
from pathlib import Path
from gatehouse.accounts.models import Membership, Organization, User
from gatehouse.accounts.services import api_token_create
from gatehouse.registry.models import Model
from gatehouse.registry.services.ingest import files_from_directory, model_version_ingest
from gatehouse.registry.services.versions import model_version_verify
from releases.models import AccessGrant, AccessPolicy, InferenceBackend
folder = Path(os.environ["SETUP_FOLDER"])
alice = User.objects.create_user("alice", "alice@example.com", "pw")
aurora = Organization.objects.create(slug="aurora", name="Aurora")
Membership.objects.create(user=alice, organization=aurora, role=Membership.Role.ADMIN)
people = {name: User.objects.create_user(name, f"{name}@example.org", "pw") for name in ("carol", "dave", "erin")}
for name, tier, audience in [("tiny-served", "api", "public"), ("tiny-gated", "open", "gated-manual"),
                             ("tiny-secret", "closed", "organization"), ("tiny-offline", "api", "public")]:
    version = model_version_ingest(organization=aurora, name=name, files=files_from_directory(folder), user=alice,
                                   tier=tier)
    model_version_verify(version_id=version.pk)
    AccessPolicy.objects.create(model=version.model, audience=audience)
    url = "http://127.0.0.1:9/v1" if name == "tiny-offline" else os.environ["ENGINE_URL"]
    InferenceBackend.objects.create(model=version.model, kind="upstream", url=url, upstream_model="tiny")
    if name == "tiny-gated":
        AccessGrant.objects.create(model=version.model, user=people["dave"])
# Served by a stand-in whose pace the test sets (no weights needed).
slow = Model.objects.create(organization=aurora, name="tiny-slow", tier="api")
InferenceBackend.objects.create(model=slow, kind="upstream", url=os.environ["SLOW_URL"], upstream_model="slow")
scopes = ["read", "inference"]
tokens = {name: api_token_create(user=user, name="e2e", scopes=scopes).secret for name, user in people.items()}
tokens["alice"] = api_token_create(user=alice, name="e2e", scopes=scopes).secret
tokens["carol-read-only"] = api_token_create(user=people["carol"], name="ro", scopes=["read"]).secret
print("TOKENS " + json.dumps(tokens))
"""


@pytest.fixture
def gateway(deployment, tmp_path):
    env, manage = deployment["env"], deployment["manage"]
    folder = tiny_hf_folder(tmp_path / "src")
    engine_port = free_port()
    log = open(tmp_path / "servers.log", "w")
    engine = subprocess.Popen([sys.executable, "-m", "training", "serve", "--model", str(folder), "--model-id", "tiny",
                               "--port", str(engine_port), "--max-batch", "8", "--device", "cpu"],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    deployment["processes"].append(engine)
    engine_url = f"http://127.0.0.1:{engine_port}/v1"
    slow = FakeUpstream()
    setup = subprocess.run([*manage, "shell", "-c", SETUP], env=env | {"SETUP_FOLDER": str(folder),
                                                                        "ENGINE_URL": engine_url,
                                                                        "SLOW_URL": slow.url},
                           cwd=ROOT, capture_output=True, text=True)
    assert setup.returncode == 0, setup.stderr
    port = free_port()
    server = subprocess.Popen([*manage, "runserver", f"127.0.0.1:{port}", "--noreload"],
                              env=env | {"GATEHOUSE_INFERENCE_RPM_PER_TOKEN": str(RPM)}, cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT)
    deployment["processes"].append(server)
    base = f"http://127.0.0.1:{port}"
    wait_for_http(base + "/api/v1/licenses")
    wait_for_http(f"http://127.0.0.1:{engine_port}/health", timeout=120)

    def calls():
        out = subprocess.run([*manage, "shell", "-c", "import json; from releases.models import InferenceCall; "
                              "print(json.dumps(list(InferenceCall.objects.order_by('id').values("
                              "'user__username', 'status', 'prompt_tokens', 'completion_tokens', 'stream', "
                              "'error_code'))))"], env=env, cwd=ROOT, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    yield {"base": base + "/v1", "engine": engine_url, "slow": slow, "folder": folder,
           "tokens": json.loads(setup.stdout.split("TOKENS ", 1)[1]), "calls": calls}
    slow.close()


def client(gateway, who, **kwargs):
    from openai import OpenAI

    return OpenAI(base_url=gateway["base"], api_key=gateway["tokens"].get(who, who), **kwargs)


def test_openai_client_lists_completes_chats_and_streams_with_metered_usage(gateway):
    carol = client(gateway, "carol")
    assert [m.id for m in carol.models.list()] == ["aurora/tiny-offline", "aurora/tiny-served", "aurora/tiny-slow"]
    assert {m.id for m in client(gateway, "dave").models.list()} == {
        "aurora/tiny-gated", "aurora/tiny-offline", "aurora/tiny-served", "aurora/tiny-slow"}
    assert {m.id for m in client(gateway, "alice").models.list()} >= {"aurora/tiny-secret"}
    assert carol.models.retrieve("aurora/tiny-served").id == "aurora/tiny-served"

    direct = httpx.post(gateway["engine"] + "/completions", json={"model": "tiny", "prompt": "def add(a, b):",
                                                                  "max_tokens": 12, "temperature": 0}).json()
    completion = carol.completions.create(model="aurora/tiny-served", prompt="def add(a, b):", max_tokens=12,
                                          temperature=0)
    assert completion.choices[0].text == direct["choices"][0]["text"] and completion.model == "aurora/tiny-served"
    assert completion.usage.completion_tokens == direct["usage"]["completion_tokens"] > 0
    # The engine's prefix cache held the prompt from the direct call: the client reads how much, as OpenAI reports it.
    assert direct["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert completion.usage.prompt_tokens_details.cached_tokens == completion.usage.prompt_tokens - 1

    messages = [{"role": "user", "content": "Write a function."}]
    chat = carol.chat.completions.create(model="aurora/tiny-served", messages=messages, max_tokens=16, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    stream = carol.chat.completions.create(model="aurora/tiny-served", messages=messages, max_tokens=16,
                                           temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    plain = list(carol.chat.completions.create(model="aurora/tiny-served", messages=messages, max_tokens=4,
                                               temperature=0, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason in ("stop", "length")

    # Every call is metered with the tokens the client was told about.
    metered = [c for c in gateway["calls"]() if c["user__username"] == "carol"]
    assert [(c["status"], c["stream"]) for c in metered] == [(200, False), (200, False), (200, True), (200, True)]
    assert metered[0]["completion_tokens"] == completion.usage.completion_tokens
    assert metered[1]["prompt_tokens"] == chat.usage.prompt_tokens
    assert metered[2]["completion_tokens"] == chat.usage.completion_tokens and metered[3]["completion_tokens"] > 0


def test_a_chunked_body_is_read_under_gunicorn_and_refused_with_411_where_the_server_cannot_end_it(gateway,
                                                                                                   deployment):
    # nginx passes a chunked body on as it comes (proxy_request_buffering off): Django alone would read no body.
    port = free_port()
    gunicorn = subprocess.Popen([sys.executable, "-m", "gunicorn", "gatehouse.wsgi:application", "--bind",
                                 f"127.0.0.1:{port}", "--workers", "1", "--worker-class", "gthread", "--threads", "2"],
                                env=deployment["env"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deployment["processes"].append(gunicorn)
    wait_for_http(f"http://127.0.0.1:{port}/api/v1/licenses")
    body = json.dumps({"model": "aurora/tiny-served", "prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0})
    headers = {"Authorization": f"Bearer {gateway['tokens']['carol']}", "Content-Type": "application/json"}

    def chunked(base):  # a generator body: httpx sends it chunked, with no Content-Length
        return httpx.post(base + "/completions", content=iter([body[:10].encode(), body[10:].encode()]),
                          headers=headers, timeout=60)
    answered = chunked(f"http://127.0.0.1:{port}/v1")
    assert answered.status_code == 200, answered.text
    sized = httpx.post(gateway["base"] + "/completions", content=body, headers=headers, timeout=60).json()
    assert answered.json()["choices"][0]["text"] == sized["choices"][0]["text"]
    refused = chunked(gateway["base"])  # runserver: its input does not end with the body
    assert refused.status_code == 411 and refused.json()["error"]["code"] == "length_required"
    assert "Content-Length" in refused.json()["error"]["message"]
    assert [c["status"] for c in gateway["calls"]()] == [200, 200]  # the refusal counted nothing


def test_openai_client_reads_log_probabilities_and_echo(gateway):
    carol = client(gateway, "carol")  # eight calls below: her per-minute quota (RPM); a ninth would wait a minute
    completion = carol.completions.create(model="aurora/tiny-served", prompt="def add(a, b):", max_tokens=3,
                                          temperature=0, logprobs=2, echo=True)
    choice = completion.choices[0]
    assert choice.text.startswith("def add(a, b):")
    assert len(choice.logprobs.tokens) == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert choice.logprobs.token_logprobs[0] is None and all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs[1:])
    # lm-evaluation-harness's scoring call: the prompt as token ids, echo, nothing generated.
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(gateway["folder"] / "tokenizer.json")).encode("def add(a, b):").ids
    scored = carol.completions.create(model="aurora/tiny-served", prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                      temperature=0)
    values = scored.choices[0].logprobs.token_logprobs
    assert scored.usage.completion_tokens == 0 and len(values) == len(ids) == scored.usage.prompt_tokens
    assert values[0] is None and values[1:] == pytest.approx(choice.logprobs.token_logprobs[1:len(ids)], abs=1e-5)
    chat = carol.chat.completions.create(model="aurora/tiny-served", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    # Streamed: each chunk carries its tokens' entries; together they are the whole answer's, and metered as such.
    chunks = list(carol.chat.completions.create(model="aurora/tiny-served", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
                                                stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-5)
    echoed = list(carol.completions.create(model="aurora/tiny-served", prompt="def add(a, b):", max_tokens=3,
                                           temperature=0, logprobs=2, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in echoed) == choice.text
    assert [t for c in echoed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == choice.logprobs.tokens
    metered = [c for c in gateway["calls"]() if c["user__username"] == "carol"][-2:]
    assert [(c["status"], c["stream"], c["completion_tokens"]) for c in metered] == [(200, True, 3), (200, True, 3)]
    # The client's logit_bias (string keys) reaches the engine and takes effect, a penalty beside it accepted.
    tokenizer = Tokenizer.from_file(str(gateway["folder"] / "tokenizer.json"))
    forced = carol.completions.create(model="aurora/tiny-served", prompt="def add(a, b):", max_tokens=3,
                                      temperature=0, logit_bias={"42": 100}, frequency_penalty=0.5)
    assert forced.choices[0].text == tokenizer.decode([42, 42, 42])
    two = carol.chat.completions.create(model="aurora/tiny-served", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=3, temperature=0.9, seed=1, n=2)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens <= 6
    assert [c for c in gateway["calls"]() if c["user__username"] == "carol"][-1]["completion_tokens"] == \
        two.usage.completion_tokens
    # Several prompts in one call (lm-evaluation-harness batches its scoring so): a choice each, metered together.
    prompts = ["def add(a, b):", "import os"]
    batch = carol.completions.create(model="aurora/tiny-served", prompt=prompts, max_tokens=2, temperature=0)
    alone = [httpx.post(gateway["engine"] + "/completions", json={  # straight to the engine: within carol's quota
        "model": "tiny", "prompt": p, "max_tokens": 2, "temperature": 0}).json() for p in prompts]
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [a["choices"][0]["text"] for a in alone]
    assert batch.usage.prompt_tokens == sum(a["usage"]["prompt_tokens"] for a in alone)
    metered = [c for c in gateway["calls"]() if c["user__username"] == "carol"][-1]
    assert (metered["prompt_tokens"], metered["completion_tokens"]) == (batch.usage.prompt_tokens, 4)


def test_streams_are_relayed_as_they_come_not_buffered(gateway):
    slow = gateway["slow"]
    words = ["one", " two", " three", " four"]
    slow.events = [chat_chunk(""), *map(chat_chunk, words), chat_chunk(finish="stop"),
                   chat_chunk(usage={"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}), "[DONE]"]
    slow.gap = 0.4  # 2.8 s from the first event to the last
    stream = client(gateway, "carol").chat.completions.create(
        model="aurora/tiny-slow", messages=[{"role": "user", "content": "Count."}], stream=True)
    stamps, text = [], ""
    for chunk in stream:
        stamps.append(time.monotonic())
        text += chunk.choices[0].delta.content or ""
    assert text == "one two three four" and len(stamps) == 6  # role, 4 words, finish (usage not asked for)
    # Each chunk as the upstream sends it: a gateway that buffered would hand them all over at once, at the end.
    assert stamps[-1] - stamps[0] > 1.5 and all(b - a > 0.2 for a, b in zip(stamps[1:], stamps[2:]))


def test_openai_client_raises_its_own_errors_where_they_belong(gateway):
    import openai

    carol = client(gateway, "carol", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "not-a-token").models.list()
    with pytest.raises(openai.PermissionDeniedError, match="request access"):
        carol.completions.create(model="aurora/tiny-gated", prompt="x", max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError, match="'inference' scope"):
        client(gateway, "carol-read-only").completions.create(model="aurora/tiny-served", prompt="x", max_tokens=2)
    for hidden in ("aurora/tiny-secret", "aurora/nope"):
        with pytest.raises(openai.NotFoundError) as missing:
            carol.completions.create(model=hidden, prompt="x", max_tokens=2)
        assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        carol.completions.create(model="aurora/tiny-served", prompt="x", max_tokens=5000)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        carol.completions.create(model="aurora/tiny-served", prompt="x", max_tokens=2, temperature=9)
    with pytest.raises(openai.InternalServerError) as down:
        carol.completions.create(model="aurora/tiny-offline", prompt="x", max_tokens=2)
    assert down.value.status_code == 503
    # Closed and gated rules hold for the people they admit.
    assert client(gateway, "dave").completions.create(model="aurora/tiny-gated", prompt="x", max_tokens=2).choices
    assert client(gateway, "alice").completions.create(model="aurora/tiny-secret", prompt="x", max_tokens=2).choices
    refused = [c for c in gateway["calls"]() if c["user__username"] == "carol"]
    # Refusals before a backend (bad parameters are checked by the gateway itself) are not calls.
    assert [c["status"] for c in refused] == [503]


def test_quota_exhaustion_is_a_rate_limit_error_with_retry_after(gateway):
    import openai

    erin = client(gateway, "erin", max_retries=0)
    for _ in range(RPM):
        erin.completions.create(model="aurora/tiny-served", prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as limited:
        erin.completions.create(model="aurora/tiny-served", prompt="x", max_tokens=1)
    assert limited.value.code == "rate_limit_exceeded"
    assert 1 <= int(limited.value.response.headers["retry-after"]) <= 61
    # Another token is not affected.
    assert client(gateway, "carol").completions.create(model="aurora/tiny-served", prompt="x", max_tokens=1).choices


LOCAL_SETUP = """
import os
from pathlib import Path
from gatehouse.accounts.models import Membership, Organization, User
from gatehouse.accounts.services import api_token_create
from gatehouse.registry.services.ingest import files_from_directory, model_version_ingest
from gatehouse.registry.services.versions import model_version_verify
from releases.models import InferenceBackend
alice = User.objects.create_user("alice", "alice@example.com", "pw")
aurora = Organization.objects.create(slug="aurora", name="Aurora")
Membership.objects.create(user=alice, organization=aurora, role=Membership.Role.ADMIN)
version = model_version_ingest(organization=aurora, name="tiny-local", files=files_from_directory(
    Path(os.environ["SETUP_FOLDER"])), user=alice, tier="api")
model_version_verify(version_id=version.pk)
InferenceBackend.objects.create(model=version.model, kind="local")
print("TOKEN " + api_token_create(user=alice, name="e2e", scopes=["inference"]).secret)
"""


def test_the_platform_runs_a_local_engine_and_restarts_it_after_a_crash(deployment, tmp_path):
    import time

    import openai

    env, manage = deployment["env"], deployment["manage"]
    folder = tiny_hf_folder(tmp_path / "src")
    setup = subprocess.run([*manage, "shell", "-c", LOCAL_SETUP], env=env | {"SETUP_FOLDER": str(folder)}, cwd=ROOT,
                           capture_output=True, text=True)
    assert setup.returncode == 0, setup.stderr
    token = setup.stdout.split("TOKEN ", 1)[1].strip()
    log = open(tmp_path / "servers.log", "w")
    port = free_port()
    for command in (["runserver", f"127.0.0.1:{port}", "--noreload"], ["serve_engines"]):
        deployment["processes"].append(subprocess.Popen([*manage, *command], env=env, cwd=ROOT, stdout=log,
                                                        stderr=subprocess.STDOUT))
    wait_for_http(f"http://127.0.0.1:{port}/api/v1/licenses")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0)

    def answer_within(seconds):
        deadline, statuses = time.time() + seconds, set()
        while time.time() < deadline:
            try:
                return client.completions.create(model="aurora/tiny-local", prompt="def", max_tokens=3,
                                                 temperature=0), statuses
            except openai.APIStatusError as exc:
                statuses.add(exc.status_code)
                time.sleep(0.5)
        pytest.fail(f"no answer within {seconds} s (statuses seen: {statuses})")

    first, seen = answer_within(120)
    assert first.choices[0].text is not None and seen <= {503}  # "not running yet; retry shortly" until ready
    killed = subprocess.run(["pkill", "-f", "--", "--model-id aurora/tiny-local"])
    assert killed.returncode == 0
    again, seen = answer_within(120)
    assert 503 in seen  # the gateway said so while the engine was down
    assert again.choices[0].text == first.choices[0].text  # the restarted engine serves the same weights
    supervisor = deployment["processes"][-1]
    supervisor.kill()  # even killed outright, the supervisor leaves no engine behind
    supervisor.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline and subprocess.run(["pgrep", "-f", "--", "--model-id aurora/tiny-local"]).returncode == 0:
        time.sleep(0.2)
    assert subprocess.run(["pgrep", "-f", "--", "--model-id aurora/tiny-local"]).returncode != 0


def test_playground_answers_signed_in_users_with_access_and_shows_the_snippet(gateway):
    base = gateway["base"].removesuffix("/v1")
    with httpx.Client(base_url=base, follow_redirects=False) as browser:
        assert browser.get("/releases/models/aurora/tiny-served/playground").status_code == 302  # sign in first
        login = browser.get("/accounts/login/")
        csrf = browser.cookies["csrftoken"]
        browser.post("/accounts/login/", data={"username": "carol", "password": "pw", "csrfmiddlewaretoken": csrf,
                                            "next": "/"})
        page = browser.get("/releases/models/aurora/tiny-served/playground")
        assert page.status_code == 200 and 'base_url="http://127.0.0.1' in page.text and "aurora/tiny-served" in page.text
        csrf = browser.cookies["csrftoken"]
        answered = browser.post("/releases/models/aurora/tiny-served/playground",
                                data={"message": "Hello", "max_tokens": "4", "temperature": "0",
                                      "csrfmiddlewaretoken": csrf})
        assert answered.status_code == 200 and "completion tokens (metered)" in answered.text
        gated = browser.post("/releases/models/aurora/tiny-gated/playground",
                             data={"message": "Hello", "max_tokens": "4", "temperature": "0",
                                   "csrfmiddlewaretoken": csrf})
        assert gated.status_code == 403 and "request access" in gated.text
    assert login.status_code == 200


def test_the_playground_streams_its_answer_in_chromium(gateway, chromium, screenshots):
    """With JavaScript the answer arrives as the engine generates it, on the same page, with the metered usage; the
    streamed text is what the openai client gets for the same greedy call."""
    from playwright.sync_api import expect

    from .test_browser import log_in

    base = gateway["base"].removesuffix("/v1")
    page = log_in(chromium, base, "carol", "pw")
    page.goto(f"{base}/releases/models/aurora/tiny-served/playground")
    page.get_by_label("Message").fill("def")
    page.get_by_label("Max tokens").fill("6")
    page.get_by_label("Temperature").fill("0")
    page.evaluate("window.stayed = true")  # gone if the form navigated instead of streaming
    with page.expect_response(lambda r: r.url.endswith("/playground") and r.request.method == "POST") as posted:
        page.get_by_role("button", name="Send").click()
    assert posted.value.headers["content-type"] == "text/event-stream"
    page.get_by_text("completion tokens (metered)").wait_for(timeout=60_000)
    page.screenshot(path=str(screenshots / "playground-streamed.png"), full_page=True)
    assert page.evaluate("window.stayed") is True and page.locator("#error").is_hidden()
    reply = client(gateway, "carol").chat.completions.create(
        model="aurora/tiny-served", messages=[{"role": "user", "content": "def"}], max_tokens=6, temperature=0)
    assert page.locator("#answer-text").inner_text() == reply.choices[0].message.content
    assert page.locator("#answer-usage").inner_text() == (
        f"{reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens (metered)")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()  # once [DONE] is read


def test_the_playground_shows_refusals_and_failures_mid_answer_in_chromium(gateway, chromium, screenshots):
    from playwright.sync_api import expect

    from .test_browser import log_in

    base = gateway["base"].removesuffix("/v1")
    page = log_in(chromium, base, "carol", "pw")
    page.goto(f"{base}/releases/models/aurora/tiny-offline/playground")  # its engine does not answer
    page.get_by_label("Message").fill("def")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#error")).to_have_text("The engine for aurora/tiny-offline is not answering; retry shortly.")
    assert page.locator("#answer").is_hidden()
    gateway["slow"].events = [chat_chunk("par"), chat_chunk("tial"),
                              json.dumps({"error": {"message": "The engine ran out of memory.", "code": "oom"}})]
    page.goto(f"{base}/releases/models/aurora/tiny-slow/playground")
    page.get_by_label("Message").fill("def")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#error")).to_have_text("The engine ran out of memory.")
    page.screenshot(path=str(screenshots / "playground-failed-mid-answer.png"), full_page=True)
    assert page.locator("#answer-text").inner_text() == "partial" and page.locator("#answer-usage").inner_text() == ""
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    assert [(c["user__username"], c["status"], c["error_code"]) for c in gateway["calls"]()
            if c["stream"]] == [("carol", 503, "engine_unavailable"), ("carol", 502, "oom")]
