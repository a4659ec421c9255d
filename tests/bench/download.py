#!/usr/bin/env python
"""Download benchmark: `snapshot_download` of a 1 GiB gated model with the stock huggingface_hub client,
  1. from the embedded server (`manage.py runserver`, what `make run` serves),
  2. through nginx in front of Gatehouse with X-Accel-Redirect (Django decides, nginx sends the bytes),
  3. from nginx serving the same files statically (a static Hub mirror: JSON files and the blobs, no gate),
in the same run, plus the p50/p95 latency of the gate decision (HEAD resolve of the gated file, token with a
grant) over 1,000 requests with 1,000 models registered, and the embedded server's memory during a download.

    python tests/bench/download.py            # needs nginx on PATH (apt-get install nginx)
    BENCH_SIZE_MIB=256 python tests/bench/download.py

Goals (issue 6): behind nginx >= 0.9x nginx static, embedded >= 0.5x, gate p50 <= 5 ms, memory flat.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the repository, for infra.stack, which e2e.conftest imports
from e2e.conftest import free_port, wait_for_http  # noqa: E402  (the end-to-end tests' plain helpers)
SIZE_MIB = int(os.environ.get("BENCH_SIZE_MIB", "1024"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
GATE_REQUESTS = int(os.environ.get("BENCH_GATE_REQUESTS", "1000"))
REPO = "bench/big"

SETUP = """
import json, os
from pathlib import Path
from gatehouse.accounts.models import Membership, Organization, User
from gatehouse.accounts.services import api_token_create
from gatehouse.registry.models import Model
from gatehouse.registry.services.ingest import files_from_directory, model_version_ingest
from gatehouse.registry.services.versions import model_version_verify
from releases.models import AccessGrant, AccessPolicy
owner = User.objects.create_user("owner", "owner@example.com", "pw")
reader = User.objects.create_user("reader", "reader@example.org", "pw")
org = Organization.objects.create(slug="bench", name="Bench")
Membership.objects.create(user=owner, organization=org, role=Membership.Role.ADMIN)
version = model_version_ingest(organization=org, name="big", files=files_from_directory(Path(os.environ["BENCH_FOLDER"])),
                               user=owner, tier="open")
version = model_version_verify(version_id=version.pk)
AccessPolicy.objects.create(model=version.model, audience="gated-manual")
AccessGrant.objects.create(model=version.model, user=reader)
Model.objects.bulk_create([Model(organization=org, name=f"filler-{i}", tier="open") for i in range(999)])
print("SETUP " + json.dumps({"commit": version.commit, "models": Model.objects.count(),
      "token": api_token_create(user=reader, name="bench", scopes=["read", "gated-read"]).secret,
      "files": {f.path: [f.storage_key, f.size, f.sha256] for f in version.files.all()}}))
"""

NGINX_CONF = """
worker_processes 2;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  sendfile on; tcp_nopush on;
  default_type application/octet-stream;
  client_body_temp_path {tmp}/nginx-body; proxy_temp_path {tmp}/nginx-proxy; fastcgi_temp_path {tmp}/nginx-fcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi; scgi_temp_path {tmp}/nginx-scgi;
  # nginx's own ETag (mtime-size) is the same for two shards of equal size written in the same second, and
  # the client stores blobs by ETag: the mirror names each blob by its sha256, as the Hub does.
  map_hash_bucket_size 256;
  map $uri $linked_etag {{
{etags}
  }}
  server {{  # Gatehouse behind nginx: Django decides, nginx sends the bytes (infra/nginx.conf has the same block)
    listen 127.0.0.1:{gated_port};
    location /_weights/ {{
      internal;
      alias {weights}/;
      add_header X-Repo-Commit $upstream_http_x_repo_commit always;
      add_header X-Linked-Etag $upstream_http_x_linked_etag always;
      add_header X-Linked-Size $upstream_http_x_linked_size always;
    }}
    location / {{
      proxy_pass http://127.0.0.1:{accel_port};
      proxy_set_header Host $http_host;
      proxy_buffering off;
    }}
  }}
  server {{  # the peer: the same files as a static Hub mirror
    listen 127.0.0.1:{static_port};
    root {mirror};
    location /api/ {{ default_type application/json; }}
    location /{repo}/resolve/ {{
      add_header X-Repo-Commit {commit} always;
      add_header X-Linked-Etag $linked_etag always;
    }}
  }}
}}
"""


def write_model(folder: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Big\n")
    half = SIZE_MIB * 1024 * 1024 // 2 // 4
    for index in range(2):  # two shards, as real checkpoints come
        save_file({"weight": np.full(half, index + 1, dtype=np.float32)},
                  str(folder / f"model-0000{index + 1}-of-00002.safetensors"))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def snapshot(endpoint: str, token, cache: Path) -> float:
    from huggingface_hub import snapshot_download

    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    snapshot_download(REPO, endpoint=endpoint, token=token, cache_dir=cache)
    return time.perf_counter() - start


def main() -> None:
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise SystemExit("nginx is not installed: apt-get install -y nginx")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        tmp.chmod(0o755)  # nginx's workers run as an unprivileged user and must read the files
        write_model(tmp / "model")
        env = dict(os.environ, GATEHOUSE_VAR_DIR=str(tmp / "var"), DATABASE_URL=f"sqlite:///{tmp / 'db.sqlite3'}",
                   PYTHONPATH=f"{ROOT / 'platform'}{os.pathsep}{ROOT}", BENCH_FOLDER=str(tmp / "model"))
        manage = [sys.executable, str(ROOT / "manage.py")]
        subprocess.run([*manage, "migrate", "--noinput", "-v0"], env=env, check=True, cwd=ROOT)
        setup = subprocess.run([*manage, "shell", "-c", SETUP], env=env, cwd=ROOT, capture_output=True, text=True)
        if setup.returncode:
            raise SystemExit(setup.stderr)
        facts = json.loads(setup.stdout.split("SETUP ", 1)[1])
        commit, token = facts["commit"], facts["token"]
        weights = tmp / "var" / "weights"
        shutil.rmtree(tmp / "model")  # only the stored copy remains

        # The static mirror: the JSON the client asks for, and symlinks to the stored blobs.
        mirror = tmp / "mirror"
        api = mirror / "api" / "models" / REPO
        (api / "revision").mkdir(parents=True)
        (api / "tree").mkdir()
        (api / "revision" / "main").write_text(json.dumps({"id": REPO, "sha": commit}))
        (api / "tree" / commit).write_text(json.dumps([{"type": "file", "path": path, "size": size, "oid": sha[:40]}
                                                       for path, (_, size, sha) in facts["files"].items()]))
        resolve = mirror / REPO / "resolve" / commit
        resolve.mkdir(parents=True)
        for path, (key, _, _) in facts["files"].items():
            (resolve / path).symlink_to(weights / key)

        embedded_port, accel_port, gated_port, static_port = free_port(), free_port(), free_port(), free_port()
        log = open(tmp / "servers.log", "w")
        embedded = subprocess.Popen([*manage, "runserver", f"127.0.0.1:{embedded_port}", "--noreload"], env=env,
                                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        accel = subprocess.Popen([*manage, "runserver", f"127.0.0.1:{accel_port}", "--noreload"],
                                 env=env | {"GATEHOUSE_ACCEL_REDIRECT_PREFIX": "/_weights/"}, cwd=ROOT, stdout=log,
                                 stderr=subprocess.STDOUT)
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, gated_port=gated_port, accel_port=accel_port,
                                                          static_port=static_port, weights=weights, mirror=mirror,
                                                          repo=REPO, commit=commit, etags="\n".join(
            f'    /{REPO}/resolve/{commit}/{path} "{sha}";' for path, (_, _, sha) in facts["files"].items())))
        proxy = subprocess.Popen([nginx, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)], stdout=log,
                                 stderr=subprocess.STDOUT)
        try:
            for port in (embedded_port, accel_port, gated_port, static_port):
                wait_for_http(f"http://127.0.0.1:{port}/api/models/{REPO}/revision/main")
            results = run(tmp, embedded.pid, embedded_port, gated_port, static_port, token)
        finally:
            for proc in (proxy, embedded, accel):
                proc.terminate()
                proc.wait(timeout=20)
        report(results, facts)


def run(tmp: Path, embedded_pid: int, embedded_port: int, gated_port: int, static_port: int, token: str) -> dict:
    total = SIZE_MIB * 1024 * 1024
    ways = {"nginx static (peer)": (f"http://127.0.0.1:{static_port}", False),
            "gatehouse behind nginx (X-Accel-Redirect)": (f"http://127.0.0.1:{gated_port}", token),
            "gatehouse embedded (runserver)": (f"http://127.0.0.1:{embedded_port}", token)}
    seconds = {name: [] for name in ways}
    memory = {"before": rss_mib(embedded_pid), "peak": 0.0}
    for _ in range(RUNS):  # interleaved, so drift on a shared machine hits every way alike
        for name, (endpoint, auth) in ways.items():
            sampling = name.startswith("gatehouse embedded")
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    memory["peak"] = max(memory["peak"], rss_mib(embedded_pid))
                    time.sleep(0.02)
            sampler = threading.Thread(target=sample) if sampling else None
            if sampler:
                sampler.start()
            seconds[name].append(snapshot(endpoint, auth, tmp / "cache"))
            stop.set()
            if sampler:
                sampler.join()
    throughput = {name: total / statistics.median(values) / 2**20 for name, values in seconds.items()}

    url = f"http://127.0.0.1:{embedded_port}/{REPO}/resolve/main/model-00001-of-00002.safetensors"
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(headers=headers) as client:
        for _ in range(50):
            client.head(url)
        samples = []
        for _ in range(GATE_REQUESTS):
            start = time.perf_counter()
            response = client.head(url)
            samples.append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200, response.headers
    samples.sort()
    return {"throughput": throughput, "seconds": seconds, "memory": memory,
            "gate_ms": {"p50": samples[len(samples) // 2], "p95": samples[int(len(samples) * 0.95)],
                        "p99": samples[int(len(samples) * 0.99)]}}


def report(results: dict, facts: dict) -> None:
    throughput = results["throughput"]
    peer = throughput["nginx static (peer)"]
    print(f"\nsnapshot_download of {SIZE_MIB} MiB (2 shards), stock huggingface_hub, median of {RUNS} runs, loopback")
    print(f"{'server':44} {'MiB/s':>8} {'vs nginx static':>16}")
    for name, value in throughput.items():
        print(f"{name:44} {value:8.0f} {value / peer:15.2f}x")
    gate, memory = results["gate_ms"], results["memory"]
    print(f"gate decision (HEAD resolve, gated model with a grant, {facts['models']} models): p50 {gate['p50']:.2f} ms, "
          f"p95 {gate['p95']:.2f} ms, p99 {gate['p99']:.2f} ms over {GATE_REQUESTS} requests")
    print(f"embedded server memory: {memory['before']:.0f} MiB before, {memory['peak']:.0f} MiB peak during downloads")
    print(json.dumps({"bench": "download", "size_mib": SIZE_MIB, "runs": RUNS, "models": facts["models"],
                      "mib_per_s": {k: round(v) for k, v in throughput.items()},
                      "ratio_behind_nginx": round(throughput["gatehouse behind nginx (X-Accel-Redirect)"] / peer, 3),
                      "ratio_embedded": round(throughput["gatehouse embedded (runserver)"] / peer, 3),
                      "gate_ms": {k: round(v, 3) for k, v in gate.items()},
                      "memory_mib": {k: round(v) for k, v in memory.items()}}))


if __name__ == "__main__":
    main()
