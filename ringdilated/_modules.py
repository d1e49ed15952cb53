"""What the Linen and NNX modules share, written once and framework-neutral.

The attention settings of a module are its fields named in
:data:`ATTENTION_FIELDS`; :func:`config_of` turns them into the one
:class:`DilatedConfig` the function runs on. The multi-head fields are
checked by :func:`check_heads` and sized by :func:`head_layout`, and both
frameworks draw their kernels from the same initializers.

Shape legend: B batch, L local tokens, E input features, F output features,
H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax.core import meta

from ._config import DilatedConfig
from ._validate import positive_count, positive_real

Array = jax.Array
Initializer = Callable[..., Array]

# The settings a module carries as fields, in DilatedConfig's names.
ATTENTION_FIELDS = ("segment_lengths", "dilation_rates", "mode", "causal", "layout",
                    "backend", "detach_weights", "softmax_scale", "dropout_rate",
                    "axis_name")


def config_of(module) -> DilatedConfig:
  """The validated settings of a module with the :data:`ATTENTION_FIELDS`."""
  return DilatedConfig(**attention_fields(module))


def attention_fields(module) -> dict:
  """``{field: value}`` of the :data:`ATTENTION_FIELDS` of ``module``."""
  return {name: getattr(module, name) for name in ATTENTION_FIELDS}


class HeadLayout(NamedTuple):
  """Sizes of a multi-head module: ``H``, ``K``, ``D`` and ``F``."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  out_features: int


def check_heads(num_heads, num_kv_heads, qkv_features, out_features,
                gamma_init) -> tuple[int, int]:
  """Validates the multi-head fields that do not depend on the input;
  returns ``(H, K)``."""
  h = positive_count("num_heads", num_heads)
  kv = h if num_kv_heads is None else positive_count("num_kv_heads", num_kv_heads)
  if h % kv:
    raise ValueError(f"num_heads={h} must be divisible by num_kv_heads={kv}")
  positive_count("qkv_features", qkv_features, optional=True)
  positive_count("out_features", out_features, optional=True)
  positive_real("gamma_init", gamma_init)
  return h, kv


def head_layout(num_heads, num_kv_heads, qkv_features, out_features, gamma_init,
                in_features: int) -> HeadLayout:
  """Validates the multi-head fields against ``E = in_features``."""
  h, kv = check_heads(num_heads, num_kv_heads, qkv_features, out_features, gamma_init)
  e = positive_count("in_features", in_features)
  qkv = e if qkv_features is None else int(qkv_features)
  if qkv % h:
    raise ValueError(f"qkv_features={qkv} must be divisible by num_heads={h}")
  return HeadLayout(h, kv, qkv // h, e if out_features is None else int(out_features))


def xavier_normal(gain: float) -> Initializer:
  """Xavier (Glorot) normal with ``gain``, as ``torch.nn.init.xavier_normal_``.

  ``std = gain * sqrt(2 / (fan_in + fan_out))``, untruncated.
  """
  return jax.nn.initializers.variance_scaling(gain**2, "fan_avg", "normal")


def projection_inits(kernel_init: Initializer | None,
                     gamma_init: float) -> tuple[Initializer, Initializer]:
  """``(query/key init, value/output init)``: Xavier-normal with gains 1 and
  ``gamma_init``, or ``kernel_init`` for all four."""
  if kernel_init is None:
    return xavier_normal(1.0), xavier_normal(gamma_init)
  return kernel_init, kernel_init


def stacked_init(inits: Sequence[Initializer], widths: Sequence[int]) -> Initializer:
  """A kernel initializer for side-by-side projections (the fused QKV kernel).

  Piece ``i`` (``widths[i]`` output columns of the flattened ``[E, columns]``
  kernel, in order) is drawn by ``inits[i]`` with its own shape, so the fused
  kernel has the same distribution as separate projections (fans are those
  of each piece, not of the fused matrix).
  """

  def init(rng, shape, dtype=jnp.float32):
    fan_in = math.prod(shape) // sum(widths)
    rngs = jax.random.split(rng, len(inits))
    pieces = [f(r, (fan_in, w), dtype) for f, r, w in zip(inits, rngs, widths)]
    # Boxed initializers (``nn.with_partitioning``) keep their metadata.
    kernel = jnp.concatenate([meta.unbox(x) for x in pieces], axis=-1).reshape(shape)
    return meta.replace_boxed(pieces[0], kernel)

  return init


def fused_qkv_init(qk_init: Initializer, vo_init: Initializer,
                   heads: HeadLayout) -> Initializer:
  """The init of the fused ``[E, H + 2K, D]`` kernel: query, key, value heads."""
  h, kv, d = heads.num_heads, heads.num_kv_heads, heads.head_dim
  return stacked_init((qk_init, qk_init, vo_init), (h * d, kv * d, kv * d))


def split_qkv(qkv: Array, heads: HeadLayout) -> tuple[Array, Array, Array]:
  """[B, L, H + 2K, D] -> q [B, L, H, D], k and v [B, L, K, D]."""
  h, kv = heads.num_heads, heads.num_kv_heads
  q, k, v = jnp.split(qkv, (h, h + kv), axis=-2)
  return q, k, v


def need_deterministic(deterministic: bool | None, dropout_rate: float, where: str) -> bool:
  """``deterministic`` resolved: True without dropout; an error if unset."""
  if dropout_rate == 0:
    return True
  if deterministic is None:
    raise ValueError(f"deterministic=None: pass deterministic=True or False {where}"
                     f"when dropout_rate={dropout_rate} > 0")
  return bool(deterministic)
