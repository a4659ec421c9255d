"""Personas and helpers. alice owns aurora (admin), bob is her teammate (member), carol is an outsider
(admin of her own organization), root is a superuser who approves."""
import os
from pathlib import Path

import pytest
from django.core.files.storage import storages
from pytest_django.plugin import blocking_manager_key
from rest_framework.test import APIClient

from gatehouse import celery_app
from gatehouse.accounts.models import Membership, Organization, User
from gatehouse.accounts.services import api_token_create
from gatehouse.registry.demo import write_model_folder
from gatehouse.registry.reference_data import load_reference_data
from gatehouse.registry.services.ingest import files_from_directory, model_version_ingest
from gatehouse.registry.services.versions import model_version_verify
from tests.releases.upstream import FakeUpstream


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs -n logical) each worker gets its share of the CPUs for PyTorch's threads,
    and so do the processes a test starts: a worker per core, each with every core's threads, would oversubscribe.
    Nothing has imported torch yet (the test modules do, at collection), so it reads the variable."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))


# The directories whose files take longest (compiling, training, whole deployments), sent to pytest-xdist's workers
# first: pytest-django orders them last (they use no test database), and the suite then ended with one worker alone
# on a training file while the other had nothing left. The short database tests now fill the end.
SLOWEST_FIRST = ("tests/training/", "tests/e2e/")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: not item.nodeid.startswith(SLOWEST_FIRST))  # stable: the order within kept


def _empties_every_table(item: pytest.Item) -> bool:
    marker = item.get_closest_marker("django_db")
    return bool(marker and (marker.kwargs.get("transaction") or marker.kwargs.get("reset_sequences"))) \
        or bool({"transactional_db", "live_server"} & set(getattr(item, "fixturenames", ())))


_SET_UP = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    result = yield  # raises when a fixture failed or a skipif marker skipped the test: then no test database was used
    item.stash[_SET_UP] = True
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """A test with real transactions ends by emptying every table (TransactionTestCase's flush), the reference data
    the migrations loaded (licences, frameworks, thresholds) with them. Run in one process, pytest-django orders such
    tests after every other database test; a pytest-xdist worker may go on to another module's database tests, so
    the reference data is put back once the flush is done, even when another teardown failed."""
    try:
        return (yield)
    finally:
        if item.stash.get(_SET_UP, False) and _empties_every_table(item):
            from django.apps import apps

            with item.config.stash[blocking_manager_key].unblock():
                load_reference_data(apps)


@pytest.fixture(autouse=True)
def _isolated_storage(settings, tmp_path):
    """Weights and training runs in the test's own folder: `make run` leaves runs 1, 2… under var/training, and a
    test's run 1 must not find their logs and checkpoints."""
    settings.STORAGES = {**settings.STORAGES, "weights": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(tmp_path / "weights")}}}
    (tmp_path / "weights").mkdir()
    settings.TRAINING_ROOT = tmp_path / "training"
    yield


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Throttling counts live in the cache: every test starts with none."""
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _eager_celery():
    celery_app.conf.task_always_eager = True
    celery_app.conf.task_eager_propagates = True
    yield


@pytest.fixture
def weights_dir(tmp_path) -> Path:
    return tmp_path / "weights"


@pytest.fixture
def stored_files(weights_dir):
    """Every file currently in weight storage, as relative paths."""
    return lambda: sorted(str(p.relative_to(weights_dir)) for p in weights_dir.rglob("*") if p.is_file())


@pytest.fixture
def aurora(db, alice):
    org = Organization.objects.create(slug="aurora", name="Aurora")
    Membership.objects.create(user=alice, organization=org, role=Membership.Role.ADMIN)
    return org


@pytest.fixture
def northwind(db, carol):
    org = Organization.objects.create(slug="northwind", name="Northwind")
    Membership.objects.create(user=carol, organization=org, role=Membership.Role.ADMIN)
    return org


@pytest.fixture
def alice(db):
    return User.objects.create_user("alice", "alice@example.com", "pw-alice")


@pytest.fixture
def bob(db, aurora):
    user = User.objects.create_user("bob", "bob@example.com", "pw-bob")
    Membership.objects.create(user=user, organization=aurora, role=Membership.Role.MEMBER)
    return user


@pytest.fixture
def carol(db):
    return User.objects.create_user("carol", "carol@example.com", "pw-carol")


@pytest.fixture
def root(db):
    return User.objects.create_superuser("root", "root@example.com", "pw-root")


@pytest.fixture
def token_for():
    def make(user, scopes=("read",), **kwargs):
        return api_token_create(user=user, name="test", scopes=list(scopes), **kwargs).secret
    return make


@pytest.fixture
def client_for(token_for):
    """An API client authenticated with a fresh token; `client_for(None)` is anonymous."""
    def make(user=None, scopes=("read",)):
        client = APIClient()
        if user is not None:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(user, scopes)}")
        return client
    return make


@pytest.fixture
def model_folder(tmp_path):
    counter = iter(range(10_000))

    def make(metadata=None, body="# Model\n", seed=None, **kwargs) -> Path:
        n = next(counter)
        return write_model_folder(tmp_path / f"folder{n}", metadata=metadata, body=body,
                                  seed=n if seed is None else seed, **kwargs)
    return make


@pytest.fixture
def register(model_folder):
    """Ingest and verify a model folder; returns the verified version."""
    def make(org, name, user, *, tier="open", metadata=None, seed=None, verify=True, body="# Model\n"):
        folder = model_folder(metadata=metadata, seed=seed, body=body)
        version = model_version_ingest(organization=org, name=name, files=files_from_directory(folder), user=user,
                                       tier=tier)
        return model_version_verify(version_id=version.pk) if verify else version
    return make


@pytest.fixture
def weights_storage():
    return storages["weights"]


@pytest.fixture
def upstream():
    """An OpenAI-compatible backend for the inference gateway, a real HTTP server that records what reaches it."""
    server = FakeUpstream()
    yield server
    server.close()
