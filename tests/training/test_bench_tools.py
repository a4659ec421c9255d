"""The benches' own logic: the training bench's variant parsing, kernel kinds and profile of the trainer's loop (on a
CPU, where it profiles aten operators instead of kernels); the generation bench's serving workload."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "bench"))

import train_throughput  # noqa: E402


def test_variants_split_into_trainer_settings_and_inductor_flags():
    assert train_throughput.parse_variant("default") == ({}, {})
    assert train_throughput.parse_variant("residual_dtype=bfloat16+inductor.coordinate_descent_tuning=1") == \
        ({"residual_dtype": "bfloat16"}, {"coordinate_descent_tuning": True})
    with pytest.raises(SystemExit, match="unknown variant 'lr=1'"):
        train_throughput.parse_variant("lr=1")


@pytest.mark.parametrize("name, kind", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", "attention"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("triton_red_fused__log_softmax__to_copy__unsafe_view_prepare_softmax_online_view_9", "cross-entropy"),
    ("triton_poi_fused__unsafe_view_mul_silu_5", "elementwise (triton)"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer"),
])
def test_kernels_are_sorted_by_kind(name, kind):
    assert train_throughput.kernel_kind(name) == kind


def test_profile_of_the_trainers_loop_covers_three_steps(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "bench" / "train_throughput.py"), "--profile",
                          "--device", "cpu", "--preset", "debug", "--seq-len", "32", "--batch-size", "2",
                          "--warmup", "1", "--vocab", "300", "--trace-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Profile of 3 trainer steps (default, cpu" in out.stdout
    # Per step, a 2-layer model's 7 projections a layer, each a forward product and two backward ones, and the head
    # with its loss (HeadLossInBlocks, one block here): the logits' product and the hidden states' gradient (its
    # weight's gradient is an accumulating addmm_). A window of any other number of steps than the three it divides
    # by would not give this count.
    matmuls = next(line for line in out.stdout.splitlines() if line.startswith("aten::mm "))
    assert int(matmuls.split()[2]) == 2 * 7 * 3 + 2
    assert (tmp_path / "train_step_trace.json").stat().st_size > 0


def test_serving_workload_is_fixed_by_its_seed_and_within_the_context():
    import generate

    lengths = generate.serving_lengths(200, seed=3)
    assert lengths == generate.serving_lengths(200, seed=3) != generate.serving_lengths(200, seed=4)
    assert all(4 <= p <= generate.SERVING_PROMPT_CAP and 4 <= a <= generate.SERVING_ANSWER_CAP for p, a in lengths)
    # Long-tailed as asked: answers vary several-fold around the mean (a uniform workload would give no spread).
    answers = sorted(a for _, a in lengths)
    assert answers[-10] > 3 * answers[100] and 40 < sum(answers) / 200 < 130


def test_serving_and_conversation_benches_run_both_sides_on_the_same_requests():
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "bench" / "generate.py"), "--preset", "debug",
                          "--concurrency", "4", "--new-tokens", "4", "--sequential-prompts", "1",
                          "--gateway-requests", "0", "--serving-rounds", "2", "--conversations", "3", "--turns", "3",
                          "--conversation-answer", "4"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    import generate

    result = json.loads(out.stdout.strip().splitlines()[-1])
    [row] = result["serving"]
    # 4 clients x 2 rounds, every answer exactly as long as asked, greedy tokens equal to generate's in fp32.
    assert row["requests"] == 8
    assert row["answer_tokens"] == sum(a for _, a in generate.serving_lengths(8, seed=4))
    assert row["same_tokens"] == 1.0 and row["ours_tokens_per_s"] > 0 and row["transformers_tokens_per_s"] > 0
    # Conversations (the bench asserts all three sides' answers equal): 3 clients x 3 turns, the later turns' history
    # served from the prefix cache.
    chats = result["conversations"]
    assert (chats["clients"], chats["turns"]) == (3, 3) and 0 < chats["cached_prompt_tokens"] < chats["prompt_tokens"]
    assert chats["cached_tokens_per_s"] > 0 and chats["transformers_tokens_per_s"] > 0
