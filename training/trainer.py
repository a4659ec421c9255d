"""The training loop.

    python -m training train --data data/ --out runs/r1 --preset debug             # CPU or one GPU
    torchrun --nproc_per_node 8 -m training train --data data/ --out runs/r1 ...   # DDP, rank 0 does I/O

AdamW (fused, on CUDA and CPU; compiled, as the clipping is, where the model is compiled) with warmup + cosine
decay, gradient accumulation and clipping, optional bf16 autocast and torch.compile, periodic validation, exact
checkpoint/resume (re-running the same command resumes), SIGTERM → checkpoint and exit with status 75.
Events go to OUT/events.jsonl, one JSON object per line.
Exit status: 0 done, 2 bad configuration or data, 75 stopped by a signal with a resumable checkpoint.
"""
import fcntl
import inspect
import json
import math
import os
import platform
import resource
import signal
import subprocess
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from training.adapt import apply_method
from training.checkpoint import load_checkpoint, read_checkpoint_meta, recover_checkpoint, save_checkpoint
from training.config import ConfigError, ModelConfig, TrainConfig, preset
from training.data import TokenStream, load_manifest
from training.evaluate import run_tasks, validation_loss
from training.export import card_text, check_export_target, export, load_exported
from training.model import Transformer
from training.tokenizer import load_tokenizer

EXIT_STOPPED = 75

# Dense bf16 peaks (no sparsity), by device name substring. See docs in performance-anchors §0.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> tuple[float, str]:
    """The peak MFU divides by, and where it came from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value, f"{key} bf16 dense datasheet"
        return 0.0, f"unknown GPU {name!r}: MFU not reported"
    return measure_cpu_matmul_peak(), "measured fp32 matmul on this CPU"


def measure_cpu_matmul_peak(n: int = 1024, repeats: int = 8) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


_KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def attention_kernels(choice: str):
    """A context in which SDPA tries the chosen kernel first and falls back to the others in PyTorch's own order
    where it cannot run (a shape, a dtype, a CPU). torch.compile reads it when it traces, so the training loop
    runs inside it. "auto" leaves PyTorch's order."""
    if choice == "auto":
        return nullcontext()
    if "set_priority" not in inspect.signature(sdpa_kernel).parameters:
        raise ConfigError(f"--attention {choice} needs torch 2.6 or later (this is {torch.__version__}); use auto")
    first = _KERNELS[choice]
    order = [SDPBackend(value) for value in torch._C._get_sdp_priority_order()]
    return sdpa_kernel([first, *(k for k in order if k != first)], set_priority=True)


def attention_kernel_used(config, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel SDPA picks for this model's causal attention here (PyTorch's own choice function)."""
    q = torch.zeros(1, config.num_heads, 64, config.head_dim, device=device, dtype=dtype)
    try:
        return SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)).name.lower()
    except (AttributeError, RuntimeError, ValueError):  # a private function: report rather than fail a run
        return "unknown"


class Distributed:
    """Process-group facts. DDP is used when torchrun sets WORLD_SIZE > 1."""

    def __init__(self, device_choice: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
        if device_choice == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is available")
        self.device = torch.device(f"cuda:{self.local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
            # fp32 matmuls left outside autocast (and fp32 runs) may use TF32 tensor cores, as nanoGPT does.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.world > 1:
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        self.is_main = self.rank == 0

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class Events:
    """JSON-lines event log written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool, echo: bool):
        self.enabled, self.echo = enabled, echo
        self.fh = open(path, "a", buffering=1) if enabled else None

    def emit(self, kind: str, **fields):
        if not self.enabled:
            return
        # Strict JSON: a NaN or an infinity (a diverged loss, its perplexity) is written as null.
        fields = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in fields.items()}
        line = json.dumps({"event": kind, "time": time.time(), **fields}, default=str, allow_nan=False)
        self.fh.write(line + "\n")
        if self.echo:
            print(line, flush=True)

    def close(self):
        if self.fh:
            self.fh.close()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def code_version(directory: Path = Path(__file__).parent) -> str:
    """The commit the trainer runs, "+dirty" when its files differ from it (the commit alone would not say what ran)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=directory)
        if not head.stdout.strip():
            return "unknown"
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                                 capture_output=True, text=True, timeout=5, cwd=directory)
        return head.stdout.strip() + ("+dirty" if changed.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_model(cfg: TrainConfig, data_manifest: dict) -> tuple[Transformer, dict]:
    """A fresh model from a preset, or an exported one to adapt; returns it with facts about its base."""
    vocab = data_manifest["tokenizer"]["vocab_size"]
    if cfg.vocab_size and cfg.vocab_size < vocab:
        raise ConfigError(f"--vocab-size {cfg.vocab_size} is smaller than the tokenizer's {vocab} tokens")
    if cfg.init_from:
        model, hf_config = load_exported(Path(cfg.init_from))
        if model.config.vocab_size < vocab or not _same_tokenizer(Path(cfg.init_from), Path(cfg.data)):
            raise ConfigError(f"the data was not tokenized with the --init-from model's tokenizer; prepare it with "
                              f"--tokenizer-from {cfg.init_from}")
        base_manifest = Path(cfg.init_from) / "manifest.json"
        base = {"path": str(cfg.init_from),
                "manifest": json.loads(base_manifest.read_text()) if base_manifest.exists() else None}
        return model, base
    # The model's context is the length it is trained on (a shorter one than the preset's costs nothing to ask for),
    # never more than its preset allows.
    limit = preset(cfg.preset).max_seq_len
    if cfg.seq_len > limit:
        raise ConfigError(f"--seq-len {cfg.seq_len} is longer than preset {cfg.preset}'s context of {limit} tokens: "
                          "use a shorter --seq-len or a larger preset")
    return Transformer(preset(cfg.preset, vocab_size=cfg.vocab_size or vocab, max_seq_len=max(cfg.seq_len, 16))), {}


def _same_tokenizer(model_dir: Path, data_dir: Path) -> bool:
    """Token ids mean the same thing on both sides (the files may be serialised differently)."""
    if not (model_dir / "tokenizer.json").exists():
        return True  # a bare weights folder: only the vocabulary size can be checked
    return load_tokenizer(model_dir).get_vocab() == load_tokenizer(data_dir).get_vocab()


def _run_facts(cfg: TrainConfig, env, data_manifest: dict) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint for it to continue exactly."""
    return {"data_sha256": data_manifest.get("content_sha256"), "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum, "world_size": env.world, "seed": cfg.seed}


def check_triton(device: torch.device) -> None:
    """--head-loss triton launches a CUDA kernel (training.kernels); Triton's CPU interpreter (TRITON_INTERPRET=1) runs
    it on a CPU too, for tests."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("--head-loss triton is a CUDA kernel: train on a GPU, or use --head-loss fused")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise ConfigError("--head-loss triton needs Triton (CUDA builds of torch install it): pip install triton, or "
                          "use --head-loss fused") from None


def train(cfg: TrainConfig, *, echo: bool = False) -> int:
    cfg.validate()
    out = Path(cfg.out)
    data_manifest = load_manifest(Path(cfg.data))
    env = Distributed(cfg.device)
    try:
        if cfg.compile_mode == "reduce-overhead" and env.world > 1:
            raise ConfigError("--compile-mode reduce-overhead runs in one process: drop it under torchrun")
        if cfg.head_loss == "triton":
            check_triton(env.device)
        with attention_kernels(cfg.attention):
            return _train(cfg, env, out, data_manifest, echo)
    finally:
        env.close()


def _train(cfg: TrainConfig, env: Distributed, out: Path, data_manifest: dict, echo: bool) -> int:
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # One trainer per run folder: a second one (say, a retry started while the first still checkpoints)
        # must not interleave writes. The lock goes with the process, however it ends.
        lock = open(out / ".lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another trainer is running in {out}; wait for it or use another --out") from None
        check_export_target(out / "export")  # before the run, not after its compute is spent
    torch.manual_seed(cfg.seed)
    model, base = build_model(cfg, data_manifest)
    if cfg.seq_len > model.config.max_seq_len:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    trainable = apply_method(model, cfg.method, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                             lora_targets=cfg.lora_targets)
    model.to(env.device)
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and env.device.type == "cuda")
    autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    if cfg.residual_dtype == "bfloat16":
        if not use_bf16:
            raise ConfigError("--residual-dtype bfloat16 needs bf16 training (--dtype bfloat16, or auto on CUDA)")
        model.residual_dtype = torch.bfloat16

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # Fused on both devices a run can have, CPUs included (torch 2.4+): one pass over each tensor where the
    # default makes six. Compiled (--compile-optimizer, by default with the model), torch.compile makes its own
    # kernels of the clipping and, after the graph break torch.optim's step takes, of AdamW's update; the lr is then a
    # device tensor that the schedule fills, so a new lr is not a new compilation. A tensor lr needs the single-tensor
    # path or a capturable one, and only the single-tensor path runs on a CPU if dynamo falls back to eager (past its
    # recompile limit: a process that trains more than eight times).
    compiled = cfg.compile == "yes" or (cfg.compile == "auto" and env.device.type == "cuda")
    compiled_optimizer = cfg.compile_optimizer == "yes" or (cfg.compile_optimizer == "auto" and compiled)
    on_cpu = env.device.type == "cpu"
    flags = ({"foreach": not on_cpu, "capturable": not on_cpu, "fused": None} if compiled_optimizer
             else {"fused": True, "foreach": None, "capturable": False})
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  **flags)

    def set_lr(lr: float) -> None:
        for group in optimizer.param_groups:
            if compiled_optimizer:
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def as_run_wants(group: dict) -> None:
        group.update(flags)
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=env.device) if compiled_optimizer else lr

    for group in optimizer.param_groups:
        as_run_wants(group)

    checkpoint_dir = out / "checkpoint"
    step, cursor, run_id = 0, 0, cfg.run_id or uuid.uuid4().hex[:12]
    started_tokens, flops_done, device_seconds = 0, 0.0, 0.0
    run_facts = _run_facts(cfg, env, data_manifest)
    resumed = {}
    if env.is_main:
        recover_checkpoint(checkpoint_dir)
    if env.world > 1:
        dist.barrier()
    if checkpoint_dir.exists():
        meta = read_checkpoint_meta(checkpoint_dir)
        # Compared as configs, not dicts: a checkpoint from before a field existed holds that field's default.
        try:
            same_model = ModelConfig.from_dict(meta["model_config"]) == model.config
        except (ConfigError, TypeError):
            same_model = False
        if not same_model or meta["method"] != cfg.method:
            raise ConfigError(f"{checkpoint_dir} was written for a different model or method; use another --out "
                              "or delete the checkpoint")
        recorded = meta.get("run") or {}  # checkpoints from before these facts were kept are taken on trust
        changed = [f"{key} {recorded[key]!r} -> {value!r}" for key, value in run_facts.items()
                   if key in recorded and recorded[key] != value]
        if changed:
            raise ConfigError(f"{checkpoint_dir} belongs to a run with other settings ({', '.join(changed)}); it "
                              "would not continue exactly: rerun with the same settings, use another --out, or delete "
                              "the checkpoint")
        meta = load_checkpoint(checkpoint_dir, model=model, optimizer=optimizer)
        for group in optimizer.param_groups:  # a checkpoint carries its optimizer's flags; this run's choice wins
            as_run_wants(group)
        step, cursor, run_id = meta["step"], meta["cursor"], meta["run_id"]
        started_tokens, flops_done, device_seconds = meta["tokens"], meta["flops"], meta["device_seconds"]
        resumed = meta

    train_stream = TokenStream(Path(cfg.data), "train", cfg.seq_len, seed=cfg.seed)
    val_stream = TokenStream(Path(cfg.data), "val", cfg.seq_len, seed=cfg.seed, shuffle=False)
    if train_stream.vocab_size > model.config.vocab_size:
        raise ConfigError("the data's tokenizer is larger than the model's vocabulary")

    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    model.head_loss = "fused" if cfg.head_loss == "auto" else cfg.head_loss
    forward_model = torch.compile(model, mode=mode) if compiled else model

    def clip_and_step() -> None:
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()

    optimizer_step = torch.compile(clip_and_step) if compiled_optimizer else clip_and_step
    if env.world > 1:
        forward_model = DistributedDataParallel(forward_model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)

    flops_per_token = model.flops_per_token(cfg.seq_len)
    peak, peak_source = peak_flops(env.device)
    events = Events(out / "events.jsonl", env.is_main, echo)
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * env.world
    events.emit("start", run_id=run_id, resumed_from_step=step if step else None, device=str(env.device),
                world_size=env.world, parameters=model.num_parameters(), trainable_parameters=trainable,
                matmul_parameters=model.matmul_parameters(), flops_per_token=flops_per_token,
                flops_formula="6N + 12*L*H*Q*T (N: matmul parameters, embedding lookup excluded unless tied)",
                peak_flops=peak, peak_source=peak_source, bf16=use_bf16, compiled=compiled,
                compile_mode=cfg.compile_mode if compiled else None,
                head_loss=model.head_loss,
                optimizer="AdamW and clipping compiled" if compiled_optimizer else "AdamW, fused",
                attention_kernel=attention_kernel_used(model.config, env.device,
                                                       torch.bfloat16 if use_bf16 else torch.float32),
                model_config=model.config.to_dict(), train_config=asdict(cfg))
    energy = _EnergyMeter(env.device)
    model.train()
    # A run resumed at its last step (its export interrupted, say) exports what the run measured, not nothing.
    metrics = resumed.get("metrics", {})
    clock = _StepClock(events, energy, env, tokens_per_step, flops_per_token, peak,
                       totals=(started_tokens, flops_done, device_seconds))
    clock.last_loss = resumed.get("train_loss", clock.last_loss)

    def to_device(batch):
        # Pinned host memory lets the copy overlap the GPU work already queued.
        pin = env.device.type == "cuda"
        return tuple((t.pin_memory() if pin else t).to(env.device, non_blocking=True) for t in batch)

    try:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            set_lr(lr)
            total_loss = torch.zeros((), device=env.device)
            for micro in range(cfg.grad_accum):
                first = cursor + (micro * env.world + env.rank) * cfg.batch_size
                x, y = to_device(train_stream.batch(first, cfg.batch_size))
                sync = micro == cfg.grad_accum - 1 or env.world == 1
                context = nullcontext() if sync else forward_model.no_sync()
                with context, autocast():
                    _, loss = forward_model(x, y)
                    loss = loss / cfg.grad_accum
                loss.backward()
                total_loss += loss.detach()
            optimizer_step()
            optimizer.zero_grad(set_to_none=True)
            cursor += cfg.batch_size * cfg.grad_accum * env.world
            step += 1
            signalled = None
            if env.world > 1:
                # Ranks see a signal at different steps. Each one's flag travels with the loss, and all act on
                # the sum once the clock has read it (a step later on a GPU): the same step on every rank, with
                # no extra synchronisation.
                flag = torch.full((), 1.0 if stop["signal"] else 0.0, device=env.device)  # a fill, not a host copy
                packed = torch.stack([total_loss, flag])
                dist.all_reduce(packed, op=dist.ReduceOp.SUM)
                total_loss, signalled = packed[0] / env.world, packed[1]
            # The step is queued, not done: its loss is read once the next step is queued too, so the host
            # never idles the GPU between steps. Evaluation, checkpoints and stops read it first.
            clock.queued(step, total_loss, lr, signalled)
            # Read once: a signal arriving during evaluation must not stop a step that was not checkpointed.
            stopping = clock.peer_signalled if env.world > 1 else stop["signal"] is not None
            finished = step == cfg.max_steps
            evaluate = step % cfg.eval_interval == 0 or finished
            checkpoint = env.is_main and (step % cfg.checkpoint_interval == 0 or finished or stopping)
            if evaluate or checkpoint or stopping:
                clock.flush()
            if evaluate:
                metrics = validation_loss(model, val_stream, batches=cfg.eval_batches, batch_size=cfg.batch_size,
                                          device=env.device, autocast=autocast)
                events.emit("eval", step=step, **metrics)
            if checkpoint:
                save_checkpoint(checkpoint_dir, model=model, optimizer=optimizer, state={
                    "step": step, "cursor": cursor, "run_id": run_id, "tokens": clock.tokens,
                    "flops": clock.flops, "device_seconds": clock.device_seconds,
                    "model_config": model.config.to_dict(), "method": cfg.method, "run": run_facts,
                    "metrics": metrics, "train_loss": clock.last_loss})
                events.emit("checkpoint", step=step, path=str(checkpoint_dir))
            if env.world > 1:
                dist.barrier()
            if stopping and not finished:
                events.emit("stopped", step=step, signal=stop["signal"] or "another rank's", resumable=True)
                return EXIT_STOPPED
            if evaluate or checkpoint:
                clock.restart()  # evaluation and checkpoint time is not training-step time
        clock.flush()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    if env.world > 1:
        # Every rank's weights must be the same model at the end: each rank leaves a checksum of its weights,
        # and rank 0 records them all (where the ranks share a filesystem, as on one node).
        replicas = out / "replicas"
        replicas.mkdir(parents=True, exist_ok=True)
        (replicas / f"rank-{env.rank}.sha256").write_text(_weights_digest(model))
        dist.barrier()
        digests = [(replicas / f"rank-{r}.sha256").read_text() if (replicas / f"rank-{r}.sha256").exists() else None
                   for r in range(env.world)] if env.is_main else []
        if env.is_main and all(digests):
            events.emit("replicas", world_size=env.world, weights_sha256=digests, in_sync=len(set(digests)) == 1)
    if env.is_main:
        _finish(cfg, out, model, run_id, data_manifest, base, trainable, metrics, clock.last_loss,
                clock.tokens, clock.flops, clock.device_seconds, events, env)
    if env.world > 1:
        dist.barrier()  # the other ranks wait for rank 0's export, so all leave the process group together
    events.close()
    return 0


def _weights_digest(model) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _finish(cfg, out, model, run_id, data_manifest, base, trainable, metrics, last_loss, tokens, flops,
            device_seconds, events, env):
    tokenizer = load_tokenizer(Path(cfg.data))
    evaluations = run_tasks(model, tokenizer)  # the fixed suite `python -m training eval` scores too
    events.emit("evaluation", results=evaluations)
    adapter = cfg.method == "lora"
    # Only a repository id goes in the card's metadata; a local base is named in its text (its run's name).
    base_label = ((base.get("manifest") or {}).get("name") or Path(cfg.init_from).name) if cfg.init_from else ""
    license = cfg.license or data_manifest.get("license") or ""
    name = Path(cfg.out).name
    card = card_text(name=name, license=license, datasets=list(cfg.datasets), base_model=cfg.base_model_id or None,
                     base_label=base_label, method=cfg.method,
                     evaluations=evaluations, metrics=metrics, description=data_manifest.get("description", ""),
                     adapter=adapter)
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else platform.processor() or "CPU"
    manifest = {
        "kind": "gatehouse.training.export", "name": name, "run_id": run_id, "code_version": code_version(),
        "method": cfg.method, "adapter": adapter, "trainable_parameters": trainable,
        "parameters": model.num_parameters(),
        "base": {"path": base["path"], "run_id": (base.get("manifest") or {}).get("run_id"),
                 "files": (base.get("manifest") or {}).get("files")} if base else None,
        "model_config": model.config.to_dict(), "train_config": asdict(cfg),
        "data": [{key: data_manifest.get(key) for key in (
            "description", "license", "content_sha256", "documents", "documents_kept", "bytes",
            "exact_duplicates_removed", "exact_duplicate_rate", "personal_data_found", "personal_data_redacted",
            "tokens", "tokenizer", "sources", "splits", "groups")}],
        "metrics": {"train_loss": last_loss, **metrics}, "evaluations": evaluations,
        "tokens": tokens, "flops": flops, "flops_per_token": model.flops_per_token(cfg.seq_len),
        "device_hours": device_seconds / 3600, "hardware": {"device": device_name, "count": env.world,
                                                             "type": env.device.type},
        "license": license,
    }
    path = export(model, out / "export", tokenizer_dir=Path(cfg.data), manifest=manifest, card=card,
                  adapter=adapter, base_model_path=cfg.init_from)
    events.emit("export", path=str(path), train_loss=last_loss, **metrics)


class TrainingDiverged(ValueError):
    """The loss is no longer a number: the run stops rather than export a model of NaNs."""


class _StepClock:
    """Step events without a host-device sync per step.

    A step's loss is read when the following step has been queued (or at a flush). On a GPU it is copied to pinned
    host memory behind the step and read once an event recorded after it has fired: reading the device tensor
    itself would synchronise the whole stream, that is wait for the next step too, and the GPU would idle while
    the host queued the one after (4-6 ms a step of an H200's 62). A step's time is from the previous step's
    completion to its own, which is its real duration in the steady state where the GPU never waits for the host.
    """

    def __init__(self, events, energy, env, tokens_per_step, flops_per_token, peak, totals):
        self.events, self.energy, self.env = events, energy, env
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak
        self.pending = []
        # Only a device that runs asynchronously gains from the lag; on a CPU the step is done when queued.
        self.lag = 1 if env.device.type == "cuda" else 0
        self.tokens, self.flops, self.device_seconds = totals  # carried over from a resumed checkpoint
        self.last_loss = float("nan")
        self.peer_signalled = False
        self.restart()

    def restart(self):
        self.done_at = time.perf_counter()

    def queued(self, step: int, loss: torch.Tensor, lr: float, signalled: torch.Tensor | None = None):
        """signalled: under DDP, how many ranks had a stop signal at this step (read with the loss)."""
        done = None
        if self.env.device.type == "cuda":
            # A non-blocking copy off a GPU lands in pinned memory (PyTorch pins it), filled when the step gets there.
            loss = loss.detach().to("cpu", non_blocking=True)
            signalled = signalled.to("cpu", non_blocking=True) if signalled is not None else None
            done = torch.cuda.Event()
            done.record()
        self.pending.append((step, loss, lr, done, signalled))
        if len(self.pending) > self.lag:
            self._report(*self.pending.pop(0))

    def flush(self):
        while self.pending:
            self._report(*self.pending.pop(0))

    def _report(self, step, loss, lr, done, signalled):
        if done is not None:
            done.synchronize()  # this step's kernels, not the ones queued after it
        if signalled is not None and float(signalled) > 0:
            self.peer_signalled = True
        self.last_loss = float(loss)
        if not math.isfinite(self.last_loss):
            self.events.emit("diverged", step=step, loss=self.last_loss, lr=lr)
            raise TrainingDiverged(f"the loss became {self.last_loss} at step {step} (learning rate {lr:g}): training "
                                   "diverged and nothing was exported; lower --lr (or raise --warmup-steps) and run "
                                   "again")
        now = time.perf_counter()
        elapsed, self.done_at = now - self.done_at, now
        self.device_seconds += elapsed * self.env.world
        self.tokens += self.tokens_per_step
        self.flops += self.flops_per_token * self.tokens_per_step
        tokens_per_s = self.tokens_per_step / elapsed
        mfu = self.flops_per_token * tokens_per_s / (self.peak * self.env.world) if self.peak else None
        self.events.emit("step", step=step, loss=self.last_loss, lr=lr, tokens=self.tokens, tokens_per_s=tokens_per_s,
                         flops=self.flops, mfu=mfu, memory_bytes=_memory_bytes(self.env.device),
                         energy_j=self.energy.joules())


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _EnergyMeter:
    """Joules since start from NVML's energy counter, where the driver reports one; None elsewhere."""

    def __init__(self, device: torch.device):
        self.handle, self.start = None, None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self.start = pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception:  # no pynvml or no energy counter on this GPU: energy is simply not reported
            self.handle = None

    def joules(self) -> float | None:
        if self.handle is None:
            return None
        return (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self.start) / 1000.0
