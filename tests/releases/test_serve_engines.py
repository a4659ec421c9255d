"""The engine supervisor's judgement of its engines: one that never becomes ready, or that stops answering while it
runs (hung, not exited), is marked down, stopped and started again after a backoff; a busy one that answers is left
alone. The engine here is a process that only sleeps; the port it "bound" and whether it "answers /health" are the
test's to say."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from releases.management.commands import serve_engines
from releases.models import InferenceBackend


@pytest.fixture
def supervisor(register, aurora, alice, monkeypatch, tmp_path, settings):
    model = register(aurora, "served", alice, tier="api").model
    backend = InferenceBackend.objects.create(model=model, kind="local")
    started = []
    real_popen = subprocess.Popen
    answers = {"health": False, "port": 43210}

    def popen(command, **kwargs):  # the real start_engine, with a sleeper in place of `python -m training serve`
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(120)"], **kwargs))
        started[-1].command = command  # what would have run
        if answers["port"]:  # it bound a port at once and wrote it where it was told
            Path(command[command.index("--port-file") + 1]).write_text(f"{answers['port']}\n")
        return started[-1]

    monkeypatch.setattr(serve_engines.subprocess, "Popen", popen)
    monkeypatch.setattr(serve_engines, "materialize", lambda version: tmp_path)
    (tmp_path / "engines").mkdir()
    settings.VAR_DIR = tmp_path
    command = serve_engines.Command()
    monkeypatch.setattr(command, "ready", lambda engine: answers["health"])
    clock = {"now": 1000.0}
    monkeypatch.setattr(serve_engines, "time", SimpleNamespace(monotonic=lambda: clock["now"]))  # its clock only
    engines = {}
    yield command, engines, backend, started, answers, clock
    for process in started:
        process.kill()
        process.wait()


def test_an_engine_not_ready_in_time_is_stopped_and_restarted_after_a_backoff(supervisor, settings):
    command, engines, backend, started, answers, clock = supervisor
    settings.ENGINE_START_TIMEOUT_SECONDS = 600
    command.reconcile(engines)
    assert len(started) == 1 and started[0].poll() is None
    clock["now"] += 599
    command.reconcile(engines)  # still compiling, within its time
    assert started[0].poll() is None and len(started) == 1
    clock["now"] += 2
    command.reconcile(engines)
    assert started[0].wait(timeout=10) is not None  # stopped, not left running beside the next one
    assert engines[backend.pk].failures == 1 and engines[backend.pk].process is None
    command.reconcile(engines)
    assert len(started) == 1  # not restarted before the backoff
    clock["now"] += 3
    answers["health"] = True
    command.reconcile(engines)
    assert len(started) == 2
    command.reconcile(engines)
    backend.refresh_from_db()
    assert backend.url == "http://127.0.0.1:43210/v1"


def test_an_engine_is_routed_to_on_the_port_it_reported_and_never_on_an_earlier_runs(supervisor, settings):
    command, engines, backend, started, answers, clock = supervisor
    answers["health"] = True
    command.reconcile(engines)
    command.reconcile(engines)
    backend.refresh_from_db()
    assert backend.url == "http://127.0.0.1:43210/v1"
    assert started[0].command[started[0].command.index("--port") + 1] == "0"  # the engine binds; nothing to race for
    started[0].kill()  # it crashed
    started[0].wait()
    command.reconcile(engines)
    backend.refresh_from_db()
    assert backend.url == "" and engines[backend.pk].failures == 1
    answers["port"] = None  # the next one is still loading: it has bound nothing yet
    clock["now"] += 3
    for _ in range(3):
        command.reconcile(engines)
    backend.refresh_from_db()
    assert len(started) == 2 and backend.url == "" and engines[backend.pk].port == 0  # not the old run's port
    engines[backend.pk].port_file.write_text("43211\n")  # it serves
    command.reconcile(engines)
    backend.refresh_from_db()
    assert backend.url == "http://127.0.0.1:43211/v1"


def test_a_running_engine_that_stops_answering_is_taken_for_hung(supervisor, settings):
    command, engines, backend, started, answers, clock = supervisor
    settings.ENGINE_UNRESPONSIVE_SECONDS = 60
    answers["health"] = True
    command.reconcile(engines)
    command.reconcile(engines)  # ready: routed to
    backend.refresh_from_db()
    assert backend.url
    for _ in range(40):  # busy for minutes, answering all along: left alone
        clock["now"] += 10
        command.reconcile(engines)
    assert started[0].poll() is None and len(started) == 1
    answers["health"] = False
    clock["now"] += 300  # the supervisor was busy elsewhere for minutes: one missed probe after it proves nothing
    command.reconcile(engines)
    clock["now"] += 50
    command.reconcile(engines)
    backend.refresh_from_db()
    assert backend.url and started[0].poll() is None  # missed for 50 s: not yet
    answers["health"] = True
    command.reconcile(engines)  # answered again: the count starts over
    answers["health"] = False
    for _ in range(3):
        clock["now"] += 25
        command.reconcile(engines)
    backend.refresh_from_db()
    assert backend.url and started[0].poll() is None  # 3 misses over 50 s
    clock["now"] += 25
    command.reconcile(engines)
    backend.refresh_from_db()
    assert backend.url == ""  # 4 misses over 75 s: hung; the gateway answers 503 with Retry-After meanwhile
    assert started[0].wait(timeout=10) is not None and engines[backend.pk].failures == 1


def test_a_backend_that_cannot_start_is_marked_down_and_retried_while_the_others_run(supervisor, register, aurora,
                                                                                     alice, monkeypatch, tmp_path):
    command, engines, backend, started, answers, clock = supervisor
    broken = InferenceBackend.objects.create(model=register(aurora, "broken", alice, tier="api").model, kind="local",
                                             url="http://127.0.0.1:9/v1")  # a stale URL from an earlier run

    def materialize(version):  # the broken model's weights cannot be copied out (storage down, disk full)
        if version.model_id == broken.model_id:
            raise OSError("No space left on device")
        return tmp_path

    monkeypatch.setattr(serve_engines, "materialize", materialize)
    answers["health"] = True
    command.reconcile(engines)  # does not raise: the other engine starts
    command.reconcile(engines)
    broken.refresh_from_db()
    backend.refresh_from_db()
    assert len(started) == 1 and started[0].poll() is None and backend.url  # started and routed to
    assert broken.url == "" and engines[broken.pk].failures == 1 and engines[broken.pk].process is None
    command.reconcile(engines)
    assert engines[broken.pk].failures == 1  # not retried before the backoff (2 s)
    clock["now"] += 3
    command.reconcile(engines)
    assert engines[broken.pk].failures == 2 and started[0].poll() is None and len(started) == 1


def test_an_engine_stopped_or_restarted_closes_its_log(supervisor, settings):
    command, engines, backend, started, answers, clock = supervisor
    settings.ENGINE_START_TIMEOUT_SECONDS = 10
    command.reconcile(engines)
    first_log = engines[backend.pk].log
    assert not first_log.closed
    clock["now"] += 11
    command.reconcile(engines)  # not ready in time: stopped
    assert first_log.closed and engines[backend.pk].log is None
    clock["now"] += 3
    command.reconcile(engines)  # restarted: a new handle, closed in turn when stopped
    second_log = engines[backend.pk].log
    assert len(started) == 2 and not second_log.closed
    command.stop_engine(engines[backend.pk])
    assert second_log.closed


def test_an_engine_serves_at_most_the_configured_context(supervisor, settings):
    command, engines, backend, started, answers, clock = supervisor
    settings.ENGINE_MAX_SEQ_LEN = 4096  # a checkpoint declaring 131,072 positions would size its cache by that
    command.reconcile(engines)
    argv = started[0].command
    assert argv[argv.index("--max-seq-len") + 1] == "4096" and argv[1:4] == ["-m", "training", "serve"]
