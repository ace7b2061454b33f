#!/usr/bin/env bash
# Runs N copies of one command on this machine as one jax.distributed job.
#
#   launch/local.sh [options] N -- COMMAND [ARGS...]
#
# Each copy gets R1JAX_COORDINATOR=127.0.0.1:<free port>, R1JAX_NUM_PROCESSES=N and
# R1JAX_PROCESS_ID=<rank>, which r1jax.distributed.maybe_initialize() turns into
# jax.distributed.initialize(). Output lines are prefixed with "[rank R] ". The launcher waits for
# every rank; when one fails it stops the others and exits with that rank's exit code. Ctrl-C (or
# SIGTERM/SIGHUP to the launcher) stops every rank, including processes the ranks started. A
# launcher started with `&` from a non-interactive script ignores SIGINT (POSIX: background jobs
# there start with it ignored, and bash cannot trap it); send SIGTERM instead.
set -euo pipefail

readonly PROG="${0##*/}"

usage() {
  cat <<EOF
Usage: $PROG [options] N -- COMMAND [ARGS...]

Starts N processes of COMMAND on this machine as one jax.distributed job.

Options:
  --devices-per-process K  CPU: K devices per process (XLA_FLAGS=--xla_force_host_platform_device_count=K).
                           GPU: K GPUs per process (rank r gets CUDA_VISIBLE_DEVICES r*K .. r*K+K-1).
                           Default: CPU gives one device per process; GPU processes see every GPU.
  --port P                 Coordinator port on 127.0.0.1 (default: a free port).
  --grace S                Seconds the other ranks get to exit after SIGTERM before SIGKILL (default 10).
  --no-prefix              Do not prefix output lines with the rank.
  --dry-run                Print the environment and command of every rank, start nothing.
  -h, --help               Show this help.

Environment: JAX_PLATFORMS defaults to cpu when no GPU/TPU device file exists; set it to override.
Every rank inherits the rest of the environment.

Examples:
  $PROG --devices-per-process 2 2 -- python -m r1jax.tools.dist_check
  $PROG 2 -- python -m r1jax.main --config=configs/pretrain.py:variant=tiny --workdir=/tmp/r1jax_mp
EOF
}

die() {
  echo "$PROG: $*" >&2
  echo "Run '$PROG --help' for usage." >&2
  exit 2
}

is_positive_int() {
  [[ "$1" =~ ^[0-9]+$ ]] && (("$1" > 0))
}

devices_per_process=""
port=""
grace=10
prefix=1
dry_run=0
while (($# > 0)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --devices-per-process) (($# >= 2)) || die "$1 needs a value"; devices_per_process="$2"; shift 2 ;;
    --devices-per-process=*) devices_per_process="${1#*=}"; shift ;;
    --port) (($# >= 2)) || die "$1 needs a value"; port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --grace) (($# >= 2)) || die "$1 needs a value"; grace="$2"; shift 2 ;;
    --grace=*) grace="${1#*=}"; shift ;;
    --no-prefix) prefix=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) die "the process count N must come before '--'" ;;
    -*) die "unknown option '$1'" ;;
    *) break ;;
  esac
done

(($# >= 1)) || die "missing the process count N"
num_processes="$1"
shift
is_positive_int "$num_processes" || die "N='$num_processes' must be a positive integer"
(($# >= 1)) && [[ "$1" == "--" ]] || die "expected '--' after N, then the command to run"
shift
(($# >= 1)) || die "missing the command after '--'"
if [[ -n "$devices_per_process" ]]; then
  is_positive_int "$devices_per_process" ||
    die "--devices-per-process='$devices_per_process' must be a positive integer"
fi
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace='$grace' must be a whole number of seconds"

has_accelerator() {
  compgen -G '/dev/nvidia[0-9]*' >/dev/null || compgen -G '/dev/accel[0-9]*' >/dev/null ||
    compgen -G '/dev/vfio/[0-9]*' >/dev/null || [[ -e /dev/kfd ]]
}

if [[ -z "${JAX_PLATFORMS:-}" ]] && ! has_accelerator; then
  export JAX_PLATFORMS=cpu
fi
platforms="${JAX_PLATFORMS:-<auto>}"

if [[ -z "$port" ]]; then
  port="$("${PYTHON:-python3}" -c \
    'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
is_positive_int "$port" || die "--port='$port' must be a positive integer"
coordinator="127.0.0.1:$port"

# XLA_FLAGS for CPU ranks: the caller's flags without any forced device count, plus ours.
cpu_xla_flags() {
  local kept=() flags=() flag
  read -r -a flags <<<"${XLA_FLAGS:-}"
  for flag in "${flags[@]+"${flags[@]}"}"; do
    [[ "$flag" == --xla_force_host_platform_device_count=* ]] || kept+=("$flag")
  done
  kept+=("--xla_force_host_platform_device_count=$1")
  echo "${kept[*]}"
}

# GPU ids to share out (from CUDA_VISIBLE_DEVICES, else 0..N*K-1), checked before anything starts.
device_mode=""
gpu_ids=()
if [[ -n "$devices_per_process" ]]; then
  if [[ "$platforms" == cpu ]]; then
    device_mode=cpu
  elif [[ "$platforms" == *cuda* || "$platforms" == *gpu* ]] || compgen -G '/dev/nvidia[0-9]*' >/dev/null; then
    device_mode=gpu
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
      IFS=, read -r -a gpu_ids <<<"$CUDA_VISIBLE_DEVICES"
    else
      for ((i = 0; i < num_processes * devices_per_process; i++)); do gpu_ids+=("$i"); done
    fi
    ((${#gpu_ids[@]} >= num_processes * devices_per_process)) ||
      die "$num_processes ranks x $devices_per_process GPUs need $((num_processes * devices_per_process))" \
        "GPUs; CUDA_VISIBLE_DEVICES lists ${#gpu_ids[@]}"
  else
    die "--devices-per-process works with CPU (JAX_PLATFORMS=cpu) and NVIDIA GPUs, not JAX_PLATFORMS=$platforms"
  fi
fi

# The GPUs of rank $1, comma-separated.
gpu_slice() {
  local slice=("${gpu_ids[@]:$1*devices_per_process:devices_per_process}")
  local IFS=,
  echo "${slice[*]}"
}

# The environment assignments of rank $1, one NAME=VALUE per line.
rank_env() {
  local rank="$1"
  echo "R1JAX_COORDINATOR=$coordinator"
  echo "R1JAX_NUM_PROCESSES=$num_processes"
  echo "R1JAX_PROCESS_ID=$rank"
  case "$device_mode" in
    cpu) echo "XLA_FLAGS=$(cpu_xla_flags "$devices_per_process")" ;;
    gpu) echo "CUDA_VISIBLE_DEVICES=$(gpu_slice "$rank")" ;;
  esac
}

echo "$PROG: $num_processes processes, coordinator $coordinator, JAX_PLATFORMS=$platforms," \
  "devices per process: ${devices_per_process:-default}; command: $*" >&2

if ((dry_run)); then
  for ((rank = 0; rank < num_processes; rank++)); do
    mapfile -t assignments < <(rank_env "$rank")
    printf '%q ' env "${assignments[@]}" "$@"
    printf '\n'
  done
  exit 0
fi

pids=()
stopping=0

# Stops every rank still running: SIGTERM to its process group, SIGKILL after the grace period.
stop_all() {
  local pid waited=0 alive
  stopping=1
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  while :; do
    alive=0
    for pid in "${pids[@]}"; do
      if kill -0 -- "-$pid" 2>/dev/null; then alive=1; fi
    done
    ((alive)) || break
    if ((waited >= grace * 10)); then
      echo "$PROG: ranks still running after ${grace}s; sending SIGKILL" >&2
      for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}

# shellcheck disable=SC2329  # called from the traps below
on_signal() {
  local code="$1" name="$2"
  trap - INT TERM HUP
  ((stopping)) && exit "$code"
  echo "$PROG: received SIG$name; stopping all ranks" >&2
  stop_all
  exit "$code"
}
trap 'on_signal 130 INT' INT
trap 'on_signal 143 TERM' TERM
trap 'on_signal 129 HUP' HUP

# Job control puts each rank in its own process group, so stop_all reaches everything a rank
# started, and a Ctrl-C reaches only the launcher, which then stops the ranks in order.
set -m
for ((rank = 0; rank < num_processes; rank++)); do
  mapfile -t assignments < <(rank_env "$rank")
  if ((prefix)); then
    # The prefixer joins the rank's process group; it ignores INT/TERM so that it still prints a
    # stopping rank's last lines, and ends when every writer of the rank's output has exited.
    env "${assignments[@]}" "$@" </dev/null \
      > >(trap '' INT TERM; exec awk -v p="[rank $rank] " '{ print p $0; fflush() }') 2>&1 &
  else
    env "${assignments[@]}" "$@" </dev/null &
  fi
  pids+=("$!")
done
set +m

# Wait for every rank; on the first failure stop the rest and keep that exit code.
exit_code=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  still=()
  for index in "${!running[@]}"; do
    pid="${running[$index]}"
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    if ((rc != 0 && exit_code == 0)); then
      exit_code="$rc"
      for rank in "${!pids[@]}"; do
        [[ "${pids[$rank]}" == "$pid" ]] && break
      done
      echo "$PROG: rank $rank exited with code $rc; stopping the other ranks" >&2
      trap - INT TERM HUP
      stop_all
      still=()
      break
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  ((${#running[@]} == 0)) || sleep 0.1
done
# Every rank has exited; stop what they may have left running in the background.
((stopping)) || stop_all
exit "$exit_code"
