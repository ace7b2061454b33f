"""SentencePiece tokenizer with fixed special ids, trained on the cleaned corpus.

    tok = Tokenizer.train(texts, vocab_size=8000)        # seconds on the embedded corpus
    tok.save(workdir + "/tokenizer.model")
    tok = Tokenizer.load(workdir + "/tokenizer.model")
    ids = tok.encode("Ada is a language.")               # list[int], no specials added
    tok.decode(ids)

Special ids are fixed so every stage agrees on them without reading the model:
  [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4   (`PAD_ID`, `UNK_ID`, `CLS_ID`, `SEP_ID`, `MASK_ID`).
[CLS], [SEP] and [MASK] are SentencePiece control symbols: `encode` never produces them from text
(typing "[MASK]" in a document gives ordinary pieces), so masking cannot be injected by data.
`byte_fallback` is on, so characters never seen in training (rare CJK, emoji) become byte pieces
rather than [UNK].

The vocabulary fits the corpus in both directions: `vocab_size` is an upper bound (SentencePiece's
soft limit), so a small corpus gives fewer pieces rather than an error; and when the characters
SentencePiece must keep as pieces (`character_coverage` of the text) do not fit beside the 5
specials and 256 byte pieces, only the most frequent characters, up to half the room left, are
learned as pieces and the rarer ones fall back to bytes. `train` logs one line with the outcome; a
model built on the tokenizer takes its `vocab_size` (the piece count), not the one asked for.

The model is held as bytes: a Tokenizer pickles cheaply into Grain worker processes.
"""
import collections
import io
import os
import re
import shutil
import tempfile

from absl import logging
import numpy as np
import sentencepiece as spm

from r1jax import errors

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
SPECIAL_PIECES = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
NUM_SPECIAL = len(SPECIAL_PIECES)
NUM_BYTE_PIECES = 256  # byte_fallback's <0x00>..<0xFF>
MODEL_TYPES = ("unigram", "bpe")
WORD_START = "\u2581"  # SentencePiece's whitespace marker
_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
# SentencePiece skips training sentences longer than this (in bytes); longer documents are cut into
# pieces at line and sentence breaks before training.
_MAX_SENTENCE_BYTES = 8192


def _training_sentences(texts, limit, seed=0):
  """Lines of the documents (long lines cut into chunks), a uniform sample of `limit` if more.

  Reservoir sampling keeps memory at `limit` lines and the sample deterministic for a seed.
  """
  rng = np.random.default_rng(seed)
  sample, count = [], 0
  for text in texts:
    for line in text.splitlines():
      line = line.strip()
      while line:
        chunk = line[:_MAX_SENTENCE_BYTES // 4]  # up to 4 bytes per character in UTF-8
        line = line[len(chunk):]
        if not limit or len(sample) < limit:
          sample.append(chunk)
        else:
          j = int(rng.integers(0, count + 1))
          if j < limit:
            sample[j] = chunk
        count += 1
  return sample


def _required_characters(counts: collections.Counter, coverage: float) -> int:
  """How many characters SentencePiece keeps as pieces for `coverage`: the most frequent ones until
  they cover that fraction of all characters (its trainer_interface's required_chars)."""
  total = sum(counts.values())
  covered = 0
  for n, (_, count) in enumerate(counts.most_common()):
    if covered >= coverage * total:
      return n
    covered += count
  return len(counts)


def _fit_characters(sentences: list[str], vocab_size: int, coverage: float
                    ) -> tuple[list[str], str]:
  """(sentences, note): when the characters SentencePiece would require do not fit in the
  vocabulary beside the specials and byte pieces, the sentences are cut at every character outside
  the most frequent half-the-room, so those stay pieces and the rest fall back to bytes (as they
  do when encoding). Otherwise the sentences unchanged and an empty note."""
  counts = collections.Counter()
  for sentence in sentences:
    counts.update(sentence.replace(" ", "\u2581"))  # SentencePiece counts spaces as its marker
  room = vocab_size - NUM_SPECIAL - NUM_BYTE_PIECES
  required = _required_characters(counts, coverage)
  if required <= room:
    return sentences, ""
  ranked = counts.most_common()
  keep = max(1, room // 2)  # the other half for multi-character pieces
  table = {ord(ch): "\n" for ch, _ in ranked[keep:]}
  cut = [part.strip() for s in sentences for part in s.translate(table).split("\n")]
  fallback = sum(c for _, c in ranked[keep:]) / sum(counts.values())
  note = (f"; {keep} characters are pieces and {len(ranked) - keep} rarer ones "
          f"({fallback:.1%} of the text) fall back to bytes: covering {coverage:g} of the text "
          f"needs {required} characters, more than the {room} places after the specials and "
          f"byte pieces")
  return [part for part in cut if part], note


class Tokenizer:
  """A SentencePiece model with the project's special ids (see module docstring)."""

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = None
    self._word_start = None
    self._check()

  # Pickling sends only the model bytes; the processor is rebuilt lazily in the worker.
  def __getstate__(self):
    return {"proto": self._proto}

  def __setstate__(self, state):
    self.__init__(state["proto"])

  @property
  def sp(self) -> spm.SentencePieceProcessor:
    if self._sp is None:
      self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    return self._sp

  def _check(self):
    pieces = tuple(self.sp.id_to_piece(i) for i in range(NUM_SPECIAL))
    if pieces != SPECIAL_PIECES:
      raise ValueError(f"Not an r1jax tokenizer: ids 0-{NUM_SPECIAL - 1} are {pieces}, expected "
                       f"{SPECIAL_PIECES}. Train one with Tokenizer.train().")

  # -----------------------------------------------------------------------------------------------
  # Construction

  @classmethod
  def train(cls, texts, vocab_size: int, *, model_type: str = "bpe",
            character_coverage: float = 0.9995, max_sentences: int = 300_000,
            seed_sentencepiece_size: int = 200_000, num_threads: int = 2) -> "Tokenizer":
    """Trains a tokenizer.

    Args:
      texts: iterable of document strings (cleaned). Documents are split into lines for training.
      vocab_size: the largest vocabulary, the 5 specials and 256 byte pieces included. A corpus
        too small for it gives fewer pieces; a corpus with more distinct characters than fit
        keeps its most frequent ones as pieces (module docstring). One line logs the outcome.
      model_type: one of MODEL_TYPES. "bpe" trains in about a second on the embedded corpus;
        "unigram" takes 5-15 s there.
      character_coverage: fraction of characters covered by single pieces (0.9995 suits CJK; the
        rest fall back to bytes).
      max_sentences: at most this many lines are used: a uniform sample if the corpus has more.
      seed_sentencepiece_size: unigram seed vocabulary size (smaller is faster).
      num_threads: training threads.
    """
    if model_type not in MODEL_TYPES:
      raise ValueError(f"model_type={model_type!r}; choose one of {MODEL_TYPES}.")
    if vocab_size <= NUM_SPECIAL + NUM_BYTE_PIECES + 1:
      raise ValueError(f"vocab_size={vocab_size} is too small: it must exceed "
                       f"{NUM_SPECIAL + NUM_BYTE_PIECES + 1} (5 specials + 256 byte pieces + 1).")
    sentences = _training_sentences(texts, max_sentences)
    if not sentences:
      raise errors.BadInput("Tokenizer.train got no text: the corpus is empty after cleaning.")
    lines = len(sentences)
    sentences, note = _fit_characters(sentences, vocab_size, character_coverage)
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
          hard_vocab_limit=False, model_type=model_type, character_coverage=character_coverage,
          byte_fallback=True, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=-1, eos_id=-1,
          pad_piece="[PAD]", unk_piece="[UNK]", control_symbols=["[CLS]", "[SEP]", "[MASK]"],
          max_sentence_length=_MAX_SENTENCE_BYTES, seed_sentencepiece_size=seed_sentencepiece_size,
          num_threads=num_threads, split_digits=True, minloglevel=2,
          train_extremely_large_corpus=False)
    except RuntimeError as e:
      raise ValueError(f"SentencePiece training failed for vocab_size={vocab_size} on "
                       f"{lines} lines: {e}") from e
    tok = cls(model.getvalue())
    if tok.vocab_size < vocab_size:
      note = (f"; the {lines} training lines support no more pieces (vocab_size is an upper "
              f"bound)") + note
    logging.info("Tokenizer: %s vocabulary of %d pieces (vocab_size=%d)%s.", model_type,
                 tok.vocab_size, vocab_size, note)
    return tok

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    """Loads a model file written by `save` (e.g. WORKDIR/tokenizer.model)."""
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.model")
    if not os.path.exists(path):
      raise errors.InputNotFound(f"No tokenizer model at {path}; run the data stage first "
                                 "(python -m r1jax.main --config=configs/data.py --workdir=DIR).")
    with open(path, "rb") as f:
      return cls(f.read())

  def save(self, path: str) -> str:
    """Writes the model atomically; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(os.path.abspath(path)), delete=False) as f:
      f.write(self._proto)
    os.chmod(f.name, 0o644)  # NamedTemporaryFile creates 0600
    shutil.move(f.name, path)
    return path

  @property
  def model_proto(self) -> bytes:
    return self._proto

  # -----------------------------------------------------------------------------------------------
  # Use

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  pad_id, unk_id, cls_id, sep_id, mask_id = PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID
  num_special = NUM_SPECIAL

  def encode(self, text: str) -> list[int]:
    """Text -> piece ids (no [CLS]/[SEP] added)."""
    return self.sp.encode(text, out_type=int)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self.sp.encode(list(texts), out_type=int)

  def encode_with_offsets(self, text: str):
    """Text -> (ids int32 [N], starts int32 [N], ends int32 [N]) with character offsets into text.

    Offsets let callers map character spans (entity mentions) to token positions.
    """
    proto = self.sp.encode(text, return_type="proto")
    n = len(proto.pieces)
    ids = np.empty(n, np.int32)
    starts = np.empty(n, np.int32)
    ends = np.empty(n, np.int32)
    # SentencePiece reports byte offsets into the UTF-8 input; convert to character offsets.
    raw = text.encode("utf-8")
    if len(raw) == len(text):
      byte_to_char = None
    else:
      byte_to_char = np.zeros(len(raw) + 1, np.int32)
      pos = 0
      for i, ch in enumerate(text):
        width = len(ch.encode("utf-8"))
        byte_to_char[pos:pos + width] = i
        pos += width
      byte_to_char[len(raw)] = len(text)
    for i, piece in enumerate(proto.pieces):
      ids[i] = piece.id
      b, e = piece.begin, piece.end
      if byte_to_char is not None:
        b, e = byte_to_char[b], byte_to_char[e]
      starts[i], ends[i] = b, e
    return ids, starts, ends

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids if int(i) >= NUM_SPECIAL or int(i) == UNK_ID]
    return self.sp.decode(ids)

  def id_to_piece(self, i: int) -> str:
    return self.sp.id_to_piece(int(i))

  def word_start_table(self) -> np.ndarray:
    """bool [V]: piece i begins a new word (whole-word masking units).

    A piece begins a word if it starts with the whitespace marker, is a special piece, holds CJK
    characters (Chinese has no spaces, so each CJK piece is its own unit), or is the first byte of a
    byte-fallback character (so a rare character's bytes are masked together).
    """
    if self._word_start is None:
      table = np.zeros(self.vocab_size, bool)
      for i in range(self.vocab_size):
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):
          value = int(piece[3:5], 16)  # "<0xE4>"
          table[i] = value < 0x80 or value >= 0xC0  # not a UTF-8 continuation byte
        else:
          table[i] = (i < NUM_SPECIAL or piece.startswith(WORD_START)
                      or bool(_CJK_RE.search(piece)))
      self._word_start = table
    return self._word_start
