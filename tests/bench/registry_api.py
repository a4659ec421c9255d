#!/usr/bin/env python
"""Registry API benchmark: list (page of 50), search and detail at 10 and 1,000 models x 5 versions with
evaluations, on SQLite and (when reachable) PostgreSQL. Requests go over real HTTP to the Django WSGI app in its own process;
query counts come from the same requests made in-process.

Peer in the same run: when MLFLOW_BIN names an `mlflow` executable (e.g. a throwaway venv's), an MLflow
server is started on SQLite, seeded with 100 models x 3 versions over REST, and its
`registered-models/search?max_results=100` is timed next to ours at 100 models and a page of 100.

    python tests/bench/registry_api.py                 # prints a table and one JSON line
    MLFLOW_BIN=/tmp/mlflow-venv/bin/mlflow python tests/bench/registry_api.py
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PG_BASE = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres:postgres@127.0.0.1:5432")
ITERATIONS = int(os.environ.get("BENCH_ITERATIONS", "200"))


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def timed(fn, iterations=ITERATIONS, warmup=20):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": round(statistics.median(samples), 2), "p95_ms": round(percentile(samples, 0.95), 2)}


# ------------------------------------------------------------------------------------------------
# Child: one backend, one fresh database.
# ------------------------------------------------------------------------------------------------

def seed(n_models, *, start=0):
    from datetime import timedelta

    from django.utils import timezone

    from gatehouse.accounts.models import Organization
    from gatehouse.registry.models import (
        Benchmark, EvaluationResult, License, Model, ModelRef, ModelVersion,
    )

    now = timezone.now()
    orgs = list(Organization.objects.order_by("slug"))
    licenses = list(License.objects.order_by("key"))
    benchmarks = list(Benchmark.objects.order_by("key"))
    tasks = ["text-generation", "fill-mask", "translation", "summarization"]
    models = Model.objects.bulk_create([
        Model(organization=orgs[i % len(orgs)], name=f"model-{i:04d}", tier=["open", "api", "closed"][i % 3],
              task=tasks[i % len(tasks)], license=licenses[i % len(licenses)], tags=["bench", f"family-{i % 7}"],
              summary=f"Benchmark model {i} for {'vision' if i % 10 == 0 else 'language'} tasks",
              updated_at=now - timedelta(minutes=i))
        for i in range(start, start + n_models)])
    versions = ModelVersion.objects.bulk_create([
        ModelVersion(model=model, commit=uuid.uuid4().hex + uuid.uuid4().hex[:8], status="verified", verified_at=now,
                     architecture="LlamaForCausalLM", parameters=7_000_000_000, context_length=4096,
                     own_flops=float(10 ** (20 + (model.pk + v) % 7)), cumulative_flops=float(10 ** (20 + (model.pk + v) % 7)),
                     card="---\nlicense: mit\n---\n# Bench\n", created_at=now)
        for model in models for v in range(5)])
    latest = {}
    for version in versions:
        latest[version.model_id] = version
    for model in models:
        model.latest_version = latest[model.pk]
    Model.objects.bulk_update(models, ["latest_version"])
    ModelRef.objects.bulk_create([ModelRef(model=m, name="main", kind="branch", version=latest[m.pk]) for m in models])
    EvaluationResult.objects.bulk_create([
        EvaluationResult(version=version, benchmark=b, metric="acc", value=0.5) for version in versions for b in benchmarks])


def serve(port):
    """Serve the Django app with wsgiref in its own process, so client and server don't share a GIL."""
    sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gatehouse.settings")
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from django.core.wsgi import get_wsgi_application

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    make_server("127.0.0.1", int(port), get_wsgi_application(), handler_class=Quiet).serve_forever()


class _Server:
    def __init__(self):
        import httpx

        from infra.stack import free_port

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
        for _ in range(200):
            try:
                httpx.get(self.url + "/api/v1/licenses", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("benchmark server did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def measure_ours(token, server, cases):
    import httpx
    from django.db import connection, reset_queries
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"})
    inproc = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    rows = {}
    for name, path in cases.items():
        response = http.get(path)
        assert response.status_code == 200, (path, response.status_code, response.text[:200])
        with CaptureQueriesContext(connection) as ctx:
            assert inproc.get(path).status_code == 200
        queries = len(ctx.captured_queries)  # read before reset_queries(): the property is lazy
        reset_queries()
        assert queries > 0
        rows[name] = timed(lambda: http.get(path)) | {"queries": queries}
    return rows


def child(backend):
    sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gatehouse.settings")
    import django

    django.setup()
    from django.core.management import call_command

    from gatehouse.accounts.models import Membership, Organization, User
    from gatehouse.accounts.services import api_token_create
    from gatehouse.registry.models import Benchmark

    call_command("migrate", verbosity=0)
    user = User.objects.create_user("bench", password="x")
    for i in range(10):
        org = Organization.objects.create(slug=f"org-{i}", name=f"Org {i}")
        Membership.objects.create(user=user, organization=org, role="member") if i < 2 else None
    for key in ("mmlu", "hellaswag", "gsm8k", "arc", "truthfulqa"):
        Benchmark.objects.create(key=key, name=key.upper())
    token = api_token_create(user=user, name="bench", scopes=["read"]).secret
    server = _Server()
    cases = {
        "list (page of 50)": "/api/v1/models?page_size=50",
        "search": "/api/v1/models?q=vision&page_size=50",
        "detail": "/api/v1/models/org-3/model-0003",
    }
    result = {"backend": backend, "at_10": None, "at_1000": None}
    seed(10)
    result["at_10"] = measure_ours(token, server, cases)
    seed(90, start=10)
    result["at_100_page_100"] = measure_ours(token, server, {"list (page of 100)": "/api/v1/models?page_size=100"})
    seed(900, start=100)
    result["at_1000"] = measure_ours(token, server, cases)
    server.stop()
    print("RESULT " + json.dumps(result))


# ------------------------------------------------------------------------------------------------
# MLflow peer
# ------------------------------------------------------------------------------------------------

def mlflow_peer(mlflow_bin):
    import httpx

    workdir = Path(tempfile.mkdtemp(prefix="bench-mlflow-"))
    port = 5055
    proc = subprocess.Popen([mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db",
                             "--default-artifact-root", str(workdir / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{base}/registered-models/search?max_results=1", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        else:
            return {"error": "mlflow server did not start"}
        with httpx.Client(base_url=base, timeout=30) as http:
            for i in range(100):
                http.post("/registered-models/create", json={"name": f"model-{i:04d}",
                                                             "tags": [{"key": "family", "value": str(i % 7)}]})
                for _ in range(3):
                    http.post("/model-versions/create", json={"name": f"model-{i:04d}", "source": f"s3://bucket/m{i}"})
            assert len(http.get("/registered-models/search?max_results=100").json()["registered_models"]) == 100
            return {"search (100 models, max_results=100)": timed(
                lambda: http.get("/registered-models/search?max_results=100"))}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# ------------------------------------------------------------------------------------------------
# Parent
# ------------------------------------------------------------------------------------------------

def run_backend(backend):
    env = dict(os.environ)
    tmp = tempfile.mkdtemp(prefix="bench-gatehouse-")
    env["GATEHOUSE_VAR_DIR"] = tmp
    drop = None
    if backend == "sqlite":
        env["DATABASE_URL"] = f"sqlite:///{tmp}/bench.sqlite3"
    else:
        import psycopg

        name = f"gatehouse_bench_{uuid.uuid4().hex[:8]}"
        try:
            with psycopg.connect(f"{PG_BASE}/postgres", autocommit=True, connect_timeout=3) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
        except psycopg.OperationalError as exc:
            print(f"skipping PostgreSQL: {exc}".splitlines()[0], file=sys.stderr)
            return None
        env["DATABASE_URL"] = f"{PG_BASE}/{name}"

        def drop():
            with psycopg.connect(f"{PG_BASE}/postgres", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    try:
        out = subprocess.run([sys.executable, __file__, "--child", backend], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"benchmark child for {backend} failed:\n{out.stderr[-3000:]}")
        line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
        return json.loads(line[len("RESULT "):])
    finally:
        if drop:
            drop()


def main():
    results = [r for r in (run_backend("sqlite"), run_backend("postgres")) if r]
    peer = mlflow_peer(os.environ["MLFLOW_BIN"]) if os.environ.get("MLFLOW_BIN") else None

    print(f"\nGatehouse registry API, {ITERATIONS} sequential HTTP requests per row (bearer token of a member)")
    print(f"{'backend':10} {'models':>6}  {'endpoint':26} {'p50 ms':>8} {'p95 ms':>8} {'queries':>8}")
    for r in results:
        for size, key in (("10", "at_10"), ("100", "at_100_page_100"), ("1000", "at_1000")):
            for name, row in r[key].items():
                print(f"{r['backend']:10} {size:>6}  {name:26} {row['p50_ms']:8.2f} {row['p95_ms']:8.2f} {row['queries']:8d}")
    summary = {"bench": "registry_api", "iterations": ITERATIONS}
    for r in results:
        b = r["backend"]
        summary[f"{b}_list_p50_ms_at_1000"] = r["at_1000"]["list (page of 50)"]["p50_ms"]
        summary[f"{b}_search_p50_ms_at_1000"] = r["at_1000"]["search"]["p50_ms"]
        summary[f"{b}_detail_p50_ms_at_1000"] = r["at_1000"]["detail"]["p50_ms"]
        summary[f"{b}_list_queries_at_10_vs_1000"] = [r["at_10"]["list (page of 50)"]["queries"],
                                                      r["at_1000"]["list (page of 50)"]["queries"]]
        summary[f"{b}_list100_p50_ms_at_100"] = r["at_100_page_100"]["list (page of 100)"]["p50_ms"]
        summary[f"{b}_list_under_15ms"] = summary[f"{b}_list_p50_ms_at_1000"] < 15
        summary[f"{b}_constant_queries"] = len(set(summary[f"{b}_list_queries_at_10_vs_1000"])) == 1
    if peer and "error" not in peer:
        mlflow_p50 = peer["search (100 models, max_results=100)"]["p50_ms"]
        ours = results[0]["at_100_page_100"]["list (page of 100)"]["p50_ms"]
        print(f"\nPeer, same run: MLflow registered-models/search (100 models x 3 versions, sqlite): "
              f"p50 {mlflow_p50:.2f} ms, p95 {peer['search (100 models, max_results=100)']['p95_ms']:.2f} ms; "
              f"Gatehouse list of 100 on sqlite: p50 {ours:.2f} ms -> ratio {ours / mlflow_p50:.2f}x")
        summary["mlflow_search100_p50_ms"] = mlflow_p50
        summary["ratio_vs_mlflow"] = round(ours / mlflow_p50, 3)
    elif peer:
        summary["mlflow_error"] = peer["error"]
    else:
        print("\nPeer: set MLFLOW_BIN to run MLflow side by side (reference anchor: 26.8 ms p50 at 100 models).")
    print(json.dumps(summary))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(sys.argv[2])
    else:
        main()
