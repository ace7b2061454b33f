#!/usr/bin/env bash
# Cloud TPU VM slice launcher: create a slice, install r1jax on every worker, run the same
# `python -m r1jax.main` command on all workers (--worker=all), resume after preemption, delete.
#
#   launch/tpu_pod.sh [options] create|install|run|resume|check|logs|status|delete [-- MAIN_FLAGS...]
#
# Checkpoints, metrics and reports go to --workdir, which every worker and every future slice must
# see; the workers' own disks vanish with a preempted slice. r1jax writes its workdir with POSIX
# file I/O, so for --workdir=gs://BUCKET/PATH each worker first mounts the bucket with gcsfuse at
# /mnt/gcs/BUCKET (`install` puts gcsfuse on the workers) and r1jax.main gets
# --workdir=/mnt/gcs/BUCKET/PATH. A path that is not gs:// is passed as it is (and warned about).
# Rerunning `run` (or `resume`, which first recreates a preempted slice) with the same --workdir
# continues from the last checkpoint. Each printed "+ ..." line is a command this script runs;
# --dry-run only prints them. See launch/README.md.
set -euo pipefail

readonly PROG="${0##*/}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

usage() {
  cat <<EOF
Usage: $PROG [options] SUBCOMMAND [-- MAIN_FLAGS...]

Subcommands:
  create   create the TPU VM slice (a queued resource with --queued)
  install  on every worker: install gcsfuse (if missing), fetch r1jax (git clone, or --copy of
           this checkout), make a Python $python_version venv with uv, pip install -e "r1jax[tpu]"
  run      on every worker: R1JAX_DISTRIBUTED=auto python -m r1jax.main --config=CONFIG
           --workdir=WORKDIR MAIN_FLAGS...  (the same command everywhere, --worker=all); for
           --workdir=gs://BUCKET/PATH the worker first mounts the bucket with gcsfuse at
           $GCS_MOUNT_ROOT/BUCKET (unless already mounted) and WORKDIR is $GCS_MOUNT_ROOT/BUCKET/PATH
  resume   if the slice is not READY (preempted, missing): delete, create, install; then run.
           The same --workdir makes r1jax continue from its last checkpoint.
  check    on every worker: python -m r1jax.tools.dist_check (jax.distributed across the slice)
  logs     last lines of worker 0's log of a --detach run
  status   show the slice (or queued resource) state
  delete   delete the slice (or queued resource)

Options (environment variable in brackets, then the default):
  --name NAME              slice name [TPU_NAME] ($name)
  --zone ZONE              zone [TPU_ZONE] ($zone)
  --project PROJECT        project [TPU_PROJECT] (gcloud's configured project)
  --accelerator-type TYPE  e.g. v4-32, v5litepod-16, v5p-32, v6e-16 [TPU_ACCELERATOR_TYPE] ($accelerator)
  --version VERSION        TPU software version [TPU_RUNTIME_VERSION] (v2-v4: tpu-ubuntu2204-base,
                           v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
  --spot                   Spot capacity: cheaper, can be preempted at any time [TPU_SPOT=1]
  --queued                 create through a queued resource (waits for capacity) [TPU_QUEUED=1]
  --service-account EMAIL  service account of the workers; it needs read/write on the bucket
  --repo URL               git repository to install from [R1JAX_REPO] (this checkout's origin)
  --ref REF                commit, branch or tag to install [R1JAX_REF] (this checkout's HEAD)
  --copy                   install a copy of this checkout instead of cloning (uncommitted changes too)
  --python VERSION         Python version of the workers' venv [R1JAX_PYTHON] ($python_version)
  --config CONFIG          r1jax config: a path relative to the repository or a shipped config's
                           name (pretrain:variant=base) [R1JAX_CONFIG] ($config)
  --workdir WORKDIR        workdir shared by all workers and slices [R1JAX_WORKDIR] (required for
                           run and resume): gs://BUCKET/PATH (mounted with gcsfuse on the workers,
                           see run) or a path on a share mounted at the same place on every worker
  --detach                 run in the background on the workers (survives a closed ssh session);
                           output goes to ~/r1jax-run.log on each worker, see 'logs'
  --dry-run                print the commands, run nothing
  -h, --help               show this help

Examples:
  $PROG --accelerator-type=v4-32 --spot create
  $PROG --repo=https://github.com/you/r1jax.git install
  $PROG --config=configs/pretrain.py:variant=base --workdir=gs://my-bucket/r1jax/pretrain run
  $PROG --config=configs/pretrain.py:variant=base --workdir=gs://my-bucket/r1jax/pretrain resume
  $PROG --dry-run --workdir=gs://my-bucket/r1jax/pipeline run -- --config.stages=pretrain,finetune
EOF
}

die() {
  echo "$PROG: $*" >&2
  exit 2
}

# Where each worker mounts a gs:// workdir's bucket: $GCS_MOUNT_ROOT/BUCKET.
readonly GCS_MOUNT_ROOT=/mnt/gcs

name="${TPU_NAME:-r1jax}"
zone="${TPU_ZONE:-us-central2-b}"
project="${TPU_PROJECT:-}"
accelerator="${TPU_ACCELERATOR_TYPE:-v4-32}"
runtime="${TPU_RUNTIME_VERSION:-}"
spot="${TPU_SPOT:-0}"
queued="${TPU_QUEUED:-0}"
service_account=""
repo="${R1JAX_REPO:-}"
ref="${R1JAX_REF:-}"
copy=0
python_version="${R1JAX_PYTHON:-3.11}"
config="${R1JAX_CONFIG:-configs/pipeline.py}"
workdir="${R1JAX_WORKDIR:-}"
detach=0
dry_run=0
subcommand=""
main_flags=()

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
    --name | --name=*) take_value "$@"; name="$value"; shift "$used" ;;
    --zone | --zone=*) take_value "$@"; zone="$value"; shift "$used" ;;
    --project | --project=*) take_value "$@"; project="$value"; shift "$used" ;;
    --accelerator-type | --accelerator-type=*) take_value "$@"; accelerator="$value"; shift "$used" ;;
    --version | --version=*) take_value "$@"; runtime="$value"; shift "$used" ;;
    --service-account | --service-account=*) take_value "$@"; service_account="$value"; shift "$used" ;;
    --repo | --repo=*) take_value "$@"; repo="$value"; shift "$used" ;;
    --ref | --ref=*) take_value "$@"; ref="$value"; shift "$used" ;;
    --python | --python=*) take_value "$@"; python_version="$value"; shift "$used" ;;
    --config | --config=*) take_value "$@"; config="$value"; shift "$used" ;;
    --workdir | --workdir=*) take_value "$@"; workdir="$value"; shift "$used" ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --copy) copy=1; shift ;;
    --detach) detach=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; main_flags=("$@"); break ;;
    -*) die "unknown option '$1' (see --help)" ;;
    create | install | run | resume | check | logs | status | delete)
      [[ -z "$subcommand" ]] || die "one subcommand at a time, got '$subcommand' and '$1'"
      subcommand="$1"
      shift
      ;;
    *) die "unknown subcommand '$1'; choose create, install, run, resume, check, logs, status or delete" ;;
  esac
done
[[ -n "$subcommand" ]] || { usage >&2; die "missing the subcommand"; }
for flag in spot queued; do
  [[ "${!flag}" == 0 || "${!flag}" == 1 ]] || die "--$flag / TPU_${flag^^} must be 0 or 1, got '${!flag}'"
done

if [[ -z "$runtime" ]]; then
  case "$accelerator" in
    v6e-*) runtime=v2-alpha-tpuv6e ;;
    v5p-*) runtime=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) runtime=v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) runtime=tpu-ubuntu2204-base ;;
    *) die "no default TPU software version for --accelerator-type=$accelerator; pass --version" ;;
  esac
fi

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

# Prints a command, then runs it unless --dry-run.
run() {
  show "$@"
  ((dry_run)) || "$@"
}

if ((!dry_run)) && ! command -v gcloud >/dev/null; then
  die "gcloud is not installed; see https://cloud.google.com/sdk/docs/install (or use --dry-run)"
fi

where=(--zone="$zone")
[[ -z "$project" ]] || where+=(--project="$project")

# Runs a shell command on every worker of the slice (or on the worker given as $2).
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="${2:-all}" --command="$1"
}

# The command that prints the slice state: READY/PREEMPTED/... (ACTIVE/SUSPENDED/... if queued).
if ((queued)); then
  state_command=(gcloud compute tpus queued-resources describe "$name" "${where[@]}"
    --format='value(state.state)')
else
  state_command=(gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format='value(state)')
fi

do_create() {
  local extra=(--scopes=https://www.googleapis.com/auth/cloud-platform)
  ((spot)) && extra+=(--spot)
  [[ -z "$service_account" ]] || extra+=(--service-account="$service_account")
  if ((queued)); then
    run gcloud compute tpus queued-resources create "$name" --node-id="$name" "${where[@]}" \
      --accelerator-type="$accelerator" --runtime-version="$runtime" "${extra[@]}"
    echo "# waiting until queued resource $name is ACTIVE"
    if ((!dry_run)); then
      local state
      while state="$("${state_command[@]}")" && [[ "$state" != ACTIVE ]]; do
        [[ "$state" != FAILED && "$state" != SUSPENDED ]] || die "queued resource $name is $state"
        echo "# state: $state; checking again in 60 s"
        sleep 60
      done
    fi
  else
    run gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type="$accelerator" \
      --version="$runtime" "${extra[@]}"
  fi
}

do_delete() {
  if ((queued)); then
    run gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
  fi
}

do_install() {
  local fetch
  if ((copy)); then
    local tarball="${TMPDIR:-/tmp}/r1jax-src.tar.gz"
    echo "# packing this checkout (tracked and untracked, not ignored files) into $tarball"
    if ((!dry_run)); then
      tarball="$(mktemp "${TMPDIR:-/tmp}/r1jax-src.XXXXXX")"
      (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard |
        tar --null -T - -czf "$tarball")
    fi
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:r1jax-src.tar.gz" "${where[@]}" --worker=all
    ((dry_run)) || rm -f "$tarball"
    # shellcheck disable=SC2016  # $HOME is expanded on the worker
    fetch='rm -rf "$HOME/r1jax" && mkdir -p "$HOME/r1jax" && tar -xzf "$HOME/r1jax-src.tar.gz" -C "$HOME/r1jax"'
  else
    if [[ -z "$repo" ]]; then
      repo="$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null)" ||
        die "no --repo given and this checkout has no 'origin' remote; pass --repo=URL or --copy"
    fi
    if [[ -z "$ref" ]]; then
      ref="$(git -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null)" || ref=main
    fi
    fetch="rm -rf \"\$HOME/r1jax\" && git clone --quiet $(quote "$repo") \"\$HOME/r1jax\""
    fetch+=" && git -C \"\$HOME/r1jax\" checkout --quiet $(quote "$ref")"
  fi
  # gcsfuse mounts a gs:// workdir (see mount_command); Google's apt repository for it, as in
  # https://cloud.google.com/storage/docs/cloud-storage-fuse/install (skipped when already there).
  # DPkg::Lock::Timeout waits for the apt run a freshly booted image may have in progress.
  local gcsfuse apt='sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -qq -y'
  gcsfuse='if ! command -v gcsfuse >/dev/null; then echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc]'
  # shellcheck disable=SC2016  # $(lsb_release ...) is expanded on the worker
  gcsfuse+=' https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main"'
  gcsfuse+=' | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null;'
  gcsfuse+=' curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg'
  gcsfuse+=' | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null;'
  gcsfuse+=" $apt update; $apt install gcsfuse; fi"
  # uv provides Python $python_version even where the image's python3 is older (Ubuntu 22.04: 3.10);
  # the second pip call is for images whose system Python refuses --user installs (PEP 668).
  on_workers "set -euo pipefail; $gcsfuse; $fetch; { python3 -m pip install --user --quiet --upgrade uv || \
python3 -m pip install --user --quiet --upgrade --break-system-packages uv; }; \
\"\$HOME/.local/bin/uv\" venv --quiet --allow-existing --python $(quote "$python_version") \"\$HOME/r1jax-venv\"; \
\"\$HOME/.local/bin/uv\" pip install --quiet --python \"\$HOME/r1jax-venv/bin/python\" -e \"\$HOME/r1jax[tpu]\""
}

# The command every worker runs, from the repository so relative config paths resolve.
python_command() {
  local line arg
  line="cd \"\$HOME/r1jax\" && R1JAX_DISTRIBUTED=auto \"\$HOME/r1jax-venv/bin/python\" -m $1"
  shift
  for arg in "$@"; do line+=" $(quote "$arg")"; done
  echo "$line"
}

# Checks --workdir for run and resume (before resume touches the slice) and sets worker_workdir,
# the path r1jax.main gets on the workers, and mount_command, what a worker runs first ("" if nothing).
resolve_workdir() {
  [[ -n "$workdir" ]] || die "$subcommand needs --workdir=gs://BUCKET/PATH (or R1JAX_WORKDIR)"
  worker_workdir="$workdir"
  mount_command=""
  if [[ "$workdir" != gs://* ]]; then
    echo "$PROG: warning: --workdir=$workdir is not a gs:// path; unless it is a share mounted at the" \
      "same path on every worker (Filestore, NFS, gcsfuse), each worker writes its own disk, the" \
      "workers do not share checkpoints and a preempted slice loses them." \
      "Pass --workdir=gs://BUCKET/PATH to have the bucket mounted on every worker." >&2
    return
  fi
  local rest="${workdir#gs://}" bucket path
  bucket="${rest%%/*}"
  path="${rest:${#bucket}}"
  while [[ "$path" == */ ]]; do path="${path%/}"; done
  [[ -n "$bucket" ]] ||
    die "--workdir=$workdir names no bucket; pass --workdir=gs://BUCKET/PATH, e.g. gs://my-bucket/runs/pretrain"
  [[ "$bucket" =~ ^[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]$ ]] ||
    die "--workdir=$workdir: '$bucket' is not a GCS bucket name (3-222 lowercase letters, digits," \
      "'-', '_', '.'); pass --workdir=gs://BUCKET/PATH"
  [[ "/$path/" != */../* && "/$path/" != */./* ]] ||
    die "--workdir=$workdir: '.' and '..' are not allowed in the path; pass --workdir=gs://BUCKET/PATH"
  local mount_point="$GCS_MOUNT_ROOT/$bucket"
  worker_workdir="$mount_point$path"
  echo "# --workdir=$workdir: every worker mounts gs://$bucket at $mount_point (gcsfuse," \
    "unless already mounted); r1jax.main gets --workdir=$worker_workdir"
  # The mount point belongs to the login user, who mounts, so r1jax can write the files.
  local m
  m="$(quote "$mount_point")"
  mount_command="set -euo pipefail; if ! mountpoint -q $m; then \
command -v gcsfuse >/dev/null || { echo \"gcsfuse is missing on \$(hostname); run '$PROG install'\" >&2; exit 1; }; \
sudo mkdir -p $m; sudo chown \"\$(id -u):\$(id -g)\" $m; gcsfuse --implicit-dirs $(quote "$bucket") $m; fi; "
}

do_run() {
  local command
  command="$(python_command r1jax.main --config="$config" --workdir="$worker_workdir" \
    "${main_flags[@]+"${main_flags[@]}"}")"
  if ((detach)); then
    command="setsid nohup bash -c $(quote "$command") >\"\$HOME/r1jax-run.log\" 2>&1 </dev/null & \
echo \"started on \$(hostname); log: \$HOME/r1jax-run.log\""
  fi
  on_workers "$mount_command$command"
}

do_resume() {
  local state
  if ((dry_run)); then
    show "${state_command[@]}"
    echo "# dry run: assuming the slice was preempted, so it is recreated"
    state=PREEMPTED
  else
    show "${state_command[@]}"
    state="$("${state_command[@]}" 2>/dev/null)" || state=MISSING
  fi
  echo "# slice $name state: ${state:-UNKNOWN}"
  if [[ "$state" == READY || "$state" == ACTIVE ]]; then
    do_run
    return
  fi
  [[ "$state" == MISSING ]] || do_delete
  do_create
  do_install
  do_run
}

case "$subcommand" in
  create) do_create ;;
  install) do_install ;;
  run) resolve_workdir; do_run ;;
  resume) resolve_workdir; do_resume ;;
  check) on_workers "$(python_command r1jax.tools.dist_check)" ;;
  logs)
    # shellcheck disable=SC2016  # $HOME is expanded on the worker
    on_workers 'tail -n 100 "$HOME/r1jax-run.log"' 0
    ;;
  status)
    if ((queued)); then
      run gcloud compute tpus queued-resources describe "$name" "${where[@]}"
    else
      run gcloud compute tpus tpu-vm describe "$name" "${where[@]}"
    fi
    ;;
  delete) do_delete ;;
esac
