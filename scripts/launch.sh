#!/usr/bin/env bash
# One command for single- and multi-node jobs: runs `python -m llm <args>` on every
# process, through DeepSpeed's launcher (default) or torchrun.
#
#   scripts/launch.sh [options] -- train configs/tiny-topk.yaml parallel.ep_size=2
#
# DeepSpeed launcher (run once, on the first node; it starts the others over ssh/pdsh):
#   --hostfile FILE        lines "HOST slots=N": the nodes and processes per node
#   --num-nodes N          use the first N hosts of the hostfile (default: all)
#   --num-gpus N           processes per node (default: the hostfile's slots; without a
#                          hostfile the GPU count, on CPU 1 — pass it explicitly there)
#   Variables in LLM_LAUNCH_ENV (and the defaults below) are written to .deepspeed_env in
#   the current directory, which the launcher exports on every node.
# torchrun (run the same command on every node, e.g. from SLURM: scripts/slurm/train.sbatch):
#   --launcher torchrun --nnodes N --nproc-per-node G --rdzv-endpoint HOST:PORT [--rdzv-id ID]
# Common:
#   --master-addr ADDR --master-port PORT   rendezvous (default: first host / 127.0.0.1, 29500)
#   --dry-run              print the command instead of running it
#
# On CPU set DS_ACCELERATOR=cpu (the default when no GPU is visible); each process gets
# OMP_NUM_THREADS = cores / processes per node unless it is set.
set -euo pipefail

launcher=deepspeed
hostfile=""
num_nodes=""
nproc=""
master_addr=""
master_port=29500
rdzv_endpoint=""
rdzv_id="${SLURM_JOB_ID:-llm}"
dry_run=0

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "launch.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --launcher) launcher="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --num-nodes|--num_nodes|--nnodes) num_nodes="$2"; shift 2 ;;
    --num-gpus|--num_gpus|--nproc-per-node|--nproc_per_node) nproc="$2"; shift 2 ;;
    --master-addr|--master_addr) master_addr="$2"; shift 2 ;;
    --master-port|--master_port) master_port="$2"; shift 2 ;;
    --rdzv-endpoint|--rdzv_endpoint) rdzv_endpoint="$2"; shift 2 ;;
    --rdzv-id|--rdzv_id) rdzv_id="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) die "unknown option $1 (the llm command goes after --)" ;;
  esac
done
[[ $# -gt 0 ]] || die "no llm command given: scripts/launch.sh [options] -- train CONFIG [key=value ...]"

PYTHON="${PYTHON:-python}"
if [[ -z "${DS_ACCELERATOR:-}" ]]; then
  if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export DS_ACCELERATOR=cuda
  else
    export DS_ACCELERATOR=cpu
  fi
fi

# Hosts and slots from the hostfile ("host slots=N"; comments and blank lines skipped).
hosts=()
slots=()
if [[ -n "$hostfile" ]]; then
  [[ -f "$hostfile" ]] || die "hostfile $hostfile not found"
  while read -r host rest; do
    [[ -z "$host" || "$host" == \#* ]] && continue
    n="$(sed -n 's/.*slots=\([0-9]\+\).*/\1/p' <<<"$rest")"
    [[ -n "$n" ]] || die "hostfile $hostfile: line '$host $rest' has no slots=N"
    hosts+=("$host"); slots+=("$n")
  done <"$hostfile"
  [[ ${#hosts[@]} -gt 0 ]] || die "hostfile $hostfile lists no hosts"
fi
num_nodes="${num_nodes:-${#hosts[@]}}"
[[ "$num_nodes" -ge 1 ]] 2>/dev/null || num_nodes=1
if [[ -z "$nproc" ]]; then
  if [[ ${#slots[@]} -gt 0 ]]; then
    nproc="${slots[0]}"
  elif [[ "$DS_ACCELERATOR" == cuda ]]; then
    nproc="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
  else
    nproc=1
  fi
fi
master_addr="${master_addr:-${hosts[0]:-127.0.0.1}}"

if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  cores="$(nproc 2>/dev/null || echo 1)"
  export OMP_NUM_THREADS=$(( cores / nproc > 0 ? cores / nproc : 1 ))
fi

# What every process needs besides what the launchers pass on themselves.
propagate=(DS_ACCELERATOR OMP_NUM_THREADS TORCH_EXTENSIONS_DIR PYTHONPATH WANDB_MODE WANDB_DIR
           HF_HOME HF_DATASETS_OFFLINE HF_HUB_OFFLINE LLM_EVAL_DATA
           NCCL_SOCKET_IFNAME NCCL_IB_DISABLE GLOO_SOCKET_IFNAME ${LLM_LAUNCH_ENV:-})

case "$launcher" in
  deepspeed)
    if [[ ${#hosts[@]} -gt 1 || $num_nodes -gt 1 ]]; then
      : >.deepspeed_env
      for var in "${propagate[@]}"; do
        [[ -n "${!var:-}" ]] && printf '%s=%s\n' "$var" "${!var}" >>.deepspeed_env
      done
    fi
    cmd=("$PYTHON" -m deepspeed.launcher.runner --master_addr "$master_addr" --master_port "$master_port"
         --num_nodes "$num_nodes" --num_gpus "$nproc" --module --no_local_rank)
    if [[ -n "$hostfile" ]]; then
      cmd+=(--hostfile "$hostfile")
      # A single local host needs no ssh: skip DeepSpeed's passwordless-ssh check.
      if [[ ${#hosts[@]} -eq 1 && ( "${hosts[0]}" == localhost || "${hosts[0]}" == 127.0.0.1
            || "${hosts[0]}" == "$(hostname)" ) ]]; then
        cmd+=(--no_ssh_check)
      fi
    fi
    cmd+=(llm "$@")
    ;;
  torchrun)
    rdzv_endpoint="${rdzv_endpoint:-$master_addr:$master_port}"
    cmd=("$PYTHON" -m torch.distributed.run --nnodes "$num_nodes" --nproc-per-node "$nproc"
         --rdzv-backend c10d --rdzv-endpoint "$rdzv_endpoint" --rdzv-id "$rdzv_id" -m llm "$@")
    ;;
  *) die "--launcher $launcher: expected deepspeed or torchrun" ;;
esac

if [[ $dry_run -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
