"""A deployment of our own for each end-to-end test: its own database (a fresh PostgreSQL database when the
suite runs on PostgreSQL, else a SQLite file), var/ folder and Celery queues. The database is a copy of one
migrated from scratch once per session: `migrate` takes seconds, a copy a fraction of one."""
import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from infra.stack import free_port  # noqa: F401  (the end-to-end tests' servers take their ports from it)

ROOT = Path(__file__).resolve().parents[2]


def wait_for_http(url: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"{url} did not answer within {timeout} s")


def _admin_url(base: str) -> str:
    return base.rsplit("/", 1)[0] + "/postgres"


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory):
    """The database every scratch database copies: a PostgreSQL database name, or a SQLite file's path."""
    directory = tmp_path_factory.mktemp("template")
    base = os.environ.get("DATABASE_URL", "")
    if base.startswith("postgres"):
        import psycopg

        name = f"gatehouse_template_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(_admin_url(base), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url, template = base.rsplit("/", 1)[0] + "/" + name, name
    else:
        template = directory / "template.sqlite3"
        url = f"sqlite:///{template}"
    env = dict(os.environ, DATABASE_URL=url, GATEHOUSE_VAR_DIR=str(directory / "var"),
               PYTHONPATH=f"{ROOT / 'platform'}{os.pathsep}{ROOT}")
    subprocess.run([sys.executable, str(ROOT / "manage.py"), "migrate", "--noinput", "-v0"], env=env, check=True,
                   cwd=ROOT)
    yield template
    if base.startswith("postgres"):
        with psycopg.connect(_admin_url(base), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')


@contextlib.contextmanager
def scratch_database(template, directory: Path, prefix: str = "gatehouse_e2e"):
    """A fresh, migrated database URL for processes under test, copied from `template`: a new PostgreSQL database
    (dropped afterwards) when the suite runs on PostgreSQL, else a SQLite file in `directory`."""
    base = os.environ.get("DATABASE_URL", "")
    if not base.startswith("postgres"):
        import sqlite3

        target = directory / f"{prefix}.sqlite3"
        with contextlib.closing(sqlite3.connect(template)) as source, \
                contextlib.closing(sqlite3.connect(target)) as copy:
            source.backup(copy)  # consistent even if the template's WAL was not checkpointed
        yield f"sqlite:///{target}"
        return
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_admin_url(base), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(_admin_url(base), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def deployment(tmp_path, migrated_template):
    with scratch_database(migrated_template, tmp_path) as database_url:
        yield from _deployment(tmp_path, database_url)


def _deployment(tmp_path, database_url):
    queue = f"e2e-{uuid.uuid4().hex[:10]}"
    env = dict(os.environ, GATEHOUSE_VAR_DIR=str(tmp_path / "var"), DATABASE_URL=database_url,
               GATEHOUSE_DEFAULT_QUEUE=queue, GATEHOUSE_TRAINING_QUEUE=f"{queue}-train",
               PYTHONPATH=f"{ROOT / 'platform'}{os.pathsep}{ROOT}", PYTHONUNBUFFERED="1")
    env.pop("CELERY_TASK_ALWAYS_EAGER", None)
    manage = [sys.executable, str(ROOT / "manage.py")]
    processes = []
    try:
        yield {"env": env, "manage": manage, "queue": queue, "var": tmp_path / "var", "processes": processes}
    finally:
        stop_processes(processes)


def stop_processes(processes: list[subprocess.Popen]) -> None:
    """Kill each process with everything it started: `celery worker -B` runs beat as a child that outlives a
    killed parent and would go on ticking against a dropped database for the rest of the suite."""
    for proc in processes:
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for member in reversed(family):
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(family, timeout=20)
        proc.wait(timeout=20)


CHROMIUM = os.environ.get("GATEHOUSE_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def chromium():
    """Chromium driven by Playwright (the system's browser: `playwright install` cannot download here). One per
    module: Playwright's sync API keeps an event loop running in the test's thread while it is open, and Django then
    refuses database calls from that thread as if from async code (SynchronousOnlyOperation) in the tests after it,
    which under pytest-xdist may be any module's."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("GATEHOUSE_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
        pytest.skip(f"browser tests need Chromium at {CHROMIUM} (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


@pytest.fixture
def screenshots(request):
    """Where a browser test saves its screenshots: test-output/<test name>/."""
    folder = ROOT / "test-output" / request.node.name
    folder.mkdir(parents=True, exist_ok=True)
    return folder
