"""A small document model for the pipeline's report: one list of blocks, rendered to Markdown and
to a standalone HTML page, so the two always say the same.

    doc = pipeline_document.Document()
    doc.heading(2, "Stages")
    doc.table(["stage", "wall time"], [["pretrain_general", pipeline_document.fmt_secs(75.0)]])
    doc.markdown(), doc.html("title")

Text may hold `code` spans and [text](link) links (rendered in HTML, kept as written in Markdown).
Table cells go through `cell` (ints with thousands separators, floats to 4 significant digits,
bools as yes/no, NaN as n/a).
"""
from __future__ import annotations

import dataclasses
import html
import math
import re
from typing import Any, Sequence


@dataclasses.dataclass
class Document:
  """Blocks: ("h", level, text) ("p", text) ("list", [text]) ("table", headers, rows) ("img", path,
  alt). Text may hold `code` spans."""
  blocks: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)

  def heading(self, level: int, text: str) -> None:
    self.blocks.append(("h", level, text))

  def para(self, text: str) -> None:
    self.blocks.append(("p", text))

  def bullets(self, items: Sequence[str]) -> None:
    if items:
      self.blocks.append(("list", list(items)))

  def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    self.blocks.append(("table", [str(h) for h in headers], [[cell(v) for v in r] for r in rows]))

  def image(self, path: str, alt: str) -> None:
    self.blocks.append(("img", path, alt))

  def markdown(self) -> str:
    out = []
    for block in self.blocks:
      kind = block[0]
      if kind == "h":
        out.append("#" * block[1] + " " + block[2])
      elif kind == "p":
        out.append(block[1])
      elif kind == "list":
        out.append("\n".join(f"- {item}" for item in block[1]))
      elif kind == "table":
        headers, rows = block[1], block[2]
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        out.append("\n".join(lines))
      elif kind == "img":
        out.append(f"![{block[2]}]({block[1]})")
    return "\n\n".join(out) + "\n"

  def html(self, title: str) -> str:
    body = []
    for block in self.blocks:
      kind = block[0]
      if kind == "h":
        body.append(f"<h{block[1]}>{_inline(block[2])}</h{block[1]}>")
      elif kind == "p":
        body.append(f"<p>{_inline(block[1])}</p>")
      elif kind == "list":
        body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1]) + "</ul>")
      elif kind == "table":
        head = "".join(f"<th>{_inline(h)}</th>" for h in block[1])
        rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>"
                       for r in block[2])
        body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
      elif kind == "img":
        body.append(f'<p><img src="{html.escape(block[1])}" alt="{html.escape(block[2])}"></p>')
    style = ("body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;"
             "line-height:1.45}table{border-collapse:collapse;margin:.5rem 0 1rem}"
             "th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left;vertical-align:top}"
             "th{background:#f3f3f3}code{background:#f3f3f3;padding:0 .2rem}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>"
            f"{html.escape(title)}</title><style>{style}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


_CODE = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def _inline(text: str) -> str:
  """`code` spans and [text](link) in HTML; everything else escaped."""
  out, pos = [], 0
  pattern = re.compile(f"{_CODE.pattern}|{_LINK.pattern}")
  for m in pattern.finditer(text):
    out.append(html.escape(text[pos:m.start()]))
    if m.group(1) is not None:
      out.append(f"<code>{html.escape(m.group(1))}</code>")
    else:
      out.append(f'<a href="{html.escape(m.group(3))}">{html.escape(m.group(2))}</a>')
    pos = m.end()
  out.append(html.escape(text[pos:]))
  return "".join(out)


def cell(value: Any) -> str:
  """A table cell's text: "" for None, yes/no, 1,234, 4 significant digits, n/a for NaN."""
  if value is None:
    return ""
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, int):
    return f"{value:,}"
  if isinstance(value, float):
    if math.isnan(value):
      return "n/a"
    return f"{value:.4g}"
  return str(value)


def fmt_secs(secs: float | None) -> str:
  """A duration for people: "42 s", "3 min 05 s", "2 h 07 min" ("" for None)."""
  if secs is None:
    return ""
  secs = float(secs)
  if secs < 60:
    return f"{secs:.0f} s"
  minutes, secs = divmod(round(secs), 60)
  if minutes < 60:
    return f"{minutes} min {secs:02d} s"
  hours, minutes = divmod(minutes, 60)
  return f"{hours} h {minutes:02d} min"


def signed(value: float | None, digits: int = 4) -> str:
  """A difference with its sign ("+0.0123", "-2", "0"); "" for None or NaN."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ""
  if value == 0:
    return "0"
  return f"{value:+.{digits}g}"
