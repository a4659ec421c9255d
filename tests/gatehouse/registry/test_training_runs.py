"""Training runs through the platform's services, executed in-process (the e2e test uses real workers)."""
import json
import time

import pytest
from django.utils import timezone

from gatehouse.audit.models import AuditEvent
from gatehouse.core.errors import InvalidInput, PermissionDenied
from gatehouse.registry.models import (
    ComputeRecord, Dataset, DatasetVersion, License, ModelVersion, TrainingMetric, TrainingRun,
)
from gatehouse.registry.services.training import (
    AttemptLost, _Lease, _prepare_data, stranded_training_runs_requeue, training_run_cancel, training_run_create, training_run_execute,
    training_run_work_dir, training_runs_requeue_stale,
)

FAST = {"seq_len": 32, "batch_size": 4, "eval_interval": 5, "eval_batches": 1, "max_bytes": 120_000,
        "tokenizer_vocab_size": 400}


@pytest.fixture(autouse=True)
def _roots(settings, tmp_path):
    settings.GATEHOUSE_DATA_ROOT = tmp_path / "datasets"
    settings.GATEHOUSE_DATA_ROOT.mkdir()


@pytest.fixture
def corpus(aurora, settings):
    """A dataset folder under the data root, with personal data in it."""
    folder = settings.GATEHOUSE_DATA_ROOT / "support-tickets"
    folder.mkdir()
    for i in range(30):
        (folder / f"t{i}.txt").write_text(f"Ticket {i}: please reset my password. Reach me at user{i}@example.com "
                                          f"or +1 415-555-01{i:02d}. def handler_{i}(request): return {i}\n" * 6)
    (folder / "copy.txt").write_text((folder / "t3.txt").read_text())  # one exact duplicate
    dataset = Dataset.objects.create(organization=aurora, name="tickets", provenance="user-data")
    dataset.licenses.set(License.objects.filter(key="cc-by-4.0"))
    return DatasetVersion.objects.create(dataset=dataset, version="v1", source_uri=f"file://{folder}")


def _run(aurora, alice, corpus, **kwargs):
    values = {"organization": aurora, "model_name": "ticket-lm", "actor": alice, "datasets": [(corpus, 1.0)],
              "max_steps": 12, "options": dict(FAST)}
    values.update(kwargs)
    return training_run_create(**values)


def test_a_run_trains_and_records_everything(aurora, alice, corpus, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as queued:
        run = _run(aurora, alice, corpus)
    assert len(queued) == 1 and run.status == "queued" and run.total_steps == 12
    run = training_run_execute(run_id=run.pk, attempt=0)
    assert run.status == "succeeded", run.error
    version = run.result_version
    manifest = json.loads((training_run_work_dir(run) / "train" / "export" / "manifest.json").read_text())

    record = ComputeRecord.objects.get(version=version)
    assert record.flops == manifest["flops"] and record.tokens == manifest["tokens"] == 12 * 4 * 32
    assert record.flops == run.estimated_flops  # the estimate used the same formula and shape
    assert record.flops_method == "operation-count" and record.hardware == "CPU" and record.device_count == 1
    assert version.own_flops == manifest["flops"]

    corpus.refresh_from_db()
    assert corpus.documents == 31 and corpus.exact_duplicate_rate == pytest.approx(1 / 31)
    assert corpus.personal_data_found["email"] == 30 * 6 and corpus.personal_data_found["phone"] == 30 * 6
    assert corpus.tokens > 0 and len(corpus.manifest_sha256) == 64
    assert list(version.datasets.all()) == [corpus.dataset]

    tasks = set(version.evaluations.values_list("benchmark__key", flat=True))
    assert {"gatehouse-copy", "gatehouse-count", "gatehouse-brackets", "validation"} <= tasks
    assert version.license.key == "cc-by-4.0"
    assert "- aurora/tickets" in version.card
    steps = TrainingMetric.objects.filter(run=run, kind="step").count()
    assert steps == 12 and TrainingMetric.objects.filter(run=run, kind="eval").count() == 3
    assert run.last_loss is not None and run.tokens == 12 * 4 * 32
    assert set(AuditEvent.objects.filter(target_id=str(run.pk), target_type="registry.trainingrun")
               .values_list("action", flat=True)) == {"training_run.create", "training_run.succeeded"}


def test_a_redelivered_or_repeated_task_registers_nothing_twice(aurora, alice, corpus):
    run = _run(aurora, alice, corpus)
    training_run_execute(run_id=run.pk, attempt=0)
    again = training_run_execute(run_id=run.pk, attempt=0)
    assert again.status == "succeeded"
    assert ModelVersion.objects.count() == 1 and ComputeRecord.objects.count() == 1


def test_fine_tune_records_lineage_and_inherits_the_licence(aurora, alice, corpus):
    base = training_run_execute(run_id=_run(aurora, alice, corpus).pk, attempt=0).result_version
    from gatehouse.registry.services.versions import model_version_verify

    base = model_version_verify(version_id=base.pk)
    run = _run(aurora, alice, corpus, model_name="ticket-lm-lora", method="lora", base_version=base, max_steps=6,
               options={**FAST, "lr": 0.01, "min_lr": 0.001})
    assert run.estimated_cumulative_flops == pytest.approx(run.estimated_flops + base.cumulative_flops)
    run = training_run_execute(run_id=run.pk, attempt=0)
    assert run.status == "succeeded", run.error
    version = run.result_version
    assert version.base_version_id == base.pk
    assert version.cumulative_flops == pytest.approx(base.cumulative_flops + version.own_flops)
    assert version.license_id == base.license_id
    assert sorted(f.path for f in version.files.all() if f.path.startswith("adapter")) == [
        "adapter_config.json", "adapter_model.safetensors"]


def test_a_bad_config_fails_the_run_with_a_readable_error(aurora, alice, corpus):
    base = training_run_execute(run_id=_run(aurora, alice, corpus).pk, attempt=0).result_version
    from gatehouse.registry.services.versions import model_version_verify

    base = model_version_verify(version_id=base.pk)
    run = _run(aurora, alice, corpus, model_name="bad", method="lora", base_version=base,
               options={**FAST, "lora_targets": ["q_proj", "wq"]})
    run = training_run_execute(run_id=run.pk, attempt=0)
    assert run.status == "failed"
    assert run.error == "--lora-targets: unknown module(s) wq; choose from q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    assert run.result_version is None and ModelVersion.objects.filter(model__name="bad").count() == 0
    assert "error: --lora-targets" in run.log_tail


@pytest.mark.parametrize("kwargs, message", [
    ({"datasets": []}, "needs at least one dataset version"),
    ({"max_steps": None}, "Give exactly one budget"),
    ({"token_budget": 1000}, "Give exactly one budget"),
    ({"method": "lora"}, "Method lora adapts an existing model"),
    ({"preset_name": "galactic"}, "unknown preset 'galactic'"),
    ({"options": {"learning_rate": 1}}, "Unknown training option(s): learning_rate"),
    ({"options": {"lr": "fast"}}, "Training option lr must be a float"),
    ({"options": {"batch_size": 0}}, "must be positive integers"),
    ({"model_name": "bad name!"}, "name: Use letters, digits"),
    ({"tier": "public"}, "tier must be one of closed, api, open"),
    ({"options": {"head_loss": "chunked"}}, "--head-loss must be auto, plain, fused or triton, not 'chunked'"),
    ({"options": {"compile_mode": "reduce-overhead"}, "processes": 2},
     "compile_mode reduce-overhead runs in one process: use processes 1 or another compile_mode."),
    ({"options": {"residual_dtype": "bfloat16", "dtype": "float32"}}, "--residual-dtype bfloat16 needs bf16 training"),
])
def test_bad_launches_are_refused_and_nothing_is_created(aurora, alice, corpus, kwargs, message):
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        _run(aurora, alice, corpus, **kwargs)
    assert TrainingRun.objects.count() == 0
    assert not AuditEvent.objects.filter(action__startswith="training_run").exists()


def test_the_licence_is_decided_before_compute_is_spent(aurora, alice, corpus):
    corpus.dataset.licenses.set(License.objects.filter(key__in=["mit", "cc-by-4.0"]))
    with pytest.raises(InvalidInput, match=r"the datasets carry several \(cc-by-4.0, mit\), so none can be inferred"):
        _run(aurora, alice, corpus)
    run = _run(aurora, alice, corpus, license="mit")
    assert run.config["license"] == "mit"
    llama = License.objects.get(key="llama3.1")
    corpus.dataset.licenses.set([llama])
    base = training_run_execute(run_id=_run(aurora, alice, corpus, model_name="llama-based").pk, attempt=0).result_version
    assert base.license == llama
    from gatehouse.registry.services.versions import model_version_verify

    base = model_version_verify(version_id=base.pk)
    with pytest.raises(InvalidInput, match="passes its restrictions to derivatives"):
        _run(aurora, alice, corpus, model_name="ft", method="lora", base_version=base, license="mit")


def test_sources_outside_the_data_root_are_refused(aurora, alice, corpus, tmp_path):
    outside = DatasetVersion.objects.create(dataset=corpus.dataset, version="v2", source_uri="file:///etc")
    with pytest.raises(InvalidInput, match="outside GATEHOUSE_DATA_ROOT"):
        _run(aurora, alice, outside)
    nowhere = DatasetVersion.objects.create(dataset=corpus.dataset, version="v3", source_uri="")
    with pytest.raises(InvalidInput, match="is not usable for training"):
        _run(aurora, alice, nowhere)
    assert TrainingRun.objects.count() == 0


def test_only_writers_launch_and_cancel(aurora, alice, bob, carol, corpus):
    for user in (bob, carol):
        with pytest.raises(PermissionDenied):
            _run(aurora, user, corpus)
    assert TrainingRun.objects.count() == 0
    run = _run(aurora, alice, corpus)
    with pytest.raises(PermissionDenied):
        training_run_cancel(run=run, actor=carol)
    assert TrainingRun.objects.get().status == "queued"


def test_estimate_and_expected_designations_are_recorded_before_the_run(aurora, alice, corpus):
    run = _run(aurora, alice, corpus, preset_name="1b", max_steps=None, token_budget=20_000_000_000_000,
               options={"seq_len": 2048, "batch_size": 8, "tokenizer_vocab_size": 32000})
    assert run.estimated_flops > 1e23
    assert run.expected_designations == ["eu-gpai"]
    notice = AuditEvent.objects.get(action="training_run.designation_expected")
    assert notice.payload["designations"] == ["eu-gpai"]


def test_cancel_a_queued_run_and_the_task_does_nothing(aurora, alice, corpus):
    run = training_run_cancel(run=_run(aurora, alice, corpus), actor=alice)
    assert run.status == "cancelled"
    assert training_run_execute(run_id=run.pk, attempt=0).status == "cancelled"
    assert not training_run_work_dir(run).exists()


def test_stale_running_runs_are_requeued_once(aurora, alice, corpus, django_capture_on_commit_callbacks):
    run = _run(aurora, alice, corpus)
    TrainingRun.objects.filter(pk=run.pk).update(status="running", heartbeat_at=timezone.now() - timezone.timedelta(minutes=5))
    with django_capture_on_commit_callbacks() as queued:
        assert training_runs_requeue_stale(stale_after_seconds=30) == [run.pk]
        assert training_runs_requeue_stale(stale_after_seconds=30) == []
    assert len(queued) == 1
    run.refresh_from_db()
    assert (run.status, run.attempt) == ("queued", 1)
    assert training_run_execute(run_id=run.pk, attempt=0).status == "queued"  # the old attempt's message: no-op
    assert training_run_execute(run_id=run.pk, attempt=1).status == "succeeded"


def _claimed(run, attempt=0):
    TrainingRun.objects.filter(pk=run.pk).update(status="running", attempt=attempt, heartbeat_at=timezone.now())
    work = training_run_work_dir(run)
    work.mkdir(parents=True)
    return work


def test_data_preparation_renews_the_lease_so_the_reaper_never_takes_it_for_a_dead_worker(aurora, alice, corpus,
                                                                                          settings):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    settings.TRAINING_HEARTBEAT_STALE_SECONDS = 0.4  # a heartbeat every 0.1 s; preparing takes well over a second
    run = _run(aurora, alice, corpus)
    work = _claimed(run)
    started = time.monotonic()
    with CaptureQueriesContext(connection) as queries, open(work / "train.log", "a") as log:
        data = _prepare_data(_Lease(run, 0), work, log)
    took = time.monotonic() - started
    renewals = [q for q in queries.captured_queries if q["sql"].startswith("UPDATE") and "heartbeat_at" in q["sql"]]
    assert (data / "manifest.json").exists() and took > 0.8
    assert len(renewals) >= took / 0.1 / 2  # renewed all along, not once at the end
    assert training_runs_requeue_stale(stale_after_seconds=0.4) == []


def test_an_attempt_that_lost_its_run_stops_preparing_and_writes_nothing(aurora, alice, corpus):
    run = _run(aurora, alice, corpus)
    work = _claimed(run, attempt=1)  # the reaper gave the run to attempt 1 while attempt 0 was still alive
    started = time.monotonic()
    with pytest.raises(AttemptLost), open(work / "train.log", "a") as log:
        _prepare_data(_Lease(run, 0), work, log)
    assert time.monotonic() - started < 5  # stopped at once, not left to run to the end
    assert not (work / "data" / "manifest.json").exists()
    assert TrainingRun.objects.get(pk=run.pk).status == "running"  # attempt 1's run, untouched


def test_a_cancel_during_data_preparation_stops_it_and_cancels_the_run(aurora, alice, corpus):
    run = _run(aurora, alice, corpus)
    TrainingRun.objects.filter(pk=run.pk).update(cancel_requested=True)  # arrives just as the worker claims it
    run = training_run_execute(run_id=run.pk, attempt=0)
    assert run.status == "cancelled" and run.finished_at and run.result_version is None
    assert not (training_run_work_dir(run) / "data" / "manifest.json").exists()
    assert not (training_run_work_dir(run) / "train").exists()  # the trainer never started
    assert not ModelVersion.objects.exists()


def test_a_failure_while_following_a_child_stops_the_child(aurora, alice, corpus, monkeypatch):
    import sys

    import psutil

    from gatehouse.registry.services import training

    run = _run(aurora, alice, corpus)
    work = _claimed(run)
    renewals = []

    def renew(self, **progress):
        renewals.append(1)
        if len(renewals) > 1:
            raise RuntimeError("the database went away")
    monkeypatch.setattr(_Lease, "renew", renew)
    monkeypatch.setattr(training, "_heartbeat_interval", lambda: 0.05)
    with pytest.raises(RuntimeError), open(work / "train.log", "a") as log:
        training._follow(_Lease(run, 0), [sys.executable, "-c", "import time; time.sleep(60)"], work, log)
    assert not [p for p in psutil.Process().children() if "time.sleep(60)" in " ".join(p.cmdline())]


def test_a_cancel_that_kills_the_trainer_before_its_handler_is_installed_still_cancels(aurora, alice, corpus,
                                                                                       monkeypatch):
    from gatehouse.registry.services import training

    def cancel_just_before_the_trainer_starts(lease, work):
        TrainingRun.objects.filter(pk=lease.run.pk).update(cancel_requested=True)
    monkeypatch.setattr(training, "_wait_for_previous_trainer", cancel_just_before_the_trainer_starts)
    run = training_run_execute(run_id=_run(aurora, alice, corpus).pk, attempt=0)
    assert run.status == "cancelled" and run.error == "" and not ModelVersion.objects.exists()


def test_a_requeued_run_waits_for_the_previous_trainer_to_release_the_folder(aurora, alice, corpus, settings):
    import fcntl
    import threading

    from gatehouse.registry.services.training import _wait_for_previous_trainer

    settings.TRAINING_HEARTBEAT_STALE_SECONDS = 0.4
    run = _run(aurora, alice, corpus)
    work = _claimed(run, attempt=1)
    (work / "train").mkdir()
    held = open(work / "train" / ".lock", "w")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # attempt 0's trainer, still writing its checkpoint
    threading.Timer(1.0, held.close).start()
    started = time.monotonic()
    _wait_for_previous_trainer(_Lease(run, 1), work)
    assert time.monotonic() - started >= 0.9
    assert training_runs_requeue_stale(stale_after_seconds=0.4) == []  # renewed while it waited


def test_registering_the_export_holds_the_run_beyond_the_staleness_window(aurora, alice, corpus):
    run = _run(aurora, alice, corpus)
    _claimed(run)
    _Lease(run, 0).extend(120)
    assert training_runs_requeue_stale(stale_after_seconds=1) == []
    TrainingRun.objects.filter(pk=run.pk).update(attempt=1)
    with pytest.raises(AttemptLost):
        _Lease(run, 0).extend(120)


def test_a_queued_run_whose_message_was_lost_is_sent_again_once_per_period(aurora, alice, corpus, settings,
                                                                           django_capture_on_commit_callbacks):
    from gatehouse.core.redelivery import stranded_work_redeliver

    settings.GATEHOUSE_STRANDED_WORK_SECONDS = 600
    with django_capture_on_commit_callbacks() as lost:  # never executed: the broker lost the message
        run = _run(aurora, alice, corpus)
    assert len(lost) == 1
    assert stranded_training_runs_requeue() == []  # just created: a normal wait for a worker
    TrainingRun.objects.filter(pk=run.pk).update(created_at=timezone.now() - timezone.timedelta(minutes=11))
    with django_capture_on_commit_callbacks() as queued:
        assert stranded_work_redeliver()["training_runs"] == [run.pk]  # beat's stranded-work sweep
        assert stranded_training_runs_requeue() == []  # not again within the period
    assert len(queued) == 1
    run.refresh_from_db()
    assert (run.status, run.attempt) == ("queued", 1)
    assert AuditEvent.objects.filter(action="training_run.requeue").count() == 1
    assert training_run_execute(run_id=run.pk, attempt=0).status == "queued"  # the lost message, should it come back
    assert training_run_execute(run_id=run.pk, attempt=1).status == "succeeded"


def test_the_trainers_speed_settings_reach_its_command_line(aurora, alice, corpus, tmp_path):
    from gatehouse.registry.services.training import _Lease, _train_command

    speed = {"compile_mode": "max-autotune-no-cudagraphs", "attention": "math", "residual_dtype": "bfloat16",
             "dtype": "bfloat16", "head_loss": "plain", "compile_optimizer": "no"}
    run = _run(aurora, alice, corpus, options={**FAST, **speed})
    command = _train_command(_Lease(run, 0), tmp_path, tmp_path / "data")
    passed = {flag[2:].replace("-", "_"): command[i + 1] for i, flag in enumerate(command) if flag.startswith("--")}
    assert {key: passed[key] for key in speed} == speed
    default = _train_command(_Lease(_run(aurora, alice, corpus, model_name="plain-lm"), 0), tmp_path, tmp_path)
    assert default[default.index("--head-loss") + 1] == "auto"  # the trainer's defaults, recorded with the run


def test_the_gpu_worker_launches_torchrun_for_several_processes_and_nodes(settings):
    import pytest

    from gatehouse.core.errors import InvalidInput
    from gatehouse.registry.services.training import launcher

    assert launcher(1)[1:] == ["-m", "training", "train"]
    two = launcher(2)
    assert two[1:4] == ["-m", "torch.distributed.run", "--standalone"] and two[4:6] == ["--nproc-per-node", "2"]
    settings.TRAINING_NNODES, settings.TRAINING_NODE_RANK = 4, 3
    with pytest.raises(InvalidInput, match="RDZV_ENDPOINT"):
        launcher(8)
    settings.TRAINING_RDZV_ENDPOINT = "node0.cluster:29400"
    multi = launcher(8)
    assert multi[multi.index("--nnodes") + 1] == "4" and multi[multi.index("--node-rank") + 1] == "3"
    assert multi[multi.index("--rdzv-endpoint") + 1] == "node0.cluster:29400" and "--standalone" not in multi
    assert multi[multi.index("--nproc-per-node") + 1] == "8"
