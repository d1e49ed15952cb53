"""The settings of dilated attention: one frozen value, validated once.

:class:`DilatedConfig` holds everything about an attention call that is not
data: the dilation pattern, the ring layout, the backend, dropout and the
logit scale. The public function, :func:`ringdilated.make_attention_fn` and
the Linen and NNX modules each build it once from their arguments or fields
(so bad settings are refused where they are given, before any tracing) and
pass it on; it is hashable, so it is the static argument of everything
below it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

from . import _backends
from ._layout import LAYOUTS
from ._validate import boolean, hashable, one_of, positive_ints, positive_real, probability

MODES = ("mix", "partition")


@dataclasses.dataclass(frozen=True)
class DilatedConfig:
  """The attention pattern and how to run it. Hashable, validated on construction.

  Attributes:
    segment_lengths: ``w_i``, tokens per segment of branch ``i`` (global).
    dilation_rates: ``r_i``, keep every ``r_i``-th token of a segment;
      ``w_i % r_i == 0``.
    mode: ``"mix"`` (every head uses every branch, one softmax over all
      branches' keys) or ``"partition"`` (head groups, one branch each).
    causal: a query sees only keys at positions ``<=`` its own.
    layout: how the sequence lies on a ring's devices, ``"contiguous"`` or
      ``"zigzag"`` (see :func:`ringdilated.to_layout`).
    backend: block implementation: ``"auto"``, a name of
      ``ringdilated.backends.REGISTRY``, or a backend object (e.g. one with its
      own tiles).
    detach_weights: ``"mix"``: the branch weights are constants in the
      gradient (as LongNet's torchscale implementation).
    softmax_scale: logit scale; None for ``1 / sqrt(D)``.
    dropout_rate: probability of dropping an attention weight, in ``[0, 1)``.
    axis_name: mesh axis the sequence is sharded over (ring execution), or
      None for one device.

  Example:
    >>> import ringdilated as rd
    >>> rd.DilatedConfig((2048, 4096), (1, 2), causal=True, layout="zigzag").branches
    ((2048, 1), (4096, 2))
  """

  segment_lengths: tuple[int, ...]
  dilation_rates: tuple[int, ...]
  mode: str = "mix"
  causal: bool = False
  _: dataclasses.KW_ONLY
  layout: str = "contiguous"
  backend: str | _backends.Backend = "auto"
  detach_weights: bool = False
  softmax_scale: float | None = None
  dropout_rate: float = 0.0
  axis_name: Hashable | None = None

  def __post_init__(self):
    w = positive_ints("segment_lengths", self.segment_lengths)
    r = positive_ints("dilation_rates", self.dilation_rates)
    if not w:
      raise ValueError("segment_lengths must not be empty")
    if len(w) != len(r):
      raise ValueError(
          f"segment_lengths={w} and dilation_rates={r} must have the same length")
    for i, (wi, ri) in enumerate(zip(w, r)):
      if wi % ri:
        raise ValueError(f"segment_lengths[{i}]={wi} must be divisible by "
                         f"dilation_rates[{i}]={ri}")
    one_of("mode", self.mode, MODES)
    one_of("layout", self.layout, LAYOUTS)
    _backends.check_name(self.backend)
    hashable("axis_name", self.axis_name)
    scale = self.softmax_scale
    fields = dict(
        segment_lengths=w, dilation_rates=r,
        causal=boolean("causal", self.causal),
        detach_weights=boolean("detach_weights", self.detach_weights),
        softmax_scale=None if scale is None else positive_real("softmax_scale", scale),
        dropout_rate=probability("dropout_rate", self.dropout_rate))
    for name, value in fields.items():
      object.__setattr__(self, name, value)

  @property
  def branches(self) -> tuple[tuple[int, int], ...]:
    """``((w_0, r_0), (w_1, r_1), ...)``."""
    return tuple(zip(self.segment_lengths, self.dilation_rates))

  def replace(self, **changes) -> DilatedConfig:
    """A copy with ``changes``, validated again."""
    return dataclasses.replace(self, **changes)
