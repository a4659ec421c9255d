#!/usr/bin/env python
"""Training throughput: our trainer (the real `training.trainer.train` path, read from its events) against
transformers' LlamaForCausalLM with the same shape, the same starting weights, the same token windows and
the same AdamW settings, in the same run. Prints a table and one JSON line.

    python tests/bench/train_throughput.py                     # CPU: 'small' shape, seq 256
    python tests/bench/train_throughput.py --device cuda --preset 124m --seq-len 1024 --batch-size 16

MFU uses one formula for both (6N + 12·L·H·Q·T per token) and one peak: the datasheet bf16 figure on
A100/H100/H200, the measured fp32 matmul peak on a CPU.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def prepare_data(directory: Path, vocab: int) -> Path:
    import sysconfig

    from training.data import prepare

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prepare([stdlib], directory, vocab_size=vocab, license="PSF-2.0", max_bytes=3_000_000, val_fraction=0.02)
    return directory


# The TrainConfig fields a variant may set, each with what it takes: the one list the check, its error and --help use.
VARIANT_SETTINGS = ("attention=KERNEL", "compile_mode=MODE", "residual_dtype=DTYPE", "head_loss=KIND",
                    "compile_optimizer=auto|yes|no")


def parse_variant(variant: str) -> tuple[dict, dict]:
    """"default", or settings joined by "+": TrainConfig fields (VARIANT_SETTINGS) and inductor.NAME=VALUE (a
    torch._inductor.config flag set for that run only, to try one before it becomes a trainer setting)."""
    settings = dict(part.partition("=")[::2] for part in variant.split("+") if part != "default")
    inductor = {k.removeprefix("inductor."): v for k, v in settings.items() if k.startswith("inductor.")}
    config = {k: v for k, v in settings.items() if not k.startswith("inductor.")}
    if set(config) - {setting.partition("=")[0] for setting in VARIANT_SETTINGS}:
        raise SystemExit(f"unknown variant {variant!r}: use default, {', '.join(VARIANT_SETTINGS)} or "
                         "inductor.FLAG=VALUE, joined by +")
    return config, {k: {"1": True, "0": False}.get(v, v) for k, v in inductor.items()}


def ours(args, data: Path, out: Path, variant: str) -> dict:
    """One run of our trainer with one variant (parse_variant)."""
    import torch
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    from training.config import TrainConfig
    from training.trainer import train

    settings, inductor = parse_variant(variant)
    cfg = TrainConfig(data=str(data), out=str(out), preset=args.preset, batch_size=args.batch_size,
                      seq_len=args.seq_len, max_steps=args.warmup + args.steps, warmup_steps=1,
                      eval_interval=10**6, checkpoint_interval=10**6, device=args.device,
                      compile=args.compile, dtype=args.dtype, seed=0, vocab_size=args.model_vocab,
                      **settings)
    torch._dynamo.reset()  # each variant compiles from scratch, as a fresh process would
    counters.clear()
    # The export at the end is part of a real run but not of throughput; the step events carry the figures.
    with inductor_config.patch(inductor):
        assert train(cfg) == 0
    steps = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    start = next(e for e in steps if e["event"] == "start")
    timed = [e for e in steps if e["event"] == "step"][args.warmup:]
    tokens_per_s = statistics.median(e["tokens_per_s"] for e in timed)
    return {"variant": variant, "tokens_per_s": tokens_per_s, "flops_per_token": start["flops_per_token"],
            "peak": start["peak_flops"], "attention_kernel": start["attention_kernel"],
            "losses": [e["loss"] for e in timed][:3],
            # compile_mode=reduce-overhead: graphs inductor declined to use (it then launches kernels as default does)
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
            # head_loss=triton: the kernel's launch settings its autotuning picked
            "head_loss_kernel": triton_head_loss_config()}


def triton_head_loss_config() -> str | None:
    kernels = sys.modules.get("training.kernels")
    if kernels is None or kernels.INTERPRETED or kernels._head_loss_rows_tuned.best_config is None:
        return None
    return str(kernels._head_loss_rows_tuned.best_config)


def bench_device(args):
    """The device both trainers run on."""
    import torch

    return torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")


def transformers_peer(args, data: Path, init_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from training.data import TokenStream

    device = bench_device(args)
    model = AutoModelForCausalLM.from_pretrained(str(init_dir), local_files_only=True, dtype=torch.float32,
                                                 attn_implementation="sdpa").to(device)
    model.train()
    use_bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    compiled = args.compile == "yes" or (args.compile == "auto" and device.type == "cuda")
    step_model = torch.compile(model) if compiled else model
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=3e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    stream = TokenStream(data, "train", args.seq_len, seed=0)
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        x, y = stream.batch(step * args.batch_size, args.batch_size)
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = step_model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tokens = args.batch_size * args.seq_len
    return {"tokens_per_s": tokens / statistics.median(times[args.warmup:])}


# Attention first: cuDNN's attention kernels are named after the matmul instructions they use (wgmma).
KERNEL_KINDS = (("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
                ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "addmm", "aten::mm", "bmm")),
                ("cross-entropy", ("log_softmax", "nll_loss", "cross_entropy")),
                ("optimizer", ("adam",)),
                ("clip", ("norm", "clamp", "foreach_mul")))


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(n in lowered for n in needles):
            return kind
    return "elementwise (triton)" if lowered.startswith("triton") else "other"


def profile(args, data: Path, out: Path, variant: str, trace_dir: Path | None) -> None:
    """Where a step's time goes in the trainer's own loop (training.trainer.train, one variant): torch.profiler is
    stepped at the top of each training step (where the loop asks lr_at for the step's rate), skips the warm-up
    steps and records the kernels launched by the next three; stopping it waits for those to finish, and the
    steps queued after them are not launched yet. Kernels are summed per kind."""
    import argparse

    import torch
    from torch.profiler import ProfilerActivity

    import training.trainer as trainer

    steps = 3
    gpu = torch.cuda.is_available() and args.device != "cpu"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if gpu else [ProfilerActivity.CPU]
    schedule = torch.profiler.schedule(wait=args.warmup, warmup=1, active=steps, repeat=1)
    lr_at = trainer.lr_at
    with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
        def step_then_lr_at(step, cfg):
            prof.step()
            return lr_at(step, cfg)

        trainer.lr_at = step_then_lr_at
        try:
            # Steps beyond the window: the profiler stops at the top of the one after it, and a few more follow.
            run = ours(argparse.Namespace(**{**vars(args), "steps": 1 + steps + 2}), data, out, variant)
        finally:
            trainer.lr_at = lr_at
    step_events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    window = [e for e in step_events if e["event"] == "step"][args.warmup + 1:args.warmup + 1 + steps]
    wall = sum(args.batch_size * args.seq_len / e["tokens_per_s"] for e in window) / steps
    # On a GPU the kernels (less user annotations, which span kernels already counted); on a CPU (to try this
    # out) the aten operators' own time.
    if gpu:
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
                   and e.self_device_time_total > 0 and not getattr(e, "is_user_annotation", False)
                   and "#" not in e.key and not e.key.startswith("ProfilerStep")]
        per_step = lambda e: e.self_device_time_total / steps / 1000  # microseconds -> ms a step
    else:
        kernels = [e for e in prof.key_averages() if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
        per_step = lambda e: e.self_cpu_time_total / steps / 1000
    busy = sum(per_step(e) for e in kernels)
    kinds: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + per_step(e)
    tokens = args.batch_size * args.seq_len
    print(f"\nProfile of {steps} trainer steps ({variant}, {'cuda' if gpu else 'cpu'}, {run['attention_kernel']}), "
          f"preset {args.preset}, batch {args.batch_size} x seq {args.seq_len}: {wall * 1000:.1f} ms a step between "
          f"step events ({tokens / wall:.0f} tokens/s, profiler on), kernels busy {busy:.1f} ms a step")
    print(f"{'kind':24} {'ms/step':>9} {'share':>7}")
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"{kind:24} {ms:9.2f} {ms / busy:7.1%}")
    print(f"\n{'kernel (top 30 by time)':90} {'ms/step':>8} {'calls':>6} {'kind':>14}")
    for e in sorted(kernels, key=per_step, reverse=True)[:30]:
        print(f"{e.key[:90]:90} {per_step(e):8.3f} {e.count // steps:6d} {kernel_kind(e.key):>14}")
    if trace_dir:
        trace_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_dir / "train_step_trace.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--vocab", type=int, default=4096, help="tokenizer vocabulary to train")
    parser.add_argument("--model-vocab", type=int, default=0, help="pad the model's vocabulary (50304 = GPT-2's)")
    parser.add_argument("--ours", default="default",
                        help="comma-separated variants of our trainer, each timed: default, or settings joined "
                             f"by + ({', '.join(VARIANT_SETTINGS)}, inductor.FLAG=VALUE); the first is the headline")
    parser.add_argument("--peer-runs", type=int, default=2, choices=(1, 2),
                        help="2: the peer runs before and after ours, and ours (its first variant) again after that; the "
                             "better figure of each is compared")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the comparison: profile three steps of the trainer with the first --ours variant")
    parser.add_argument("--trace-dir", default="", help="with --profile: also write a Chrome trace here")
    args = parser.parse_args()

    import torch

    from training.config import preset
    from training.export import export
    from training.model import Transformer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prepare_data(tmp / "data", args.vocab)
        if args.profile:
            return profile(args, data, tmp / "profiled", args.ours.split(",")[0],
                           Path(args.trace_dir) if args.trace_dir else None)
        vocab = json.loads((data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
        # Both start from the same weights: ours exported, the peer loads that folder.
        torch.manual_seed(0)
        config = preset(args.preset, vocab_size=args.model_vocab or vocab, max_seq_len=max(args.seq_len, 16))
        export(Transformer(config), tmp / "init", tokenizer_dir=data, manifest={"run_id": "bench-init"},
               card="---\nlicense: PSF-2.0\n---\n")
        # The peer runs before and after ours and keeps its better figure, and the headline variant of ours runs
        # again after that: each side's better of two runs, alternated, on a noisy shared machine.
        peer_runs = [transformers_peer(args, data, tmp / "init")]
        print(f"transformers: {peer_runs[0]['tokens_per_s']:.0f} tokens/s", flush=True)
        variants = []
        for i, variant in enumerate(args.ours.split(",")):
            try:
                variants.append(ours(args, data, tmp / f"ours-{i}", variant))
            except Exception as exc:  # one variant failing (on a lent GPU, say) must not cost the others' figures
                print(f"ours ({variant}): failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            # Printed as it comes, so a run stopped at a time limit still reports the variants it finished.
            run = variants[-1]
            skips = run["cudagraph_skips"]
            print(f"ours ({variant}): {run['tokens_per_s']:.0f} tokens/s"
                  # against the first variant's peak, as the table below (a CPU's peak is measured each run)
                  + (f", MFU {run['flops_per_token'] * run['tokens_per_s'] / variants[0]['peak']:.3f}"
                     if variants[0]["peak"] else "")
                  + f", {run['tokens_per_s'] / peer_runs[0]['tokens_per_s']:.2f}x"
                  + (f" ({skips} CUDA graphs skipped by inductor)" if skips else "")
                  + (f" (head-loss kernel: {run['head_loss_kernel']})" if run["head_loss_kernel"] else ""), flush=True)
        ours_runs = [variants[0]["tokens_per_s"]] if variants else []
        if args.peer_runs > 1:
            peer_runs.append(transformers_peer(args, data, tmp / "init"))
            if variants and bench_device(args).type == "cpu":  # on a GPU each run's compile warms it (and costs lease)
                # Ours again, after the peer's second run: a process's first training run is the slower (on a
                # 2-core CPU, 1,465 then 1,758 tokens/s for one setting, as the peer's 1,411 then 1,496), so
                # comparing ours once against the better of the peer's two compared a cold run with a warm one.
                again = ours(args, data, tmp / "ours-again", variants[0]["variant"])
                ours_runs.append(again["tokens_per_s"])
                if again["tokens_per_s"] > variants[0]["tokens_per_s"]:
                    variants[0] = again
        peer = max(peer_runs, key=lambda r: r["tokens_per_s"])

    if not variants:
        raise SystemExit("every variant of our trainer failed")
    us = variants[0]
    flops_per_token, peak = us["flops_per_token"], us["peak"]
    mfu = (lambda tps: flops_per_token * tps / peak) if peak else (lambda tps: float("nan"))
    rows = [(f"gatehouse trainer ({v['variant']}, {v['attention_kernel']})", v["tokens_per_s"]) for v in variants]
    rows.append(("transformers LlamaForCausalLM", peer["tokens_per_s"]))
    threads = torch.get_num_threads()
    print(f"\nTraining throughput, preset {args.preset} ({config.num_layers}L x {config.hidden_size}, model vocab {config.vocab_size}, tokenizer {vocab}), "
          f"batch {args.batch_size} x seq {args.seq_len}, device {args.device}, {threads} CPU threads, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'trainer':52} {'tokens/s':>12} {'MFU':>8} {'ratio':>7}")
    for name, tps in rows:
        print(f"{name:52} {tps:12.0f} {mfu(tps):8.3f} {tps / peer['tokens_per_s']:6.2f}x")
    print("transformers before / after ours: " + " / ".join(f"{r['tokens_per_s']:.0f}" for r in peer_runs)
          + " tok/s; ours (first variant) first / last: " + " / ".join(f"{t:.0f}" for t in ours_runs)
          + " tok/s (the better of each is compared)")
    ratio = us["tokens_per_s"] / peer["tokens_per_s"]
    print(f"ratio (ours / transformers): {ratio:.2f}x; peak {peak:.3g} FLOP/s, {flops_per_token:.4g} FLOP/token")
    print(json.dumps({"bench": "train_throughput", "preset": args.preset, "seq_len": args.seq_len,
                      "batch_size": args.batch_size, "device": args.device, "ours_variant": us["variant"],
                      "ours_tokens_per_s": round(us["tokens_per_s"]),
                      "transformers_tokens_per_s": round(peer["tokens_per_s"]),
                      "transformers_runs_tokens_per_s": [round(r["tokens_per_s"]) for r in peer_runs],
                      "ours_runs_tokens_per_s": [round(t) for t in ours_runs],
                      "ratio": round(ratio, 3), "ours_mfu": round(mfu(us["tokens_per_s"]), 4) if peak else None,
                      "transformers_mfu": round(mfu(peer["tokens_per_s"]), 4) if peak else None,
                      "variants": [{"variant": v["variant"], "attention_kernel": v["attention_kernel"],
                                    "tokens_per_s": round(v["tokens_per_s"]),
                                    "mfu": round(mfu(v["tokens_per_s"]), 4) if peak else None} for v in variants],
                      "peak_flops": peak}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
