#!/usr/bin/env bash
# GPU checks for a lent NVIDIA machine (device tool), about 7 minutes. Run from the repo root:
#   bash tests/bench/gpu_check.sh
# Uses the machine's own python3 (torch, transformers, peft, tokenizers, safetensors are in its image);
# the training tests never import Django, so the repository's Django conftest is left out (--confcutdir).
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

echo "=== CUDA tests: bf16 compiled training, CUDA-graph decoding equals eager (the CPU suite runs in CI) ==="
timeout 150 python3 -m pytest -c /dev/null --rootdir "$PWD" --confcutdir tests/training --import-mode=importlib \
  -p no:cacheprovider -q tests/training/test_gpu.py 2>&1 | tee "$OUT/tests.log"

echo "=== train_throughput: 124M shape, seq 1024, bf16 + torch.compile, batch 32 as in performance-anchors §8, ours vs transformers ==="
timeout 300 python3 tests/bench/train_throughput.py --device cuda --preset 124m --seq-len 1024 --batch-size 32 \
  --model-vocab 50304 --steps 20 --warmup 5 2>&1 | grep -v -i warn | tee "$OUT/bench.log"

echo "=== generate: our engine (CUDA graphs) vs transformers.generate, 124M shape, bf16, batch 1 and 64 concurrent ==="
timeout 240 python3 tests/bench/generate.py --device cuda --preset 124m --concurrency 1,64 --new-tokens 128 \
  --gateway-requests 0 2>&1 | grep -v -i "warn\|Loading weights" | tee "$OUT/generate.log"

echo "=== torchrun (nccl): the launcher the gpu worker uses, one process per GPU here ==="
timeout 120 python3 -c "
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
" 2>&1 | grep -v -i warn | tail -3 | tee "$OUT/torchrun.log"
