"""The static plan of one call: the branches in terms of local tensors.

Everything here is plain Python/numpy on hashable values. The plan is
computed once per ``(config, shapes, ring size)`` at trace time and memoized
with ``functools.lru_cache``: it is a pure function of hashable inputs, so
the cache can never be stale, needs no locking beyond the one ``lru_cache``
has, and there is nothing to initialize or clear.

Shape legend: B batch, N global sequence length, P devices on the ring axis,
L = N / P local length, H query heads, K kv heads, G = H / K query heads per
kv head, D head dim.
"""

from __future__ import annotations

import dataclasses
import functools

from ._config import DilatedConfig
from ._layout import check_segments, placement


@dataclasses.dataclass(frozen=True)
class Branch:
  """One block-sparse attention pass, in terms of local (per-device) tensors.

  The branch reads query heads ``q_heads`` (a contiguous range), arranges them
  as ``[K_b, G_b]`` (``G_b`` query heads per kv slot), and reads kv head
  ``kv_heads[j]`` for kv slot ``j``. Slot ``j`` keeps positions with
  ``position % rate == offsets[j]``. Locally the sequence is cut into
  pieces of ``piece`` tokens; a piece holds ``piece // rate`` kept tokens
  (``T``). A segment spans ``ring_size`` consecutive devices (``1``: the
  segment is local and nothing is communicated).

  ``schedule`` says how the chunks of a segment lie on its ring (it matters
  only for causal rings, ``ring_size > 1``):

  * ``"contiguous"``: device ``c`` of the group holds the ``c``-th chunk.
  * ``"mirror"`` (zigzag layout, segment of a divisor of ``P`` half-chunks):
    the two local halves belong to two segments laid over the same devices in
    opposite orders, so device ``c`` holds half-chunk ``c`` of one segment and
    half-chunk ``g - 1 - c`` of the other.
  * ``"zigzag"`` (zigzag layout, segment of the whole sequence): device ``c``
    holds half-chunks ``c`` and ``2g - 1 - c`` of the segment.

  ``regroup``: the chunks lie contiguously (contiguous layout, causal) and
  the causal work is balanced over the devices (else the last device of the
  segment works at every step, the first once): for ``g = 2`` by sending
  half of the later chunk's queries to the earlier device (``_ring._pair``);
  for ``g > 2`` the ring first swaps halves of the compacted chunks between
  the devices of the segment into the ``"zigzag"`` order, and the results
  back at the end.
  """

  index: int
  segment_length: int
  rate: int
  q_heads: tuple[int, int]          # [start, stop)
  kv_heads: tuple[int, ...]         # length K_b
  group: int                        # G_b
  offsets: tuple[int, ...]          # length K_b, each in [0, rate)
  piece: int                        # local tokens per piece: min(w, L)
  ring_size: int                    # g: devices per segment
  schedule: str = "contiguous"      # "contiguous", "mirror" or "zigzag"
  regroup: bool = False             # contiguous causal chunks balanced (above)

  @property
  def num_kv(self) -> int:
    return len(self.kv_heads)

  @property
  def kept(self) -> int:
    """Kept tokens per piece: the block length ``T``."""
    return self.piece // self.rate

  @property
  def swaps_halves(self) -> bool:
    """Whether the ring swaps halves of its chunks into the ``"zigzag"``
    order before its first step (``regroup`` over more than two devices)."""
    return self.regroup and self.ring_size > 2

  @property
  def half(self) -> int:
    """Kept tokens per local half-chunk (zigzag schedules)."""
    return self.kept // 2 if self.schedule == "zigzag" else self.kept


@dataclasses.dataclass(frozen=True)
class Plan:
  config: DilatedConfig
  seq_len: int
  num_heads: int
  num_kv_heads: int
  num_shards: int
  branches: tuple[Branch, ...]

  @property
  def local_len(self) -> int:
    return self.seq_len // self.num_shards

  @property
  def group(self) -> int:
    """``G``: query heads per kv head."""
    return self.num_heads // self.num_kv_heads


def partition_groups(num_heads: int, num_branches: int) -> tuple[tuple[int, int], ...]:
  """Contiguous head ranges of ``"partition"`` mode; the first ``H % k`` get one more."""
  base, extra = divmod(num_heads, num_branches)
  bounds, start = [], 0
  for i in range(num_branches):
    stop = start + base + (i < extra)
    bounds.append((start, stop))
    start = stop
  return tuple(bounds)


def _kv_slots(start: int, stop: int, num_heads: int,
              num_kv_heads: int) -> tuple[tuple[int, ...], int]:
  """kv slots and query heads per slot for query heads ``[start, stop)``.

  When the range covers whole GQA groups each kv head is read once and shared
  by its ``G`` query heads. Otherwise (partition groups that cut a GQA group)
  each query head gets its own slot, so only that branch reads a kv head twice.
  """
  g = num_heads // num_kv_heads
  if start % g == 0 and stop % g == 0:
    return tuple(range(start // g, stop // g)), g
  return tuple(h // g for h in range(start, stop)), 1


@functools.lru_cache(maxsize=256)
def make_plan(config: DilatedConfig, seq_len: int, num_heads: int,
              num_kv_heads: int, num_shards: int = 1) -> Plan:
  """Builds (and memoizes: it is pure and hashable) the static plan.

  Args:
    config: the settings; its pattern and ``layout`` are read.
    seq_len: global sequence length ``N``.
    num_heads: ``H``.
    num_kv_heads: ``K``; must divide ``H``.
    num_shards: ``P``, devices the sequence is split over; must divide ``N``.

  Raises:
    ValueError: naming the argument and value that make the plan impossible.
  """
  if num_kv_heads <= 0 or num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} must be divisible by "
                     f"num_kv_heads={num_kv_heads}")
  if num_shards <= 0 or seq_len % num_shards:
    raise ValueError(f"sequence length {seq_len} must be divisible by the "
                     f"number of devices {num_shards}")
  check_segments(config.segment_lengths, config.dilation_rates, seq_len,
                 num_shards, config.layout)
  k = len(config.segment_lengths)
  if config.mode == "partition" and k > num_heads:
    raise ValueError(f"mode='partition' needs at least one head per branch: "
                     f"num_heads={num_heads} < {k} branches")
  group = num_heads // num_kv_heads
  branches = []
  for i, (w, r) in enumerate(config.branches):
    if config.mode == "mix":
      start, stop = 0, num_heads
      kv_heads, g = tuple(range(num_kv_heads)), group
      offsets = tuple(j % r for j in kv_heads)
    else:
      start, stop = partition_groups(num_heads, k)[i]
      kv_heads, g = _kv_slots(start, stop, num_heads, num_kv_heads)
      offsets = (i % r,) * len(kv_heads)
    piece, ring_size, schedule = placement(w, seq_len, num_shards, config.layout)
    regroup = (config.causal and schedule == "contiguous" and ring_size > 1
               and (piece // r) % 2 == 0)
    branches.append(Branch(
        index=i, segment_length=w, rate=r, q_heads=(start, stop),
        kv_heads=kv_heads, group=g, offsets=offsets,
        piece=piece, ring_size=ring_size, schedule="zigzag" if regroup else schedule,
        regroup=regroup))
  return Plan(config, seq_len, num_heads, num_kv_heads, num_shards, tuple(branches))
