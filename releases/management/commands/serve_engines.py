"""Run and supervise one engine process (`python -m training serve`) per local inference backend.

    python manage.py serve_engines          # infra/run_local.py (`make run`) starts it beside web and worker

Each enabled backend of kind "local" gets its model version's files copied out of weight storage (streamed)
into VAR_DIR/engines/<commit>/, an engine on a loopback port the system picks (the engine binds port 0 and writes
the port to a file: no port to race other processes for), and its URL recorded on the backend once the engine
answers /health, so the gateway starts routing to it. An engine that exits, that is not ready within
GATEHOUSE_ENGINE_START_TIMEOUT_SECONDS, or that stops answering /health for GATEHOUSE_ENGINE_UNRESPONSIVE_SECONDS
while it runs (hung) is marked down (the gateway answers 503 with Retry-After), stopped and restarted with backoff.
So is one whose files could not be copied out or whose process could not be started: the others keep running.
SIGTERM/SIGINT stop every engine.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.files.storage import storages
from django.core.management.base import BaseCommand
from django.utils import timezone

from releases.models import InferenceBackend
from releases.ops import engine_healthy

ROOT = Path(__file__).resolve().parents[3]
POLL_SECONDS = 2.0


def materialize(version) -> Path:
    """The version's files as a folder the engine can load; written once per commit, atomically."""
    target = Path(settings.VAR_DIR) / "engines" / version.commit
    if (target / ".complete").exists():
        return target
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    storage = storages["weights"]
    for file in version.files.all():
        destination = tmp / file.path
        destination.parent.mkdir(parents=True, exist_ok=True)
        with storage.open(file.storage_key, "rb") as source, open(destination, "wb") as out:
            shutil.copyfileobj(source, out, 1024 * 1024)
    (tmp / ".complete").write_text(version.commit)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _die_with_parent() -> None:
    """Linux: the engine gets SIGTERM if the supervisor dies, even by SIGKILL, so no engine is orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Engine:
    def __init__(self, backend_id: int):
        self.backend_id, self.process, self.port, self.failures, self.next_start = backend_id, None, 0, 0, 0.0
        self.commit = ""
        self.port_file: Path | None = None  # where the engine writes the port it bound, once it serves
        self.log = None  # the engine's log file, open while it runs
        self.started_at = 0.0  # when the process was started (time.monotonic, as every time here)
        self.first_miss, self.misses = None, 0  # a ready engine's unanswered /health probes in a row, since when

    def reported_port(self) -> int:
        """The port the engine listens on, 0 until it has said (the file is written whole, after the bind)."""
        try:
            return int(self.port_file.read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def mark(self, url: str) -> None:
        InferenceBackend.objects.filter(pk=self.backend_id).update(url=url, updated_at=timezone.now())


class Command(BaseCommand):
    help = "Run and supervise the engine processes of local inference backends."

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="start what is missing, wait until ready, exit "
                                                                "(engines keep running; for scripts)")

    def handle(self, *args, once=False, **options):
        engines: dict[int, Engine] = {}
        stopping = {"now": False}

        def stop(*_):
            stopping["now"] = True
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, stop)
        try:
            while not stopping["now"]:
                self.reconcile(engines)
                if once and engines and not InferenceBackend.objects.filter(pk__in=list(engines), url="").exists():
                    return
                time.sleep(POLL_SECONDS)
        finally:
            if not once:
                for engine in engines.values():
                    self.stop_engine(engine)

    def reconcile(self, engines: dict[int, Engine]) -> None:
        backends = {b.pk: b for b in InferenceBackend.objects.filter(kind=InferenceBackend.Kind.LOCAL, enabled=True)
                    .select_related("model__organization", "model__latest_version", "version")}
        for backend_id in set(engines) - set(backends):  # disabled or deleted
            self.stop_engine(engines.pop(backend_id))
        for backend_id, backend in backends.items():
            engine = engines.setdefault(backend_id, Engine(backend_id))
            try:
                self.reconcile_one(engine, backend)
            except Exception as exc:  # one backend's trouble (storage, disk, a bad folder) must not stop the others
                self.fail(engine, f"engine for {backend.model.repo_id} failed: {exc.__class__.__name__}: {exc}")

    def reconcile_one(self, engine: Engine, backend: InferenceBackend) -> None:
        version = backend.version or backend.model.latest_version
        if version is None:
            return
        now = time.monotonic()
        if engine.process is not None and engine.process.poll() is not None:
            self.fail(engine, f"engine for {backend.model.repo_id} exited with status {engine.process.returncode}")
        if engine.process is not None and engine.commit != version.commit:  # a new version to serve
            self.stop_engine(engine)
        if engine.process is None and now >= engine.next_start:
            self.start_engine(engine, backend, version)
        elif engine.process is not None and not backend.url:  # starting: loading, compiling, capturing
            engine.port = engine.port or engine.reported_port()
            if engine.port and self.ready(engine):
                engine.mark(f"http://127.0.0.1:{engine.port}/v1")
                engine.failures, engine.first_miss, engine.misses = 0, None, 0
                self.stdout.write(f"engine for {backend.model.repo_id} is ready on port {engine.port}")
            elif now - engine.started_at > settings.ENGINE_START_TIMEOUT_SECONDS:
                self.fail(engine, f"engine for {backend.model.repo_id} was not ready after "
                                  f"{settings.ENGINE_START_TIMEOUT_SECONDS:g} s")
        elif engine.process is not None:  # serving: a busy engine still answers /health from its own thread
            if self.ready(engine):
                engine.first_miss, engine.misses = None, 0
                return
            # Hung only after probes kept failing for the whole span: the supervisor itself may have been busy
            # (copying another model's weights) between two probes, which says nothing about the engine.
            engine.first_miss = now if engine.first_miss is None else engine.first_miss
            engine.misses += 1
            if engine.misses >= 3 and now - engine.first_miss >= settings.ENGINE_UNRESPONSIVE_SECONDS:
                self.fail(engine, f"engine for {backend.model.repo_id} has not answered /health for "
                                  f"{now - engine.first_miss:.0f} s ({engine.misses} probes)")

    def fail(self, engine: Engine, why: str) -> None:
        """Down (the gateway answers 503 meanwhile), stopped if it still runs, started again after a backoff."""
        self.stderr.write(f"{why}; restarting")
        self.stop_engine(engine)
        engine.failures += 1
        engine.first_miss, engine.misses = None, 0
        engine.next_start = time.monotonic() + min(60, 2 ** engine.failures)

    def start_engine(self, engine: Engine, backend: InferenceBackend, version) -> None:
        folder = materialize(version)
        engine.port, engine.commit, engine.started_at = 0, version.commit, time.monotonic()
        engines, name = Path(settings.VAR_DIR) / "engines", f"{backend.model.organization.slug}--{backend.model.name}"
        engine.port_file = engines / f"{name}.port"
        engine.port_file.unlink(missing_ok=True)  # the last run's port is not this one's
        engine.log = open(engines / f"{name}.log", "a")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "platform"), str(ROOT)]))
        engine.process = subprocess.Popen(
            [sys.executable, "-m", "training", "serve", "--model", str(folder), "--model-id", backend.model.repo_id,
             "--port", "0", "--port-file", str(engine.port_file), "--max-seq-len", str(settings.ENGINE_MAX_SEQ_LEN)],
            cwd=ROOT, env=env, stdout=engine.log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        InferenceBackend.objects.filter(pk=backend.pk).update(url="", upstream_model=backend.model.repo_id)
        self.stdout.write(f"starting the engine for {backend.model.repo_id}@{version.commit[:12]}")

    def ready(self, engine: Engine) -> bool:
        return engine_healthy(f"http://127.0.0.1:{engine.port}/v1", timeout=1)

    def stop_engine(self, engine: Engine) -> None:
        engine.mark("")
        if engine.process is not None and engine.process.poll() is None:
            engine.process.terminate()
            try:
                engine.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                engine.process.kill()
        engine.process = None
        if engine.log is not None:  # one handle per start: a supervisor restarting for weeks must not run out
            engine.log.close()
            engine.log = None
