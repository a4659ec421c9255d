"""A deployment of our own for each end-to-end test: its own database (a fresh PostgreSQL database when the
suite runs on PostgreSQL, else a SQLite file), var/ folder and Celery queues, migrated from scratch."""
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


@pytest.fixture
def deployment(tmp_path):
    base = os.environ.get("DATABASE_URL", "")
    drop = None
    if base.startswith("postgres"):
        import psycopg

        name = f"gatehouse_e2e_{uuid.uuid4().hex[:10]}"
        admin_url = base.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        database_url = base.rsplit("/", 1)[0] + "/" + name

        def drop():
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    else:
        database_url = f"sqlite:///{tmp_path / 'e2e.sqlite3'}"
    queue = f"e2e-{uuid.uuid4().hex[:10]}"
    env = dict(os.environ, GATEHOUSE_VAR_DIR=str(tmp_path / "var"), DATABASE_URL=database_url,
               GATEHOUSE_DEFAULT_QUEUE=queue, GATEHOUSE_TRAINING_QUEUE=f"{queue}-train",
               PYTHONPATH=f"{ROOT / 'platform'}{os.pathsep}{ROOT}", PYTHONUNBUFFERED="1")
    env.pop("CELERY_TASK_ALWAYS_EAGER", None)
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run([*manage, "migrate", "--noinput", "-v0"], env=env, check=True, cwd=ROOT)
    processes = []
    try:
        yield {"env": env, "manage": manage, "queue": queue, "var": tmp_path / "var", "processes": processes}
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=20)
        if drop:
            drop()


CHROMIUM = os.environ.get("GATEHOUSE_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="session")
def chromium():
    """Chromium driven by Playwright (the system's browser: `playwright install` cannot download here)."""
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
