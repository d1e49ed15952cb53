"""The ring schedule, in pure Python/numpy: which blocks each step visits.

A segment of branch ``b`` spans a sub-ring of ``g`` devices. At step ``s``
device ``d`` (position ``c = d mod g`` in its group) holds the K/V chunk of
group position ``(c - s) mod g``. :func:`visible_pairs` says which blocks of
that chunk its queries see; the ring executes exactly this rule, and
:func:`step_work` counts the work from it.

With a causal mask a device skips chunks that come after its own; with
chunks in device order the last device of a ring would work at every step
while the first idles (``max / mean`` work per step up to ``g``). So each
device holds two half-chunks, ``c`` and ``2g - 1 - c``: placed there by the
zigzag layout (``rd.to_layout``), or in the contiguous layout swapped there
(and the results back) by :func:`regroup_permutations` (a segment over two
devices instead sends half of the later chunk's queries to the earlier
device, :func:`pair_permutations`: the same work per device). Then
:func:`visible_pairs` picks per step the half-blocks that are visible:
exactly the same work on every device at every step, chosen by index
arithmetic (no data-dependent branches). Chunks whose kept length is odd
can't be halved and stay in device order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._config import DilatedConfig
from ._plan import Branch, Plan, make_plan
from ._validate import positive_int


def ring_permutation(ring_size: int, num_shards: int) -> list[tuple[int, int]]:
  """``ppermute`` pairs sending each device's chunk to the next device of
  its sub-ring of ``ring_size`` consecutive devices (cyclic in the group)."""
  g = ring_size
  return [(d, d - d % g + (d % g + 1) % g) for d in range(num_shards)]


def pair_permutations(num_shards: int
                      ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
  """``ppermute`` pairs within each sub-ring of two consecutive devices:
  (group position 0 to 1, 1 to 0); a device that receives nothing in one of
  them gets zeros there."""
  return ([(d, d + 1) for d in range(0, num_shards, 2)],
          [(d + 1, d) for d in range(0, num_shards, 2)])


def regroup_permutations(ring_size: int, num_shards: int
                         ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
  """``ppermute`` pairs moving contiguous chunks into the zigzag order.

  In each sub-ring of ``g = ring_size`` consecutive devices, group position
  ``c`` holds half-chunks ``2c`` and ``2c + 1`` of the segment, and is to
  hold ``c`` and ``2g - 1 - c``: half-chunk ``h`` goes to position ``h`` if
  ``h < g``, else ``2g - 1 - h``. Returns the pairs sending every device's
  first half, and those sending its second half; each is a permutation.
  """
  g = ring_size

  def to(h):
    return h if h < g else 2 * g - 1 - h

  return tuple([(d, d - d % g + to(2 * (d % g) + s)) for d in range(num_shards)]
               for s in (0, 1))


def visible_pairs(br: Branch, causal: bool, c, src) -> list[tuple[Any, Any, Any]]:
  """The blocks of a ring step: device ``c`` holds the chunk of ``src != c``.

  Returns ``[(q_half, kv_half, when)]``: queries of local half ``q_half``
  attend keys of half ``kv_half`` of the visiting chunk (``None``: the whole
  chunk), iff ``when``. ``c`` and ``src`` are traced in the ring and Python
  ints in :func:`step_work`, which counts the work from this same rule.
  """
  if not causal:
    return [(None, None, True)]
  if br.schedule == "contiguous":
    return [(None, None, src < c)]  # a later chunk is invisible: idle device
  later = src > c
  # Half 0 runs in device order and sees earlier chunks; half 1 runs in the
  # opposite order and sees later ones: one block per step on every device.
  same = (later, later, True)
  if br.schedule == "mirror":
    return [same]
  # "zigzag": half 1 (half-chunk 2g-1-c) also sees every other half 0.
  return [(1, 0, True), same]


def step_work(plan: Plan) -> tuple[np.ndarray, ...]:
  """Attention work per ring step and device, for each branch of ``plan``.

  Entry ``[s, d]`` of branch ``b``'s array is the work of device ``d`` at ring
  step ``s`` (step 0: its own chunk), in query-key pairs of kept tokens per
  batch row and kv slot; a causal diagonal block counts half. Wall time is
  set by the busiest device of each step, so ``max / mean`` over devices is
  the slowdown from imbalance (1 is perfect).
  """
  causal = plan.config.causal
  work = []
  for br in plan.branches:
    whole = plan.local_len // br.piece * br.kept ** 2
    w = np.zeros((br.ring_size, plan.num_shards))
    w[0] = whole / 2 if causal else whole
    for d in range(plan.num_shards):
      c = d % br.ring_size
      for s in range(1, br.ring_size):
        for qi, _, when in visible_pairs(br, causal, c, (c - s) % br.ring_size):
          w[s, d] += bool(when) * (whole if qi is None else br.half ** 2)
    work.append(w)
  return tuple(work)


def balance(plan: Plan) -> tuple[float, float]:
  """Busiest device / mean of :func:`step_work`: (worst step, whole pass).

  The whole pass is the sum of the per-step maxima over the sum of means,
  over all branches (run one after the other).
  """
  work = step_work(plan)
  worst = max(float(np.max(w.max(1) / w.mean(1))) for w in work)
  whole = sum(w.max(1).sum() for w in work) / sum(w.mean(1).sum() for w in work)
  return worst, float(whole)


def ring_balance(config: DilatedConfig, seq_len: int, num_shards: int) -> tuple[float, float]:
  """How evenly a ring of ``num_shards`` devices shares the attention work.

  Counted from the static schedule the ring executes (no device work): per
  ring step the busiest device's work over the mean, as (worst step, whole
  pass = sum of per-step maxima / sum of means). 1.0 is perfect balance.

  Args:
    config: the settings; its pattern, ``causal`` and ``layout`` are read.
    seq_len: ``N``, the global sequence length.
    num_shards: ``P``, devices on the ring axis.

  Returns:
    ``(worst_step, whole_pass)``, each ``>= 1``.

  Example (a chunk of one kept token can't be halved, so it is not swapped
  into the zigzag order):
    >>> import ringdilated as rd
    >>> dense = dict(segment_lengths=(4096,), dilation_rates=(1,), causal=True)
    >>> rd.ring_balance(rd.DilatedConfig(**dense), 4096, 4)
    (1.0, 1.0)
    >>> one_kept = dict(segment_lengths=(4096,), dilation_rates=(1024,), causal=True)
    >>> rd.ring_balance(rd.DilatedConfig(**one_kept), 4096, 4)
    (4.0, 1.75)
  """
  if not isinstance(config, DilatedConfig):
    raise TypeError(f"config must be a ringdilated.DilatedConfig, got {type(config).__name__}")
  heads = len(config.segment_lengths) if config.mode == "partition" else 1
  plan = make_plan(config, positive_int("seq_len", seq_len), heads, heads,
                   positive_int("num_shards", num_shards))
  return balance(plan)
