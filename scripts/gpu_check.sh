#!/usr/bin/env bash
# One prepared GPU check (about 8 minutes on one H200): install what the GPU image lacks
# from carried wheels, run the CUDA tests, then time bf16 training steps of the
# gpt-125m models (eager and compiled, tokens/s, MFU, peak memory) and the routing
# benchmarks (SMEAR's in bf16; bench_routing has no dtype switch). No network is used.
#
#   scripts/gpu_check.sh              run it (from the repository root)
#   scripts/gpu_check.sh --dry-run    print the commands only
#
# Wheels: the image has torch, triton and transformers but not deepspeed. Build them
# once on a machine with network, into the folder this script reads (see BENCHMARKS.md):
#   pip wheel --no-deps -w wheels/gpu deepspeed==0.19.8
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d wheels/gpu hjson ninja py-cpuinfo msgpack pydantic pydantic-core annotated-types \
#       typing-inspection einops psutil
# wheels/ is git-ignored: the device tool carries it when asked (carry: ["wheels/gpu"], 6 MB).
# Results go to $OUT (or gpu_check/ without it): one log per part.
set -euo pipefail

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
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

if ! python -c "import deepspeed" 2>/dev/null; then
  step install 120 python -m pip install --no-index --find-links "$WHEELS" deepspeed
fi
step device 30 python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(), torch.version.cuda)"
step cuda_tests 100 python -m pytest -q -p no:cacheprovider tests/test_cuda.py
step train_125m 300 python scripts/bench_train.py --dtype bf16 --peak-tflops "$PEAK_TFLOPS" \
  --routers configs/gpt-125m-dense.yaml configs/gpt-125m-topk2.yaml configs/gpt-125m-lapsum.yaml \
  configs/gpt-125m-smear.yaml --variants bare trainer compile --batch 16 --seq-len 1024 --steps 8 --warmup 3 \
  --loss-chunk 4096 --json "$RESULTS/train_125m.json"
step routing 60 python scripts/bench_routing.py --repeats 5 --layer-repeats 3 --no-deepspeed
step smear_bf16 45 python scripts/bench_smear.py --dtype bf16 --repeats 5
