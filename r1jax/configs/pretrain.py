r"""MLM + NSP (+ knowledge) pretraining of the Transformer-XL encoder.

    python -m r1jax.main --config=configs/pretrain.py:variant=tiny --workdir=/tmp/pretrain_tiny
    python -m r1jax.main --config=configs/pretrain.py --workdir=DIR \
        --config.train.num_steps=20000 --config.mesh.fsdp=4
    # Domain-adaptive pretraining (DAPT): start from another pretraining run's parameters.
    python -m r1jax.main --config=configs/pretrain.py --workdir=DAPT \
        --config.init_from=DIR --config.data.corpus=builtin:domain

`variant`: tiny (a laptop CPU in minutes), small, base (the seed's settings: base model, lr 5e-5,
batch 64, 3 epochs on the embedded general corpus). Rerunning a command on the same workdir resumes.
"""
import ml_collections

from r1jax import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = configlib.parse_arg(arg, variant="base").variant
  configlib.check_variant(variant)
  config = ml_collections.ConfigDict()
  config.stage = "pretrain"
  config.seed = 0
  config.init_from = ""  # workdir of an earlier pretraining run: start from its params (DAPT)

  # Model: the variant's sizes, any field overridable, e.g. --config.model.n_layer=6.
  config.model = configlib.model_section(variant)

  config.data = ml_collections.ConfigDict(dict(
      corpus="builtin:general",  # path / glob / builtin:general|domain / tfds:NAME/SPLIT, or a list
      input="auto",              # auto | shards | memory: stream the data stage's tokenized shards
                                 # (corpus = its DIR/data/clean or DIR/data/tokenized) or read and
                                 # tokenize the texts here; auto: shards when they exist and fit
      tokenizer="",              # tokenizer.model to use; "" = init_from's, else train one here
      tokenizer_type="bpe",      # when training one: bpe | unigram (vocab = model.vocab_size)
      seq_len=-1,                # tokens per row and step; -1 = the variant's segment length
      mlm_prob=0.15,             # fraction of maskable tokens predicted
      max_predictions=-1,        # prediction slots per row; -1 = ceil(seq_len * mlm_prob)
      whole_word=False,          # mask whole words rather than single pieces
      nsp=True,                  # next-segment prediction pairs (50% random B)
      pack=False,                # nsp=False: fill rows with several documents ([SEP] between)
      knowledge_file="",         # entity/triple TSV ("builtin" = the embedded one): knowledge head
      kg_seq_len=32,             # tokens per knowledge triple sequence
      kg_weight=1.0,             # weight of the knowledge loss
      eval_every_nth_doc=50,     # held-out documents: every n-th of the corpus (independent of seed)
      worker_count=0,            # Grain worker processes building rows (0 = in-process)
      row_groups=1,              # blocks of rows, each reading only its own contiguous part of the
                                 # documents; a multiple of the process count makes each process
                                 # fetch only its part of gs:// shards (1: every row reads all)
  ))

  config.train = configlib.train_section(
      num_steps=-1, num_epochs=3.0, batch_size=64, learning_rate=5e-5, warmup_fraction=0.1,
      weight_decay=0.01, grad_clip_norm=1.0, log_every_steps=20)
  config.eval = configlib.eval_section(every_steps=200, num_batches=8, early_stopping_patience=3)
  config.checkpoint = configlib.checkpoint_section(every_steps=500)
  config.mesh = configlib.mesh_section()

  if variant == "small":
    config.train.batch_size = 32
    config.train.learning_rate = 3e-4
    config.model.dtype = "float32"
  elif variant == "tiny":
    # A few minutes on 2 CPU cores; MLM accuracy clearly above chance on held-out documents.
    config.train.num_steps = 2000
    config.train.batch_size = 32
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 100
    config.train.log_every_steps = 100
    config.eval.every_steps = 500
    config.eval.num_batches = 16
    config.checkpoint.every_steps = 500
    config.model.dropout = 0.0
  else:
    config.model.dtype = "bfloat16"  # bf16 compute, float32 parameters
  return config
