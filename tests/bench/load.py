#!/usr/bin/env python
"""Bounded load test of the production-like stack (infra/stack.py: PostgreSQL, Redis, gunicorn behind nginx,
Celery workers, the engine supervisor; weights on local disk, sent by nginx with X-Accel-Redirect) on loopback,
with one asyncio client (httpx.AsyncClient):

  1. downloads: 200 concurrent GETs of a gated model's files through /{org}/{name}/resolve/main/..., a quarter of
     them with a Range header; peer: nginx serving the same files statically (no gate), same requests;
  2. chats: 50 concurrent streaming chat completions (SSE, stream_options include_usage) through /v1; peer: the
     same requests straight to the engine process behind the gateway;
  3. decisions: 20 distinct access-request and release-request decisions at once, plus two races (four reviewers
     deciding the same access request, four approvers approving the same release request) that must yield
     exactly one decision and 409 for the rest.

Per scenario: requests, errors by status, p50/p95/p99 latency (and time to first byte), throughput. Then it checks
in the database that every metered Download row's bytes equal what the client received (per token: each download
slot and each chat has its own token), that every InferenceCall's tokens equal the usage the client got in its
stream, that no decision was duplicated and that the audit chain is intact. Exit status 1 if a check fails or a
request failed unexpectedly.

    python tests/bench/load.py                 # full size, ~2-3 minutes on 2 CPUs; needs PostgreSQL, Redis, nginx
    python tests/bench/load.py --scale 0.1 --runs 1    # what tests/e2e/test_load.py runs
"""
import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "infra"))
from smoke import bootstrap, release, timed, train, wait  # noqa: E402  (the smoke suite's setup; a shorter training run:
# the load needs a model's files and an engine, not a good model)
from stack import Stack, free_port  # noqa: E402

REPO = "acme/smoke-coder"
RACERS = 4  # concurrent duplicate decisions of one request

SETUP = """
import json, os
from gatehouse.accounts.models import Membership, Organization, User
from gatehouse.accounts.services import api_token_create
from gatehouse.registry.models import Model, ModelFile
from releases import access
from releases.models import InferenceBackend
n_downloads, n_chats, n_access = (int(os.environ[k]) for k in ("LOAD_DOWNLOADS", "LOAD_CHATS", "LOAD_ACCESS"))
model = Model.objects.select_related("organization").get(organization__slug="acme", name="smoke-coder")
org, mia, oz = model.organization, User.objects.get(username="mia"), User.objects.get(username="oz")
access.access_grant_create(model=model, actor=mia, user=oz)
reviewers = {}
for i in range(RACERS):
    user = User.objects.create_user(f"rev{i}", f"rev{i}@example.org", "pw")
    Membership.objects.create(user=user, organization=org, role=Membership.Role.ADMIN)
    reviewers[user.username] = api_token_create(user=user, name="load", scopes=["read", "write", "admin"]).secret
requests = []
for i in range(n_access + 1):  # the last one is raced
    user = User.objects.create_user(f"asker{i}", f"asker{i}@example.net", "pw")
    requests.append(access.access_request_create(model=model, user=user, fields={}, accept_license=True,
                                                 accept_acceptable_use=True).pk)
files = {f.path: [f.storage_key, f.size, f.sha256] for f in ModelFile.objects.filter(version=model.latest_version)}
InferenceBackend.objects.create(model=model, kind="local")
tokens = {f"dl-{i}": api_token_create(user=oz, name=f"dl-{i}", scopes=["read", "gated-read"]).secret
          for i in range(n_downloads)}
tokens |= {f"chat-{i}": api_token_create(user=oz, name=f"chat-{i}", scopes=["inference"]).secret
           for i in range(n_chats)}
tokens["warmup"] = api_token_create(user=oz, name="warmup", scopes=["inference"]).secret
print("SETUP " + json.dumps({"reviewers": reviewers, "access_requests": requests, "files": files, "tokens": tokens}))
""".replace("RACERS", str(RACERS))

ENGINE_URL = """
from releases.models import InferenceBackend
print("URL", InferenceBackend.objects.get(model__name="smoke-coder").url)
"""

FACTS = """
import json, os
from collections import defaultdict
from gatehouse.audit.models import AuditEvent
from gatehouse.audit.services import audit_verify
from releases.models import (AccessGrant, AccessRequest, Download, InferenceCall, Release, ReleaseApproval,
                             ReleaseRequest)
ids = json.loads(os.environ["LOAD_IDS"])
downloads = defaultdict(list)
for name, path, size, start, via in Download.objects.values_list("token__name", "path", "bytes", "range_start", "via"):
    downloads[name or ""].append([path, size, start, via])
calls = defaultdict(list)
for name, p, c, status, stream, endpoint in InferenceCall.objects.values_list(
        "token__name", "prompt_tokens", "completion_tokens", "status", "stream", "endpoint"):
    calls[name or ""].append([p, c, status, stream, endpoint])
def events(kind, pk):
    return list(AuditEvent.objects.filter(target_type=kind, target_id=str(pk)).values_list("action", flat=True))
access = {pk: {"status": r.status, "grants": AccessGrant.objects.filter(request=r).count(),
               "events": events("releases.accessrequest", pk)}
          for pk, r in AccessRequest.objects.in_bulk(ids["access"]).items()}
releases = {pk: {"status": r.status, "approvals": list(ReleaseApproval.objects.filter(request=r).values_list(
                     "decision", flat=True)), "releases": Release.objects.filter(request=r).count(),
                 "events": events("releases.releaserequest", pk)}
            for pk, r in ReleaseRequest.objects.in_bulk(ids["release"]).items()}
chain = audit_verify()
print("FACTS " + json.dumps({"downloads": downloads, "calls": calls, "access": access, "releases": releases,
                             "audit": {"checked": chain.checked, "problems": chain.problems[:5]}}))
"""

PEER_NGINX = """worker_processes 2;
{user}pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on; tcp_nopush on;
  default_type application/octet-stream;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy; fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  server {{ listen 127.0.0.1:{port}; root {weights}; }}
}}
"""


@dataclass
class Result:
    status: int = 0  # 0: transport error
    seconds: float = 0.0
    ttfb: float | None = None
    bytes: int = 0
    ok: bool = False  # the answer was what the scenario expects
    detail: str = ""
    usage: dict | None = None


@dataclass
class Scenario:
    name: str
    results: list[Result] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)  # wall time of each run
    amounts: list[float] = field(default_factory=list)  # MiB or tokens per run


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]  # nearest rank


# --- the workloads ---------------------------------------------------------------------------------------------

def download_plan(files: dict, n: int) -> list[tuple[str, str | None, int, int]]:
    """(path, Range header, first, last) per request: half the requests take the weights, the rest cycle through
    the other files; every fourth asks for a range (a middle span, an open end, a suffix)."""
    paths = sorted(files)
    big = max(paths, key=lambda p: files[p][1])
    others = [p for p in paths if p != big] or [big]
    plan = []
    for i in range(n):
        path = big if i % 2 == 0 else others[(i // 2) % len(others)]
        size = files[path][1]
        header, first, last = None, 0, size - 1
        if i % 4 == 3 and size > 2:
            kind = (i // 4) % 3
            if kind == 0:
                first, last = size // 3, size // 3 + max(1, size // 4)
                header = f"bytes={first}-{last}"
            elif kind == 1:
                first, last = size // 2, size - 1
                header = f"bytes={first}-"
            else:
                first, last = max(0, size - 500), size - 1
                header = f"bytes=-{min(500, size)}"
        plan.append((path, header, first, last))
    return plan


async def download(client: httpx.AsyncClient, url: str, headers: dict, expected: bytes, ranged: bool) -> Result:
    result, digest = Result(), hashlib.sha256()
    start = time.perf_counter()
    try:
        async with client.stream("GET", url, headers=headers) as response:
            result.status = response.status_code
            async for chunk in response.aiter_raw():
                if result.ttfb is None:
                    result.ttfb = time.perf_counter() - start
                result.bytes += len(chunk)
                digest.update(chunk)
    except httpx.HTTPError as exc:
        result.detail = f"{exc.__class__.__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    want = 206 if ranged else 200
    result.ok = result.status == want and result.bytes == len(expected) and \
        digest.digest() == hashlib.sha256(expected).digest()
    if result.status and not result.ok and not result.detail:
        other = ", same length, other bytes" if result.bytes == len(expected) else ""
        result.detail = f"status {result.status}, {result.bytes} bytes (expected {want}, {len(expected)} bytes{other})"
    return result


async def chat(client: httpx.AsyncClient, url: str, headers: dict, body: dict) -> Result:
    result, done, content = Result(), False, 0
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, headers=headers, json=body) as response:
            result.status = response.status_code
            async for line in response.aiter_lines():
                if result.ttfb is None:
                    result.ttfb = time.perf_counter() - start
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    continue
                event = json.loads(data)
                if event.get("usage"):
                    result.usage = event["usage"]
                for choice in event.get("choices") or []:
                    content += bool((choice.get("delta") or {}).get("content"))
    except (httpx.HTTPError, ValueError) as exc:
        result.detail = f"{exc.__class__.__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    result.ok = result.status == 200 and done and bool(result.usage) and \
        result.usage.get("completion_tokens", -1) >= content
    if not result.ok and not result.detail:
        result.detail = f"status {result.status}, [DONE] {'seen' if done else 'missing'}, usage {result.usage}"
    return result


async def decide(client: httpx.AsyncClient, url: str, token: str, body: dict, expected: set[int]) -> Result:
    result = Result()
    start = time.perf_counter()
    try:
        response = await client.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
        result.status = response.status_code
        result.detail = response.text[:300]
    except httpx.HTTPError as exc:
        result.detail = f"{exc.__class__.__name__}: {exc}"
    result.seconds = result.ttfb = time.perf_counter() - start
    result.ok = result.status in expected
    return result


async def gathered(coroutines) -> tuple[list[Result], float]:
    start = time.perf_counter()
    results = await asyncio.gather(*coroutines)
    return list(results), time.perf_counter() - start


def client(concurrency: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(180, connect=60), limits=httpx.Limits(
        max_connections=concurrency + 10, max_keepalive_connections=concurrency + 10))


# --- the run -----------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the full load (0.1: 20/5/2)")
    parser.add_argument("--runs", type=int, default=3, help="runs of the download and chat scenarios (median)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per chat")
    parser.add_argument("--keep", action="store_true", help="keep the stack's folder (logs) even when all passes")
    args = parser.parse_args()
    if not shutil.which("nginx"):
        print("error: nginx is not installed (apt-get install -y nginx)", file=sys.stderr)
        return 2
    n_downloads, n_chats = max(2, round(200 * args.scale)), max(2, round(50 * args.scale))
    n_decisions = max(2, round(20 * args.scale))
    n_access, n_release = n_decisions // 2, n_decisions - n_decisions // 2
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    work = Path(tempfile.mkdtemp(prefix="gatehouse-load-"))
    work.chmod(0o755)
    stack, peer, failed = Stack(work, storage="local"), None, True
    began = time.perf_counter()

    def step(name, fn):
        return timed(name, fn, width=60)
    try:
        print(f"production-like stack (local disk + X-Accel-Redirect) in {work}", flush=True)
        step("start PostgreSQL db, gunicorn, nginx, workers, beat, engines", stack.start)
        _, api = bootstrap(stack)
        api["oz"].close()  # the load makes its own outsiders
        with api["mia"] as mia, api["ada"] as ada:
            step("train a tiny model through the API (Celery gpu worker)",
                 lambda: train(mia, max_steps=4, batch_size=4, max_bytes=60000))
            step("release it open-gated, manual review (smoke suite)", lambda: release(mia, ada))
            release_ids = step("submit the release requests to decide", lambda: submit_requests(mia, n_release + 1))
        shell = step("users, access requests, tokens, a grant, the inference backend", lambda: stack.manage_shell(
            SETUP, LOAD_DOWNLOADS=str(n_downloads), LOAD_CHATS=str(n_chats), LOAD_ACCESS=str(n_access)))
        facts = json.loads(shell.split("SETUP ", 1)[1])
        secrets = facts["tokens"]
        weights = work / "var" / "weights"
        content = {path: (weights / key).read_bytes() for path, (key, _, _) in facts["files"].items()}
        for path, (_, size, sha) in facts["files"].items():
            assert len(content[path]) == size and hashlib.sha256(content[path]).hexdigest() == sha, path

        def answer():
            try:
                r = httpx.post(stack.url + "/v1/chat/completions", timeout=60, headers={
                    "Authorization": f"Bearer {secrets['warmup']}"}, json={
                    "model": REPO, "max_tokens": 4, "messages": [{"role": "user", "content": "def"}]})
                return r.status_code == 200
            except httpx.HTTPError:
                return False
        step("wait for the engine to answer", lambda: wait(answer, 180, "the engine to answer"))
        engine_url = stack.manage_shell(ENGINE_URL).split("URL ", 1)[1].strip().rstrip("/")
        peer_port = free_port()
        peer = start_peer_nginx(work / "peer-nginx", weights, peer_port)
        logs = {name: (work / name).stat().st_size if (work / name).exists() else 0
                for name in ("web.log", "worker.log", "engines.log")}  # judged from here on
        print(f"set up in {time.perf_counter() - began:.0f} s; load: {n_downloads} downloads, {n_chats} chats "
              f"x {args.runs} runs, {n_decisions} decisions + 2 races of {RACERS}", flush=True)

        plan = download_plan(facts["files"], n_downloads)
        expected = [content[path][first:last + 1] for path, _, first, last in plan]
        bodies = [{"model": REPO, "max_tokens": args.max_tokens, "temperature": 0.8, "stream": True,
                   "stream_options": {"include_usage": True},
                   "messages": [{"role": "user", "content": f"def handler_{i}(request):"}]} for i in range(n_chats)]
        scenarios = {key: Scenario(name) for key, name in [
            ("dl", f"downloads ({n_downloads} concurrent, 1/4 Range)"), ("dl-peer", "  peer: nginx static, same files"),
            ("chat", f"chats ({n_chats} concurrent SSE streams)"), ("chat-peer", "  peer: the engine directly"),
            ("decide", f"decisions ({n_decisions} distinct + 2x{RACERS} racing)")]}
        client_bytes: dict[str, list] = {}
        client_usage: dict[str, list] = {}

        async def load():
            async with client(max(n_downloads, n_chats) * 2) as http:
                for _ in range(args.runs):  # interleaved: drift on a shared machine hits us and the peers alike
                    results, wall = await gathered(download(
                        http, f"http://127.0.0.1:{peer_port}/{facts['files'][path][0]}",
                        {"Accept-Encoding": "identity"} | ({"Range": header} if header else {}), body, bool(header))
                        for (path, header, _, _), body in zip(plan, expected))
                    record(scenarios["dl-peer"], results, wall, sum(r.bytes for r in results) / 2**20)
                    results, wall = await gathered(download(
                        http, f"{stack.url}/{REPO}/resolve/main/{path}",
                        {"Authorization": f"Bearer {secrets[f'dl-{i}']}", "Accept-Encoding": "identity"}
                        | ({"Range": header} if header else {}), body, bool(header))
                        for i, ((path, header, first, _), body) in enumerate(zip(plan, expected)))
                    record(scenarios["dl"], results, wall, sum(r.bytes for r in results) / 2**20)
                    for i, ((path, header, first, _), r) in enumerate(zip(plan, results)):
                        if r.status in (200, 206):
                            client_bytes.setdefault(f"dl-{i}", []).append([path, r.bytes, first if header else None])
                    results, wall = await gathered(chat(http, engine_url + "/chat/completions", {}, body)
                                                   for body in bodies)
                    record(scenarios["chat-peer"], results, wall,
                           sum((r.usage or {}).get("completion_tokens", 0) for r in results))
                    results, wall = await gathered(chat(
                        http, stack.url + "/v1/chat/completions", {"Authorization": f"Bearer {secrets[f'chat-{i}']}"},
                        body) for i, body in enumerate(bodies))
                    record(scenarios["chat"], results, wall,
                           sum((r.usage or {}).get("completion_tokens", 0) for r in results))
                    for i, r in enumerate(results):
                        if r.status == 200:
                            client_usage.setdefault(f"chat-{i}", []).append(
                                [(r.usage or {}).get("prompt_tokens"), (r.usage or {}).get("completion_tokens")])
                # Decisions, all at once: distinct requests (accept or reject; approve or reject) and two races.
                reviewers = list(facts["reviewers"].values())
                access_ids, calls = facts["access_requests"], []
                for i, pk in enumerate(access_ids[:-1]):
                    body = {"status": "accepted"} if i % 2 == 0 else {"status": "rejected", "reason": "load test"}
                    calls.append(("access", pk, body, reviewers[i % len(reviewers)], {200}))
                for i, pk in enumerate(release_ids[:-1]):
                    body = {"decision": "approve"} if i % 2 == 0 else {"decision": "reject", "comment": "load test"}
                    calls.append(("release", pk, body, reviewers[i % len(reviewers)], {200}))
                for secret in reviewers:
                    calls.append(("access", access_ids[-1], {"status": "accepted"}, secret, {200, 409}))
                    calls.append(("release", release_ids[-1], {"decision": "approve"}, secret, {200, 409}))
                url = {"access": stack.url + "/api/v1/access-requests/{}/decision",
                       "release": stack.url + "/api/v1/release-requests/{}/decisions"}
                results, wall = await gathered(decide(http, url[kind].format(pk), secret, body, want)
                                               for kind, pk, body, secret, want in calls)
                record(scenarios["decide"], results, wall, len(results))
                return calls, results

        calls, decided = asyncio.run(load())
        report_table(scenarios, args.runs)
        db = json.loads(stack.manage_shell(FACTS, LOAD_IDS=json.dumps({"access": facts["access_requests"],
                                                                        "release": release_ids})).split("FACTS ", 1)[1])
        # Streams are metered when the relay ends, which may be a moment after the client saw [DONE].
        deadline = time.time() + 15
        while time.time() < deadline and any(c[2] == 0 for name, rows in db["calls"].items() for c in rows):
            time.sleep(0.5)
            db = json.loads(stack.manage_shell(FACTS, LOAD_IDS=json.dumps({
                "access": facts["access_requests"], "release": release_ids})).split("FACTS ", 1)[1])
        checks = run_checks(scenarios, db, client_bytes, client_usage, calls, decided, facts, release_ids, work, logs)
        for ok, line in checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {line}")
        failed = not all(ok for ok, _ in checks)
        print(json.dumps({"bench": "load", "scale": args.scale, "runs": args.runs, "passed": not failed,
                          "seconds": round(time.perf_counter() - began, 1), "cpus": os.cpu_count(),
                          "checks": [{"ok": ok, "check": line} for ok, line in checks],
                          "scenarios": {key: summary(s) for key, s in scenarios.items()}}))
        return 1 if failed else 0
    except Exception as exc:  # one line, the detail in the stack's logs
        print(f"error: load test failed: {exc.__class__.__name__}: {exc} (logs in {work})", file=sys.stderr)
        return 1
    finally:
        if peer is not None:
            peer.terminate()
            peer.wait(timeout=15)
        stack.stop()
        if failed or args.keep:
            print(f"logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def submit_requests(mia: httpx.Client, n: int) -> list[int]:
    """n submitted release requests (open, gated-manual) for the same version, awaiting a decision."""
    ids = []
    for _ in range(n):
        made = mia.post("/api/v1/release-requests", json={"model": REPO, "stages": [{"tier": "open"}],
                                                           "audience": "gated-manual"})
        assert made.status_code == 201, made.text
        submitted = mia.post(f"/api/v1/release-requests/{made.json()['id']}/submit")
        assert submitted.status_code == 200 and submitted.json()["status"] == "submitted", submitted.text
        ids.append(made.json()["id"])
    return ids


def start_peer_nginx(prefix: Path, weights: Path, port: int) -> subprocess.Popen:
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(PEER_NGINX.format(prefix=prefix, weights=weights, port=port,
                                      user="user root;\n" if os.geteuid() == 0 else ""))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=open(prefix / "stderr.log", "w"))
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("the peer nginx did not start")


def record(scenario: Scenario, results: list[Result], wall: float, amount: float) -> None:
    scenario.results += results
    scenario.walls.append(wall)
    scenario.amounts.append(amount)


def errors(scenario: Scenario) -> dict[str, int]:
    """Unexpected answers by status (0: no answer); expected 409s of the races are not errors."""
    out: dict[str, int] = {}
    for r in scenario.results:
        if not r.ok:
            key = str(r.status) if r.status else "none"
            out[key] = out.get(key, 0) + 1
    return out


def summary(s: Scenario) -> dict:
    ms = [r.seconds * 1000 for r in s.results]
    ttfb = [r.ttfb * 1000 for r in s.results if r.ttfb is not None]
    statuses: dict[str, int] = {}
    for r in s.results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    return {"requests": len(s.results), "errors": errors(s), "statuses": statuses,
            "latency_ms": {q: round(pct(ms, int(q[1:])), 1) for q in ("p50", "p95", "p99")},
            "ttfb_ms": {q: round(pct(ttfb, int(q[1:])), 1) for q in ("p50", "p95", "p99")},
            "requests_per_s": round(statistics.median(len(s.results) / len(s.walls) / w for w in s.walls), 1),
            "amount_per_s": round(statistics.median(a / w for a, w in zip(s.amounts, s.walls)), 1),
            "wall_s": round(statistics.median(s.walls), 2)}


def report_table(scenarios: dict[str, Scenario], runs: int) -> None:
    cpus = os.cpu_count()
    print(f"\nLoad on the production-like stack (PostgreSQL, gunicorn 2x32 threads behind nginx, local disk + "
          f"X-Accel-Redirect), loopback, {cpus} CPUs; downloads and chats: {runs} runs, latency percentiles over all "
          "requests, throughput the median of runs")
    print("errors: unexpected answers by status (none: no answer, e.g. connection reset)")
    print(f"{'scenario':40} {'requests':>8} {'errors':>10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'TTFB p50/p95/p99 ms':>22} {'req/s':>7} {'throughput':>14} {'vs peer':>8}")
    units = {"dl": "MiB/s", "dl-peer": "MiB/s", "chat": "tok/s", "chat-peer": "tok/s", "decide": "dec/s"}
    for key, s in scenarios.items():
        m = summary(s)
        errs = ",".join(f"{k}:{v}" for k, v in sorted(m["errors"].items())) or "0"
        lat, ttfb = m["latency_ms"], m["ttfb_ms"]
        ttfb_text = f"{ttfb['p50']:.0f}/{ttfb['p95']:.0f}/{ttfb['p99']:.0f}" if key != "decide" else "-"
        peer = scenarios.get(key + "-peer")
        ratio = f"{m['amount_per_s'] / summary(peer)['amount_per_s']:.2f}x" if peer else ""
        print(f"{s.name:40} {m['requests']:>8} {errs:>10} {lat['p50']:>8.0f} {lat['p95']:>8.0f} {lat['p99']:>8.0f} "
              f"{ttfb_text:>22} {m['requests_per_s']:>7.1f} {m['amount_per_s']:>8.1f} {units[key]:5} {ratio:>8}")
    statuses = summary(scenarios["decide"])["statuses"]
    print("decisions answered: " + ", ".join(f"{n} x {status or 'no answer'}" for status, n in sorted(statuses.items()))
          + " (409: the races' duplicates)")


def run_checks(scenarios, db, client_bytes, client_usage, calls, decided, facts, release_ids, work, logs) -> list:
    checks = []
    for key, s in scenarios.items():
        bad = [r for r in s.results if not r.ok]
        checks.append((not bad, f"{s.name.strip()}: {len(s.results) - len(bad)}/{len(s.results)} as expected"
                       + (f"; first failure: {bad[0].detail[:200]}" if bad else "")))
    # Downloads: per token (one per download slot), the rows match what the client received, one by one.
    rows = {name: v for name, v in db["downloads"].items() if name.startswith("dl-")}
    got = sorted((n, p, b, s) for n, v in client_bytes.items() for p, b, s in v)
    metered = sorted((n, p, b, s) for n, v in rows.items() for p, b, s, _ in v)
    vias = {via for v in rows.values() for *_, via in v}
    checks.append((got == metered and vias <= {"x-accel"},
                   f"downloads metered: {len(metered)} rows, {sum(m[2] for m in metered)} bytes; client received "
                   f"{len(got)} downloads, {sum(g[2] for g in got)} bytes; rows equal per token, path and range "
                   f"({'same' if got == metered else 'DIFFERENT'}), via {sorted(vias)}"))
    # Chats: per token (one per chat slot), the calls' tokens equal the usage the client got.
    rows = {name: v for name, v in db["calls"].items() if name.startswith("chat-")}
    got = sorted((n, p, c) for n, v in client_usage.items() for p, c in v)
    metered = sorted((n, p, c) for n, v in rows.items() for p, c, _, _, _ in v)
    flags = {(status, stream, endpoint) for v in rows.values() for _, _, status, stream, endpoint in v}
    checks.append((got == metered and len(flags) == 1 and next(iter(flags))[:2] == (200, True),
                   f"inference metered: {len(metered)} calls, {sum(m[1] for m in metered)} prompt + "
                   f"{sum(m[2] for m in metered)} completion tokens; client got {len(got)} usages, "
                   f"{sum(g[1] for g in got)} + {sum(g[2] for g in got)}; equal per token "
                   f"({'same' if got == metered else 'DIFFERENT'}); status/stream/endpoint {sorted(flags)}"))
    # Decisions: one per request, as the client asked; the races have exactly one winner.
    problems = []
    access_ids, answers = facts["access_requests"], {}
    for (kind, pk, body, _, _), r in zip(calls, decided):
        answers.setdefault((kind, pk), []).append((body, r.status))
    for (kind, pk), got in answers.items():
        winners = [body for body, status in got if status == 200]
        raced = len(got) > 1
        if len(winners) != 1 or (raced and sorted(s for _, s in got) != [200] + [409] * (len(got) - 1)):
            problems.append(f"{kind} request {pk}: answers {sorted(s for _, s in got)}")
            continue
        if kind == "access":
            row = db["access"][str(pk)]
            want = winners[0]["status"]
            grants = 1 if want == "accepted" else 0
            events = [e for e in row["events"] if e.startswith("access_request.") and e != "access_request.create"]
            if row["status"] != want or row["grants"] != grants or len(events) != 1:
                problems.append(f"access request {pk}: {row} after one {want}")
        else:
            row = db["releases"][str(pk)]
            want = winners[0]["decision"]
            status = {"approve": "approved", "reject": "rejected"}[want]
            decisions = [e for e in row["events"] if e in ("release_request.approve", "release_request.reject")]
            if row["status"] != status or row["approvals"] != [want] or len(decisions) != 1 or \
                    row["releases"] != (1 if want == "approve" else 0):
                problems.append(f"release request {pk}: {row} after one {want}")
    conflicts = sum(r.status == 409 for r in decided)
    checks.append((not problems, f"decisions: {len(answers) - len(problems)}/{len(answers)} requests decided exactly "
                   f"once, as asked ({conflicts} racing duplicates answered 409)"
                   + (f"; {problems[:3]}" if problems else "")))
    audit = db["audit"]
    checks.append((not audit["problems"], f"audit chain intact over {audit['checked']} events"
                   + (f": {audit['problems']}" if audit["problems"] else "")))
    crashes = []
    for log, offset in logs.items():
        with open(work / log, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
        n = text.count("Traceback") + text.count('"level": "ERROR"') + text.count('"levelname": "ERROR"')
        if n:
            crashes.append(f"{log}: {n}")
    checks.append((not crashes, "no tracebacks or errors in the web, worker and engine logs during the load"
                   + (f" ({', '.join(crashes)})" if crashes else "")))
    return checks


if __name__ == "__main__":
    sys.exit(main())
