"""Every config in configs/ loads and validates; bad values fail up front with a message naming the
key and the fix; a config is found by path or by the name of a shipped one."""
import dataclasses
import glob
import importlib
import inspect
import os

import jax
import pytest

from r1jax import configlib
from r1jax import errors
from r1jax import main
from r1jax.model import transformer_xl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The clone's configs/ (a link to the shipped r1jax/configs/), as the docs' commands name them.
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith("_"))
VARIANTS = ("tiny", "small", "base")


def _validate(config, needs_dir=None):
  """Runs the stage's validate(config). A stage that compresses or compares an earlier run has no
  sensible default for init_from; if that is the only problem, validate again with `needs_dir`."""
  module = importlib.import_module(f"r1jax.stages.{config.stage}")
  assert hasattr(module, "validate"), f"r1jax.stages.{config.stage} must expose validate(config)"
  kwargs = {}
  if "num_devices" in inspect.signature(module.validate).parameters:
    # The default mesh (data=-1) fits any device count; check against the 8 forced test devices.
    kwargs = dict(num_devices=jax.device_count(), process_count=1)
  try:
    module.validate(config, **kwargs)
  except configlib.ConfigError as e:
    only_init_from = "(1 problem(s))" in str(e) and "\n  init_from:" in str(e)
    if needs_dir is None or not only_init_from or config.get("init_from"):
      raise
    config.init_from = needs_dir
    module.validate(config, **kwargs)


def test_there_are_configs():
  assert any(p.endswith("pretrain.py") for p in CONFIGS)


def test_the_clone_configs_folder_is_the_shipped_one():
  """`configs/x.py` in a clone and the package's configs are the same files (one copy to edit)."""
  assert os.path.realpath(os.path.join(ROOT, "configs")) == os.path.realpath(configlib.CONFIG_DIR)
  assert configlib.shipped_configs() == [os.path.basename(p)[:-3] for p in CONFIGS]


@pytest.mark.parametrize("spelling", ["pretrain", "pretrain.py", "configs/pretrain.py",
                                      "./configs/pretrain.py"])
def test_a_shipped_config_is_found_by_name_from_any_directory(spelling, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here: the name means the shipped file
  shipped = os.path.join(configlib.CONFIG_DIR, "pretrain.py")
  assert configlib.resolve_config(f"{spelling}:variant=tiny") == f"{shipped}:variant=tiny"
  assert configlib.resolve_config(spelling) == shipped
  config = configlib.load_config(f"{spelling}:variant=tiny")
  assert config.stage == "pretrain" and config.model.variant == "tiny"


def test_a_file_that_exists_wins_over_the_shipped_config(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "pretrain.py").write_text(
      "import ml_collections\n\n"
      "def get_config(arg=None):\n"
      "  return ml_collections.ConfigDict(dict(stage='mine', arg=arg or ''))\n")
  assert configlib.load_config("configs/pretrain.py:variant=tiny").stage == "mine"
  assert configlib.load_config(str(tmp_path / "configs" / "pretrain.py")).stage == "mine"
  assert configlib.load_config("pretrain:variant=tiny").stage == "pretrain"  # no file "pretrain"


def test_the_command_line_resolves_its_config_flag_the_same_way(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  shipped = os.path.join(configlib.CONFIG_DIR, "pretrain.py")
  assert main._config_resolved(["r1jax", "--config=pretrain:variant=tiny", "--workdir=w",
                                "--config.seed=1"]) == [
      "r1jax", f"--config={shipped}:variant=tiny", "--workdir=w", "--config.seed=1"]
  # The two-argument form; what follows "--" is positional, left as it is.
  argv = ["r1jax", "--config", "configs/pretrain.py", "--", "--config=x"]
  assert main._config_resolved(argv) == ["r1jax", "--config", shipped, "--", "--config=x"]


@pytest.mark.parametrize("spec", ["pretrian:variant=tiny", "elsewhere/pretrain.py", "configs"])
def test_a_config_neither_here_nor_shipped_is_refused_with_the_names(spec, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "configs").mkdir()  # a folder is not a config file
  with pytest.raises(errors.InputNotFound, match=r"no such config file here .*nor a config "
                     r"shipped with r1jax \(compare, .*data, .*pretrain, .*tune\)"):
    configlib.resolve_config(spec)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("variant", VARIANTS)
def test_config_loads_and_validates(path, variant, tmp_path):
  config = configlib.load_config(f"{path}:variant={variant}")
  assert isinstance(config.stage, str) and "seed" in config
  if "train" in config:  # training stages share these names (scripts rely on them)
    assert "init_from" in config, f"{path} lacks init_from"
    for key in ("num_steps", "batch_size", "learning_rate"):
      assert key in config.train
    assert "every_steps" in config.checkpoint
    assert set(config.mesh) == {"data", "fsdp", "tensor"}
  _validate(config, needs_dir=str(tmp_path))


def test_unknown_variant_is_rejected():
  with pytest.raises(configlib.ConfigError, match="variant='huge' is not one of"):
    configlib.load_config(os.path.join(ROOT, "configs", "pretrain.py") + ":variant=huge")


def _pretrain_tiny():
  return configlib.load_config(os.path.join(ROOT, "configs", "pretrain.py") + ":variant=tiny")


@pytest.mark.parametrize("key,value,message", [
    ("train.batch_size", 30, "train.batch_size: 30 is not divisible by data-parallel size"),
    ("train.learning_rate", -1.0, "train.learning_rate: -1.0 is outside"),
    ("train.schedule", "step", "train.schedule: 'step' is not one of"),
    ("mesh.tensor", 16, "needs 16 devices but 8 are available"),
    ("mesh.fsdp", 3, "does not divide the 8 devices"),
    ("model.n_head", 0, "TransformerXLConfig.n_head=0: must be a positive integer"),
    ("model.attention", "sideways", "attention='sideways'"),
    ("data.mlm_prob", 1.5, "data.mlm_prob: 1.5 is outside"),
    ("checkpoint.every_steps", 0, "checkpoint.every_steps: 0 must be >= 1"),
    ("init_from", "/nonexistent/run", "is not a directory"),
])
def test_bad_value_names_key_and_fix(key, value, message):
  config = _pretrain_tiny()
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(configlib.ConfigError) as info:
    _validate(config)
  assert message in str(info.value)
  assert "--config." in str(info.value)  # says how to fix


def test_all_problems_reported_together():
  config = _pretrain_tiny()
  config.train.batch_size = 30
  config.eval.num_batches = 0
  with pytest.raises(configlib.ConfigError, match=r"2 problem\(s\)") as info:
    _validate(config)
  assert "eval.num_batches" in str(info.value) and "train.batch_size" in str(info.value)


def test_wrong_type_in_config_file_is_rejected():
  config = _pretrain_tiny()
  config.unlock()
  del config.train["skip_nonfinite"]
  config.train.skip_nonfinite = "yes"
  with pytest.raises(configlib.ConfigError, match="train.skip_nonfinite: 'yes' is a str"):
    _validate(config)


def test_resolve_mesh_shape():
  m = lambda d, f, t: {"data": d, "fsdp": f, "tensor": t}
  assert configlib.resolve_mesh_shape(m(-1, 1, 1), 8) == (8, 1, 1)
  assert configlib.resolve_mesh_shape(m(2, -1, 2), 8) == (2, 2, 2)
  assert configlib.resolve_mesh_shape(m(1, 1, 1), 1) == (1, 1, 1)
  with pytest.raises(configlib.ConfigError, match="at most one axis may be -1"):
    configlib.resolve_mesh_shape(m(-1, -1, 1), 8)
  with pytest.raises(configlib.ConfigError, match="must be a positive int or -1"):
    configlib.resolve_mesh_shape(m(0, 1, 1), 8)


def test_parse_arg():
  assert configlib.parse_arg("variant=tiny", variant="base").variant == "tiny"
  assert configlib.parse_arg(None, variant="base").variant == "base"
  with pytest.raises(configlib.ConfigError, match="key=value"):
    configlib.parse_arg("size=tiny", variant="base")


def test_model_overrides_cover_every_transformer_xl_field():
  fields = dataclasses.fields(transformer_xl.TransformerXLConfig)
  assert set(configlib.MODEL_OVERRIDES) == {f.name for f in fields}
  for f in fields:  # the config type fits the field's default (dtypes are given by name)
    assert isinstance(f.default, configlib.MODEL_OVERRIDES[f.name]), f.name
  section = configlib.model_section("tiny")
  assert set(section) == {"variant", *configlib.MODEL_OVERRIDES}
  assert configlib.model_overrides(section) == {}  # placeholders: the variant's values


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_training_config_takes_every_model_override(stage):
  config = configlib.load_config(os.path.join(ROOT, "configs", f"{stage}.py") + ":variant=tiny")
  # What --config.model.attention_impl=einsum etc. do on the locked config.
  config.model.attention_impl = "einsum"
  config.model.head_groups = 2
  config.model.flat_matmuls = False
  with pytest.raises(TypeError):
    config.model.head_groups = "two"
  _validate(config)
  overrides = configlib.model_overrides(config.model)
  assert {k: overrides[k] for k in ("attention_impl", "head_groups", "flat_matmuls")} == {
      "attention_impl": "einsum", "head_groups": 2, "flat_matmuls": False}
  model = transformer_xl.get_variant(config.model.variant, **overrides)
  assert (model.attention_impl, model.head_groups, model.flat_matmuls) == ("einsum", 2, False)
