#!/usr/bin/env bash
# The GPU suite: GPU-marked tests at LLaMA shapes, the kernel microbenchmarks, the adapter-schedule and NF4-route
# sweep, the end-to-end steps on LLaMA-2-7B shapes (random weights, NF4 in memory) and the per-call overhead.
# Usage: bash benchmarks/gpu_suite.sh OUT_DIR [PARTS]   PARTS: comma list of
#   tests,layers,schedule,e2e,matrix,overhead (default all; run in that order, what the open issue needs
#   most first: the focused tests, the layer rows, the thresholds' sweep, the end-to-end step)
# Needs a CUDA GPU; no network; bitsandbytes needed for the QLoRA/bnb rows and the e2e part.
# Writes OUT_DIR/env.json, gpu_tests(_matrix).xml/.log, layers-cuda.json/.csv/.md, schedule-cuda.json/.md,
# e2e-cuda.json/.md, overhead-cuda.json/.md (plots are rendered afterwards, off the device:
# python -m benchmarks.plot benchmarks/results/gpu/*.json). Each part has its own time limit (a part killed
# there keeps the rows it measured, marked "complete": false), cut to what is left of SUITE_SECONDS (default
# 540, from this script's start; each part gets 5 s more to exit) so the last parts shrink instead of the
# device's command limit killing the whole call (a 600 s call keeps the rest for the setup: the wheel's
# install, a cold torch import for env.json). The limits are guesses: no GPU has run this yet.
# PACK=FILE: after each part and every 20 s, every result so far is packed into the one gzipped tar FILE (the
# lent GPU machine returns at most 8 files; a part killed at the command's limit still leaves what it wrote).
# A provider or layer that raises is recorded in its part's JSON under "errors" and the part goes on.
# PYTHON: the interpreter (default python3; some images have no plain `python`).
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR [PARTS]}
parts=",${2:-tests,layers,schedule,e2e,matrix,overhead},"
deadline=$((SECONDS + ${SUITE_SECONDS:-540}))
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Autotune results on disk, shared by every part and process (each new shape, token bucket and dtype would
# otherwise compile and time every NF4 GEMM config again), and each pick logged with its tuning time.
export TRITON_CACHE_AUTOTUNING=1 TRITON_PRINT_AUTOTUNING=1
pack() {  # a temp name per process: the background packer and this shell never write the same one
  # tar exits 1 when a file changed while it read it (a part rewriting its JSON): the archive is still whole
  if [[ -n ${PACK:-} ]]; then
    tar --warning=no-file-changed -czf "$PACK.$BASHPID.tmp" -C "$out" . 2>/dev/null
    if (($? <= 1)); then mv "$PACK.$BASHPID.tmp" "$PACK"; fi
  fi
}
if [[ -n ${PACK:-} ]]; then
  # Every 20 s too: if the device's command limit kills this script mid-part, that part's rows so far come back.
  (while sleep 20; do pack; done) > /dev/null 2>&1 &  # not on the tee pipe: an orphaned sleep would hold it
  packer=$!
  stop_packer() { kill "$packer" 2>/dev/null; wait "$packer" 2>/dev/null; rm -f "$PACK".*.tmp; }
  trap stop_packer EXIT
fi
"$py" - > "$out/env.json" <<'PY'
import importlib.metadata, json, os, subprocess, torch
def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
try:
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=30).stdout.strip() or None
except (OSError, subprocess.TimeoutExpired):
    driver = None
print(json.dumps({"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "date": __import__("datetime").datetime.now(__import__("datetime").timezone.utc).isoformat(),
                  "torch": torch.__version__, "cuda": torch.version.cuda, "driver": driver,
                  **{name: version(name) for name in ("triton", "transformers", "peft", "bitsandbytes", "numpy")},
                  "git_sha": os.environ.get("MOKA_GIT_SHA"),
                  "env": {k: v for k, v in os.environ.items() if k.startswith(("MOKA_", "TRITON_"))}}))
PY
status=0
# SIGINT, not timeout's default SIGTERM: pytest then still writes its junit XML and failure summary, and the
# benchmarks unwind (their rows are written as they go). -k: SIGKILL 5 s later if that hangs.
# Each part's limit is cut to what is left before the deadline (its 5 s grace included); none left: skipped.
limit() {
  local seconds=$1 left=$((deadline - SECONDS - 5))
  shift
  ((left < seconds)) && seconds=$left
  if ((seconds < 5)); then echo "gpu_suite: no time left for: $*" >&2; return 1; fi
  timeout -s INT -k 5 "$seconds" "$@"
}
# pytest: -vv over pyproject's -q names each test as it ends (a log cut by SIGKILL still says which ran);
# --durations=0 sizes the next run.
tests() {
  MOKA_NF4_AUTOTUNE=quick limit "$1" "$py" -m pytest -m gpu tests/test_gpu.py -k "$2" -vv --durations=0 -rfE \
    -p no:cacheprovider --junitxml "$out/$3.xml" 2>&1 | tee "$out/$3.log"
}
if [[ $parts == *,tests,* ]]; then
  # The focused tests (schedules, determinism, CUDA graphs, NF4 kernels and routes). Correctness only: two NF4
  # GEMM configs each (MOKA_NF4_AUTOTUNE=quick), not every config timed per shape.
  tests 75 "not test_triton_matches_reference_at_llama_shapes" gpu_tests || status=1
  pack
fi
if [[ $parts == *,layers,* ]]; then
  limit 170 "$py" -m benchmarks.run --device cuda --out "$out" 2>&1 | tee "$out/layers.log" || status=1
  pack
fi
if [[ $parts == *,schedule,* ]]; then
  # r = 4 as the layer part: its kernels and tunings are reused (TRITON_CACHE_AUTOTUNING)
  limit 80 "$py" -m benchmarks.schedule --device cuda --components 4 --out "$out" 2>&1 | tee "$out/schedule.log" \
    || status=1
  pack
fi
if [[ $parts == *,e2e,* ]]; then
  limit 130 "$py" -m benchmarks.e2e --models llama2-7b --device cuda --batch 4 --seq 512 --steps 3 --out "$out" \
    2>&1 | tee "$out/e2e.log" || status=1
  pack
fi
if [[ $parts == *,matrix,* ]]; then
  # The 60-case matrix at LLaMA shapes, bf16 (the training dtype) only: each new shape and dtype compiles and
  # autotunes, and pytest would run every fp16 case of a layer before the next layer's bf16 ones.
  tests 55 "test_triton_matches_reference_at_llama_shapes and bfloat16" gpu_tests_matrix || status=1
  pack
fi
if [[ $parts == *,overhead,* ]]; then
  limit 45 "$py" -m benchmarks.overhead --device cuda --out "$out" 2>&1 | tee "$out/overhead.log" || status=1
  pack
fi
# Clocks and throttling at the end of the run (a throttled GPU would explain slow rows).
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  nvidia-smi -q -d PERFORMANCE; } > "$out/nvidia-smi-end.txt" 2>&1 || true
if [[ -n ${PACK:-} ]]; then stop_packer; fi  # no older snapshot can land after the last one
pack
exit $status
