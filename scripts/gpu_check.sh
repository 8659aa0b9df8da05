#!/usr/bin/env bash
# The prepared GPU check, in two calls of at most ~8 and ~5 minutes on one H200 (a device
# call may last 10 minutes; a session has 15 of device time, start-up included):
#
#   scripts/gpu_check.sh train          bf16 training steps of each gpt-125m model: bare loop,
#                                       trainer, trainer compiled; tokens/s, MFU, peak memory
#   scripts/gpu_check.sh tests bench    tests/test_cuda.py, then the routing benchmarks
#                                       (SMEAR's in bf16; bench_routing has no dtype switch)
#   scripts/gpu_check.sh                all of it, in that order
#   scripts/gpu_check.sh --dry-run ...  print the commands only
#
# The most wanted figures come first: each model is its own part with its own time limit,
# so a slow compile costs that model's figures, not the others'. No network is used.
#
# Wheels: the image has torch, triton and transformers but not deepspeed or pytest. Build
# them once on a machine with network, into the folder this script reads:
#   pip wheel --no-deps -w wheels/gpu deepspeed==0.19.8
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d wheels/gpu hjson ninja py-cpuinfo msgpack pydantic pydantic-core annotated-types \
#       typing-inspection einops psutil pytest
# wheels/ is git-ignored: the device tool carries it when asked (carry: ["wheels/gpu"], 6 MB).
# Results go to $OUT (or gpu_check/ without it): one log per part.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
GROUPS_WANTED="${*:-train tests bench}"
for group in $GROUPS_WANTED; do
  [[ "$group" =~ ^(train|tests|bench)$ ]] || { echo "error: unknown part '$group': expected train, tests or bench" >&2; exit 2; }
done
WHEELS="${WHEELS:-wheels/gpu}"
RESULTS="${OUT:-gpu_check}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"  # H100/H200 dense bf16
mkdir -p "$RESULTS"
export DS_ACCELERATOR=cuda HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONPATH="$PWD"

step() {  # step NAME TIMEOUT_S COMMAND...: run (or print) one part; its log goes to $RESULTS/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  if (( DRY_RUN )); then return 0; fi
  local start=$SECONDS
  if timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - start)) s"
  else
    echo "   FAILED (exit $?) after $((SECONDS - start)) s; last lines:"
    tail -n 20 "$RESULTS/$name.log"
  fi
  tail -n 25 "$RESULTS/$name.log"
}

wants() { [[ " $GROUPS_WANTED " == *" $1 "* ]]; }

missing=()
python -c "import deepspeed" 2>/dev/null || missing+=(deepspeed)
wants tests && { python -c "import pytest" 2>/dev/null || missing+=(pytest); }
if (( ${#missing[@]} )) || (( DRY_RUN )); then
  step install 90 python -m pip install --no-index --find-links "$WHEELS" "${missing[@]:-deepspeed}"
fi
step device 30 python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(), torch.version.cuda)"
if wants train; then
  for model in dense topk2 lapsum smear; do
    step "train_$model" 110 python scripts/bench_train.py --dtype bf16 --peak-tflops "$PEAK_TFLOPS" \
      --routers "configs/gpt-125m-$model.yaml" --variants bare trainer compile --batch 16 --seq-len 1024 \
      --steps 6 --warmup 3 --loss-chunk 4096 --json "$RESULTS/train_$model.json"
  done
fi
if wants tests; then
  step cuda_tests 150 python -m pytest -q -p no:cacheprovider tests/test_cuda.py
fi
if wants bench; then
  step routing 60 python scripts/bench_routing.py --repeats 5 --layer-repeats 3 --no-deepspeed
  step smear_bf16 45 python scripts/bench_smear.py --dtype bf16 --repeats 5
fi
