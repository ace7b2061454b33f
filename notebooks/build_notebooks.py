r"""Builds the notebooks in this folder from the cell sources below (the .ipynb files are generated).

    python notebooks/build_notebooks.py          # rewrite pretrain_tpu.ipynb, adapt_compress.ipynb
    python notebooks/build_notebooks.py --check  # exit 1 if a committed notebook is out of date

Both notebooks start with a parameters cell (tagged "parameters", the papermill convention) whose
`TINY = False` runs the real settings; `TINY = True` there, an injected cell after it, or the
environment variable R1JAX_NOTEBOOK_TINY=1 selects tiny settings that run top to bottom on a CPU
in a few minutes (CI executes them that way: tests/test_notebooks.py).
"""
import os
import sys

import nbformat
from nbformat import v4

HERE = os.path.dirname(os.path.abspath(__file__))
# The project's git repository, where the install cell gets r1jax on a fresh Colab by default
# (`R1JAX_SOURCE` in the parameters cell). Empty: no public URL is recorded yet. Set it (e.g.
# "https://github.com/OWNER/r1jax.git") and rebuild, and the notebooks install from it unasked.
REPOSITORY_URL = ""
_SOURCE_DEFAULT = f"git+{REPOSITORY_URL}" if REPOSITORY_URL else ""
# The parameters cells' line saying where r1jax comes from (its comment aligned with the others').
SOURCE_PARAMETER = (f'R1JAX_SOURCE = "{_SOURCE_DEFAULT}"'.ljust(23)
                    + "  # pip source when r1jax is not installed: git URL, wheel or checkout")

# --------------------------------------------------------------------------------------------------
# Cells both notebooks share.

SETTINGS = '''\
import os

# CI (and anyone on a CPU) can ask for tiny settings without editing the notebook.
TINY = TINY or os.environ.get("R1JAX_NOTEBOOK_TINY", "") == "1"
WORKDIR = os.environ.get("R1JAX_NOTEBOOK_WORKDIR", WORKDIR)
print(f"TINY={TINY}, WORKDIR={WORKDIR}")'''

INSTALL_MD = '''\
## Install

On Colab, first pick **Runtime > Change runtime type > TPU** (or a GPU). The cell below installs r1jax
with the JAX build for the accelerator it finds (`[tpu]` on a TPU VM) unless it is installed already:
from `R1JAX_SOURCE` (the parameters cell: a git URL, a wheel or a checkout path; by default the
project's repository when one is recorded), else from the checkout this notebook sits in. The stage
configs ship inside the package (`r1jax/configs/`), so nothing else is needed.'''

INSTALL = '''\
import importlib.util
import subprocess
import sys

on_tpu_vm = (os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")
             or "COLAB_TPU_ADDR" in os.environ or "TPU_NAME" in os.environ)
if importlib.util.find_spec("r1jax") is None:
    extra = "[tpu]" if on_tpu_vm else ""
    checkout = os.path.abspath("..")
    if "://" in R1JAX_SOURCE:  # a repository: pip wants git+https://...
        url = R1JAX_SOURCE if R1JAX_SOURCE.startswith("git+") else "git+" + R1JAX_SOURCE
        spec = [f"r1jax{extra} @ {url}"]
    elif R1JAX_SOURCE:  # a wheel or a checkout on this machine
        spec = [R1JAX_SOURCE + extra]
    elif os.path.exists(os.path.join(checkout, "setup.cfg")):
        spec = ["-e", checkout + extra]
    else:
        raise RuntimeError("r1jax is not installed and no repository URL is recorded: set "
                           "R1JAX_SOURCE in the parameters cell to its git URL, a wheel or a "
                           "checkout path (e.g. after `git clone ...` in a cell).")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *spec])
    importlib.invalidate_caches()

import r1jax

print("r1jax from", os.path.dirname(r1jax.__file__))'''

DEVICES_MD = '''\
## Which accelerator?

`jax.devices()` lists what JAX sees: TPU cores on a Colab TPU or TPU VM, GPUs, otherwise the CPU.'''

DEVICES = '''\
import jax

BACKEND = jax.default_backend()
print(f"jax {jax.__version__}, backend {BACKEND!r}, {jax.device_count()} device(s), "
      f"{jax.process_count()} process(es)")
for d in jax.devices():
    print("  ", d.id, d.device_kind, getattr(d, "coords", ""))
if BACKEND == "tpu":
    print("TPU detected.")
else:
    print(f"No TPU found: running on {BACKEND}."
          + (" Use TINY = True on a CPU." if BACKEND == "cpu" and not TINY else ""))'''


def _md(text):
  return v4.new_markdown_cell(text)


def _code(text, tags=()):
  cell = v4.new_code_cell(text)
  if tags:
    cell.metadata["tags"] = list(tags)
  return cell


def _notebook(cells):
  nb = v4.new_notebook()
  nb.cells = cells
  for i, cell in enumerate(cells):  # stable ids, so a rebuild without changes is byte-identical
    cell["id"] = f"cell-{i:02d}"
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  nb.metadata["accelerator"] = "TPU"
  nb.metadata["colab"] = {"provenance": []}
  return nb


# --------------------------------------------------------------------------------------------------
# (a) Pretraining on a Colab TPU.


def pretrain_tpu():
  return _notebook([
      _md('''\
# Pretraining a Transformer-XL on a Colab TPU with r1jax

MLM + NSP pretraining (`r1jax.stages.pretrain.run`, the same function as
`r1jax --config=pretrain`) on the embedded general corpus: install, find the
TPU, lay the devices out as a `data x fsdp x tensor` mesh, train while the metrics plot updates,
then look at the run in TensorBoard. Re-running the training cell resumes from the last checkpoint in
`WORKDIR`; to keep checkpoints across Colab sessions, make `WORKDIR` a folder of a mounted Google
Drive (`/content/drive/MyDrive/...`) or of a bucket mounted with gcsfuse (not a `gs://` URL).

For several TPU hosts (a pod slice) use `launch/tpu_pod.sh`, which runs the same command on every
worker.'''),
      _md("## Parameters"),
      _code('''\
TINY = False             # True: tiny settings that finish on a CPU in a few minutes
VARIANT = "small"        # model + config variant for the accelerator run: small | base
NUM_STEPS = 3000         # optimizer steps
WORKDIR = "runs/colab_pretrain"  # checkpoints, metrics.jsonl, tensorboard/ (a local or mounted path)
''' + SOURCE_PARAMETER + '''
POLL_SECS = 10           # how often the live plot refreshes''', tags=("parameters",)),
      _code(SETTINGS + '''
if TINY:
    VARIANT, NUM_STEPS, POLL_SECS = "tiny", 60, 2'''),
      _md(INSTALL_MD),
      _code(INSTALL),
      _md(DEVICES_MD),
      _code(DEVICES),
      _md('''\
## Config

The shipped `pretrain` config (`configs/pretrain.py` in a clone) with the chosen variant; any key can
be changed here as on the command line (`--config.train.batch_size=...`). The config is validated
before anything is compiled.'''),
      _code('''\
from r1jax import configlib
from r1jax.stages import pretrain

config = configlib.load_config(f"pretrain:variant={VARIANT}")
config.train.num_steps = NUM_STEPS
config.train.progress_bar = False  # the live plot below shows progress
if TINY:
    config.train.warmup_steps = 6
    config.train.log_every_steps = 5
    config.eval.every_steps = 20
    config.eval.num_batches = 2
    config.checkpoint.every_steps = 20
    config.data.corpus = "builtin:domain"
pretrain.validate(config)
print(config)'''),
      _md('''\
## Device mesh

Parameters and batches are sharded over a `data x fsdp x tensor` mesh (`config.mesh`; -1 takes the
remaining devices). On a v2-8 / v3-8 Colab TPU the default is 8-way data parallelism.'''),
      _code('''\
from r1jax.train import mesh as mesh_lib

mesh = mesh_lib.make_mesh(config.mesh)
print("mesh shape:", dict(mesh.shape))
print(mesh.devices)
print("batch rows per step:", config.train.batch_size, "| per data-parallel shard:",
      config.train.batch_size // mesh_lib.data_parallel_size(mesh))'''),
      _md('''\
## Train, with live metrics

Training runs in a background thread; this cell redraws the training and held-out loss and MLM
accuracy from `WORKDIR/metrics.jsonl` every `POLL_SECS` seconds until it finishes.'''),
      _code('''\
import threading
import time

import matplotlib.pyplot as plt
from IPython.display import clear_output, display

from r1jax.train import metrics as metrics_lib

result = {}

def _train():
    try:
        result["summary"] = pretrain.run(config, WORKDIR)
    except BaseException as e:  # shown below, in the notebook's thread
        result["error"] = e

def plot_metrics(records, title=""):
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for split, rows, style in (("train", train, "-"), ("held-out", evals, "o-")):
        if rows:
            axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], style, label=split)
            axes[1].plot([r["step"] for r in rows], [r["mlm_accuracy"] for r in rows], style,
                         label=split)
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel("MLM accuracy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig

thread = threading.Thread(target=_train, daemon=True)
thread.start()
while thread.is_alive():
    thread.join(timeout=POLL_SECS)
    records = metrics_lib.read_metrics(WORKDIR)
    if records:
        last = [r for r in records if r["split"] == "train"][-1:]
        clear_output(wait=True)
        fig = plot_metrics(records, f"step {records[-1]['step']} of {config.train.num_steps}"
                           + (f", {last[0].get('tokens_per_sec', 0):,.0f} tokens/s" if last else ""))
        display(fig)
        plt.close(fig)
if "error" in result:
    raise result["error"]
summary = result["summary"]
print({k: summary[k] for k in ("status", "step", "num_params", "final_eval", "wall_secs")})'''),
      _md("## Final curves"),
      _code('''\
fig = plot_metrics(metrics_lib.read_metrics(WORKDIR), f"{VARIANT}: {summary['step']} steps")
display(fig)
plt.close(fig)
print(f"held-out MLM accuracy {summary['final_eval']['mlm_accuracy']:.3f} "
      f"(chance {summary['mlm_chance_accuracy']:.4f}), NSP accuracy "
      f"{summary['final_eval']['nsp_accuracy']:.3f}")'''),
      _md('''\
## TensorBoard

The same metrics as TensorBoard events in `WORKDIR/tensorboard`. The extension loads only where
TensorBoard is installed (it is on Colab); the inline server is not started with the tiny settings.'''),
      _code('''\
import importlib.util

if importlib.util.find_spec("tensorboard") is None:
    print("TensorBoard is not installed (pip install tensorboard); events are in",
          os.path.join(WORKDIR, "tensorboard"))
else:
    get_ipython().run_line_magic("load_ext", "tensorboard")
    if not TINY:
        get_ipython().run_line_magic("tensorboard", f"--logdir {os.path.join(WORKDIR, 'tensorboard')}")
    else:
        print("tensorboard extension loaded; run  %tensorboard --logdir", os.path.join(WORKDIR, "tensorboard"))'''),
      _md('''\
## Next

- Domain adaptation and compression from this model: `notebooks/adapt_compress.ipynb` with
  `PRETRAIN_FROM = WORKDIR`.
- The same run from a shell: `r1jax --config=pretrain:variant=small --workdir=WORKDIR
  --config.train.num_steps=...`; on a pod slice `launch/tpu_pod.sh`.'''),
  ])


# --------------------------------------------------------------------------------------------------
# (b) Domain adaptation + compression, with the pipeline's report.


def adapt_compress():
  return _notebook([
      _md('''\
# Domain adaptation and compression with r1jax

The recipe after general pretraining, run by the pipeline stage (`r1jax.stages.pipeline.run`, the
same as `r1jax --config=pipeline`): domain-adaptive pretraining on the
FOLDOC computing dictionary, finetuning a classifier (frozen backbone, then the last layers) from the
general and from the adapted model, their comparison, then distillation, INT8 quantization and
pruning of the adapted classifier, and the final report. Every stage writes `WORKDIR/<stage>/`;
re-running the pipeline cell skips finished stages and resumes an interrupted one.'''),
      _md("## Parameters"),
      _code('''\
TINY = False             # True: tiny settings that finish on a CPU in a few minutes
VARIANT = "small"        # tiny | small | base (the pipeline config's variant=...)
WORKDIR = "runs/colab_pipeline"
PRETRAIN_FROM = ""       # a finished pretraining workdir (e.g. from pretrain_tpu.ipynb) used instead
                         # of the pipeline's own general pretraining; "" = pretrain here
RUN_TUNE = False         # also run the hyperparameter search stage
''' + SOURCE_PARAMETER, tags=("parameters",)),
      _code(SETTINGS + '''
if TINY:
    VARIANT = "tiny"'''),
      _md(INSTALL_MD),
      _code(INSTALL),
      _md(DEVICES_MD),
      _code(DEVICES),
      _md('''\
## Config

The shipped `pipeline` config (`configs/pipeline.py` in a clone): every stage's own config under
`config.pipeline.<stage>`, plus which stages
run and what feeds the compression stages. The tiny settings below shorten every stage further so
the notebook runs on a CPU in minutes (the default tiny pipeline takes 6 to 12 minutes on a
shared 2-core CPU).'''),
      _code('''\
from r1jax import configlib
from r1jax.stages import pipeline

config = configlib.load_config(f"pipeline:variant={VARIANT}")
config.init_from = PRETRAIN_FROM
config.run_tune = RUN_TUNE
if TINY:
    p = config.pipeline
    for stage, steps, every in (("pretrain_general", 30, 10), ("pretrain_domain", 30, 10),
                                ("finetune_general", 32, 8), ("finetune_domain", 32, 8),
                                ("distill", 16, 8), ("prune", 16, 8)):
        p[stage].train.num_steps = steps
        p[stage].eval.every_steps = every
        p[stage].checkpoint.every_steps = every
        p[stage].train.log_every_steps = every // 2
        p[stage].train.progress_bar = False
    for stage in ("pretrain_general", "pretrain_domain"):
        p[stage].train.warmup_steps = 3
        p[stage].eval.num_batches = 2
    for stage in ("finetune_general", "finetune_domain", "distill", "quantize", "prune"):
        p[stage].report.latency_repeats = 3
    for stage in ("distill", "quantize", "prune"):
        p[stage].export.enabled = False
    for stage in ("finetune_general", "finetune_domain"):
        p[stage].task.seq_len = 64  # 2 length-bucket widths to compile, not 8 of 256-token rows
    p.finetune_general.report.linear_baseline = False  # TF-IDF + LR: a minute of CPU
    p.quantize.quant.calibration_batches = 2
    p.tune.n_trials = 2
pipeline.validate(config)
print("stages:", ", ".join(pipeline.selected_stages(config)))
print("compression sources:", dict(config.sources))'''),
      _md('''\
## Run the pipeline

Each stage logs what it does; the pipeline prints the report's path at the end.'''),
      _code('''\
from absl import logging

logging.set_verbosity(logging.INFO)  # each stage says what it does
summary = pipeline.run(config, WORKDIR)
for name, stage in summary["stages"].items():
    wall = f"{stage['wall_secs']:.0f} s" if stage["wall_secs"] is not None else ""
    print(f"{name:18s} {stage['action']:5s} {wall}")'''),
      _md("## The report"),
      _code('''\
from IPython.display import Image, Markdown, display

report = open(summary["report"]).read()
# The report's images are files next to it; show them here as images instead of links.
display(Markdown("\\n".join(line for line in report.splitlines() if not line.startswith("!["))))
for key in ("loss_curves", "tradeoff"):
    if summary.get(key):
        display(Image(filename=summary[key]))'''),
      _md('''\
## General vs adapted, and the trade-off, as tables

The same numbers as tables, read from the stages' `summary.json` files.'''),
      _code('''\
import json

from IPython.display import Markdown, display

def load(stage):
    with open(os.path.join(WORKDIR, stage, "summary.json")) as f:
        return json.load(f)

def cell(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)

def table(header, rows):
    """A Markdown table: one list of values per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return Markdown("\\n".join(lines))

cmp = load("compare")
display(table(["metric", *cmp["names"], f"{cmp['names'][1]} - {cmp['names'][0]}"],
              [[r["metric"], *r["values"], *r["differences"]] for r in cmp["metrics"]]))

columns = ["name", "params", "bytes", "size_pct", "accuracy", "macro_f1", "latency_ms_batch1",
           "latency_ms_batched", "speedup_batch1"]
display(table(["stage", *columns], [[s, *(a.get(c, "") for c in columns)]
                                    for s in ("distill", "quantize", "prune")
                                    for a in load(s)["artifacts"]]))'''),
      _md('''\
## Next

- Open `WORKDIR/report.html` for the full report, or each stage's own `report.md`.
- The compressed artifacts (`WORKDIR/quantize/artifact`, ...) load with `r1jax.compress.artifact`;
  with export on, `model.stablehlo` runs without r1jax.
- From a shell: `r1jax --config=pipeline --workdir=WORKDIR` (in a clone also
  `python -m r1jax.main --config=configs/pipeline.py --workdir=WORKDIR`).'''),
  ])


NOTEBOOKS = {"pretrain_tpu.ipynb": pretrain_tpu, "adapt_compress.ipynb": adapt_compress}


def build(directory: str = HERE) -> dict[str, nbformat.NotebookNode]:
  out = {}
  for name, make in NOTEBOOKS.items():
    nb = make()
    nbformat.validate(nb)
    out[os.path.join(directory, name)] = nb
  return out


def _text(nb) -> str:
  return nbformat.writes(nb) + "\n"


def main(argv):
  check = "--check" in argv[1:]
  stale = []
  for path, nb in build().items():
    text = _text(nb)
    if check:
      current = open(path).read() if os.path.exists(path) else ""
      if current != text:
        stale.append(path)
    else:
      with open(path, "w") as f:
        f.write(text)
      print("wrote", path)
  if stale:
    print("out of date (run python notebooks/build_notebooks.py):", *stale)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
