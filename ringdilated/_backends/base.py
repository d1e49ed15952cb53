"""The block protocol every backend implements, and the data blocks share.

A *block* is attention of one query chunk against one key chunk. A backend
computes it forward, ``(q, k, v, visibility) -> (out, lse)`` with ``lse`` in
float32, and backward, ``-> (dq, dk, dv)``, fed the *merged* output and
log-sum-exp of the whole softmax (``_merge``), so a block never keeps
residuals of its own. Which keys a query sees is data (:class:`Visibility`),
and so is dropout (:class:`Dropout`, a hash of global identities): every
backend masks and drops the same weights.

A backend may also read a whole local branch in place (``in_place``): the
positions a branch keeps are a strided window of the ``[B, L / r, r, H, D]``
view of ``[B, L, H, D]`` (:class:`StridedBranch`), merged into the running
``(out, lse)`` and added into ``(dq, dk, dv)`` without compacted copies.

Shape legend: X batch-like (batch times segments), T query tokens,
S key tokens, K kv heads, G query heads per kv head, D head dim; for strided
branches B batch, L local length, H query heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Visibility(NamedTuple):
  """Which key of a block each query may see.

  Attributes:
    kv_valid: shape [X, S, K] bool, False for padding keys, or None.
    q_seg: shape [X, T, K] int, segment id of each query, or None.
    kv_seg: shape [X, S, K] int, segment id of each key (None iff q_seg is).
    diagonal: query ``t`` sees only keys ``s <= t`` (a causal diagonal block:
      query and key chunks hold the same positions).
  """

  kv_valid: Array | None
  q_seg: Array | None
  kv_seg: Array | None
  diagonal: bool

  @property
  def has_arrays(self) -> bool:
    return self.kv_valid is not None or self.q_seg is not None


class Dropout(NamedTuple):
  """Attention dropout of a block, a function of global identities only.

  Whether the weight of (head, query position, key position) is dropped is a
  hash of those three numbers and ``seed``: the same in the forward and the
  backward, and the same whichever blocks (one device, any ring, any layout)
  the attention is cut into.

  Attributes:
    rate: probability of dropping a weight.
    seed: uint32 scalar.
    heads: shape [K, G] int, the global query head of each slot.
    q_pos: shape [X, T, K] int, global position of each query.
    k_pos: shape [X, S, K] int, global position of each key.
  """

  rate: float
  seed: Array
  heads: Array
  q_pos: Array
  k_pos: Array


def hash32(h: Array) -> Array:
  """A 32-bit integer hash finalizer (xor-shift-multiply), elementwise."""
  h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
  h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def keep_threshold(rate: float) -> int:
  """A weight is kept iff its uint32 hash is below this even number (even,
  so kernels can compare ``hash >> 1`` with ``threshold >> 1`` in int32)."""
  return min(int((1.0 - rate) * 2.0**32), 2**32 - 2) // 2 * 2


KEY_SALT = 0x2545F491  # seeds the keys' hashes apart from the queries'
MIX = 0x9E3779B1  # odd, so x -> x * MIX (mod 2**32) is a bijection


def keep_mask(dropout: Dropout | None) -> Array | None:
  """shape [X, K, G, T, S] bool keep mask, or None without dropout.

  Weight (head, query q, key k) is kept iff ``((row ^ col) * MIX) mod 2**32``
  is below :func:`keep_threshold`, with ``row = hash32(hash32(seed ^ head) ^
  q)`` and ``col = hash32(hash32(seed ^ KEY_SALT) ^ k)``: full hashes per
  row and per key, and one multiply per weight (what a kernel pays per
  weight). ``row ^ col`` is uniform, so each weight is kept with
  probability ``1 - rate`` exactly up to the threshold's rounding.
  """
  if dropout is None:
    return None
  u32 = lambda x: jnp.asarray(x).astype(jnp.uint32)  # noqa: E731
  seed = u32(dropout.seed)
  rows = hash32(hash32(seed ^ u32(dropout.heads)[None, :, :, None, None])
                ^ u32(jnp.moveaxis(dropout.q_pos, 1, 2))[:, :, None, :, None])
  cols = hash32(hash32(seed ^ jnp.uint32(KEY_SALT))
                ^ u32(jnp.moveaxis(dropout.k_pos, 1, 2))[:, :, None, None, :])
  return (rows ^ cols) * jnp.uint32(MIX) < jnp.uint32(keep_threshold(dropout.rate))


@dataclasses.dataclass(frozen=True)
class StridedBranch:
  """A local branch as a backend reads it in place; hashable (static).

  Attributes:
    kept: ``T``, kept tokens per segment (a segment's keys are one window).
    rate: ``r``.
    heads: query heads ``[start, stop)`` of the branch, whole GQA groups.
    group: ``G``, query heads per kv head.
    offset: kept position mod ``r`` of every head, or None for ``kv head mod
      r`` (``"mix"`` mode).
    causal: causal within each segment.
    scale: logit scale.
    alone: no other branch reads its query or kv heads (``"partition"``
      mode, or one branch) and the backend writes whole heads
      (:class:`Capabilities`): the branch then *writes* every row of its heads
      in ``(out, lse)`` and ``(dq, dk, dv)`` (its result at the positions it
      keeps, 0 and ``-inf`` at the others) instead of merging or adding, so
      nothing needs zeroing first.
  """

  kept: int
  rate: int
  heads: tuple[int, int]
  group: int
  offset: int | None
  causal: bool
  scale: float
  alone: bool = False

  def off(self, kv_head):
    return kv_head % self.rate if self.offset is None else self.offset


@dataclasses.dataclass(frozen=True)
class Request:
  """What one call needs of a backend, known at trace time.

  Attributes:
    platform: ``jax.default_backend()``.
    dtype: dtype of ``q, k, v``.
    head_dim: ``D``.
    masks: a key padding mask or segment ids are given.
    dropout: dropout is applied.
    dense: the call is plain attention (one branch of rate 1).
  """

  platform: str
  dtype: np.dtype
  head_dim: int
  masks: bool
  dropout: bool
  dense: bool = False


@dataclasses.dataclass(frozen=True)
class Capabilities:
  """What a backend can do; selection reads these, never names.

  Attributes:
    platforms: where it runs natively (empty: everywhere).
    interpret: elsewhere it can run in an interpreter (exact, slow; tests).
    masks: blocks take key padding and segment ids.
    dropout: blocks take :class:`Dropout`.
    in_place: ``branch_forward`` / ``branch_backward`` read local branches
      in place (:class:`StridedBranch`).
    whole_heads: its in-place kernels write every row of a branch's heads
      natively, so branches that share no heads are marked ``alone`` and
      nothing is zeroed for them; kernels that merge would have to clear
      those heads first, writing them twice.
  """

  platforms: tuple[str, ...] = ()
  interpret: bool = False
  masks: bool = False
  dropout: bool = False
  in_place: bool = False
  whole_heads: bool = False


@dataclasses.dataclass(frozen=True)
class Backend:
  """Base of every backend: a hashable value (a static argument).

  Subclasses set ``name`` and ``capabilities`` and implement :meth:`forward`
  and :meth:`backward`; optional :meth:`problem` and :meth:`block_problem`
  refuse what they cannot run, and ``in_place`` backends implement
  :meth:`branch_forward` and :meth:`branch_backward`. Settings of a backend
  (tile sizes, say) are dataclass fields, so a tuned copy is a value:
  ``dataclasses.replace(backend, tiles=...)``.

  Attributes:
    interpret: run in interpret mode (set by selection off its platforms).
  """

  name: ClassVar[str] = "abstract"
  capabilities: ClassVar[Capabilities] = Capabilities()
  interpret: bool = False

  def problem(self, request: Request) -> str | None:
    """Why this backend can't run ``request`` beyond its capabilities, or None."""
    del request
    return None

  def auto_problem(self, request: Request, runs: Callable[[str], bool]) -> str | None:
    """Why ``backend="auto"`` should pass this backend over for ``request``
    although it can run it, or None: another that ``runs(name)`` says runs
    ``request`` natively is measured faster."""
    del request, runs
    return None

  def block_problem(self, kept: int) -> str | None:
    """Why a block of ``kept`` query and key tokens needs the portable block."""
    del kept
    return None

  def forward(self, q: Array, k: Array, v: Array, vis: Visibility, *, scale: float,
              dropout: Dropout | None = None) -> tuple[Array, Array]:
    """One block forward.

    Args:
      q: shape [X, T, K, G, D].
      k: shape [X, S, K, D].
      v: shape [X, S, K, D].
      vis: which keys each query sees.
      scale: logit scale.
      dropout: :class:`Dropout` of attention probabilities, or None.

    Returns:
      ``out`` shape [X, T, K, G, D] (0 for a row with no visible key) and
      ``lse`` shape [X, T, K, G] float32 (``-inf`` for such a row).
    """
    raise NotImplementedError

  def backward(self, q: Array, k: Array, v: Array, vis: Visibility, dout: Array,
               out: Array, lse: Array, *, scale: float,
               dropout: Dropout | None = None) -> tuple[Array, Array, Array]:
    """Gradients of one block given the **global** softmax statistics.

    Args:
      q, k, v, vis, scale, dropout: as in :meth:`forward`.
      dout: shape [X, T, K, G, D], cotangent of the global output.
      out: shape [X, T, K, G, D], the global output of the query rows.
      lse: shape [X, T, K, G] float32, global log-sum-exp of the query rows.

    Returns:
      ``dq`` [X, T, K, G, D], ``dk`` and ``dv`` [X, S, K, D].
    """
    raise NotImplementedError

  def branch_forward(self, branch: StridedBranch, q: Array, k: Array, v: Array,
                     vis: Visibility, dropout: Dropout | None, out: Array,
                     lse: Array) -> tuple[Array, Array]:
    """Merges a local branch into ``(out, lse)`` in place (``in_place`` only).

    Args:
      branch: the branch.
      q: shape [B, L, H, D].
      k, v: shape [B, L, K, D].
      vis: token vectors of the whole local sequence, each shape [B, L]
        (``kv_valid``, ``q_seg`` and ``kv_seg``, or None); ``diagonal`` is
        the branch's causality.
      dropout: with ``q_pos`` and ``k_pos`` shape [B, L] and ``heads`` the
        branch's global query heads, or None.
      out: shape [B, L, H, D], running output (0 where nothing merged yet),
        or None (with ``lse``) for new ones: for a branch keeping every
        position of every head, or an ``alone`` one (the heads of other
        branches are then undefined until those write them).
      lse: shape [B, L, H] float32, running log-sum-exp (``-inf`` likewise).

    Returns:
      The updated ``(out, lse)``; heads the branch does not read are
      unchanged, and so are its positions it does not keep unless it is
      ``alone`` (then they hold 0 and ``-inf``).
    """
    raise NotImplementedError

  def branch_backward(self, branch: StridedBranch, q: Array, k: Array, v: Array,
                      vis: Visibility, dropout: Dropout | None, dout: Array,
                      lse: Array, out: Array, grads: tuple[Array, Array, Array],
                      delta: Array | None = None
                      ) -> tuple[tuple[Array, Array, Array], Array | None]:
    """Adds a local branch's gradients into ``grads = (dq, dk, dv)`` in place.

    Args:
      branch, vis, dropout: as in :meth:`branch_forward`.
      q, dout: shape [B, L, H, D].
      k, v: shape [B, L, K, D].
      lse: shape [B, L, H] float32, the global log-sum-exp.
      out: shape [B, L, H, D], the global output (``delta = rowsum(dout *
        out)`` is the backend's to form: a kernel can do it in passing).
      grads: accumulators shaped like ``q, k, v``, or None for new ones
        (as ``out`` in :meth:`branch_forward`); an ``alone`` branch writes
        its heads' rows (0 at the positions it does not keep).
      delta: shape [B, L, H] float32, ``rowsum(dout * out)`` as an earlier
        call returned it, or None.

    Returns:
      The updated gradients, and ``delta`` of every row and head if known
      (to pass to the next call: a caller whose later calls need not read
      ``out`` lets it go), else None.
    """
    raise NotImplementedError
