r"""Finetuning a pretrained Transformer-XL as a sequence classifier (domain adaptation, stage 3).

    # Every layer trains (the backbone at unfreeze.learning_rate) until dev accuracy stops
    # improving, on the embedded FOLDOC subject task:
    python -m r1jax.main --config=configs/finetune.py:variant=tiny --workdir=/tmp/ft_tiny \
        --config.init_from=/tmp/pretrain_tiny
    # Your data (JSONL/CSV/Parquet), multi-label codes separated by ";":
    python -m r1jax.main --config=configs/finetune.py:variant=base --workdir=DIR --config.init_from=PT \
        --config.task.train=train.csv --config.task.dev=dev.csv --config.task.test=test.csv \
        --config.task.text_field=note --config.task.label_field=codes \
        --config.task.multi_label=True --config.task.label_delimiter=";"
    # The seed's schedules: a_then_b (stage A trains the head on a frozen backbone, stage B
    # unfreezes the last N layers at a low rate), head_only, progressive (one more layer every K
    # epochs or on plateau):
    ... --config.schedule=a_then_b --config.unfreeze.learning_rate=1e-6
    ... --config.schedule=progressive --config.unfreeze.every_epochs=1 \
        --config.unfreeze.plateau_patience=2
    # Images beside text (the embedded icon task; text-only, image-only and fused models compared):
    python -m r1jax.main --config=configs/finetune.py:variant=tiny --workdir=/tmp/ft_icons \
        --config.multimodal.enabled=True --config.image_augment.prob=1.0
    # Baseline without pretraining (init_from empty: trains from scratch and says so):
    python -m r1jax.main --config=configs/finetune.py:variant=tiny --workdir=/tmp/ft_scratch

Writes DIR/summary.json (test accuracy, macro-F1, latency, trainable/frozen parameter counts, ...),
DIR/report.md, DIR/confusion_matrix.png, DIR/metrics.jsonl, DIR/checkpoints/ (the best classifier)
and DIR/phases/<i>_<name>/ (each phase's own checkpoints; a rerun continues in the right phase).
Compare runs with configs/compare.py.
"""
import ml_collections

from r1jax import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = configlib.parse_arg(arg, variant="base").variant
  configlib.check_variant(variant)
  config = ml_collections.ConfigDict()
  config.stage = "finetune"
  config.seed = 0
  # Pretraining (or DAPT) workdir: its backbone, pooler and tokenizer are the starting point.
  # "" trains from scratch (with a warning): the "no pretraining" baseline.
  config.init_from = ""

  # Model: the variant's sizes; architecture fields the init_from run set are inherited. The
  # classifier reads the mean of the real tokens' states (pooling=mean; "cls" = the first
  # position's) beside a bag of hashed token 1-2 grams with its own linear path to the logits
  # (ngram_buckets rows; 0 = none): on the embedded task +1.9 and +3.4 dev accuracy points over
  # [CLS] alone and over the bag added to the pooled state (bench/NOTES_quality.md).
  config.model = configlib.model_section(variant, dropout=0.3,  # seed: finetuning dropout 0.3-0.5
                                         pooling="mean", ngram_buckets=16384)

  config.task = ml_collections.ConfigDict(dict(
      train="builtin:task:train",  # input spec: JSONL/CSV/Parquet path or glob, builtin:task:SPLIT
      dev="builtin:task:dev",      # eval during training + early stopping; "" = every 10th train row
      test="builtin:task:test",    # the final report; "" = report on dev
      text_field="text",           # column/field holding the text
      label_field="label",         # column/field holding the label(s)
      multi_label=False,           # several labels per row (e.g. ICD codes): one sigmoid per label
      label_delimiter=",",         # multi-label: separator when a row's labels are one string
      labels="",                   # class names in id order, comma-separated; "" = from train data
      unknown_label="error",       # dev/test label never seen in train: error | skip (row, or code)
      seq_len=-1,                  # tokens per example incl. [CLS]/[SEP]; -1 = from the data:
      seq_len_cover=0.9,           # ... the smallest multiple of 32 holding this share of the
      max_seq_len=512,             # ... training texts whole, at most this (the rest is cut)
      length_buckets=8,            # batches of similar length, cut to one of N widths <= seq_len; 0 = off
      tokenizer="",                # scratch runs only: tokenizer.model to use; "" = train one
      threshold=0.5,               # multi-label decision threshold on the sigmoid probability
  ))

  # Text augmentation of the training split on the fly (the seed's EDA operations), drawn afresh
  # every epoch; dev and test are never augmented.
  config.augment = ml_collections.ConfigDict(dict(
      prob=0.5,             # chance that a training example is augmented each time it is read
      synonym_prob=0.1,     # per word: replaced by a synonym
      insert_prob=0.05,     # share of the words: a synonym of a random word inserted
      delete_prob=0.05,     # per word: deleted
      swap_prob=0.05,       # share of the words: two random words swapped
      synonyms="wordnet",   # synonym sources, comma-separated: wordnet (shipped) and/or files
  ))
  # Image+text tasks (r1jax/stages/finetune_multimodal.py): images beside text in one backbone.
  config.multimodal = ml_collections.ConfigDict(dict(
      enabled=False,        # True: image+text task (task.* at the text defaults: builtin:icons)
      image_field="image",  # the image's field: a path (relative to its file) or base64:<bytes>
      image_size=32,        # images scaled (short side) and centre-cropped to this many pixels
      patch_size=8,         # ViT patch side in pixels: (image_size / patch_size)^2 image tokens
      models="fused,text,image",  # models trained on the same batches (first = the stage's)
      modality_dropout=0.0,  # fused model: share of training rows whose image is hidden each step
      fusion="late",        # fused model: late (a head per modality, logits summed) | joint (one head)
      aux_weight=0.0,       # late fusion: weight of each branch's own loss beside the fused one
  ))
  # Augmentation of the training images (multimodal only), drawn afresh every epoch.
  config.image_augment = ml_collections.ConfigDict(dict(
      prob=0.0,             # chance that an image is augmented each time it is read (0 = off)
      rotate_degrees=15.0,  # rotation drawn from [-x, x] degrees
      crop_scale_min=0.6,   # random resized crop: least share of the image's area kept
      flip_prob=0.5,        # horizontal flip
      brightness=0.3,       # factor drawn from [1 - x, 1 + x]
      contrast=0.3,         # factor drawn from [1 - x, 1 + x]
      saturation=0.3,       # factor drawn from [1 - x, 1 + x]
      hue=0.05,             # hue turned by up to +-x of a full turn
  ))
  # Which parameters train when: full | a_then_b | head_only | progressive. "full" trains every
  # layer from the start: +6.6 dev points over a_then_b at equal steps on the embedded task.
  config.schedule = "full"
  config.unfreeze = ml_collections.ConfigDict(dict(
      num_layers=4,           # stage B / progressive: the last N backbone layers (clamped to n_layer)
      learning_rate=5e-5,     # peak rate of unfrozen backbone params; the head keeps train.learning_rate
      stage_a_fraction=0.5,   # a_then_b: share of the steps spent in stage A
      every_epochs=1.0,       # progressive: one more layer every K epochs ...
      plateau_patience=0,     # ... or earlier after this many evals without improvement (0 = off)
      extra_frozen="",        # regex over parameter paths frozen in every phase, e.g. backbone/word_emb/.*
  ))

  # Optimisation (learning_rate is the head's); num_steps/num_epochs cover all phases together.
  # num_epochs is a ceiling: early stopping ends the run when dev accuracy stops improving and
  # restores the best checkpoint (a fixed short budget ended mid-climb: bench/NOTES_quality.md).
  config.train = configlib.train_section(
      num_steps=-1, num_epochs=10.0, batch_size=32, learning_rate=1e-3, warmup_fraction=0.1,
      weight_decay=0.01, grad_clip_norm=1.0, label_smoothing=0.1, log_every_steps=20)
  # Dev accuracy picks the checkpoint: with label smoothing the dev loss turns up while the
  # accuracy still climbs. Only a gain of a point resets the patience (the best checkpoint still
  # takes any gain): replayed on four recorded pipeline finetunings, gains of 1-5 dev examples had
  # kept them running 35% longer for 0.35 points of dev on average (bench/NOTES_quality.md).
  config.eval = configlib.eval_section(every_steps=100, num_batches=64, early_stopping_patience=4,
                                       early_stopping_min_delta=0.01, best_metric="accuracy")
  config.checkpoint = configlib.checkpoint_section(every_steps=200, max_to_keep=1, keep_best=1)
  config.report = ml_collections.ConfigDict(dict(
      latency_batch_size=32,  # the "batched" latency (ms per example at this batch size)
      latency_warmup=3,       # untimed calls before timing
      latency_repeats=20,     # timed calls (median reported)
      linear_baseline=True,   # also train TF-IDF + logistic regression on train; report it beside
  ))
  config.mesh = configlib.mesh_section()

  if variant == "tiny":
    # A few minutes on 2 CPU cores on the embedded task (bench/NOTES_quality.md, sessions
    # 11-14: the settings of the pipeline's tiny finetuning).
    config.task.max_seq_len = 256
    config.train.num_epochs = 24.0
    config.train.learning_rate = 3e-3
    # A 64-wide model underfits this task: a larger backbone rate and light dropout (measured on
    # the embedded task: 0.62 vs 0.54 test accuracy with dropout 0.3, schedule full).
    config.unfreeze.learning_rate = 1e-3
    config.model.dropout = 0.1
    config.eval.every_steps = 64
    config.eval.early_stopping_patience = 6
    config.train.log_every_steps = 16
    config.checkpoint.every_steps = 64
  elif variant == "base":
    config.model.dtype = "bfloat16"  # bf16 compute, float32 parameters
  return config
