"""lm-evaluation-harness's own `local-completions` client, pointed at our engine: the way a team scores an API-only
model (its weights never leave) on multiple-choice tasks. Its log-likelihoods and greedy flags, computed from our
echoed prompt log probabilities, equal what transformers computes on the same checkpoint."""
import pytest
import torch

from training.serve import serve_in_thread

PAIRS = [("def add(a, b):\n    return", " a + b"), ("import os\nimport", " sys"), ("class Foo:", "\n    pass"),
         ("x = [1, 2,", " 3]")]


@pytest.mark.parametrize("batch_size", [1, 4])  # 4: its batched requests, a list of token-id prompts in one call
def test_lm_eval_local_completions_scores_as_transformers_does(trained, batch_size):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = trained / "export"
    server = serve_in_thread(str(export), model_id="acme/coder", device="cpu", max_batch=4)
    try:
        lm = LocalCompletionsAPI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1/completions",
                                 model="acme/coder", tokenizer=str(export), tokenizer_backend="huggingface",
                                 num_concurrent=1, max_retries=1, batch_size=batch_size)
        scored = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
                                   for i, pair in enumerate(PAIRS)])
    finally:
        server.shutdown()
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    hf = AutoModelForCausalLM.from_pretrained(str(export), local_files_only=True, dtype=torch.float32).eval()
    for (context, continuation), (loglikelihood, greedy) in zip(PAIRS, scored):
        # lm-eval's own split: the context's tokens, then the whole text's beyond them.
        whole = tokenizer(context + continuation)["input_ids"]
        first = len(tokenizer(context)["input_ids"])
        with torch.no_grad():
            table = torch.log_softmax(hf(torch.tensor([whole])).logits[0], dim=-1)
        expected = [table[p - 1] for p in range(first, len(whole))]
        assert loglikelihood == pytest.approx(sum(float(row[t]) for row, t in zip(expected, whole[first:])), abs=1e-3)
        assert greedy == all(int(row.argmax()) == t for row, t in zip(expected, whole[first:]))
