#!/usr/bin/env bash
# GPU checks for a lent NVIDIA machine (device tool), from the repo root:
#   bash tests/bench/gpu_check.sh generate               # compiling the 124M decode step takes most of it: 5.5+
#                                                        # minutes compiled whole (an H200, 2026-11-27, ran out of
#                                                        # time); now each region (embeddings, a layer, the head)
#                                                        # compiled once for every shape, not yet timed on a GPU
#   bash tests/bench/gpu_check.sh train tests torchrun   # ~6 minutes (train: ~1 minute a variant, with its compile)
#   bash tests/bench/gpu_check.sh profile                # ~1.5 minutes: where a training step's GPU time goes
# (all stages, the default, outlast one 10-minute device call: run two calls back to back on the warm machine).
# A 15-minute lease, as planned at the 2026-11-28 stop (starting a machine costs 1-2 of those minutes; the
# 2026-11-27 evening stop's two calls took 403 and 253 s):
#   1. TRAIN_VARIANTS=residual_dtype=bfloat16,default,residual_dtype=bfloat16+head_loss=triton PEER_RUNS=1
#      TRAIN_LIMIT=280 bash tests/bench/gpu_check.sh train tests                       (timeout_s ~560)
#      (times the head loss's online-softmax form, never timed: the last figure for the first variant without it was
#      565,665 tokens/s, MFU 0.489; and training.kernels' Triton head loss, never run on a GPU, last, so a fault in it
#      cannot spoil the others' CUDA context: its autotuned launch settings are printed. The tests stage checks both
#      against the plain loss in bf16, and every launch config of the Triton kernel against cross_entropy)
#   2. with what is left, on the warm machine: DECODE_MODES=compiled GENERATE_LIMIT=240 bash tests/bench/gpu_check.sh
#      generate (issue 7: the CUDA default decode, compiled region by region, each once, never timed; on this
#      CPU its warm-up went from 76-83 s to 25 s with that; timeout_s ~260), or, if
#      step 1 left MFU under 0.50, PROFILE_VARIANT=residual_dtype=bfloat16 bash tests/bench/gpu_check.sh profile (~150)
# TRAIN_VARIANTS (train_throughput --ours), PEER_RUNS (1 or 2), TRAIN_LIMIT and GENERATE_LIMIT (seconds) and
# DECODE_MODES adjust stages.
# Uses the machine's own python3 (torch, transformers, peft, tokenizers, safetensors are in its image);
# the training tests never import Django, so the repository's Django conftest is left out (--confcutdir).
# Each stage has its own time limit and log under $OUT, so one that hangs cannot cost the others; the exit status
# is non-zero when any stage failed or ran out of time, and the last line names them.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
failed=""
stage() { echo "=== $1 ($(date +%T)) ==="; }
check() { local status=$?; [ $status -eq 0 ] || failed="$failed $1(exit $status)"; }

# SERVING_ROUNDS=1 adds the serving workload (ShareGPT-shaped lengths): a context of 832 instead of 224, so more
# (batch, context) shapes to capture before the timed runs; off by default to keep the stage within its limit.
# CONVERSATIONS=8 adds the chat conversations (prefix cache on and off): two more engines compiling their step.
run_generate() {
  stage "generate: our engine (CUDA graphs of the eager and of the compiled step) vs transformers.generate, 124M, bf16, batch 1 and 64"
  timeout "${GENERATE_LIMIT:-540}" python3 tests/bench/generate.py --device cuda --preset 124m --concurrency 1,64 --new-tokens 128 \
    --gateway-requests 0 --sequential-prompts 4 --decode "${DECODE_MODES:-graphs,compiled}" \
    --serving-rounds "${SERVING_ROUNDS:-0}" --conversations "${CONVERSATIONS:-0}" 2>&1 \
    | grep -v -i "warn\|Loading weights\|softmax\|split the reduction\|important use case\|^ *$" \
    | tee "$OUT/generate.log" | tail -24
  check generate
}

run_train() {
  stage "train_throughput: 124M shape, seq 1024, batch 32 (performance-anchors §8), ours (variants) vs transformers compiled"
  timeout "${TRAIN_LIMIT:-220}" python3 tests/bench/train_throughput.py --device cuda --preset 124m --seq-len 1024 \
    --batch-size 32 --model-vocab 50304 --steps 20 --warmup 5 --ours "${TRAIN_VARIANTS:-default}" \
    --peer-runs "${PEER_RUNS:-2}" 2>&1 | grep -v -i warn | tee "$OUT/bench.log" | tail -16
  check train
}

run_profile() {
  stage "profile: three steps of the trainer, 124M shape (seq 1024, batch 32), under torch.profiler, kernels by kind"
  timeout 120 python3 tests/bench/train_throughput.py --device cuda --preset 124m --seq-len 1024 --batch-size 32 \
    --model-vocab 50304 --warmup 4 --profile --trace-dir /tmp/trace --ours "${PROFILE_VARIANT:-default}" 2>&1 \
    | grep -v -i warn | tee "$OUT/profile.log" | tail -45
  check profile
  gzip -c /tmp/trace/train_step_trace.json > "$OUT/train_step_trace.json.gz" 2>/dev/null
}

run_tests() {
  stage "CUDA tests: bf16 compiled training, the fused and Triton head losses, CUDA-graph decoding equals eager"
  timeout 240 python3 -m pytest -c /dev/null --rootdir "$PWD" --confcutdir tests/training --import-mode=importlib \
    -p no:cacheprovider -q tests/training/test_gpu.py 2>&1 | tee "$OUT/tests.log" | tail -15
  check tests
}

run_torchrun() {
  stage "torchrun (nccl): the launcher the gpu worker uses, one process per GPU here"
  timeout 90 python3 -c "
import sys, tempfile, subprocess
from pathlib import Path
sys.path.insert(0, '.')
from training.data import prepare
tmp = Path(tempfile.mkdtemp())
import sysconfig
prepare([Path(sysconfig.get_paths()['stdlib']) / 'json'], tmp / 'data', vocab_size=400, license='PSF-2.0')
n = __import__('torch').cuda.device_count()
rc = subprocess.call([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', str(n), '-m',
                      'training', 'train', '--data', str(tmp / 'data'), '--out', str(tmp / 'run'), '--preset', 'debug',
                      '--device', 'cuda', '--seq-len', '64', '--max-steps', '20', '--compile', 'no'])
print('torchrun processes', n, 'exit', rc)
sys.exit(rc)
" 2>&1 | grep -v -i warn | tee "$OUT/torchrun.log" | tail -3
  check torchrun
}

# Stages run in the order given.
for name in ${*:-generate train tests torchrun profile}; do
  if declare -F "run_$name" > /dev/null; then "run_$name"; else failed="$failed $name(unknown stage)"; fi
done

stage "done${failed:+, failed:$failed}"
[ -z "$failed" ]
