"""The embedded default corpus: load it by name, no download needed.

    from r1jax.data import builtin
    docs = builtin.load("general")                 # list of {"id", "text", "lexfile"}
    domain = builtin.load("domain")                # list of {"id", "title", "text", "tags"}
    train = builtin.load("task", split="train")    # list of {"id", "title", "text", "label", "tags"}
    builtin.labels()                               # the 10 class names, in class-id order
    icons = builtin.load("icons", split="train")   # list of {"id", "text", "label", "image"}
    builtin.labels("icons")                        # the 9 icon contexts, in class-id order
    builtin.path("knowledge")                      # knowledge TSV (entity<TAB>type, h<TAB>r<TAB>t)

Sources: WordNet 3.0 (general English, Princeton licence, LICENSE.wordnet) and FOLDOC (computing,
GFDL 1.2, LICENSE.foldoc). `build_corpus.py` rebuilds every file from Debian's `wordnet-base` and
`dict-foldoc` packages; README.txt lists counts and checksums. The task's dev and test entries are not
in "domain" nor in "knowledge", so domain pretraining never sees the evaluation texts.

The image+text task "icons" (GNOME's Adwaita icon theme, CC-BY-SA 3.0 or LGPL 3, LICENSE.adwaita):
each icon's 32x32 picture as "base64:<PNG>", its name as text, its context (actions, devices,
places, ...) as label; `build_icons.py` rebuilds it from Debian's `adwaita-icon-theme`.
"""
import functools
import gzip
import json
import os

DIR = os.path.dirname(os.path.abspath(__file__))
NAMES = ("general", "domain", "task", "knowledge", "synonyms", "icons")
SPLIT_NAMES = ("task", "icons")  # the corpora read by split
SPLITS = ("train", "dev", "test")
_FILES = {
    "general": "general.jsonl.gz",
    "domain": "domain.jsonl.gz",
    "knowledge": "knowledge.tsv.gz",
    "synonyms": "wordnet_synonyms.tsv.gz",
}


def path(name, split=None):
  """Path of an embedded file.

  Args:
    name: one of NAMES.
    split: for name in SPLIT_NAMES, one of SPLITS; must be None otherwise.

  Returns:
    Absolute path of the gzip file.
  """
  if name not in NAMES:
    raise ValueError(f"Unknown built-in corpus {name!r}; choose one of {NAMES}.")
  if name in SPLIT_NAMES:
    if split not in SPLITS:
      raise ValueError(f"builtin {name!r} needs split in {SPLITS}, got split={split!r}.")
    filename = f"{name}_{split}.jsonl.gz"
  else:
    if split is not None:
      raise ValueError(f"builtin {name!r} has no splits (got split={split!r}); only "
                       f"{' and '.join(SPLIT_NAMES)} have.")
    filename = _FILES[name]
  full = os.path.join(DIR, filename)
  if not os.path.exists(full):
    rebuild = ("apt-get install -y adwaita-icon-theme && python -m r1jax.data.builtin.build_icons"
               if name == "icons" else "apt-get install -y wordnet-base dict-foldoc && "
               "python -m r1jax.data.builtin.build_corpus")
    raise FileNotFoundError(
        f"{full} is missing from the installed package; rebuild it with `{rebuild}`.")
  return full


@functools.lru_cache(maxsize=None)
def _load_jsonl(full_path):
  with gzip.open(full_path, "rt", encoding="utf-8") as f:
    return tuple(json.loads(line) for line in f)


def load(name, split=None):
  """Records of a built-in corpus (`general`, `domain`, or `task` / `icons` with a split).

  Returns:
    A new list of dicts (copies: callers may modify them).
  """
  if name not in ("general", "domain", "task", "icons"):
    raise ValueError(f"load() reads 'general', 'domain', 'task' or 'icons'; got {name!r}. "
                     "Use path() for 'knowledge' and 'synonyms'.")
  return [dict(r) for r in _load_jsonl(path(name, split))]


def texts(name, split=None):
  """Only the text field of each record of `load(name, split)`."""
  return [r["text"] for r in _load_jsonl(path(name, split))]


def labels(name="task"):
  """The class names of the labelled task ("task") or of the icon task ("icons"), in class-id
  order."""
  if name not in SPLIT_NAMES:
    raise ValueError(f"labels() is for {SPLIT_NAMES}; got {name!r}.")
  filename = "labels.txt" if name == "task" else f"{name}_labels.txt"
  with open(os.path.join(DIR, filename), encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]
