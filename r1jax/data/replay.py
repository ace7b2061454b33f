"""A replay buffer of earlier labelled examples, kept by reservoir sampling, with resumable state.

    buffer = ReplayBuffer.empty(capacity=500, seed=0)
    buffer = buffer.added(records)            # a new buffer; `buffer` itself is unchanged
    buffer.items                              # [{"text", "label"}, ...], at most `capacity`
    ReplayBuffer.from_json(buffer.to_json()) == buffer   # JSON: the stage writes it to its workdir

Reservoir sampling (Vitter's algorithm R): after `seen` examples have been offered, each of them is
in the buffer with the same probability capacity / seen, whatever order they came in, and memory
stays at `capacity` examples. The random generator's state is part of the buffer, so a buffer
saved, loaded and then fed the same examples ends exactly as one that never left memory: the
continual stage saves it with every round, and a killed round resumes it bitwise.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class ReplayBuffer:
  """At most `capacity` of the `seen` examples offered so far, each kept with equal chance."""
  capacity: int
  items: tuple[dict[str, Any], ...]
  seen: int
  rng_state: Mapping[str, Any]   # numpy PCG64 bit-generator state (plain ints: JSON-ready)

  @classmethod
  def empty(cls, capacity: int, seed: int) -> "ReplayBuffer":
    if capacity < 0:
      raise ValueError(f"replay buffer capacity {capacity}: must be >= 0 (0 = no replay).")
    return cls(capacity, (), 0, np.random.PCG64(seed).state)

  def added(self, records: Iterable[Mapping[str, Any]]) -> "ReplayBuffer":
    """The buffer after offering `records` ({"text", "label"} each) in order."""
    gen = np.random.PCG64()
    gen.state = dict(self.rng_state)
    rng = np.random.Generator(gen)
    items, seen = list(self.items), self.seen
    for record in records:
      item = {"text": record["text"], "label": record["label"]}
      seen += 1
      if len(items) < self.capacity:
        items.append(item)
      elif self.capacity:
        slot = int(rng.integers(0, seen))  # keep with probability capacity / seen
        if slot < self.capacity:
          items[slot] = item
    return dataclasses.replace(self, items=tuple(items), seen=seen, rng_state=gen.state)

  @property
  def full(self) -> bool:
    return len(self.items) >= self.capacity

  def to_json(self) -> dict[str, Any]:
    return {"capacity": self.capacity, "seen": self.seen, "rng_state": dict(self.rng_state),
            "items": [dict(i) for i in self.items]}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "ReplayBuffer":
    items = tuple({"text": i["text"], "label": (list(i["label"]) if isinstance(i["label"], list)
                                                else i["label"])} for i in data["items"])
    return cls(int(data["capacity"]), items, int(data["seen"]), data["rng_state"])
