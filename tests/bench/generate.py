#!/usr/bin/env python
"""Generation benchmark: our engine (training/engine.py, the code path `python -m training serve` runs) against
`transformers`' generate on the same exported checkpoint, in the same run: tokens/s at batch 1 and with 8 and
32 concurrent requests, and time to first token; then the gateway's overhead (p50 of the same request through
Gatehouse's /v1, served by gunicorn as in production with quotas checked, and straight to the engine process).

    python tests/bench/generate.py                          # CPU, 'small' shape, 128 new tokens
    python tests/bench/generate.py --device cuda --preset 124m --concurrency 1,64

transformers gets its best case for concurrency: all prompts as one batch to a single generate call. Both
generate exactly the same number of tokens (EOS ignored) greedily from prompts of the same length.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def make_checkpoint(directory: Path, preset_name: str, seq_len: int) -> Path:
    import torch

    from training.config import preset
    from training.export import export
    from training.model import Transformer
    from training.tokenizer import save_tokenizer, train_tokenizer

    import sysconfig

    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:150]  # ~3 MB of real Python
    texts = [path.read_text(errors="replace") for path in sources]
    save_tokenizer(train_tokenizer(texts, 4096), directory / "tok", model_max_length=seq_len)
    vocab = json.loads((directory / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    torch.manual_seed(0)
    model = Transformer(preset(preset_name, vocab_size=len(vocab) + 5, max_seq_len=seq_len))
    return export(model, directory / "model", tokenizer_dir=directory / "tok", manifest={"run_id": "bench"},
                  card="---\nlicense: apache-2.0\n---\n")


def prompts(engine, n: int, length: int) -> list[list[int]]:
    base = engine.encode("def function_1(value):\n    return value * 1 + 1\n" * 20)
    return [(base[i % 7:] + base)[:length] for i in range(n)]


def ours(engine, batch: list[list[int]], new_tokens: int) -> dict:
    from training.engine import SamplingParams

    start = time.perf_counter()
    requests = [engine.submit(p, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)) for p in batch]
    engine.run_until_idle()
    elapsed = time.perf_counter() - start
    assert all(len(r.output_ids) == new_tokens for r in requests)
    ttft = statistics.median(r.first_token_at - r.created for r in requests)
    return {"tokens_per_s": len(batch) * new_tokens / elapsed, "ttft_ms": ttft * 1000,
            "outputs": [r.output_ids for r in requests]}


def transformers_generate(model, batch: list[list[int]], new_tokens: int, device) -> dict:
    import torch

    ids = torch.tensor(batch, device=device)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        elapsed = time.perf_counter() - start
    return {"tokens_per_s": len(batch) * new_tokens / elapsed, "ttft_ms": ttft * 1000,
            "outputs": out[:, ids.shape[1]:].tolist()}


def gateway_overhead(model_dir: Path, requests: int) -> dict:
    """p50 of one-token completions through the gateway (runserver) and straight to the engine process."""
    import httpx

    sys.path.insert(0, str(ROOT / "tests"))
    from e2e.conftest import free_port, wait_for_http  # noqa: E402  (plain helpers, no fixtures)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Quotas stay on (limits no run reaches): their checks are part of every call's cost.
        env = dict(os.environ, GATEHOUSE_VAR_DIR=str(tmp / "var"), DATABASE_URL=f"sqlite:///{tmp / 'db.sqlite3'}",
                   PYTHONPATH=f"{ROOT / 'platform'}{os.pathsep}{ROOT}", GATEHOUSE_INFERENCE_RPM_PER_TOKEN="100000",
                   GATEHOUSE_INFERENCE_TOKENS_PER_DAY_PER_TOKEN="100000000")
        manage = [sys.executable, str(ROOT / "manage.py")]
        engine_port, web_port = free_port(), free_port()
        engine_url = f"http://127.0.0.1:{engine_port}/v1"
        processes = [subprocess.Popen([sys.executable, "-m", "training", "serve", "--model", str(model_dir),
                                       "--model-id", "bench", "--port", str(engine_port)], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        try:
            subprocess.run([*manage, "migrate", "--noinput", "-v0"], env=env, check=True, cwd=ROOT)
            setup = subprocess.run([*manage, "shell", "-c", f"""
from gatehouse.accounts.models import Organization, User
from gatehouse.accounts.services import api_token_create
from gatehouse.registry.models import Model
from releases.models import InferenceBackend
user = User.objects.create_user("caller", "caller@example.org", "pw")
model = Model.objects.create(organization=Organization.objects.create(slug="bench", name="Bench"), name="m", tier="api")
InferenceBackend.objects.create(model=model, kind="upstream", url="{engine_url}", upstream_model="bench")
print("TOKEN", api_token_create(user=user, name="bench", scopes=["inference"]).secret)
"""], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
            token = setup.stdout.split("TOKEN ", 1)[1].strip()
            # The server production runs (infra/stack.py), one process: what a call costs, not how calls scale.
            processes.append(subprocess.Popen([sys.executable, "-m", "gunicorn", "gatehouse.wsgi:application", "--bind",
                                               f"127.0.0.1:{web_port}", "--workers", "1", "--worker-class", "gthread",
                                               "--threads", "4"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
            wait_for_http(f"http://127.0.0.1:{web_port}/api/v1/licenses")
            wait_for_http(f"http://127.0.0.1:{engine_port}/health", timeout=120)
            body = {"prompt": "def f(x):", "max_tokens": 1, "temperature": 0}
            targets = [(engine_url, "bench", {}),
                       (f"http://127.0.0.1:{web_port}/v1", "bench/m", {"Authorization": f"Bearer {token}"})]
            samples = ([], [])
            with httpx.Client(timeout=30) as client:
                # Alternating, so drift on a shared machine touches both sides alike.
                for i in range(requests + 20):
                    for side, (url, model, headers) in enumerate(targets):
                        start = time.perf_counter()
                        response = client.post(url + "/completions", json=body | {"model": model}, headers=headers)
                        if i >= 20:
                            samples[side].append((time.perf_counter() - start) * 1000)
                        assert response.status_code == 200, response.text
            timings = {"engine": statistics.median(samples[0]), "gateway": statistics.median(samples[1]),
                       "paired": statistics.median(g - e for e, g in zip(*samples))}
        finally:
            for proc in processes:
                proc.terminate()
                proc.wait(timeout=20)
    return {"engine_p50_ms": timings["engine"], "gateway_p50_ms": timings["gateway"],
            "overhead_p50_ms": timings["gateway"] - timings["engine"], "paired_overhead_p50_ms": timings["paired"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--gateway-requests", type=int, default=200)
    parser.add_argument("--decode", default="auto",
                        help="the engine's decode step, or several comma-separated, each timed: auto, dynamic, static, "
                             "graphs, compiled")
    parser.add_argument("--sequential-prompts", type=int, default=32,
                        help="prompts generate serves one by one to measure that rate (at most the concurrency)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from training.engine import Engine

    levels = [int(c) for c in args.concurrency.split(",")]
    modes = args.decode.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_checkpoint(Path(tmp), args.preset, args.prompt_tokens + args.new_tokens + 64)
        engines = {mode: Engine(model_dir, device=args.device, max_batch=max(levels), decode=mode) for mode in modes}
        engine = engines[modes[0]]
        device = engine.device
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True,
                                                  dtype=engine.dtype).to(device).eval()
        rows = []
        for n in levels:
            batch = prompts(engine, n, args.prompt_tokens)
            for each in engines.values():
                ours(each, batch, args.new_tokens)  # warm-up: a server in steady state has captured these shapes
            transformers_generate(hf, batch[:1], 4, device)
            peer = transformers_generate(hf, batch, args.new_tokens, device)
            runs = {mode: ours(each, batch, args.new_tokens) for mode, each in engines.items()}
            peer_after = transformers_generate(hf, batch, args.new_tokens, device)
            best = max(peer, peer_after, key=lambda r: r["tokens_per_s"])
            # What a server built on generate does with concurrent requests: one generate call at a time. Its rate
            # does not depend on how many wait, so a few prompts measure it.
            start = time.perf_counter()
            for prompt in batch[:args.sequential_prompts]:
                transformers_generate(hf, [prompt], args.new_tokens, device)
            sequential = min(n, args.sequential_prompts) * args.new_tokens / (time.perf_counter() - start)
            for mode, us in runs.items():
                if engine.dtype == torch.float32:  # greedy agreement in fp32 is exact
                    assert us["outputs"] == peer["outputs"], f"our engine ({mode}) and generate disagree"
                rows.append({"concurrency": n, "decode": engines[mode].decode_mode,
                             "ours_tokens_per_s": us["tokens_per_s"],
                             "transformers_tokens_per_s": best["tokens_per_s"],
                             "ratio": us["tokens_per_s"] / best["tokens_per_s"],
                             "transformers_sequential_tokens_per_s": sequential,
                             "ratio_vs_sequential": us["tokens_per_s"] / sequential, "ours_ttft_ms": us["ttft_ms"],
                             "transformers_ttft_ms": best["ttft_ms"]})
        overhead = gateway_overhead(model_dir, args.gateway_requests) if args.gateway_requests else None
    c = engine.config
    print(f"\nGeneration, preset {args.preset} ({c.num_layers}L x {c.hidden_size}, vocab {c.vocab_size}), device "
          f"{device}, {torch.get_num_threads()} threads, prompt {args.prompt_tokens} + {args.new_tokens} new tokens, greedy, "
          f"{engine.dtype}")
    print("generate (batched) = all prompts as one generate call, its best case; generate (one by one) = how a "
          "server built on generate serves concurrent requests")
    print(f"{'concurrent':>10} {'decode':>9} {'ours tok/s':>11} {'batched tok/s':>14} {'ratio':>7} {'one-by-one tok/s':>17} "
          f"{'ratio':>7} {'ours TTFT ms':>13} {'generate TTFT ms':>17}")
    for r in rows:
        print(f"{r['concurrency']:>10} {r['decode']:>9} {r['ours_tokens_per_s']:>11.0f} {r['transformers_tokens_per_s']:>14.0f} "
              f"{r['ratio']:>6.2f}x {r['transformers_sequential_tokens_per_s']:>17.0f} {r['ratio_vs_sequential']:>6.2f}x "
              f"{r['ours_ttft_ms']:>13.1f} {r['transformers_ttft_ms']:>17.1f}")
    if overhead:
        print(f"gateway overhead: p50 {overhead['overhead_p50_ms']:.2f} ms (gateway {overhead['gateway_p50_ms']:.2f} ms, "
              f"engine direct {overhead['engine_p50_ms']:.2f} ms, one-token completions; median of paired differences "
              f"{overhead['paired_overhead_p50_ms']:.2f} ms)")
    print(json.dumps({"bench": "generate", "preset": args.preset, "device": str(device), "rows": [
        {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
        "gateway": {k: round(v, 3) for k, v in overhead.items()} if overhead else None}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
