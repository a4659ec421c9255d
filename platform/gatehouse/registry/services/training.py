"""Training runs launched by the platform: estimate, queue, execute `python -m training` as a subprocess,
follow its JSON-lines events, and record what it produced through the same services as any upload.

The worker never imports torch: it talks to the training module through files, events and exit codes.
`training.config` is plain dataclasses, so the platform can validate a run and estimate its FLOPs up front.
"""
import ctypes
import fcntl
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from gatehouse.accounts.models import Organization, User
from gatehouse.audit.services import audit_record
from gatehouse.core.errors import Conflict, InvalidInput, clean_or_invalid
from gatehouse.registry.models import (
    Dataset, DatasetVersion, Model, ModelVersion, TrainingMetric, TrainingRun, TrainingRunDataset,
)
from gatehouse.registry.selectors import designation_thresholds, organization_for_writer
from gatehouse.registry.services.compute import compute_record_create
from gatehouse.registry.services.ingest import commit_id, files_from_directory, model_version_ingest
from training.config import ConfigError, ModelConfig, TrainConfig, preset

EXIT_STOPPED = 75  # the trainer's "stopped by a signal, resumable" status
CHILD_STOP_SECONDS = 120  # a trainer told to stop gets this long to write its checkpoint, then it is killed

def _heartbeat_interval() -> float:
    # Several heartbeats fit in the staleness window, so a live run is never mistaken for a dead one.
    return min(2.0, settings.TRAINING_HEARTBEAT_STALE_SECONDS / 4)

# Trainer options a run may set; paths, devices and identities are the platform's to choose. The last five are the
# trainer's speed settings (python -m training train --help says what each does).
RUN_OPTIONS = {"batch_size", "seq_len", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay", "beta1",
               "beta2", "grad_clip", "eval_interval", "eval_batches", "checkpoint_interval", "seed", "lora_rank",
               "lora_alpha", "lora_targets", "vocab_size", "dtype", "compile",
               "compile_mode", "attention", "residual_dtype", "head_loss", "compile_optimizer"}
DATA_OPTIONS = {"tokenizer_vocab_size": 2048, "val_fraction": 0.05, "redact": False, "max_bytes": None}


# ---------------------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------------------

def resolve_source(uri: str) -> Path:
    """A dataset version's documents on this machine. Only built-ins and folders under GATEHOUSE_DATA_ROOT:
    a run must never read arbitrary server files."""
    if uri == "builtin:python-stdlib":
        import sysconfig

        return Path(sysconfig.get_paths()["stdlib"])
    if uri.startswith("file://"):
        root = Path(settings.GATEHOUSE_DATA_ROOT).resolve()
        path = Path(uri.removeprefix("file://")).resolve()
        if path != root and root not in path.parents:
            raise InvalidInput(f"Dataset source {uri} is outside GATEHOUSE_DATA_ROOT ({root}); copy the data there.")
        if not path.exists():
            raise InvalidInput(f"Dataset source {uri} does not exist on the training host.")
        return path
    raise InvalidInput(f"Dataset source {uri or '(none)'} is not usable for training: give the dataset version a "
                       "source_uri (builtin:python-stdlib or file:///… under GATEHOUSE_DATA_ROOT).")


def _train_config(*, preset_name: str, method: str, options: dict, max_steps: int, base: bool) -> TrainConfig:
    unknown = sorted(set(options) - RUN_OPTIONS - set(DATA_OPTIONS))
    if unknown:
        raise InvalidInput(f"Unknown training option(s): {', '.join(unknown)}. Allowed: {', '.join(sorted(RUN_OPTIONS | set(DATA_OPTIONS)))}.")
    values = {k: v for k, v in options.items() if k in RUN_OPTIONS}
    if "lora_targets" in values:
        values["lora_targets"] = tuple(values["lora_targets"])
    defaults = {f.name: f.default for f in fields(TrainConfig) if not callable(f.default)}
    for key, value in values.items():
        expected = type(defaults[key])
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif not isinstance(values[key], expected) or isinstance(values[key], bool) != (expected is bool):
            raise InvalidInput(f"Training option {key} must be a {expected.__name__}.")
    try:
        cfg = TrainConfig(preset=preset_name, method=method, max_steps=max_steps, data="-", out="-",
                          init_from="-" if base else "", **values)
        if cfg.warmup_steps > max_steps:
            cfg.warmup_steps = max(0, max_steps // 10)  # a short budget keeps a proportionate warm-up
        cfg.validate()
        if not base:
            preset(preset_name)
    except ConfigError as exc:
        raise InvalidInput(str(exc)) from None
    return cfg


def _model_config(cfg: TrainConfig, base_version: ModelVersion | None, data_options: dict) -> ModelConfig:
    try:
        if base_version is not None:
            return ModelConfig.from_hf(base_version.config)
        vocab = cfg.vocab_size or data_options["tokenizer_vocab_size"]
        return preset(cfg.preset, vocab_size=vocab, max_seq_len=max(cfg.seq_len, 16))
    except (ConfigError, KeyError) as exc:
        raise InvalidInput(f"Cannot build the model configuration: {exc}") from None


def training_run_create(*, organization: Organization, model_name: str, actor: User,
                        datasets: list[tuple[DatasetVersion, float]], preset_name: str = "debug", method: str = "full",
                        base_version: ModelVersion | None = None, max_steps: int | None = None,
                        token_budget: int | None = None, options: dict | None = None, tier: str = "closed",
                        processes: int = 1, license: str = "") -> TrainingRun:
    """Validate, estimate FLOPs (6·N·D + attention) and expected designations, record, and queue on commit."""
    organization_for_writer(user=actor, organization=organization)
    options = dict(options or {})
    probe = Model(organization=organization, name=model_name)
    clean_or_invalid(probe, exclude=["organization", "tier", "license", "base_model", "latest_version"],
                     validate_unique=False, validate_constraints=False)
    if not datasets:
        raise InvalidInput("A training run needs at least one dataset version.")
    if len({dv.pk for dv, _ in datasets}) != len(datasets):
        raise InvalidInput("A dataset version appears twice in the mixture.")
    for dataset_version, weight in datasets:
        if not weight > 0:
            raise InvalidInput(f"Mixture weight of {dataset_version} must be positive.")
        resolve_source(dataset_version.source_uri)
    if method != "full" and base_version is None:
        raise InvalidInput(f"Method {method} adapts an existing model: give a base version.")
    if base_version is not None and base_version.status != ModelVersion.Status.VERIFIED:
        raise InvalidInput("The base version is not verified yet.")
    if tier not in ("closed", "api", "open"):
        raise InvalidInput("tier must be one of closed, api, open.")
    if not 1 <= processes <= 64:
        raise InvalidInput("processes must be between 1 and 64.")
    if (max_steps is None) == (token_budget is None):
        raise InvalidInput("Give exactly one budget: max_steps or token_budget.")
    license = _result_license(license, base_version, [dv for dv, _ in datasets])
    data_options = {**DATA_OPTIONS, **{k: options[k] for k in DATA_OPTIONS if k in options}}
    batch, seq = options.get("batch_size", 8), options.get("seq_len", 128)
    accum = options.get("grad_accum", 1)
    if not all(isinstance(v, int) and v > 0 for v in (batch, seq, accum)):
        raise InvalidInput("batch_size, seq_len and grad_accum must be positive integers.")
    tokens_per_step = batch * seq * accum * processes
    if token_budget is not None:
        if token_budget <= 0:
            raise InvalidInput("token_budget must be positive.")
        max_steps = math.ceil(token_budget / tokens_per_step)
    if max_steps <= 0:
        raise InvalidInput("max_steps must be positive.")
    cfg = _train_config(preset_name=preset_name, method=method, options=options, max_steps=max_steps,
                        base=base_version is not None)
    model_config = _model_config(cfg, base_version, data_options)
    if cfg.compile_mode == "reduce-overhead" and processes > 1:  # the trainer would refuse it once the run starts
        raise InvalidInput("compile_mode reduce-overhead runs in one process: use processes 1 or another compile_mode.")
    if cfg.seq_len > model_config.max_seq_len:
        raise InvalidInput(f"seq_len {cfg.seq_len} exceeds the base model's context of {model_config.max_seq_len}.")

    estimated = model_config.flops_per_token(cfg.seq_len) * tokens_per_step * max_steps
    cumulative = estimated + (base_version.cumulative_flops if base_version else 0.0)
    expected = [t.key for t in designation_thresholds() if t.applies_to(own_flops=estimated, cumulative_flops=cumulative)]
    config = {k: v for k, v in asdict(cfg).items() if k in RUN_OPTIONS}
    config["lora_targets"] = list(config["lora_targets"])
    with transaction.atomic():
        run = TrainingRun.objects.create(
            organization=organization, model_name=model_name, tier=tier, created_by=actor, preset=preset_name,
            method=method, base_version=base_version, config=config | {"data": data_options, "license": license},
            processes=processes, estimated_flops=estimated, estimated_cumulative_flops=cumulative,
            expected_designations=expected, total_steps=max_steps)
        TrainingRunDataset.objects.bulk_create([TrainingRunDataset(run=run, dataset_version=dv, weight=weight)
                                                for dv, weight in datasets])
        audit_record(actor=actor, action="training_run.create", target=run, data={
            "model": f"{organization.slug}/{model_name}", "method": method, "max_steps": max_steps,
            "estimated_flops": estimated, "estimated_cumulative_flops": cumulative})
        if expected:
            # The EU AI Act (Art. 52) asks for notice when a threshold is expected to be met: record it now.
            audit_record(actor=actor, action="training_run.designation_expected", target=run,
                         data={"designations": expected, "estimated_cumulative_flops": cumulative})
        _enqueue_on_commit(run)
    return run


def _result_license(requested: str, base_version: ModelVersion | None, dataset_versions: list[DatasetVersion]) -> str:
    """The trained model's licence, decided before compute is spent: the one asked for, else the base's
    (a derivative carries its base's terms), else the one licence all the datasets share."""
    from gatehouse.registry.models import License

    if requested:
        if not License.objects.filter(key=requested).exists():
            raise InvalidInput(f"Unknown licence {requested!r}; see /api/v1/licenses.")
        if base_version and base_version.license and base_version.license.restrictions_inherited \
                and requested != base_version.license.key:
            raise InvalidInput(f"The base's licence {base_version.license.key} passes its restrictions to derivatives; "
                               f"the fine-tune must use it too, not {requested}.")
        return requested
    if base_version is not None and base_version.license_id:
        return base_version.license.key
    keys = {key for dv in dataset_versions for key in dv.dataset.licenses.values_list("key", flat=True)}
    if len(keys) == 1:
        return keys.pop()
    raise InvalidInput("Give the model a licence (license): the datasets " + (
        f"carry several ({', '.join(sorted(keys))})" if keys else "record none") + ", so none can be inferred.")


def _enqueue_on_commit(run: TrainingRun) -> None:
    from gatehouse.registry.tasks import run_training_task

    run_id, attempt = run.pk, run.attempt
    # robust: with the broker down the run is saved all the same; the reaper queues it again once it is stranded.
    transaction.on_commit(lambda: run_training_task.apply_async((run_id, attempt), queue=settings.TRAINING_QUEUE),
                          robust=True)


def training_run_cancel(*, run: TrainingRun, actor: User) -> TrainingRun:
    organization_for_writer(user=actor, organization=run.organization)
    with transaction.atomic():
        now = timezone.now()
        if TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.QUEUED).update(
                status=TrainingRun.Status.CANCELLED, cancel_requested=True, finished_at=now):
            action = "training_run.cancel"
        elif TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING).update(cancel_requested=True):
            action = "training_run.cancel_requested"
        else:
            raise Conflict(f"Run {run.pk} is already {run.status}; nothing to cancel.")
        audit_record(actor=actor, action=action, target=run, data={})
    run.refresh_from_db()
    return run


def training_runs_requeue_stale(*, stale_after_seconds: int | None = None) -> list[int]:
    """Runs whose worker stopped heart-beating (killed, lost) go back to the queue with a new attempt; the
    trainer resumes from its last checkpoint. The conditional update makes a double requeue impossible."""
    stale_after = stale_after_seconds or settings.TRAINING_HEARTBEAT_STALE_SECONDS
    cutoff = timezone.now() - timezone.timedelta(seconds=stale_after)
    requeued = []
    for run in TrainingRun.objects.filter(status=TrainingRun.Status.RUNNING, heartbeat_at__lt=cutoff):
        with transaction.atomic():
            if TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING, attempt=run.attempt,
                                          heartbeat_at__lt=cutoff).update(
                    status=TrainingRun.Status.QUEUED, attempt=F("attempt") + 1, heartbeat_at=timezone.now()):
                run.refresh_from_db()
                audit_record(actor=None, action="training_run.requeue", target=run,
                             data={"attempt": run.attempt, "reason": f"no heartbeat for {stale_after} s"})
                _enqueue_on_commit(run)
                requeued.append(run.pk)
    return requeued


def stranded_training_runs_requeue(*, stale_after_seconds: int | None = None) -> list[int]:
    """Queued runs no worker took for GATEHOUSE_STRANDED_WORK_SECONDS: their message may be lost (the broker was
    down at commit, or the filesystem broker forgot a message its worker died with). Each gets a new attempt and a
    new message; an old message, if it still exists, then finds nothing to claim. heartbeat_at marks the requeue,
    so a run that merely waits for a busy worker is sent again at most once per period."""
    stale_after = settings.GATEHOUSE_STRANDED_WORK_SECONDS if stale_after_seconds is None else stale_after_seconds
    cutoff = timezone.now() - timezone.timedelta(seconds=stale_after)
    stranded = TrainingRun.objects.filter(status=TrainingRun.Status.QUEUED).filter(
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, created_at__lt=cutoff))
    requeued = []
    for run in stranded[:100]:
        with transaction.atomic():
            if TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.QUEUED, attempt=run.attempt).update(
                    attempt=F("attempt") + 1, heartbeat_at=timezone.now()):
                run.refresh_from_db()
                reason = f"queued for over {stale_after} s and no worker took it"
                audit_record(actor=None, action="training_run.requeue", target=run,
                             data={"attempt": run.attempt, "reason": reason})
                _enqueue_on_commit(run)
                requeued.append(run.pk)
    return requeued


# ---------------------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child: get SIGTERM when the worker dies (even by kill -9), so the trainer checkpoints and exits."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _python() -> str:
    return settings.TRAINING_PYTHON or sys.executable


def _child_env() -> dict:
    root = Path(settings.REPO_DIR)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
                PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")


def training_run_work_dir(run: TrainingRun) -> Path:
    return Path(settings.TRAINING_ROOT) / str(run.pk)


def _prepare_data(lease: "_Lease", work: Path, log) -> Path:
    run = lease.run
    data = work / "data"
    if (data / "manifest.json").exists():
        return data  # a retry reuses what an earlier attempt prepared
    mixture = [{"name": f"{rd.dataset_version.dataset}@{rd.dataset_version.version}",
                "paths": [str(resolve_source(rd.dataset_version.source_uri))], "weight": rd.weight,
                "license": ", ".join(rd.dataset_version.dataset.licenses.values_list("key", flat=True))}
               for rd in run.datasets.select_related("dataset_version__dataset__organization")]
    (work / "mixture.json").write_text(json.dumps(mixture, indent=2))
    opts = run.config.get("data", DATA_OPTIONS)
    cmd = [_python(), "-m", "training", "prepare", "--mixture", str(work / "mixture.json"), "--out", str(data),
           "--vocab-size", str(opts["tokenizer_vocab_size"]), "--val-fraction", str(opts["val_fraction"])]
    if run.base_version_id:
        cmd += ["--tokenizer-from", str(_base_export(lease, work))]
    if opts.get("redact"):
        cmd.append("--redact")
    if opts.get("max_bytes"):
        cmd += ["--max-bytes", str(opts["max_bytes"])]
    if _follow(lease, cmd, work, log) != 0:
        if lease.cancel_requested:
            raise RunCancelled()
        raise RunFailed("data preparation failed: " + _last_error(work / "train.log"))
    return data


def _base_export(lease: "_Lease", work: Path) -> Path:
    """The base version's files, copied out of weight storage into the run folder (streamed, not read whole)."""
    from django.core.files.storage import storages

    target = work / "base"
    if (target / ".complete").exists():
        return target
    storage = storages["weights"]
    for file in lease.run.base_version.files.all():
        path = target / file.path
        path.parent.mkdir(parents=True, exist_ok=True)
        lease.renew()  # before touching a file: an attempt that lost the run must not clobber the new one's copy
        partial = path.with_name(path.name + f".attempt-{lease.attempt}")
        with storage.open(file.storage_key, "rb") as src, open(partial, "wb") as dst:
            while chunk := src.read(1024 * 1024):
                dst.write(chunk)
                lease.renew_when_due()  # copying a large base takes longer than the staleness window
        os.replace(partial, path)
    (target / ".complete").write_text("ok")
    return target


class RunFailed(Exception):
    pass


class RunCancelled(Exception):
    pass


class AttemptLost(Exception):
    """A newer attempt owns the run (the reaper requeued it): this one stops and writes nothing more."""


def _last_error(log_path: Path) -> str:
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1].removeprefix("error: ")
    return (lines[-1] if lines else "no output") [:500]


def launcher(processes: int) -> list[str]:
    """How the gpu worker starts the trainer: plainly for one process, with torchrun for several — on this
    node alone, or as one node of TRAINING_NNODES meeting at TRAINING_RDZV_ENDPOINT (multi-node)."""
    if processes <= 1 and settings.TRAINING_NNODES <= 1:
        return [_python(), "-m", "training", "train"]
    if settings.TRAINING_NNODES > 1:
        if not settings.TRAINING_RDZV_ENDPOINT:
            raise InvalidInput("Multi-node training needs GATEHOUSE_TRAINING_RDZV_ENDPOINT (host:port of node 0).")
        where = ["--nnodes", str(settings.TRAINING_NNODES), "--node-rank", str(settings.TRAINING_NODE_RANK),
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", settings.TRAINING_RDZV_ENDPOINT,
                 "--rdzv-id", settings.TRAINING_RDZV_ID]
    else:
        where = ["--standalone"]
    return [_python(), "-m", "torch.distributed.run", *where, "--nproc-per-node", str(max(1, processes)),
            "-m", "training", "train"]


def _train_command(lease: "_Lease", work: Path, data: Path) -> list[str]:
    run = lease.run
    base = launcher(run.processes)
    cmd = base + ["--data", str(data), "--out", str(work / "train"), "--preset", run.preset or "debug",
                  "--method", run.method, "--max-steps", str(run.total_steps), "--run-id", f"gatehouse-run-{run.pk}",
                  "--datasets", ",".join(str(rd.dataset_version.dataset) for rd in
                                         run.datasets.select_related("dataset_version__dataset__organization"))]
    if run.base_version_id:
        cmd += ["--init-from", str(_base_export(lease, work)), "--base-model-id", run.base_version.model.repo_id]
    if run.config.get("license"):
        cmd += ["--license", run.config["license"]]
    for key, value in run.config.items():
        if key in RUN_OPTIONS:
            flag = "--" + key.replace("_", "-")
            cmd += [flag, ",".join(value) if isinstance(value, list) else str(value)]
    return cmd


class _Lease:
    """One attempt's hold on its run. Every phase (copying the base, preparing data, training) renews it at least
    once per heartbeat interval, or the reaper takes a slow phase for a dead worker and requeues the run."""

    def __init__(self, run: TrainingRun, attempt: int):
        self.run, self.attempt, self.renewed = run, attempt, time.monotonic()

    def _hold(self, **fields) -> None:
        """Update the run while this attempt still owns it; AttemptLost once a newer attempt does."""
        if not TrainingRun.objects.filter(pk=self.run.pk, status=TrainingRun.Status.RUNNING,
                                          attempt=self.attempt).update(**fields):
            raise AttemptLost()

    def renew(self, **progress) -> None:
        """Record the heartbeat and progress."""
        self._hold(heartbeat_at=timezone.now(), **progress)
        self.renewed = time.monotonic()

    def renew_when_due(self) -> None:
        """For a phase without a child to signal (copying the base): renew, and stop it on a cancel."""
        if time.monotonic() - self.renewed >= _heartbeat_interval():
            self.renew()
            if self.cancel_requested:
                raise RunCancelled()

    def extend(self, seconds: float) -> None:
        """Hold the run through a phase that cannot renew as it goes (registering the export): the heartbeat is
        set `seconds` ahead, so the reaper waits that much longer than usual before taking it for dead."""
        self._hold(heartbeat_at=timezone.now() + timezone.timedelta(seconds=seconds))

    @property
    def cancel_requested(self) -> bool:
        return TrainingRun.objects.filter(pk=self.run.pk, cancel_requested=True).exists()


class _EventReader:
    """Follows OUT/events.jsonl from where it was, storing metric points as they arrive."""

    def __init__(self, path: Path, run: TrainingRun):
        self.path, self.run, self.offset = path, run, 0
        self.progress: dict = {}
        self.events: list[dict] = []

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as fh:
            fh.seek(self.offset)
            data = fh.read()
        complete = data[: data.rfind("\n") + 1]  # a half-written last line waits for the next poll
        self.offset += len(complete.encode())
        rows = []
        for line in complete.splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.events.append(event)
            if event.get("event") == "step":
                rows.append(TrainingMetric(run=self.run, kind="step", step=event["step"], loss=event["loss"],
                                           lr=event["lr"], tokens=event["tokens"], tokens_per_s=event["tokens_per_s"],
                                           mfu=event.get("mfu"), flops=event["flops"],
                                           memory_bytes=event.get("memory_bytes")))
                self.progress = {"step": event["step"], "tokens": event["tokens"], "last_loss": event["loss"]}
            elif event.get("event") == "eval":
                rows.append(TrainingMetric(run=self.run, kind="eval", step=event["step"], val_loss=event["val_loss"],
                                           val_perplexity=event["val_perplexity"]))
        if rows:
            # A resumed attempt re-reads the file from the top: points already stored are skipped.
            TrainingMetric.objects.bulk_create(rows, ignore_conflicts=True)


def training_run_execute(*, run_id: int, attempt: int) -> TrainingRun | None:
    """The task body: claim, prepare data, train in a subprocess while following its events, record."""
    now = timezone.now()
    claimed = TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.QUEUED, attempt=attempt).update(
        status=TrainingRun.Status.RUNNING, heartbeat_at=now, started_at=Coalesce("started_at", now))
    if not claimed:
        return TrainingRun.objects.filter(pk=run_id).first()  # cancelled, done, or owned by a newer attempt
    run = TrainingRun.objects.select_related("organization", "base_version__model__organization",
                                             "base_version__license", "created_by").get(pk=run_id)
    work = training_run_work_dir(run)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "train.log"
    lease = _Lease(run, attempt)
    try:
        with open(log_path, "a") as log:
            log.write(f"--- attempt {attempt} at {now.isoformat()} ---\n")
            log.flush()
            data = _prepare_data(lease, work, log)
            reader = _EventReader(work / "train" / "events.jsonl", run)
            command = _train_command(lease, work, data)
            _wait_for_previous_trainer(lease, work)
            code = _follow(lease, command, work, log, reader)
    except AttemptLost:
        return TrainingRun.objects.get(pk=run.pk)
    except RunCancelled:
        return _finish(run, attempt, TrainingRun.Status.CANCELLED, log_path=log_path)
    except RunFailed as exc:
        return _finish(run, attempt, TrainingRun.Status.FAILED, error=str(exc), log_path=log_path)
    except InvalidInput as exc:
        return _finish(run, attempt, TrainingRun.Status.FAILED, error=exc.message, log_path=log_path)
    except Exception as exc:
        # A bug must fail the run visibly, not leave it "running" for the reaper to retry forever.
        _finish(run, attempt, TrainingRun.Status.FAILED, error=f"internal error: {exc!r}", log_path=log_path)
        raise
    run.refresh_from_db()
    if code == 0:
        try:
            lease.extend(_registration_seconds(work / "train" / "export"))
            return _record(run, attempt, work, reader)
        except AttemptLost:
            return TrainingRun.objects.get(pk=run.pk)
        except InvalidInput as exc:
            return _finish(run, attempt, TrainingRun.Status.FAILED, error=f"registering the export failed: {exc.message}",
                           log_path=log_path)
    if run.cancel_requested:  # 75 after a checkpoint, or killed by the SIGTERM before it could install its handler
        return _finish(run, attempt, TrainingRun.Status.CANCELLED, log_path=log_path)
    if code == EXIT_STOPPED:
        # Stopped by something other than a cancel (host shutdown): go back to the queue and resume later.
        with transaction.atomic():
            if TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING, attempt=attempt).update(
                    status=TrainingRun.Status.QUEUED, attempt=attempt + 1, heartbeat_at=timezone.now()):
                run.refresh_from_db()
                _enqueue_on_commit(run)
        return run
    return _finish(run, attempt, TrainingRun.Status.FAILED, error=_last_error(log_path), log_path=log_path)


def _follow(lease: _Lease, cmd: list[str], work: Path, log, reader: _EventReader | None = None) -> int:
    """Run a child (data preparation, the trainer) while renewing the lease and storing its events; a cancel
    sends it SIGTERM (the trainer checkpoints and exits 75). However this ends — the attempt lost the run
    (AttemptLost), the database failed — the child does not outlive it."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(),
                            preexec_fn=_die_with_parent, cwd=work)
    signalled = False
    try:
        while True:
            finished = proc.poll() is not None
            if reader:
                reader.poll()
            lease.renew(**(reader.progress if reader else {}))
            if finished:
                return proc.returncode
            if not signalled and lease.cancel_requested:
                proc.send_signal(signal.SIGTERM)
                signalled = True
            time.sleep(_heartbeat_interval() if not signalled else 0.2)
    finally:
        _stop_child(proc)


def _stop_child(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # the trainer checkpoints first
    try:
        proc.wait(timeout=CHILD_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_for_previous_trainer(lease: _Lease, work: Path) -> None:
    """A requeued run may start here while the previous attempt's trainer still checkpoints after its SIGTERM
    and holds the run folder's lock; wait for it (renewing the lease) rather than fail on the lock."""
    lock_path = work / "train" / ".lock"
    if not lock_path.exists():
        return
    with open(lock_path, "a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lease.renew()
                time.sleep(min(1.0, _heartbeat_interval()))
                continue
            fcntl.flock(lock, fcntl.LOCK_UN)
            return


def _finish(run: TrainingRun, attempt: int, status: str, *, error: str = "", log_path: Path | None = None) -> TrainingRun:
    tail = log_path.read_text(errors="replace")[-20000:] if log_path and log_path.exists() else ""
    with transaction.atomic():
        if TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING, attempt=attempt).update(
                status=status, error=error[:5000], log_tail=tail, finished_at=timezone.now()):
            audit_record(actor=None, action=f"training_run.{status}", target=run, data={"error": error[:500]})
    run.refresh_from_db()
    return run


def _registration_seconds(export: Path) -> float:
    """How long registering the export may take: it is copied into weight storage and hashed (10 MB/s is slow
    object storage), plus a minute."""
    return 60 + sum(f.stat().st_size for f in export.rglob("*") if f.is_file()) / 10e6


def _export_commit(run: TrainingRun, export: Path) -> str:
    manifest = json.loads((export / "manifest.json").read_text())
    files = [(name, facts["size"], facts["sha256"]) for name, facts in manifest["files"].items()]
    with open(export / "manifest.json", "rb") as fh:
        files.append(("manifest.json", (export / "manifest.json").stat().st_size,
                      hashlib.file_digest(fh, "sha256").hexdigest()))
    return commit_id(run.repo_id, files)


def _record(run: TrainingRun, attempt: int, work: Path, reader: _EventReader) -> TrainingRun:
    """Register the export like any upload, then link the run, datasets and compute. Safe to repeat."""
    export = work / "train" / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    data_manifest = json.loads((work / "data" / "manifest.json").read_text())
    version = ModelVersion.objects.filter(model__organization=run.organization, model__name=run.model_name,
                                          commit=_export_commit(run, export)).first()
    if version is None:
        version = model_version_ingest(organization=run.organization, name=run.model_name,
                                       files=files_from_directory(export), user=run.created_by,
                                       message=f"Training run {run.pk} ({run.method})", tier=run.tier,
                                       base_version=run.base_version)
    energy_j = next((e.get("energy_j") for e in reversed(reader.events) if e.get("event") == "step"), None)
    hardware = manifest["hardware"]
    start = next((e for e in reader.events if e.get("event") == "start"), {})
    with transaction.atomic():
        if not TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING, attempt=attempt).update(
                status=TrainingRun.Status.SUCCEEDED, result_version=version, finished_at=timezone.now(),
                step=run.total_steps, tokens=manifest["tokens"]):
            return TrainingRun.objects.get(pk=run.pk)
        _record_datasets(run, version, data_manifest)
        compute_record_create(
            version=version, actor=run.created_by, stage=run.method if run.base_version_id else "pretraining",
            hardware=_hardware_name(hardware), device_count=hardware["count"],
            wall_time_seconds=manifest["device_hours"] * 3600 / hardware["count"], flops=manifest["flops"],
            flops_method="operation-count", parameters=manifest["parameters"], tokens=manifest["tokens"],
            energy_kwh=energy_j / 3.6e6 if energy_j is not None else None,
            precision="bf16" if start.get("bf16") else "fp32", provider="gatehouse")
        audit_record(actor=None, action="training_run.succeeded", target=run,
                     data={"commit": version.commit, "flops": manifest["flops"], "tokens": manifest["tokens"]})
    run.refresh_from_db()
    return run


def _hardware_name(hardware: dict) -> str:
    if hardware["type"] == "cpu":
        return "CPU"
    name = hardware["device"]
    for known in settings.COMPUTE_PRICE_TABLE:
        if known.split("-")[0] in name:
            return known
    return name[:100]


def _record_datasets(run: TrainingRun, version: ModelVersion, data_manifest: dict) -> None:
    """Fill each dataset version's facts from the manifest the run computed, and link it to the version."""
    groups = {g["name"]: g for g in data_manifest.get("groups", [])}
    for rd in run.datasets.select_related("dataset_version__dataset__organization"):
        dv = rd.dataset_version
        group = groups.get(f"{dv.dataset}@{dv.version}")
        if group is None:
            continue
        content = hashlib.sha256("".join(s["sha256"] for s in group["sources"]).encode()).hexdigest()
        if not dv.manifest_sha256:
            DatasetVersion.objects.filter(pk=dv.pk).update(
                manifest_sha256=content, documents=group["documents"], tokens=group["tokens"], bytes=group["bytes"],
                exact_duplicate_rate=group["exact_duplicate_rate"], personal_data_found=group["personal_data_found"])
        version.datasets.add(dv.dataset)
