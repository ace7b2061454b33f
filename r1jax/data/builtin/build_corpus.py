r"""Rebuilds the embedded default corpus from Debian's WordNet and FOLDOC packages.

    apt-get install -y wordnet-base dict-foldoc
    python -m r1jax.data.builtin.build_corpus [--out r1jax/data/builtin]

Writes, next to this script:
  general.jsonl.gz          English text: WordNet 3.0 glosses and example sentences, grouped into
                            documents of up to 8 consecutive synsets of one lexicographer file
                            (`{"id", "text", "lexfile"}`).
  domain.jsonl.gz           FOLDOC entry texts (`{"id", "title", "text", "tags"}`), subject tags
                            removed from the text, task dev/test entries left out (no leakage).
  task_{train,dev,test}.jsonl.gz  FOLDOC entries whose subject tags include one of the most
                            frequent `NUM_CLASSES` tags: `{"id", "title", "text", "label", "tags"}`.
                            `label` is the first of the entry's tags that is a class; `tags` lists all
                            of its class tags (for multi-label use). Split 80/10/10 by a hash of the
                            title, so the split does not change when entries are added elsewhere.
  labels.txt                the class names, one per line, in class-id order.
  knowledge.tsv.gz          a knowledge file built from the domain part only: `entity<TAB>type` lines
                            (FOLDOC title and its first subject tag) and `head<TAB>see_also<TAB>tail`
                            triples from FOLDOC cross-references.
  wordnet_synonyms.tsv.gz   `word<TAB>synonym<TAB>...` for single-word lemmas: the other lemmas of the
                            word's most frequent sense in each part of speech (used by augment.py).
  LICENSE.wordnet, LICENSE.foldoc, README.txt  licences and provenance.

Everything is deterministic: rerunning on the same package versions gives byte-identical files
(gzip timestamps are fixed to 0).
"""
import argparse
import collections
import gzip
import hashlib
import io
import json
import os
import re
import sys

WORDNET_DIR = "/usr/share/wordnet"
FOLDOC_DICT = "/usr/share/dictd/foldoc.dict.dz"
FOLDOC_INDEX = "/usr/share/dictd/foldoc.index"
GFDL_TEXT = "/usr/share/common-licenses/GFDL-1.2"
WORDNET_COPYRIGHT = "/usr/share/doc/wordnet-base/copyright"
FOLDOC_COPYRIGHT = "/usr/share/doc/dict-foldoc/copyright"

NUM_CLASSES = 10
SYNSETS_PER_DOC = 8
SPLIT_FRACTIONS = (("test", 0.1), ("dev", 0.1))  # the rest is train
MAX_SEE_ALSO = 8
# Cross-reference targets cited by more entries than this ("Jargon File") carry no information.
MAX_TARGET_CITATIONS = 100
# Fraction of the general documents kept (by a hash of their first line), to keep the package light.
GENERAL_KEEP_FRACTION = 0.5

# WordNet lexicographer file names, by number (WordNet 3.0 `lexnames(5WN)`).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl")
POS_FILES = (("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r"))

_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_TAG_RE = re.compile(r"<([a-z][a-z ,/-]*[a-z])>")
_XREF_RE = re.compile(r"\{([^{}]*)\}")
_DATE_RE = re.compile(r"\(\d{4}-\d{2}-\d{2}\)")
_URL_IN_XREF_RE = re.compile(r"\s*\(\s*(?:https?://|ftp://|mailto:|[\w./-]+\.html?\b)[^)]*\)\s*$")
_ADJ_MARKER_RE = re.compile(r"\((?:a|p|ip)\)$")


def _require(path):
  if not os.path.exists(path):
    sys.exit(f"{path} not found: run `apt-get install -y wordnet-base dict-foldoc` first.")
  return path


# ------------------------------------------------------------------------------------------------
# WordNet


def _lemma_text(lemma):
  return _ADJ_MARKER_RE.sub("", lemma).replace("_", " ")


def _read_synsets(pos_name):
  """Yields (offset, lexfile, [lemmas], definition, [examples]) in data-file order."""
  path = _require(os.path.join(WORDNET_DIR, f"data.{pos_name}"))
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.startswith("  "):  # licence header
        continue
      head, _, gloss = line.partition(" | ")
      fields = head.split()
      offset, lexfile, w_cnt = fields[0], int(fields[1]), int(fields[3], 16)
      lemmas = [_lemma_text(fields[4 + 2 * i]) for i in range(w_cnt)]
      parts = [p.strip() for p in gloss.strip().split("; ")]
      definition = "; ".join(p for p in parts if not p.startswith('"'))
      examples = [p.strip('"') for p in parts if p.startswith('"')]
      yield offset, LEXNAMES[lexfile], lemmas, definition, examples


def _synset_sentence(lemmas, definition, examples):
  text = f"{', '.join(lemmas)}: {definition.rstrip('.; ')}."
  for example in examples:
    example = example.strip().rstrip('"').strip()
    if example:
      text += f" {example[0].upper()}{example[1:]}" + ("" if example[-1] in ".!?" else ".")
  return text


def build_general():
  """WordNet glosses as documents of up to SYNSETS_PER_DOC consecutive synsets of one lexfile."""
  docs = []
  for pos_name, _ in POS_FILES:
    group, group_lexfile = [], None

    def flush():
      if group and _unit_hash(group[0]) < GENERAL_KEEP_FRACTION:
        docs.append({"id": f"wn-{pos_name}-{len(docs):06d}", "text": "\n".join(group),
                     "lexfile": group_lexfile})
      group.clear()

    for _, lexfile, lemmas, definition, examples in _read_synsets(pos_name):
      if lexfile != group_lexfile or len(group) >= SYNSETS_PER_DOC:
        flush()
        group_lexfile = lexfile
      group.append(_synset_sentence(lemmas, definition, examples))
    flush()
  return docs


def _unit_hash(text):
  """A stable number in [0, 1) from text."""
  return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) / 0x100000000


def build_synonyms():
  """word -> other single-word lemmas of its most frequent sense, per part of speech."""
  synset_lemmas = {}
  for pos_name, pos in POS_FILES:
    for offset, _, lemmas, _, _ in _read_synsets(pos_name):
      synset_lemmas[(pos, offset)] = lemmas
  table = collections.OrderedDict()
  for pos_name, pos in POS_FILES:
    with open(_require(os.path.join(WORDNET_DIR, f"index.{pos_name}")), encoding="utf-8") as f:
      for line in f:
        if line.startswith("  "):
          continue
        fields = line.split()
        word, synset_cnt, p_cnt = fields[0], int(fields[2]), int(fields[3])
        if not re.fullmatch(r"[a-z]{3,}", word):
          continue
        first_offset = fields[6 + p_cnt]  # synset offsets come after the pointer symbols
        del synset_cnt
        synonyms = [l for l in synset_lemmas.get((pos, first_offset), ())
                    if re.fullmatch(r"[a-z]{3,}", l) and l != word]
        if synonyms:
          existing = table.setdefault(word, [])
          existing.extend(s for s in synonyms if s not in existing)
  return table


# ------------------------------------------------------------------------------------------------
# FOLDOC


def _b64_number(text):
  value = 0
  for ch in text:
    value = value * 64 + _DICTD_B64.index(ch)
  return value


def _read_foldoc_entries():
  """Yields (title, raw body) for each distinct FOLDOC entry, in dictionary order."""
  with gzip.open(_require(FOLDOC_DICT), "rb") as f:
    data = f.read()
  spans = set()
  with open(_require(FOLDOC_INDEX), encoding="utf-8") as f:
    for line in f:
      headword, offset, length = line.rstrip("\n").split("\t")
      if headword.startswith("00-database"):
        continue
      spans.add((_b64_number(offset), _b64_number(length)))
  for offset, length in sorted(spans):
    entry = data[offset:offset + length].decode("utf-8", errors="replace")
    title, _, body = entry.partition("\n")
    yield title.strip(), body


def _xref_text(match):
  inner = _URL_IN_XREF_RE.sub("", match.group(1)).strip()
  return inner or match.group(0)[1:-1]


def _clean_foldoc_body(body):
  """Removes subject tags, cross-reference braces, dates and emphasis; joins wrapped lines."""
  paragraphs, current = [], []
  for line in body.splitlines():
    if line.strip():
      current.append(line.strip())
    elif current:
      paragraphs.append(" ".join(current))
      current = []
  if current:
    paragraphs.append(" ".join(current))
  cleaned = []
  for paragraph in paragraphs:
    paragraph = _TAG_RE.sub("", paragraph)
    paragraph = _XREF_RE.sub(_xref_text, paragraph)
    paragraph = _DATE_RE.sub("", paragraph)
    paragraph = paragraph.replace("__", "")
    paragraph = re.sub(r"\s+", " ", paragraph).strip()
    paragraph = re.sub(r"^(\d+\.)\s+", r"\1 ", paragraph)
    if paragraph:
      cleaned.append(paragraph)
  return "\n".join(cleaned)


def _entry_tags(body):
  tags = []
  for group in _TAG_RE.findall(body):
    for tag in group.split(","):
      tag = tag.strip()
      if tag and tag not in tags:
        tags.append(tag)
  return tags


def _split_of(title):
  h = _unit_hash(title)
  start = 0.0
  for name, fraction in SPLIT_FRACTIONS:
    if start <= h < start + fraction:
      return name
    start += fraction
  return "train"


def build_foldoc(wordnet_lemmas):
  entries = []
  for title, body in _read_foldoc_entries():
    tags = _entry_tags(body)
    if "introduction" in tags:
      continue  # FOLDOC's own front matter
    text = _clean_foldoc_body(body)
    if len(text) < 20:
      continue
    xrefs = [_xref_text(m).strip() for m in _XREF_RE.finditer(body)]
    entries.append({"title": title, "tags": tags, "text": f"{title}: {text}", "xrefs": xrefs})
  for i, entry in enumerate(entries):
    entry["id"] = f"foldoc-{i:05d}"

  tag_counts = collections.Counter(tag for e in entries for tag in e["tags"])
  classes = [tag for tag, _ in tag_counts.most_common(NUM_CLASSES)]
  task = {"train": [], "dev": [], "test": []}
  held_out_titles = set()
  for entry in entries:
    class_tags = [t for t in entry["tags"] if t in classes]
    if not class_tags:
      continue
    split = _split_of(entry["title"])
    task[split].append({"id": entry["id"], "title": entry["title"], "text": entry["text"],
                        "label": class_tags[0], "tags": class_tags})
    if split != "train":
      held_out_titles.add(entry["title"])

  domain = [{"id": e["id"], "title": e["title"], "text": e["text"], "tags": e["tags"]}
            for e in entries if e["title"] not in held_out_titles]

  def is_entity(name):
    # Common English words ("file", "bug") would be masked everywhere: keep names that look like
    # proper names, acronyms or multi-word terms.
    if len(name) < 3 or name in held_out_titles or "\t" in name:
      return False
    return not (name.islower() and name.replace("-", "").isalpha() and
                name.lower() in wordnet_lemmas)

  titles = {e["title"] for e in entries}
  citations = collections.Counter(t for e in entries for t in set(e["xrefs"]))
  knowledge = []
  for entry in entries:
    if entry["title"] in held_out_titles or not is_entity(entry["title"]):
      continue
    if entry["tags"]:
      knowledge.append(f"{entry['title']}\t{entry['tags'][0]}")
    seen = set()
    for target in entry["xrefs"]:
      if (target in titles and target != entry["title"] and is_entity(target)
          and citations[target] <= MAX_TARGET_CITATIONS
          and target not in seen and len(seen) < MAX_SEE_ALSO):
        seen.add(target)
        knowledge.append(f"{entry['title']}\tsee_also\t{target}")
  return domain, task, classes, knowledge


# ------------------------------------------------------------------------------------------------
# Output


def _write_gzip(path, text):
  raw = text.encode("utf-8")
  with open(path, "wb") as f:
    with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
      gz.write(raw)
  return hashlib.sha256(raw).hexdigest()


def _jsonl(records):
  return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def _licence_files(out):
  with open(_require(WORDNET_COPYRIGHT), encoding="utf-8") as f:
    wordnet = f.read()
  with open(os.path.join(out, "LICENSE.wordnet"), "w", encoding="utf-8") as f:
    f.write("general.jsonl.gz and wordnet_synonyms.tsv.gz are derived from WordNet 3.0\n"
            "(Debian package wordnet-base). WordNet licence, as shipped by Debian:\n\n" + wordnet)
  with open(_require(FOLDOC_COPYRIGHT), encoding="utf-8") as f:
    foldoc = f.read()
  gfdl = open(_require(GFDL_TEXT), encoding="utf-8").read()
  with open(os.path.join(out, "LICENSE.foldoc"), "w", encoding="utf-8") as f:
    f.write(
        "domain.jsonl.gz, task_*.jsonl.gz, labels.txt and knowledge.tsv.gz are derived from\n"
        "The Free On-line Dictionary of Computing, http://foldoc.org/, Editor Denis Howe\n"
        "(Debian package dict-foldoc). They were modified: subject tags moved out of the text,\n"
        "cross-reference markup and dates removed, entries regrouped into splits; see\n"
        "build_corpus.py. They are distributed under the GNU Free Documentation License,\n"
        "version 1.2 (FOLDOC allows 1.1 or any later version), with no Invariant Sections,\n"
        "Front-Cover Texts or Back-Cover Texts. The Debian copyright notice and a copy of the\n"
        "licence follow.\n\n" + foldoc + "\n\n" + "=" * 72 + "\n\n" + gfdl)


def build(out):
  os.makedirs(out, exist_ok=True)
  general = build_general()
  synonyms = build_synonyms()
  wordnet_lemmas = set()
  for pos_name, _ in POS_FILES:
    for _, _, lemmas, _, _ in _read_synsets(pos_name):
      wordnet_lemmas.update(l.lower() for l in lemmas)
  domain, task, classes, knowledge = build_foldoc(wordnet_lemmas)

  digests = {}
  digests["general.jsonl.gz"] = _write_gzip(os.path.join(out, "general.jsonl.gz"), _jsonl(general))
  digests["domain.jsonl.gz"] = _write_gzip(os.path.join(out, "domain.jsonl.gz"), _jsonl(domain))
  for split, records in task.items():
    name = f"task_{split}.jsonl.gz"
    digests[name] = _write_gzip(os.path.join(out, name), _jsonl(records))
  digests["knowledge.tsv.gz"] = _write_gzip(os.path.join(out, "knowledge.tsv.gz"),
                                            "".join(line + "\n" for line in knowledge))
  digests["wordnet_synonyms.tsv.gz"] = _write_gzip(
      os.path.join(out, "wordnet_synonyms.tsv.gz"),
      "".join("\t".join([w] + s) + "\n" for w, s in synonyms.items()))
  with open(os.path.join(out, "labels.txt"), "w", encoding="utf-8") as f:
    f.write("".join(c + "\n" for c in classes))
  _licence_files(out)

  label_counts = {split: dict(collections.Counter(r["label"] for r in records).most_common())
                  for split, records in task.items()}
  with io.StringIO() as readme:
    readme.write("Embedded default corpus, rebuilt by build_corpus.py (see its docstring).\n\n")
    readme.write(f"general: {len(general)} documents from WordNet 3.0 glosses and examples "
                 f"({GENERAL_KEEP_FRACTION:.0%} of the {SYNSETS_PER_DOC}-synset groups)\n")
    readme.write(f"domain: {len(domain)} FOLDOC entries (task dev/test entries excluded)\n")
    for split, records in task.items():
      readme.write(f"task {split}: {len(records)} entries, labels {label_counts[split]}\n")
    readme.write(f"labels: {classes}\n")
    readme.write(f"knowledge: {len(knowledge)} lines\n")
    readme.write(f"wordnet_synonyms: {len(synonyms)} words\n\n")
    readme.write("sha256 of the uncompressed contents:\n")
    for name, digest in sorted(digests.items()):
      readme.write(f"  {name} {digest}\n")
    summary = readme.getvalue()
  with open(os.path.join(out, "README.txt"), "w", encoding="utf-8") as f:
    f.write(summary)
  return summary


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                      help="output folder (default: next to this script)")
  args = parser.parse_args(argv)
  print(build(args.out))


if __name__ == "__main__":
  main()
