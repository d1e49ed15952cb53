"""Helpers for testing models built on ringdilated (needs hypothesis).

Not imported by ``import ringdilated``: import it in your tests as
``from ringdilated import testing``. Three pieces:

* :data:`TOLERANCES` / :func:`tolerance`: the max abs error against the
  float32 oracle that ringdilated's own tests allow, per input dtype.
* :func:`configs`: a hypothesis strategy of :class:`Case` values, settings
  (a :class:`ringdilated.DilatedConfig`) with the shapes and ring size they
  are valid for, as the README's "Configuration rules" state them.
* :func:`assert_matches_reference`: any attention callable ``(q, k, v) ->
  out`` against the dense oracle
  :func:`ringdilated.reference.dilated_attention_reference`, outputs and
  q/k/v gradients, with a message naming what differs and by how much.

Shape legend: B batch, N global sequence length, P devices on the ring axis,
L = N / P local length, H query heads, K kv heads, D head dim.

Example:
  >>> import ringdilated as rd
  >>> from ringdilated import testing
  >>> pattern = dict(segment_lengths=(8, 16), dilation_rates=(1, 2), causal=True)
  >>> q, k, v = testing.Case(16, 4, 2, 1, rd.DilatedConfig(**pattern)).inputs(seed=0)
  >>> testing.assert_matches_reference(
  ...     lambda q, k, v: rd.dilated_attention(q, k, v, **pattern), q, k, v, **pattern)
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from ._config import MODES, DilatedConfig
from ._layout import LAYOUTS
from ._validate import positive_int, positive_ints
from .reference import dilated_attention_reference

Array = jax.Array

__all__ = ["TOLERANCES", "Case", "assert_matches_reference", "configs", "tolerance"]

# Max abs error of outputs and q/k/v gradients against the float32 oracle,
# for inputs and cotangents of unit scale (standard normal), per input dtype.
# ringdilated computes every softmax in float32 and rounds only the results
# to the input dtype: low precision costs about one rounding of values of
# size ~1-4 (bf16 keeps 8 bits, fp16 11). float64 inputs still run float32
# blocks, hence float32's tolerance.
TOLERANCES = types.MappingProxyType({
    np.dtype(jnp.float32): 2e-5,
    np.dtype(jnp.float64): 2e-5,
    np.dtype(jnp.bfloat16): 3e-2,
    np.dtype(jnp.float16): 5e-3,
})


def tolerance(dtype) -> float:
  """The max abs error :data:`TOLERANCES` allows for inputs of ``dtype``.

  Args:
    dtype: a floating dtype (``jnp.bfloat16``, ``"float32"``, an array's
      ``.dtype``).

  Raises:
    ValueError: for a dtype without an entry.

  Example:
    >>> import jax.numpy as jnp
    >>> from ringdilated import testing
    >>> testing.tolerance(jnp.bfloat16)
    0.03
  """
  try:
    key = np.dtype(jnp.dtype(dtype))
  except TypeError:
    key = None
  if key not in TOLERANCES:
    names = tuple(d.name for d in TOLERANCES)
    raise ValueError(f"dtype={dtype!r} has no tolerance: use one of {names}")
  return TOLERANCES[key]


# ---------------------------------------------------------------------------
# Valid configurations.


@dataclasses.dataclass(frozen=True)
class Case:
  """Settings and the shapes and ring size they are valid for.

  Attributes:
    seq_len: ``N``, the global sequence length.
    num_heads: ``H``.
    num_kv_heads: ``K``, dividing ``H``.
    num_shards: ``P``, devices of the ring (1: one device).
    config: the settings; ``config.axis_name`` is set iff ``num_shards > 1``
      and ``config.layout`` is how the sequence lies on the ring.
  """

  seq_len: int
  num_heads: int
  num_kv_heads: int
  num_shards: int
  config: DilatedConfig

  @property
  def local_len(self) -> int:
    """``L = N / P``, tokens per device."""
    return self.seq_len // self.num_shards

  def inputs(self, seed: int = 0, *, batch: int = 1, head_dim: int = 8,
             dtype=jnp.float32) -> tuple[Array, Array, Array]:
    """Standard normal ``q`` [B, N, H, D], ``k`` and ``v`` [B, N, K, D].

    Global arrays in natural token order, from numpy's generator seeded
    with ``seed`` (deterministic, no device work but the transfer).
    """
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((batch, self.seq_len, h, head_dim)), dtype)
                 for h in (self.num_heads, self.num_kv_heads, self.num_kv_heads))


def _divisors(n: int) -> list[int]:
  return [x for x in range(1, n + 1) if n % x == 0]


def _ring_accepts(w: int, r: int, n: int, p: int, layout: str) -> bool:
  """Whether a ring of ``p`` devices in ``layout`` runs branch ``(w, r)`` of
  a sequence of ``n`` tokens (README, "Configuration rules"; ``w | n`` and
  ``r | w`` are the caller's)."""
  if p == 1:
    return True
  if layout == "contiguous":
    local = n // p
    if local % r:
      return False
    return local % w == 0 if w <= local else (w % local == 0 and p % (w // local) == 0)
  chunk = n // (2 * p)  # zigzag: device d holds half-chunks d and 2p - 1 - d
  if w <= chunk:
    return chunk % w == 0
  return w % chunk == 0 and (p % (w // chunk) == 0 or w == n) and chunk % r == 0


def configs(*, seq_lens: Sequence[int] = (64, 32),
            num_shards: Sequence[int] = (8, 4, 2, 1),
            num_heads: Sequence[int] = (4, 2),
            layouts: Sequence[str] = LAYOUTS,
            modes: Sequence[str] = MODES,
            causal: bool | None = None,
            max_branches: int = 3,
            axis_name: Hashable = "sp") -> st.SearchStrategy[Case]:
  """A hypothesis strategy of :class:`Case` values ringdilated accepts.

  Draws a sequence length, a ring size dividing it and a layout the ring
  can hold, query heads and a kv head count dividing them, a mode, and 1 to
  ``max_branches`` branches ``(w, r)`` with ``w | N``, ``r | w`` and the
  ring's rules (a segment is local or spans whole devices; zigzag: whole
  half-chunks). ``"partition"`` draws at most ``H`` branches. Every choice
  shrinks towards the first element of its argument, so the defaults put a
  ring, grouped-query heads and several branches first, and ``w = 1`` last.

  Args:
    seq_lens: ``N`` choices.
    num_shards: ``P`` choices; a pair ``(N, P)`` is drawn only if ``P | N``
      (and ``2 P | N`` for ``"zigzag"``).
    num_heads: ``H`` choices.
    layouts: ``config.layout`` choices (``P = 1`` runs either).
    modes: ``config.mode`` choices.
    causal: ``config.causal``, or None to draw it.
    max_branches: most branches per configuration.
    axis_name: ``config.axis_name`` of a ring (``P > 1``).

  Returns:
    A strategy of :class:`Case`.

  Raises:
    ValueError: for an empty or invalid choice, or no ``(N, P, layout)``
      that fits.

  Example:
    >>> from hypothesis import given, settings
    >>> from ringdilated import testing
    >>> @settings(max_examples=5, deadline=None, derandomize=True)
    ... @given(testing.configs(num_shards=(1,)))
    ... def test_segments_divide_the_sequence(case):
    ...   assert all(case.seq_len % w == 0 for w in case.config.segment_lengths)
    >>> test_segments_divide_the_sequence()
  """
  seq_lens = positive_ints("seq_lens", seq_lens)
  num_shards = positive_ints("num_shards", num_shards)
  num_heads = positive_ints("num_heads", num_heads)
  max_branches = positive_int("max_branches", max_branches)
  for name, values, options in (("layouts", layouts, LAYOUTS), ("modes", modes, MODES)):
    if isinstance(values, str) or not values or any(x not in options for x in values):
      raise ValueError(f"{name}={values!r} must be a non-empty sequence of {options}")
  if causal is not None and not isinstance(causal, bool):
    raise TypeError(f"causal={causal!r} must be a bool or None")
  for name, values in (("seq_lens", seq_lens), ("num_shards", num_shards),
                       ("num_heads", num_heads)):
    if not values:
      raise ValueError(f"{name} must not be empty")
  rings = [(n, p, layout) for n in seq_lens for p in num_shards for layout in layouts
           if n % p == 0 and (layout == "contiguous" or p == 1 or n % (2 * p) == 0)]
  if not rings:
    raise ValueError(f"no ring of num_shards={num_shards} devices holds a sequence of "
                     f"seq_lens={seq_lens} tokens in layouts={tuple(layouts)}")

  @st.composite
  def draw_case(draw) -> Case:
    n, p, layout = draw(st.sampled_from(rings))
    h = draw(st.sampled_from(num_heads))
    hkv = draw(st.sampled_from(_divisors(h)[1:] + [1]))  # K = 1 last
    mode = draw(st.sampled_from(modes))
    most = max_branches if mode == "mix" else min(max_branches, h)
    branches = []
    for _ in range(draw(st.sampled_from(range(most, 0, -1)))):
      w = draw(st.sampled_from([w for w in reversed(_divisors(n)) if any(
          _ring_accepts(w, r, n, p, layout) for r in _divisors(w))]))
      r = draw(st.sampled_from([r for r in _divisors(w)
                                if _ring_accepts(w, r, n, p, layout)]))
      branches.append((w, r))
    ws, rs = (tuple(x) for x in zip(*branches))
    is_causal = draw(st.booleans()) if causal is None else causal
    config = DilatedConfig(ws, rs, mode, is_causal, layout=layout,
                           axis_name=axis_name if p > 1 else None)
    return Case(n, h, hkv, p, config)

  return draw_case()


# ---------------------------------------------------------------------------
# The oracle comparison.

_NAMES = ("out", "dq", "dk", "dv")


def _out_and_grads(fn, q, k, v, cot, grads):
  """``(out,)`` or ``(out, dq, dk, dv)`` of ``sum(out * cot)``."""
  if not grads:
    return (fn(q, k, v),)

  def loss(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * cot), out

  dqkv, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return (out,) + dqkv


def _describe(name: str, got: np.ndarray, want: np.ndarray, atol: float,
              rtol: float) -> str | None:
  """Why ``got`` is not close to ``want`` (float64 arrays), or None."""
  if got.shape != want.shape:
    return f"{name}: shape {got.shape}, want {want.shape}"
  bad = ~(np.abs(got - want) <= atol + rtol * np.abs(want))  # NaN counts as bad
  if not bad.any():
    return None
  finite = np.isfinite(got)
  if not finite.all():
    where = tuple(int(i) for i in np.argwhere(~finite)[0])
    return f"{name}: {int((~finite).sum())} non-finite values, first at {where}"
  err = np.abs(got - want)
  where = np.unravel_index(np.argmax(err), err.shape)
  return (f"{name}: max |got - want| = {err[where]:.3g} at {tuple(int(i) for i in where)} "
          f"(got {got[where]:.6g}, want {want[where]:.6g}); {int(bad.sum())} of "
          f"{bad.size} values out of tolerance")


def assert_matches_reference(
    attention_fn: Callable[[Array, Array, Array], Array],
    q: Array,
    k: Array,
    v: Array,
    *,
    config: DilatedConfig | None = None,
    segment_lengths: Sequence[int] | None = None,
    dilation_rates: Sequence[int] | None = None,
    mode: str = "mix",
    causal: bool = False,
    softmax_scale: float | None = None,
    key_padding_mask: Array | None = None,
    segment_ids: Array | None = None,
    grads: bool = True,
    atol: float | None = None,
    rtol: float = 0.0,
    compiler_options: dict[str, Any] | None = None,
) -> None:
  """Asserts ``attention_fn`` computes dilated attention, values and gradients.

  Compares ``attention_fn(q, k, v)`` and its q/k/v gradients (of
  ``sum(out * cot)``, a fixed standard normal ``cot``) with
  :func:`ringdilated.reference.dilated_attention_reference` of the same
  pattern, run in float32 on the same values (low-precision inputs are
  upcast; float64 stays float64 under x64). Both run under one ``jax.jit``.

  ``attention_fn`` takes and returns global arrays in natural token order:
  wrap a ring (``jax.shard_map``, ``rd.to_layout`` / ``rd.from_layout``) or
  a model inside it, and close over the masks it applies; the masks given
  here are for the oracle only.

  Args:
    attention_fn: ``(q, k, v) -> out``, shape [B, N, H, D].
    q: shape [B, N, H, D].
    k, v: shape [B, N, K, D].
    config: the pattern as settings: its segment lengths, rates, mode,
      causality and softmax scale are read (layout, axis name and backend
      are ``attention_fn``'s business). Exclusive with ``segment_lengths``.
    segment_lengths, dilation_rates, mode, causal, softmax_scale: the
      pattern as :func:`ringdilated.dilated_attention` takes it.
    key_padding_mask: shape [B, N] bool, or None.
    segment_ids: shape [B, N] int, or None.
    grads: compare the gradients too (else only the output).
    atol: max abs error; default :func:`tolerance` of ``q.dtype``.
    rtol: error allowed relative to the oracle's value, added to ``atol``.
    compiler_options: of the ``jax.jit``, e.g.
      ``{"xla_backend_optimization_level": 0}`` (compiles about twice as
      fast on CPU, where compiling dominates small tests).

  Raises:
    AssertionError: naming each of ``out``, ``dq``, ``dk``, ``dv`` that
      differs, with its max error, where, and the values there (or its
      non-finite values), or an output shape or dtype other than ``q``'s.
    ValueError: for no pattern or two, or settings the oracle cannot
      mirror (dropout; ``detach_weights`` in ``"mix"`` mode with ``grads``).

  Example:
    >>> import jax, ringdilated as rd
    >>> from ringdilated import testing
    >>> q, k, v = testing.Case(16, 2, 2, 1, rd.DilatedConfig((16,), (1,))).inputs()
    >>> testing.assert_matches_reference(
    ...     lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
    ...     q, k, v, segment_lengths=(16,), dilation_rates=(1,), causal=True)
  """
  if (config is None) == (segment_lengths is None):
    raise ValueError("give the pattern either as config= or as segment_lengths= and "
                     f"dilation_rates=, not {'both' if config is not None else 'neither'}")
  if config is None:
    config = DilatedConfig(segment_lengths, dilation_rates, mode, causal,
                           softmax_scale=softmax_scale)
  elif not isinstance(config, DilatedConfig):
    raise TypeError(f"config={config!r} must be a ringdilated.DilatedConfig")
  if config.dropout_rate > 0:
    raise ValueError(f"config.dropout_rate={config.dropout_rate}: the oracle has no "
                     "dropout; compare without it")
  if grads and config.detach_weights and config.mode == "mix":
    raise ValueError("config.detach_weights=True changes the gradient the oracle "
                     "computes exactly: pass grads=False")
  atol = tolerance(q.dtype) if atol is None else float(atol)
  pattern = dict(segment_lengths=config.segment_lengths,
                 dilation_rates=config.dilation_rates, mode=config.mode,
                 causal=config.causal, softmax_scale=config.softmax_scale)
  out_shape = jax.eval_shape(attention_fn, q, k, v).shape
  if out_shape != q.shape:
    raise AssertionError(f"attention_fn returned shape {out_shape}, want q's {q.shape}")
  cot = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape), jnp.float32)
  wide = jnp.float64 if q.dtype == jnp.float64 else jnp.float32

  def oracle(q, k, v):
    return dilated_attention_reference(
        q, k, v, key_padding_mask=key_padding_mask, segment_ids=segment_ids, **pattern)

  @functools.partial(jax.jit, compiler_options=compiler_options)
  def both(q, k, v, cot):
    return (_out_and_grads(attention_fn, q, k, v, cot, grads),
            _out_and_grads(oracle, *(x.astype(wide) for x in (q, k, v)), cot, grads))

  got, want = both(q, k, v, cot)
  as64 = lambda x: np.asarray(x).astype(np.float64)  # noqa: E731
  problems = [p for p in (_describe(name, as64(g), as64(w), atol, rtol)
                          for name, g, w in zip(_NAMES, got, want)) if p]
  if got[0].dtype != q.dtype:
    problems.insert(0, f"out: dtype {got[0].dtype}, want q's dtype {q.dtype}")
  if problems:
    raise AssertionError(
        f"attention_fn differs from dilated_attention_reference (atol={atol:g}, "
        f"rtol={rtol:g}, pattern {pattern}):\n  " + "\n  ".join(problems))
