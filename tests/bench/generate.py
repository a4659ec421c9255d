#!/usr/bin/env python
"""Generation benchmark: our engine (training/engine.py, the code path `python -m training serve` runs) against
`transformers`' generate on the same exported checkpoint, in the same run: tokens/s at batch 1 and with 8 and
32 concurrent requests, and time to first token; then the gateway's overhead (p50 of the same request through
Gatehouse's /v1, served by gunicorn as in production with quotas checked, and straight to the engine process).

    python tests/bench/generate.py                          # CPU, 'small' shape, 128 new tokens
    python tests/bench/generate.py --device cuda --preset 124m --concurrency 1,64

Two workloads. Uniform: transformers gets its best case for concurrency, all prompts as one batch to a single
generate call; both generate exactly the same number of tokens (EOS ignored) greedily from prompts of the same
length, so a step does the same matmuls on both sides. Serving: what continuous batching is for, and what vLLM's
comparisons with transformers measure (ShareGPT conversations): prompt and answer lengths that vary as real ones
do, sent by N clients in a closed loop (each sends its next request when its last is answered); generate serves
them as a server built on it does, the waiting requests as one left-padded batch run until its longest answer ends.
"""
import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


STARTED = time.perf_counter()


def progress(message: str) -> None:
    """A line as each part finishes, with the seconds since start: a run stopped at a time limit (gpu_check.sh's
    stages have one) still tells what it measured and where the time went."""
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {message}", flush=True)


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


# ShareGPT's means in the vLLM paper (Kwon et al. 2023, table 1): 161 prompt and 338 answer tokens, both long-tailed.
# A quarter of each here, drawn from a lognormal (sigma 1), so the bench's small model gets through it on two cores.
SERVING_PROMPT_MEAN, SERVING_ANSWER_MEAN, SERVING_SIGMA = 161 / 4, 338 / 4, 1.0
SERVING_PROMPT_CAP, SERVING_ANSWER_CAP = 256, 512


def serving_lengths(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt tokens, answer tokens) for n requests, the same for every run with the same seed."""
    rng = random.Random(seed)

    def draw(mean: float, cap: int) -> int:
        return max(4, min(cap, round(rng.lognormvariate(math.log(mean) - SERVING_SIGMA ** 2 / 2, SERVING_SIGMA))))
    return [(draw(SERVING_PROMPT_MEAN, SERVING_PROMPT_CAP), draw(SERVING_ANSWER_MEAN, SERVING_ANSWER_CAP))
            for _ in range(n)]


def serving_requests(engine, n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    text = engine.encode("".join(f"def function_{i}(value):\n    return value * {i} + 1\n" for i in range(80)))
    return [((text[i % 97:] + text)[:prompt], answer) for i, (prompt, answer) in enumerate(serving_lengths(n, seed))]


def ours_serving(engine, work: list[tuple[list[int], int]], clients: int) -> dict:
    """`clients` closed-loop clients against the engine stepping as `serve` does: new requests join between steps."""
    from training.engine import SamplingParams

    pending, live, latencies, outputs = deque(enumerate(work)), {}, [], [None] * len(work)
    start = time.perf_counter()
    while pending or live:
        while pending and len(live) < clients:
            i, (prompt, answer) = pending.popleft()
            params = SamplingParams(max_tokens=answer, temperature=0, ignore_eos=True)
            live[i] = (engine.submit(prompt, params), time.perf_counter())
        engine.step()
        now = time.perf_counter()
        for i, (request, sent) in list(live.items()):
            if request.done.is_set():
                outputs[i] = request.output_ids
                latencies.append(now - sent)
                del live[i]
    elapsed = time.perf_counter() - start
    assert all(len(out) == answer for out, (_, answer) in zip(outputs, work))
    return {"tokens_per_s": sum(answer for _, answer in work) / elapsed, "latency_p50_s": statistics.median(latencies),
            "outputs": outputs}


def left_padded(prompts: list[list[int]], device):
    """Prompts as one batch for generate: (ids, attention mask), padded on the left to the longest."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def generate_serving(model, work: list[tuple[list[int], int]], clients: int, device) -> dict:
    """The same clients served by generate: all waiting requests as one batch, left-padded, run until the batch's
    longest answer is done (generate takes one max_new_tokens; rows that asked for less are cut), then the next."""
    import torch

    latencies, outputs = [], []
    start = time.perf_counter()
    for first in range(0, len(work), clients):
        group = work[first:first + clients]
        ids, mask = left_padded([p for p, _ in group], device)
        width, most = ids.shape[1], max(answer for _, answer in group)
        sent = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=most, min_new_tokens=most, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        latencies += [time.perf_counter() - sent] * len(group)
        outputs += [row[width:width + answer].tolist() for row, (_, answer) in zip(out, group)]
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": sum(answer for _, answer in work) / elapsed, "latency_p50_s": statistics.median(latencies),
            "outputs": outputs}


def generate_one_by_one(model, work: list[tuple[list[int], int]], device) -> float:
    """Answer tokens per second of generate serving the requests one at a time (no padding, no waiting for others)."""
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        for prompt, answer in work:
            model.generate(torch.tensor([prompt], device=device), max_new_tokens=answer, min_new_tokens=answer,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    return sum(answer for _, answer in work) / (time.perf_counter() - start)


def serving_rows(engines: dict, hf, levels: list[int], rounds: int, device) -> list[dict]:
    """Per number of clients: ours against the better of generate's two ways of serving them, each timed over the
    whole workload (generate is warm: the uniform workload ran it before)."""
    rows = []
    for clients in [n for n in levels if n > 1]:
        work = serving_requests(next(iter(engines.values())), clients * rounds, seed=clients)
        peer = generate_serving(hf, work, clients, device)
        # Long answers make a padded batch wait for its longest: one at a time can be the better way.
        one_by_one = generate_one_by_one(hf, work, device)
        best = max(peer["tokens_per_s"], one_by_one)
        for mode, engine in engines.items():
            ours_serving(engine, work[:clients], clients)  # warm-up: the shapes a server in steady state has seen
            us = ours_serving(engine, work, clients)
            same = sum(a == b for o, p in zip(us["outputs"], peer["outputs"]) for a, b in zip(o, p))
            rows.append({"concurrency": clients, "decode": engine.decode_mode, "requests": len(work),
                         "answer_tokens": sum(answer for _, answer in work),
                         "mean_prompt": statistics.mean(len(p) for p, _ in work),
                         "mean_answer": statistics.mean(answer for _, answer in work),
                         "ours_tokens_per_s": us["tokens_per_s"], "transformers_tokens_per_s": peer["tokens_per_s"],
                         "transformers_sequential_tokens_per_s": one_by_one, "ratio": us["tokens_per_s"] / best,
                         "ours_latency_p50_s": us["latency_p50_s"],
                         "transformers_latency_p50_s": peer["latency_p50_s"],
                         "same_tokens": same / sum(answer for _, answer in work)})
    return rows


def conversations(engine, clients: int, turns: int) -> list[tuple[list[int], list[list[int]]]]:
    """Per client: an opening prompt (a shared system prompt, then its own question) and the user's next messages."""
    text = engine.encode("".join(f"class Widget{i}:\n    size = {i}\n" for i in range(200)))
    system = text[:48]
    return [(system + text[60 + 7 * c:][:16], [text[400 + 11 * (c * turns + t):][:24] for t in range(turns - 1)])
            for c in range(clients)]


def ours_conversations(engine, work, answer: int) -> dict:
    """Each client sends its next turn (the whole history: every prompt and answer so far, then its new message)
    when its last is answered, as a chat client does."""
    from training.engine import SamplingParams

    histories = [opening for opening, _ in work]
    left = [list(follow_ups) for _, follow_ups in work]
    live, ttfts, outputs = {}, [], [[] for _ in work]
    start = time.perf_counter()
    while live or any(h is not None for h in histories):
        for c, history in enumerate(histories):
            if history is not None and c not in live:
                live[c] = engine.submit(history, SamplingParams(max_tokens=answer, temperature=0, ignore_eos=True))
                histories[c] = None
        engine.step()
        for c, request in list(live.items()):
            if request.done.is_set():
                del live[c]
                ttfts.append(request.first_token_at - request.created)
                outputs[c].append(request.output_ids)
                if left[c]:
                    histories[c] = request.prompt_ids + request.output_ids + left[c].pop(0)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o) for out in outputs for o in out)
    return {"tokens_per_s": tokens / elapsed, "ttft_p50_ms": statistics.median(ttfts) * 1000, "outputs": outputs}


def generate_conversations(model, work, answer: int, device) -> dict:
    """generate serving the same conversations: each round's prompts (every client's history) as one left-padded
    batch; nothing carries over from one call to the next, so every turn prefills its whole history."""
    import torch

    histories = [opening for opening, _ in work]
    outputs, ttfts, elapsed = [[] for _ in work], [], 0.0
    for turn in range(len(work[0][1]) + 1):
        ids, mask = left_padded(histories, device)
        width = ids.shape[1]
        kwargs = dict(attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)  # its time to first token
            ttfts += [time.perf_counter() - start] * len(work)
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=answer, min_new_tokens=answer, **kwargs)
            elapsed += time.perf_counter() - start
        for c, row in enumerate(out[:, width:].tolist()):
            outputs[c].append(row)
            if turn < len(work[c][1]):
                histories[c] = histories[c] + row + work[c][1][turn]
    tokens = sum(len(o) for out in outputs for o in out)
    return {"tokens_per_s": tokens / elapsed, "ttft_p50_ms": statistics.median(ttfts) * 1000, "outputs": outputs}


def conversation_row(model_dir: Path, hf, args) -> dict:
    """The conversations served by our engine with its prefix cache and without, and by generate."""
    from training.engine import Engine

    results, work = {}, None
    for cached in (True, False):
        engine = Engine(model_dir, device=args.device, max_batch=args.conversations, prefix_cache=cached)
        work = work or conversations(engine, args.conversations, args.turns)
        ours(engine, prompts(engine, 2, 16), 4)  # warm-up, on text the conversations do not contain
        before = dict(engine.stats)
        results[cached] = ours_conversations(engine, work, args.conversation_answer)
        results[cached]["prompt_tokens"] = engine.stats["prompt_tokens"] - before["prompt_tokens"]
        results[cached]["cached"] = engine.stats["cached_prompt_tokens"] - before["cached_prompt_tokens"]
    peer = generate_conversations(hf, work, args.conversation_answer, engine.device)
    assert results[True]["outputs"] == results[False]["outputs"] == peer["outputs"], "conversations disagree"
    return {"clients": args.conversations, "turns": args.turns, "answer": args.conversation_answer,
            "prompt_tokens": results[True]["prompt_tokens"], "cached_prompt_tokens": results[True]["cached"],
            "cached_tokens_per_s": results[True]["tokens_per_s"], "uncached_tokens_per_s": results[False]["tokens_per_s"],
            "transformers_tokens_per_s": peer["tokens_per_s"], "cached_ttft_p50_ms": results[True]["ttft_p50_ms"],
            "uncached_ttft_p50_ms": results[False]["ttft_p50_ms"], "transformers_ttft_p50_ms": peer["ttft_p50_ms"],
            "ratio": results[True]["tokens_per_s"] / peer["tokens_per_s"]}


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
    parser.add_argument("--serving-rounds", type=int, default=3,
                        help="requests each client sends in the serving workload (0 skips it)")
    parser.add_argument("--conversations", type=int, default=8,
                        help="chat clients sending their whole history each turn (0 skips them)")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--conversation-answer", type=int, default=32, help="answer tokens per turn")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from training.engine import Engine

    levels = [int(c) for c in args.concurrency.split(",")]
    modes = args.decode.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        conversation = 64 + args.turns * (24 + args.conversation_answer) if args.conversations else 0
        context = max(args.prompt_tokens + args.new_tokens, conversation,
                      SERVING_PROMPT_CAP + SERVING_ANSWER_CAP if args.serving_rounds else 0) + 64
        model_dir = make_checkpoint(Path(tmp), args.preset, context)
        # Without the prefix cache: these workloads time prompts their warm-up has just run, which the cache would
        # serve from there. The conversations below are where it matters, timed with it and without.
        engines = {mode: Engine(model_dir, device=args.device, max_batch=max(levels), decode=mode, prefix_cache=False)
                   for mode in modes}
        engine = engines[modes[0]]
        device = engine.device
        progress(f"checkpoint exported, engines loaded ({', '.join(modes)})")
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True,
                                                  dtype=engine.dtype).to(device).eval()
        rows = []
        for n in levels:
            batch = prompts(engine, n, args.prompt_tokens)
            for mode, each in engines.items():
                started = time.perf_counter()
                ours(each, batch, args.new_tokens)  # warm-up: a server in steady state has captured these shapes
                progress(f"{mode} warm-up at {n} concurrent (compiling and capturing its shapes): "
                         f"{time.perf_counter() - started:.1f} s")
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
                progress(f"{n} concurrent, {mode}: ours {us['tokens_per_s']:.0f} tok/s, generate batched "
                         f"{best['tokens_per_s']:.0f} ({rows[-1]['ratio']:.2f}x), one by one {sequential:.0f} "
                         f"({rows[-1]['ratio_vs_sequential']:.2f}x)")
        serving = serving_rows(engines, hf, levels, args.serving_rounds, device) if args.serving_rounds else []
        del engines  # their KV caches: the conversation engines need the memory on a GPU
        chats = conversation_row(model_dir, hf, args) if args.conversations else None
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
    if serving:
        print(f"\nServing workload: lengths shaped like ShareGPT's (lognormal, means {SERVING_PROMPT_MEAN:.0f} prompt and "
              f"{SERVING_ANSWER_MEAN:.0f} answer tokens, at most {SERVING_PROMPT_CAP} and {SERVING_ANSWER_CAP}), "
              f"{args.serving_rounds} requests per client, closed loop. generate (batched) = the waiting requests as one "
              "left-padded batch at a time; ratio = ours / the better of generate's two ways; p50 = a request's latency")
        print(f"{'clients':>10} {'decode':>9} {'requests':>9} {'answer tokens':>14} {'ours tok/s':>11} "
              f"{'batched tok/s':>14} {'one-by-one tok/s':>17} {'ratio':>7} {'ours p50 s':>11} {'batched p50 s':>14} "
              f"{'same tokens':>12}")
        for r in serving:
            print(f"{r['concurrency']:>10} {r['decode']:>9} {r['requests']:>9} {r['answer_tokens']:>14} "
                  f"{r['ours_tokens_per_s']:>11.0f} {r['transformers_tokens_per_s']:>14.0f} "
                  f"{r['transformers_sequential_tokens_per_s']:>17.0f} {r['ratio']:>6.2f}x "
                  f"{r['ours_latency_p50_s']:>11.2f} {r['transformers_latency_p50_s']:>14.2f} {r['same_tokens']:>11.1%}")
    if chats:
        print(f"\nConversations: {chats['clients']} chat clients, {chats['turns']} turns each, every turn the whole "
              f"history (a shared 48-token system prompt, the answers so far, 24 new tokens) and a "
              f"{chats['answer']}-token answer, closed loop; generate: each round as one left-padded batch")
        print(f"prefix cache: {chats['cached_prompt_tokens']} of {chats['prompt_tokens']} prompt tokens served from "
              f"the cache")
        print(f"{'':>10} {'ours cached':>12} {'ours uncached':>14} {'generate':>9} {'ratio':>7}")
        print(f"{'tok/s':>10} {chats['cached_tokens_per_s']:>12.0f} {chats['uncached_tokens_per_s']:>14.0f} "
              f"{chats['transformers_tokens_per_s']:>9.0f} {chats['ratio']:>6.2f}x")
        print(f"{'TTFT p50':>10} {chats['cached_ttft_p50_ms']:>10.1f}ms {chats['uncached_ttft_p50_ms']:>12.1f}ms "
              f"{chats['transformers_ttft_p50_ms']:>7.1f}ms")
    if overhead:
        print(f"gateway overhead: p50 {overhead['overhead_p50_ms']:.2f} ms (gateway {overhead['gateway_p50_ms']:.2f} ms, "
              f"engine direct {overhead['engine_p50_ms']:.2f} ms, one-token completions; median of paired differences "
              f"{overhead['paired_overhead_p50_ms']:.2f} ms)")
    print(json.dumps({"bench": "generate", "preset": args.preset, "device": str(device), "rows": [
        {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
        "serving": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in serving],
        "conversations": {k: round(v, 3) if isinstance(v, float) else v for k, v in chats.items()} if chats else None,
        "gateway": {k: round(v, 3) for k, v in overhead.items()} if overhead else None}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
