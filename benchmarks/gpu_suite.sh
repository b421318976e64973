#!/usr/bin/env bash
# The GPU suite: GPU-marked tests at LLaMA shapes (bf16 and fp16) and the kernel microbenchmarks.
# Usage: bash benchmarks/gpu_suite.sh OUT_DIR      (needs a CUDA GPU; no network; bitsandbytes optional)
# Writes OUT_DIR/env.json, gpu_tests.xml/.log, layers-cuda.json/.csv/.md/.png, overhead-cuda.json/.md.
# Aim: < 9 min on one H100/H200.
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - > "$out/env.json" <<'PY'
import json, torch
print(json.dumps({"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "torch": torch.__version__, "cuda": torch.version.cuda,
                  "triton": __import__("triton").__version__}))
PY
status=0
timeout 300 python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider --junitxml "$out/gpu_tests.xml" \
  2>&1 | tee "$out/gpu_tests.log" || status=1
timeout 240 python -m benchmarks.run --device cuda --out "$out" 2>&1 | tee "$out/layers.log" || status=1
timeout 45 python -m benchmarks.overhead --device cuda --out "$out" 2>&1 | tee "$out/overhead.log" || status=1
exit $status
