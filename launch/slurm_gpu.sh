#!/usr/bin/env bash
#SBATCH --job-name=r1jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --output=r1jax-%j.out
#
# Multi-node GPU launcher for SLURM: one r1jax process per GPU (default) or per node, started by
# `srun` so that every process finds the jax.distributed environment in SLURM's variables.
#
#   launch/slurm_gpu.sh [options] -- COMMAND [ARGS...]
#
# Outside an allocation it submits itself with sbatch; inside one (an sbatch job or an salloc
# shell, i.e. SLURM_JOB_ID is set) it runs `srun COMMAND`. The #SBATCH lines above are defaults for
# `sbatch launch/slurm_gpu.sh -- COMMAND`; the options below override them. See launch/README.md.
#
# Each task gets from SLURM: SLURM_JOB_ID, SLURM_STEP_NODELIST (the first node hosts the
# coordinator, port derived from the job id unless JAX_COORDINATOR_PORT is set), SLURM_NTASKS (the
# process count), SLURM_PROCID (the rank) and SLURM_LOCALID (the GPU a per-GPU task uses).
# r1jax.distributed.maybe_initialize() sees SLURM_NTASKS > 1 and calls jax.distributed.initialize().
set -euo pipefail

readonly PROG="slurm_gpu.sh"

usage() {
  cat <<EOF
Usage: $PROG [options] -- COMMAND [ARGS...]

Options:
  --nodes N            nodes to allocate (default $nodes)
  --gpus-per-node G    GPUs per node (default $gpus_per_node)
  --per gpu|node       one process per GPU (default; each sees its node's GPUs and uses number
                       SLURM_LOCALID) or one process per node using all G GPUs
  --cpus-per-task C    CPUs per process (data loading threads)
  --partition P        partition (queue)
  --account A          account to charge
  --time T             time limit, e.g. 24:00:00
  --job-name NAME      job name (default $job_name)
  --output PATTERN     sbatch log file (default $output)
  --venv DIR           Python virtual environment to activate in the job (default: .venv of this
                       repository when it exists)
  --sbatch-arg ARG     extra sbatch option, e.g. --sbatch-arg=--exclusive (repeatable)
  --dry-run            print the sbatch and srun commands, run nothing
  -h, --help           show this help

Examples:
  $PROG --nodes=4 --gpus-per-node=8 -- python -m r1jax.main \\
      --config=configs/pretrain.py:variant=base --workdir=/shared/runs/pretrain
  $PROG --nodes=2 --per=node --time=12:00:00 -- python -m r1jax.main \\
      --config=configs/pipeline.py --workdir=/shared/runs/pipeline
EOF
}

die() {
  echo "$PROG: $*" >&2
  exit 2
}

is_positive_int() {
  [[ "$1" =~ ^[0-9]+$ ]] && (("$1" > 0))
}

nodes=2
gpus_per_node=8
per=gpu
cpus_per_task=""
partition=""
account=""
time_limit=""
job_name=r1jax
output="r1jax-%j.out"
venv=""
sbatch_extra=()
dry_run=0

# Accepts "--flag value" and "--flag=value"; sets $value and $used (1 or 2 arguments consumed).
take_value() {
  if [[ "$1" == *=* ]]; then
    value="${1#*=}"
    used=1
  else
    (($# >= 2)) || die "$1 needs a value"
    value="$2"
    used=2
  fi
}

while (($# > 0)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --nodes | --nodes=*) take_value "$@"; nodes="$value"; shift "$used" ;;
    --gpus-per-node | --gpus-per-node=*) take_value "$@"; gpus_per_node="$value"; shift "$used" ;;
    --per | --per=*) take_value "$@"; per="$value"; shift "$used" ;;
    --cpus-per-task | --cpus-per-task=*) take_value "$@"; cpus_per_task="$value"; shift "$used" ;;
    --partition | --partition=*) take_value "$@"; partition="$value"; shift "$used" ;;
    --account | --account=*) take_value "$@"; account="$value"; shift "$used" ;;
    --time | --time=*) take_value "$@"; time_limit="$value"; shift "$used" ;;
    --job-name | --job-name=*) take_value "$@"; job_name="$value"; shift "$used" ;;
    --output | --output=*) take_value "$@"; output="$value"; shift "$used" ;;
    --venv | --venv=*) take_value "$@"; venv="$value"; shift "$used" ;;
    --sbatch-arg | --sbatch-arg=*) take_value "$@"; sbatch_extra+=("$value"); shift "$used" ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) die "unknown option '$1'; put the command after '--' (see --help)" ;;
  esac
done
(($# > 0)) || die "missing the command after '--'"
is_positive_int "$nodes" || die "--nodes='$nodes' must be a positive integer"
is_positive_int "$gpus_per_node" || die "--gpus-per-node='$gpus_per_node' must be a positive integer"
[[ -z "$cpus_per_task" ]] || is_positive_int "$cpus_per_task" ||
  die "--cpus-per-task='$cpus_per_task' must be a positive integer"
case "$per" in
  gpu) tasks_per_node="$gpus_per_node" ;;
  node) tasks_per_node=1 ;;
  *) die "--per='$per' must be 'gpu' or 'node'" ;;
esac

# Prints one argument so that a shell reads it back unchanged.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command line, quoted.
show() {
  local arg line="+"
  for arg in "$@"; do line+=" $(quote "$arg")"; done
  echo "$line"
}

# The step every task runs. --kill-on-bad-exit ends the whole step when one task fails, so no
# rank waits forever in a collective; --label prefixes each output line with the task's rank.
srun_command=(srun --kill-on-bad-exit=1 --label --ntasks-per-node="$tasks_per_node")
[[ -z "$cpus_per_task" ]] || srun_command+=(--cpus-per-task="$cpus_per_task")
srun_command+=("$@")

# One process per node must see all its GPUs, not only GPU SLURM_LOCALID (JAX's SLURM default).
device_ids=""
if [[ "$per" == node ]]; then
  device_ids="$(seq -s, 0 $((gpus_per_node - 1)))"
fi

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  # Inside the allocation: activate the environment and start one process per task.
  if [[ -n "$venv" ]]; then
    echo "+ source $(quote "$venv/bin/activate")"
    # shellcheck disable=SC1091  # the venv is only known at run time
    ((dry_run)) || source "$venv/bin/activate"
  fi
  if [[ -n "$device_ids" ]]; then
    echo "+ export R1JAX_LOCAL_DEVICE_IDS=$device_ids"
    export R1JAX_LOCAL_DEVICE_IDS="$device_ids"
  fi
  show "${srun_command[@]}"
  ((dry_run)) || exec "${srun_command[@]}"
  exit 0
fi

# Outside an allocation: submit this script, which then takes the branch above on the first node.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "$venv" && -d "$repo_root/.venv" ]]; then
  venv="$repo_root/.venv"
fi
sbatch_command=(sbatch --job-name="$job_name" --nodes="$nodes" --ntasks-per-node="$tasks_per_node"
  --gres="gpu:$gpus_per_node" --output="$output" --chdir="$repo_root")
[[ -z "$cpus_per_task" ]] || sbatch_command+=(--cpus-per-task="$cpus_per_task")
[[ -z "$partition" ]] || sbatch_command+=(--partition="$partition")
[[ -z "$account" ]] || sbatch_command+=(--account="$account")
[[ -z "$time_limit" ]] || sbatch_command+=(--time="$time_limit")
sbatch_command+=("${sbatch_extra[@]+"${sbatch_extra[@]}"}")
sbatch_command+=("$repo_root/launch/slurm_gpu.sh" --nodes="$nodes" --gpus-per-node="$gpus_per_node"
  --per="$per")
[[ -z "$cpus_per_task" ]] || sbatch_command+=(--cpus-per-task="$cpus_per_task")
[[ -z "$venv" ]] || sbatch_command+=(--venv="$venv")
sbatch_command+=(-- "$@")

show "${sbatch_command[@]}"
if ((dry_run)); then
  echo "# in the job, on the first node:"
  [[ -z "$venv" ]] || echo "+ source $(quote "$venv/bin/activate")"
  [[ -z "$device_ids" ]] || echo "+ export R1JAX_LOCAL_DEVICE_IDS=$device_ids"
  show "${srun_command[@]}"
  exit 0
fi
command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node (or use --dry-run)"
exec "${sbatch_command[@]}"
