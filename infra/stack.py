#!/usr/bin/env python
"""A production-like Gatehouse on one machine, without Docker: PostgreSQL (a fresh database), Redis, an
S3-compatible server (moto), gunicorn workers behind nginx, a Celery worker per queue and beat as separate
processes, and the engine supervisor. CI's smoke suite (infra/smoke.py) drives it; run it yourself with

    python infra/stack.py            # prints the URL; Ctrl-C stops everything and drops the database
    python infra/stack.py --storage local   # weights on local disk, sent by nginx with X-Accel-Redirect

Needs PostgreSQL and Redis running (as .ci/run starts them) and nginx installed.
"""
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("STACK_POSTGRES_URL", "postgres://postgres:postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("STACK_REDIS_URL", "redis://127.0.0.1:6379/14")


def _port_block() -> range:
    """The ports this process picks from: below the kernel's ephemeral range, where outgoing connections take their
    local ports (one could take a port picked there between the probe and the server's bind), and a block of its own
    per pytest-xdist worker (gw0, gw1, ...), so two workers never pick the same port (63 workers with Linux's
    default range; more share blocks). With no room below that range, the ports above it."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2])
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    size = 500
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    index = int(worker) if worker.isdigit() else 0
    below = (low - 1024) // size  # blocks between the privileged ports and the ephemeral range
    if below >= 1:
        top = low - (index % below) * size
        return range(top - size, top)
    above = (65536 - high - 1) // size
    if above >= 1:
        bottom = high + 1 + (index % above) * size
        return range(bottom, bottom + size)
    return range(1024, 65536)  # every unprivileged port is ephemeral: any


_PORTS = _port_block()
_next_port = secrets.randbelow(len(_PORTS))  # a run right after another starts elsewhere: its ports may be in TIME_WAIT


def free_port() -> int:
    """A loopback port nothing listens on, for a server about to start; successive calls give different ports."""
    global _next_port
    for _ in range(len(_PORTS)):
        port = _PORTS[_next_port % len(_PORTS)]
        _next_port += 1
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use, or closed moments ago (TIME_WAIT)
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS.start}-{_PORTS.stop - 1}")


class Stack:
    """`storage="s3"` (the default): weights in the S3 server, downloads 302 to presigned URLs. `storage="local"`:
    weights on local disk under work/var/weights, Django decides and nginx sends the bytes (X-Accel-Redirect)."""

    def __init__(self, work: Path, storage: str = "s3"):
        if storage not in ("s3", "local"):
            raise ValueError(f"storage must be s3 or local, not {storage!r}")
        self.work = Path(work)
        self.storage = storage
        self.processes: dict[str, subprocess.Popen] = {}
        self.database = f"gatehouse_stack_{uuid.uuid4().hex[:8]}"
        self.port, self.web_port, self.s3_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        queue = f"stack-{uuid.uuid4().hex[:6]}"
        self.env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "platform"), str(ROOT)]), PYTHONUNBUFFERED="1",
            DATABASE_URL=PG_ADMIN.rsplit("/", 1)[0] + "/" + self.database, CELERY_BROKER_URL=REDIS,
            GATEHOUSE_VAR_DIR=str(self.work / "var"), SECRET_KEY=secrets.token_urlsafe(50), DEBUG="0",
            ALLOWED_HOSTS="127.0.0.1,localhost", GATEHOUSE_LOG_FORMAT="json", LOG_LEVEL="WARNING",
            GATEHOUSE_STORAGE="s3", AWS_STORAGE_BUCKET_NAME="weights", AWS_ACCESS_KEY_ID="stack",
            AWS_SECRET_ACCESS_KEY="stack-secret", AWS_S3_REGION_NAME="us-east-1", AWS_DEFAULT_REGION="us-east-1",
            AWS_S3_ENDPOINT_URL=f"http://127.0.0.1:{self.s3_port}", GATEHOUSE_DEFAULT_QUEUE=queue,
            GATEHOUSE_TRAINING_QUEUE=f"{queue}-gpu", GATEHOUSE_TRUSTED_PROXY_HOPS="1")
        if storage == "local":  # the folder nginx's internal /_weights/ location serves (infra/nginx.conf.template)
            for key in [k for k in self.env if k.startswith("AWS_")]:
                del self.env[key]
            self.env.update(GATEHOUSE_STORAGE="local", GATEHOUSE_WEIGHTS_DIR=str(self.work / "var" / "weights"),
                            GATEHOUSE_ACCEL_REDIRECT_PREFIX="/_weights/")
        self.manage = [sys.executable, str(ROOT / "manage.py")]

    # --- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> "Stack":
        self.work.mkdir(parents=True, exist_ok=True)
        self._sql(f'CREATE DATABASE "{self.database}"')
        if self.storage == "s3":
            self._spawn("s3", [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                               str(self.s3_port)])
            self._wait(f"http://127.0.0.1:{self.s3_port}/", "the S3 server")
            import boto3

            boto3.client("s3", endpoint_url=self.env["AWS_S3_ENDPOINT_URL"], aws_access_key_id="stack",
                         aws_secret_access_key="stack-secret", region_name="us-east-1").create_bucket(Bucket="weights")
        else:
            (self.work / "var" / "weights").mkdir(parents=True, exist_ok=True)
        subprocess.run([*self.manage, "migrate", "--noinput", "-v0"], env=self.env, cwd=ROOT, check=True)
        # A streaming chat holds its thread for the whole answer: 2 x 32 threads serve 64 streams at once (and may
        # hold 64 database connections, within PostgreSQL's default 100).
        self._spawn("web", [sys.executable, "-m", "gunicorn", "gatehouse.wsgi:application", "--bind",
                            f"127.0.0.1:{self.web_port}", "--workers", "2", "--worker-class", "gthread",
                            "--threads", "32", "--timeout", "600", "--graceful-timeout", "10"])
        self._spawn("nginx", ["nginx", "-c", str(self._nginx_conf()), "-p", str(self.work / "nginx"),
                              "-g", "daemon off;"])
        celery = [sys.executable, "-m", "celery", "-A", "gatehouse"]
        worker = [*celery, "worker", "--pool", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        self._spawn("worker", [*worker, "-Q", self.env["GATEHOUSE_DEFAULT_QUEUE"], "-n", "default@stack"])
        self._spawn("gpu-worker", [*worker, "-Q", self.env["GATEHOUSE_TRAINING_QUEUE"], "-n", "gpu@stack"])
        self._spawn("beat", [*celery, "beat", "-s", str(self.work / "beat-schedule")])
        self._spawn("engines", [*self.manage, "serve_engines"])
        self._wait(self.url + "/readyz", "the stack to be ready", ok=lambda r: r.status_code == 200)
        return self

    def stop(self) -> None:
        for name, proc in reversed(list(self.processes.items())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            self._sql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        except Exception as exc:  # never hide the real outcome behind a cleanup error
            print(f"could not drop {self.database}: {exc}", file=sys.stderr)

    # --- helpers --------------------------------------------------------------------------------------------
    def manage_shell(self, code: str, **env) -> str:
        out = subprocess.run([*self.manage, "shell", "-c", code], env=self.env | env, cwd=ROOT, capture_output=True,
                             text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        return out.stdout

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.work / f"{name}.log", "a")
        self.processes[name] = subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def _wait(self, url: str, what: str, ok=lambda r: r.status_code < 500, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {proc.returncode} (see {self.work / name}.log)")
            try:
                if ok(httpx.get(url, timeout=3)):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"timed out waiting for {what} at {url}")

    def _sql(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(statement)

    def _nginx_conf(self) -> Path:
        prefix = self.work / "nginx"
        prefix.mkdir(parents=True, exist_ok=True)
        text = (ROOT / "infra" / "nginx.conf.template").read_text()
        for key, value in {"PREFIX": prefix, "LISTEN": f"127.0.0.1:{self.port}",
                           "UPSTREAM": f"127.0.0.1:{self.web_port}", "WEIGHTS": self.work / "var" / "weights"}.items():
            text = text.replace(f"@@{key}@@", str(value))
        text = text.replace("worker_processes auto;", "worker_processes 2;\nuser root;" if os.geteuid() == 0 else
                            "worker_processes 2;")
        path = prefix / "nginx.conf"
        path.write_text(text)
        return path


def main() -> int:
    if not shutil.which("nginx"):
        print("error: nginx is not installed (apt-get install -y nginx)", file=sys.stderr)
        return 2
    storage = sys.argv[sys.argv.index("--storage") + 1] if "--storage" in sys.argv[1:-1] else "s3"
    stack = Stack(ROOT / "var" / "stack", storage=storage)
    try:
        stack.start()
        print(f"Gatehouse (production-like) at {stack.url}/ — logs in {stack.work}; Ctrl-C stops it.", flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
