"""Static configuration and the memoized plan derived from it.

Everything here is plain Python/numpy on hashable values. The plan is computed
once per ``(config, layout)`` at trace time and memoized with
``functools.lru_cache``: it is a pure function of hashable inputs, so the cache
can never be stale, needs no locking beyond the one ``lru_cache`` has, and
there is nothing to initialize or clear.

Shape legend (used across the package):
  B batch, N global sequence length, H query heads, K kv heads, D head dim,
  P ring size (devices on ``axis_name``), L = N / P local length,
  G = H / K query heads per kv head (grouped-query attention).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Iterable

import numpy as np

MODES = ("mix", "partition")
LAYOUTS = ("contiguous", "zigzag")


def _as_int_tuple(name: str, values: Iterable[int]) -> tuple[int, ...]:
  if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
    raise TypeError(f"{name} must be a sequence of ints, got {values!r}")
  return tuple(positive_int(f"{name}[{i}]", x) for i, x in enumerate(values))


def positive_int(name: str, x) -> int:
  """``x`` as an int (numpy ints too, not bools) or an error naming ``name``."""
  try:
    if isinstance(x, bool):
      raise TypeError
    x = operator.index(x)
  except TypeError:
    raise TypeError(f"{name}={x!r} must be an int") from None
  if x <= 0:
    raise ValueError(f"{name}={x} must be positive")
  return x


def check_bool(name: str, value) -> None:
  """Raises unless ``value`` is a Python or numpy bool."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name}={value!r} must be a bool")


@dataclasses.dataclass(frozen=True)
class DilatedConfig:
  """The attention pattern: branches ``(w_i, r_i)``, mode and causality.

  Hashable and validated on construction, so it can be a static argument.

  Attributes:
    segment_lengths: ``w_i``, tokens per segment of branch ``i`` (global).
    dilation_rates: ``r_i``, keep every ``r_i``-th token of a segment.
    mode: ``"mix"`` (every head uses every branch, one softmax over all
      branches' keys) or ``"partition"`` (head groups, one branch each).
    causal: a query sees only keys at positions ``<=`` its own.
  """

  segment_lengths: tuple[int, ...]
  dilation_rates: tuple[int, ...]
  mode: str = "mix"
  causal: bool = False

  def __post_init__(self):
    w = _as_int_tuple("segment_lengths", self.segment_lengths)
    r = _as_int_tuple("dilation_rates", self.dilation_rates)
    object.__setattr__(self, "segment_lengths", w)
    object.__setattr__(self, "dilation_rates", r)
    if not w:
      raise ValueError("segment_lengths must not be empty")
    if len(w) != len(r):
      raise ValueError(
          f"segment_lengths={w} and dilation_rates={r} must have the same length")
    for i, (wi, ri) in enumerate(zip(w, r)):
      if wi % ri:
        raise ValueError(f"segment_lengths[{i}]={wi} must be divisible by "
                         f"dilation_rates[{i}]={ri}")
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r} must be one of {MODES}")
    check_bool("causal", self.causal)
    object.__setattr__(self, "causal", bool(self.causal))


@dataclasses.dataclass(frozen=True)
class Branch:
  """One block-sparse attention pass, in terms of local (per-device) tensors.

  The branch reads query heads ``q_heads`` (a contiguous range), arranges them
  as ``[K_b, G_b]`` (``G_b`` query heads per kv slot), and reads kv head
  ``kv_heads[j]`` for kv slot ``j``. Slot ``j`` keeps positions with
  ``position % rate == offsets[j]``. Locally the sequence is cut into
  ``num_local_segments`` pieces of ``piece`` tokens; a piece holds
  ``piece // rate`` kept tokens. A segment spans ``ring_size`` consecutive
  devices (``1``: the segment is local and nothing is communicated).

  ``schedule`` says how the chunks of a segment lie on its ring (it matters
  only for causal rings, ``ring_size > 1``):

  * ``"contiguous"``: device ``c`` of the group holds the ``c``-th chunk.
  * ``"mirror"`` (zigzag layout, segment of a divisor of ``P`` half-chunks):
    the two local halves belong to two segments laid over the same devices in
    opposite orders, so device ``c`` holds half-chunk ``c`` of one segment and
    half-chunk ``g - 1 - c`` of the other.
  * ``"zigzag"`` (zigzag layout, segment of the whole sequence): device ``c``
    holds half-chunks ``c`` and ``2g - 1 - c`` of the segment.
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

  @property
  def num_kv(self) -> int:
    return len(self.kv_heads)

  @property
  def kept(self) -> int:
    """Kept tokens per piece: the block length ``T``."""
    return self.piece // self.rate

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
  layout: str = "contiguous"

  @property
  def local_len(self) -> int:
    return self.seq_len // self.num_shards


def partition_groups(num_heads: int, num_branches: int) -> tuple[tuple[int, int], ...]:
  """Contiguous head ranges of ``"partition"`` mode; the first ``H % k`` get one more."""
  base, extra = divmod(num_heads, num_branches)
  bounds, start = [], 0
  for i in range(num_branches):
    stop = start + base + (i < extra)
    bounds.append((start, stop))
    start = stop
  return tuple(bounds)


def _kv_layout(start: int, stop: int, num_heads: int, num_kv_heads: int):
  """kv slots and query heads per slot for query heads ``[start, stop)``.

  When the range covers whole GQA groups each kv head is read once and shared
  by its ``G`` query heads. Otherwise (partition groups that cut a GQA group)
  each query head gets its own slot, so only that branch reads a kv head twice.
  """
  g = num_heads // num_kv_heads
  if start % g == 0 and stop % g == 0:
    return tuple(range(start // g, stop // g)), g
  return tuple(h // g for h in range(start, stop)), 1


def check_layout(layout) -> None:
  """Raises unless ``layout`` is one of :data:`LAYOUTS`."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")


def _check_layout(config: DilatedConfig, seq_len: int, num_shards: int,
                  layout: str) -> None:
  local = seq_len // num_shards
  for i, (w, r) in enumerate(zip(config.segment_lengths, config.dilation_rates)):
    if seq_len % w:
      raise ValueError(f"sequence length {seq_len} must be divisible by "
                       f"segment_lengths[{i}]={w}")
    if num_shards == 1:
      continue
    if layout == "zigzag":
      _check_zigzag(i, w, r, seq_len, num_shards)
      continue
    if local % r:
      raise ValueError(
          f"local sequence length {local} (= {seq_len} / {num_shards} devices) "
          f"must be divisible by dilation_rates[{i}]={r}")
    if w <= local and local % w:
      raise ValueError(
          f"segment_lengths[{i}]={w} must divide the local sequence length "
          f"{local} (= {seq_len} / {num_shards} devices) or be a multiple of it")
    if w > local and (w % local or num_shards % (w // local)):
      raise ValueError(
          f"segment_lengths[{i}]={w} must be a multiple of the local sequence "
          f"length {local} spanning a divisor of the {num_shards} devices")


def _check_zigzag(i: int, w: int, r: int, seq_len: int, num_shards: int) -> None:
  """Branch ``i`` on the zigzag layout: device d holds half-chunks d, 2P-1-d."""
  where = f"(= {seq_len} / (2 * {num_shards} devices)) of layout='zigzag'"
  if seq_len % (2 * num_shards):
    raise ValueError(f"sequence length {seq_len} must be divisible by 2 * "
                     f"{num_shards} devices for layout='zigzag'")
  chunk = seq_len // (2 * num_shards)
  if w <= chunk:
    if chunk % w:
      raise ValueError(f"segment_lengths[{i}]={w} must divide the half-chunk "
                       f"length {chunk} {where} or be a multiple of it")
    return
  if w % chunk:
    raise ValueError(f"segment_lengths[{i}]={w} must be a multiple of the "
                     f"half-chunk length {chunk} {where}")
  if num_shards % (w // chunk) and w != seq_len:
    raise ValueError(
        f"segment_lengths[{i}]={w} spans {w // chunk} half-chunks {where}: "
        f"segments of a divisor of {num_shards} half-chunks lie on a sub-ring "
        "in mirrored pairs, a segment of the whole sequence on the whole ring; "
        "other segments mix sub-rings of different sizes")
  if chunk % r:
    raise ValueError(f"the half-chunk length {chunk} {where} must be divisible "
                     f"by dilation_rates[{i}]={r}")


def _placement(w: int, seq_len: int, num_shards: int, layout: str):
  """``(piece, ring_size, schedule)`` of a branch of segment length ``w``."""
  local = seq_len // num_shards
  if num_shards == 1 or layout == "contiguous" or w <= local // 2:
    return min(w, local), max(1, w // local), "contiguous"
  if w == seq_len:
    return local, num_shards, "zigzag"
  return local // 2, w // (local // 2), "mirror"


@functools.lru_cache(maxsize=256)
def make_plan(config: DilatedConfig, seq_len: int, num_heads: int,
              num_kv_heads: int, num_shards: int = 1,
              layout: str = "contiguous") -> Plan:
  """Builds (and memoizes: it is pure and hashable) the static plan.

  Args:
    config: the attention pattern.
    seq_len: global sequence length ``N``.
    num_heads: ``H``.
    num_kv_heads: ``K``; must divide ``H``.
    num_shards: ``P``, devices the sequence is split over; must divide ``N``.
    layout: how the sequence lies on the devices: ``"contiguous"`` (device
      ``d`` holds tokens ``[d L, (d+1) L)``) or ``"zigzag"`` (device ``d``
      holds half-chunks ``d`` and ``2P - 1 - d`` of ``2P``; see
      :func:`ringdilated.to_layout`).

  Raises:
    ValueError: naming the argument and value that make the layout impossible.
  """
  if num_kv_heads <= 0 or num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} must be divisible by "
                     f"num_kv_heads={num_kv_heads}")
  if num_shards <= 0 or seq_len % num_shards:
    raise ValueError(f"sequence length {seq_len} must be divisible by the "
                     f"number of devices {num_shards}")
  check_layout(layout)
  _check_layout(config, seq_len, num_shards, layout)
  k = len(config.segment_lengths)
  if config.mode == "partition" and k > num_heads:
    raise ValueError(f"mode='partition' needs at least one head per branch: "
                     f"num_heads={num_heads} < {k} branches")
  group = num_heads // num_kv_heads
  branches = []
  for i, (w, r) in enumerate(zip(config.segment_lengths, config.dilation_rates)):
    if config.mode == "mix":
      start, stop = 0, num_heads
      kv_heads, g = tuple(range(num_kv_heads)), group
      offsets = tuple(j % r for j in kv_heads)
    else:
      start, stop = partition_groups(num_heads, k)[i]
      kv_heads, g = _kv_layout(start, stop, num_heads, num_kv_heads)
      offsets = (i % r,) * len(kv_heads)
    piece, ring_size, schedule = _placement(w, seq_len, num_shards, layout)
    branches.append(Branch(
        index=i, segment_length=w, rate=r, q_heads=(start, stop),
        kv_heads=kv_heads, group=g, offsets=offsets,
        piece=piece, ring_size=ring_size, schedule=schedule))
  return Plan(config, seq_len, num_heads, num_kv_heads, num_shards,
              tuple(branches), layout)
