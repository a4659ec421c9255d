"""Validation loss and a small built-in suite of generated tasks a tiny model can be scored on.

Each task item is a prompt with a right and a wrong continuation; the model scores 1 when it gives the
right one the higher log-likelihood. Chance is 0.5, so a tiny model's progress is visible.
"""
import math
import random

import torch
import torch.nn.functional as F

TASK_SAMPLES = 64


def _copy_items(rng: random.Random):
    for _ in range(TASK_SAMPLES):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 6)))
        i = rng.randrange(len(word) - 1)
        wrong = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        if wrong == word:  # two equal letters swapped: change one instead, keeping the length
            wrong = word[:i] + rng.choice([c for c in "abcdefghij" if c != word[i]]) + word[i + 1:]
        yield f"copy: {word} ->", f" {word}", f" {wrong}"


def _count_items(rng: random.Random):
    for _ in range(TASK_SAMPLES):
        n = rng.randint(1, 8)
        wrong = n + rng.choice([-1, 1]) if n > 1 else 2
        yield f"count: {' '.join('x' * n)} ->", f" {n}", f" {wrong}"


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += 1 if ch == "(" else -1
        if depth < 0:
            return False
    return depth == 0


def _bracket_items(rng: random.Random):
    # Half balanced, half not: random strings are mostly unbalanced, and a model that always says "no" would
    # score well above chance on them.
    for i in range(TASK_SAMPLES):
        length = rng.choice([2, 4, 6, 8])
        while True:
            text = "".join(rng.choice("()") for _ in range(length))
            if _balanced(text) == (i % 2 == 0):
                break
        right, wrong = (" yes", " no") if _balanced(text) else (" no", " yes")
        yield f"balanced: {text} ->", right, wrong


TASKS = {"copy": _copy_items, "count": _count_items, "brackets": _bracket_items}


@torch.no_grad()
def _logprob(model, tokenizer, prompt: str, continuation: str, device) -> float:
    prompt_ids = tokenizer.encode(prompt).ids
    ids = prompt_ids + tokenizer.encode(continuation).ids
    ids = ids[-model.config.max_seq_len:]
    x = torch.tensor([ids], device=device)
    logits, _ = model(x)
    logprobs = F.log_softmax(logits[0, :-1].float(), dim=-1)
    start = max(0, len(ids) - len(tokenizer.encode(continuation).ids) - 1)
    return sum(logprobs[i, ids[i + 1]].item() for i in range(start, len(ids) - 1))


@torch.no_grad()
def run_tasks(model, tokenizer, *, seed: int = 0) -> list[dict]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results = []
    for name, make in TASKS.items():
        rng = random.Random(f"{seed}-{name}")
        correct = total = 0
        for prompt, right, wrong in make(rng):
            total += 1
            correct += _logprob(model, tokenizer, prompt, right, device) > _logprob(model, tokenizer, prompt, wrong, device)
        results.append({"task": name, "metric": "acc", "value": correct / total, "samples": total})
    model.train(was_training)
    return results


@torch.no_grad()
def validation_loss(model, stream, *, batches: int, batch_size: int, device, autocast) -> dict:
    """Mean loss over the first `batches` validation windows (always the same ones) and its perplexity."""
    was_training = model.training
    model.eval()
    losses = []
    count = min(batches, max(1, stream.windows // batch_size))
    for b in range(count):
        x, y = stream.batch(b * batch_size, min(batch_size, stream.windows))
        with torch.no_grad(), autocast():  # no graph kept for a backward that never comes
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
    model.train(was_training)
    mean = sum(losses) / len(losses)
    return {"val_loss": mean, "val_perplexity": math.exp(min(mean, 50.0))}
