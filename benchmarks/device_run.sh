#!/usr/bin/env bash
# The one command for a lent GPU machine (the device tool's `run`), from the repo root:
#   run(command="MOKA_GIT_SHA=<sha> bash benchmarks/device_run.sh", carry=[".whl"], timeout_s=600)
# with <sha> = $(git rev-parse HEAD), plus "+uncommitted" when `git status --porcelain` is not empty (the working
# tree travels, not the commit)
# (.git does not travel: the sha, given here, is recorded in the results.) Beforehand, here (that machine has
# no bitsandbytes and cannot download; its Python is 3.12; .whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# Installs the carried wheels into /tmp/site, runs benchmarks/gpu_suite.sh (PARTS as its second argument) into
# /tmp/gpu-suite, and packs every result so far into $OUT/gpu-suite.tgz after each part (the machine returns
# at most 8 files, and a part cut off at the command's limit keeps the ones before it). Afterwards, here:
#   mkdir -p benchmarks/results/gpu && tar xzf <files_at>/gpu-suite.tgz -C benchmarks/results/gpu
set -uo pipefail
: "${OUT:?run this on the device machine, where OUT is set}"
# Nothing may reach a model hub from here: a hidden download fails at once instead of waiting on the network.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [[ -z ${MOKA_GIT_SHA:-} ]]; then
  echo "device_run: MOKA_GIT_SHA is not set: the results will record no git sha (this tree travels without .git)" >&2
fi
if ! compgen -G ".whl/*.whl" > /dev/null; then
  echo "device_run: NO WHEELS CARRIED (.whl/ is empty): no bitsandbytes, so no bnb/QLoRA rows and no e2e part" >&2
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  # A failed install costs the bitsandbytes rows and the e2e part only: every other part runs without it.
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "device_run: installing the carried wheels failed; going on without them" >&2
  fi
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>&1
export PYTHONUNBUFFERED=1 PACK="$OUT/gpu-suite.tgz"
bash benchmarks/gpu_suite.sh /tmp/gpu-suite "${1:-tests,layers,schedule,e2e,matrix,overhead}" 2>&1 | tee "$OUT/suite.log"
