"""The ring loop and the ``custom_vjp`` that runs every branch of a plan.

For each branch, every device compacts its local tensors to the positions
the branch keeps (:mod:`._compact`), attends its own chunk, then -- when a
segment spans ``g > 1`` devices -- passes its compacted K/V chunk around the
sub-ring of the ``g`` devices of its segment with ``jax.lax.ppermute``,
visiting the blocks :func:`._schedule.visible_pairs` names. Each visit is a
block of one global softmax, merged in float32 with :func:`._merge.merge`.

The backward pass recomputes every block from the saved local ``q, k, v``
and the global ``(out, lse)``; the K/V chunks travel again, together with
their ``dK/dV`` accumulators, which after ``g`` hops are back on their
owner. Nothing is saved per ring step, so memory does not grow with the
ring size. With ``axis_name=None`` the same code runs on one device (every
``g`` is 1).

A causal segment over two devices whose chunks lie in device order is
balanced by :func:`_pair` (half the later chunk's queries visit the earlier
device), over more devices by swapping halves into the zigzag order
(:func:`_regroup`).

A backend with the ``in_place`` capability reads local branches (``g = 1``)
and a ring's own (diagonal) blocks without compaction: it merges into
``(out, lse)`` and adds into ``(dq, dk, dv)`` of the whole arrays
(:func:`_split` decides which).

Shape legend: B batch, L local sequence length, H query heads, K kv heads,
D head dim; per branch X = B * pieces, T kept tokens per piece, K_b kv slots,
G_b query heads per slot.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _backends
from ._backends import Backend, StridedBranch
from ._compact import (add_kv, add_q, compact_kv, compact_q, compact_token, distinct_kv,
                       expand_q, update_q)
from ._layout import global_positions
from ._merge import merge, unmerged
from ._plan import Branch, Plan
from ._schedule import (pair_permutations, regroup_permutations, ring_permutation,
                        visible_pairs)

Array = jax.Array

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything static about one call: the ``nondiff`` argument of the vjp.

  Attributes:
    plan: the branches in local terms.
    scale: logit scale.
    dropout_rate: probability of dropping a weight (used iff a key is given).
    axis_name: the ring's mesh axis, or None.
    backend: the selected block backend.
    detach_weights: ``"mix"`` branch weights are constants in the gradient.
  """

  plan: Plan
  scale: float
  dropout_rate: float
  axis_name: Hashable | None
  backend: Backend = dataclasses.field(default_factory=_backends.portable)
  detach_weights: bool = False


class Queries(NamedTuple):
  """The query side of a branch's blocks; it stays on its device.

  ``dout, out, lse`` (the cotangent and the global output and log-sum-exp)
  are set in the backward only.
  """

  q: Array                   # [X, T, K_b, G_b, D]
  seg: Array | None          # [X, T, K_b] segment ids
  pos: Array | None          # [X, T, K_b] global positions (dropout)
  dout: Array | None = None  # [X, T, K_b, G_b, D]
  out: Array | None = None   # [X, T, K_b, G_b, D]
  lse: Array | None = None   # [X, T, K_b, G_b] float32


class Chunk(NamedTuple):
  """The key side of a branch's blocks: the chunk that travels the ring."""

  k: Array                   # [X, S, K_b, D]
  v: Array                   # [X, S, K_b, D]
  valid: Array | None        # [X, S, K_b] bool key padding
  seg: Array | None          # [X, S, K_b] segment ids
  pos: Array | None          # [X, S, K_b] global positions (dropout)


Half = Any  # None (the whole chunk), 0, 1, or a traced 0/1


# ----------------------------------------------------------------------------
# Halves of zigzag chunks.
# ----------------------------------------------------------------------------


def _half(x: Array, i: Half, half: int) -> Array:
  """Local half ``i`` of compacted [X, T, ...]; all if None."""
  if i is None:
    return x
  x = x.reshape(-1, 2, half, *x.shape[2:])
  if isinstance(i, (bool, int, np.integer, np.bool_)):
    return x[:, int(i)]
  return jax.lax.dynamic_index_in_dim(x, i.astype(jnp.int32), 1, keepdims=False)


def _put_half(x: Array, i: Half, half: int, value: Array) -> Array:
  view = x.reshape(-1, 2, half, *x.shape[2:])
  if isinstance(i, (bool, int, np.integer, np.bool_)):
    view = view.at[:, int(i)].set(value)
  else:
    view = jax.lax.dynamic_update_index_in_dim(view, value, i.astype(jnp.int32), 1)
  return view.reshape(x.shape)


def _at(tree: Any, i: Half, half: int) -> Any:
  return jax.tree.map(lambda x: _half(x, i, half), tree)


def _with(tree: Any, i: Half, half: int, fn: Callable[[Any], Any]) -> Any:
  """``tree`` with local half ``i`` (all if None) replaced by ``fn`` of it."""
  if i is None:
    return fn(tree)
  return jax.tree.map(lambda x, y: _put_half(x, i, half, y), tree, fn(_at(tree, i, half)))


def _regroup(static: Static, br: Branch, tree: Any, back: bool = False) -> Any:
  """Every [X, T, ...] leaf of ``tree`` moved from the contiguous order to
  the zigzag one among the devices of its segment (``back``: the reverse),
  see :func:`._schedule.regroup_permutations`. Position ``c`` receives
  half-chunk ``c`` by the first permutation if ``c`` is even, else by the
  second, and ``2g - 1 - c`` by the other."""
  leaves, treedef = jax.tree.flatten(tree)
  if not leaves:
    return tree
  firsts, seconds = regroup_permutations(br.ring_size, static.plan.num_shards)
  odd = jax.lax.axis_index(static.axis_name) % br.ring_size % 2 == 1
  views = [x.reshape(-1, 2, br.half, *x.shape[2:]) for x in leaves]
  a, b = [v[:, 0] for v in views], [v[:, 1] for v in views]

  def unswap(a, b):  # slots <-> (arrived by firsts, arrived by seconds)
    return ([jnp.where(odd, y, x) for x, y in zip(a, b)],
            [jnp.where(odd, x, y) for x, y in zip(a, b)])

  def send(xs, perm):
    return jax.lax.ppermute(xs, static.axis_name, [(j, i) for i, j in perm] if back else perm)

  if back:
    a, b = unswap(a, b)
  a, b = send(a, firsts), send(b, seconds)
  if not back:
    a, b = unswap(a, b)
  return jax.tree.unflatten(treedef, [jnp.stack([x, y], 1).reshape(leaf.shape)
                                     for x, y, leaf in zip(a, b, leaves)])


# ----------------------------------------------------------------------------
# One branch: its blocks, the own chunk and the sub-ring.
# ----------------------------------------------------------------------------


def _blocks(static: Static, br: Branch) -> Backend:
  """The backend of ``br``'s blocks: the selected one, or the portable block
  for block sizes it cannot take (whole chunks and zigzag half-chunks)."""
  backend = static.backend
  if backend.block_problem(br.kept) or backend.block_problem(br.half):
    return _backends.portable()
  return backend


def _dropout(static: Static, rng: Array | None, br: Branch, q_pos: Array | None,
             k_pos: Array | None) -> _backends.Dropout | None:
  """Dropout of a block of ``br`` (see :class:`_backends.Dropout`), or None."""
  if rng is None:
    return None
  seed = jax.random.bits(jax.random.fold_in(rng, br.index), (), jnp.uint32)
  heads = np.arange(*br.q_heads).reshape(br.num_kv, br.group)
  return _backends.Dropout(static.dropout_rate, seed, heads, q_pos, k_pos)


def _f32(arrays: tuple[Array, ...]) -> tuple[Array, ...]:
  return tuple(x.astype(_F32) for x in arrays)


class Fold(NamedTuple):
  """How block results gather, in the forward (``(out, lse)``) and the
  backward (``(dq, dk, dv)``) alike: a result splits into a query part, which
  stays with the queries, and a key part, which belongs to the K/V chunk."""

  split: Callable[[tuple], tuple[Any, Any]]   # result -> (query part, key part)
  to_queries: Callable[[Any, Any, Half], Any]  # (local, query part, q_half) -> local
  to_keys: Callable[[Any, Any, Half], Any]     # (acc, key part, kv_half) -> acc
  empty: Callable[[Queries, Chunk], tuple]     # the result of a block of no keys


def _own(block: Callable[[Queries, Chunk, bool], tuple], fold: Fold, queries: Queries,
         travel: Chunk, causal: bool, in_place: bool) -> tuple:
  """``(local, acc)`` of the own (diagonal) block in float32; empty if the
  backend reads it in place."""
  own = fold.empty(queries, travel) if in_place else block(queries, travel, causal)
  return fold.split(_f32(own))


def _ring(static: Static, br: Branch, block: Callable[[Queries, Chunk, bool], tuple],
          fold: Fold, queries: Queries, travel: Chunk, own_in_place: bool) -> tuple:
  """Runs the blocks of one branch: the own chunk, then the sub-ring.

  Args:
    static, br: the call and the branch.
    block: ``(queries, chunk, diagonal) -> result``, the block of ``queries``
      against ``chunk``.
    fold: how results gather into ``(local, acc)``.
    queries: the query side (it stays on the device).
    travel: the local K/V chunk (with its token vectors).
    own_in_place: the own (diagonal) block is read in place by the backend
      (see :func:`_split`), so the ring starts from :attr:`Fold.empty`.

  Returns:
    ``(local, acc)``: the query part of the local queries and the key part
    of the local chunk (``acc`` travels with the chunk it belongs to and ends
    on its owner); on a ring, float32 whatever the backend returns, so the
    error does not grow with the number of steps.
  """
  causal = static.plan.config.causal
  if br.ring_size == 1:
    return fold.split(block(queries, travel, causal))
  if br.regroup and not br.swaps_halves:
    return _pair(static, br, block, fold, queries, travel, own_in_place)
  if br.swaps_halves:
    queries, travel = _regroup(static, br, (queries, travel))
  g = br.ring_size
  c = jax.lax.axis_index(static.axis_name) % g
  rotate = functools.partial(jax.lax.ppermute, axis_name=static.axis_name,
                             perm=ring_permutation(g, static.plan.num_shards))
  local, acc = _own(block, fold, queries, travel, causal, own_in_place)

  def step(s, kv: Chunk, local, acc):
    # step s: this device holds the chunk of group position (c - s) mod g.
    src = (c - s) % g
    for qi, ki, when in visible_pairs(br, causal, c, src):
      def visit(local, acc, qi=qi, ki=ki):
        q_part, k_part = fold.split(_f32(block(_at(queries, qi, br.half), _at(kv, ki, br.half),
                                               False)))
        return fold.to_queries(local, q_part, qi), fold.to_keys(acc, k_part, ki)
      if when is True:
        local, acc = visit(local, acc)
      else:
        local, acc = jax.lax.cond(when, visit, lambda *a: a, local, acc)
    return local, rotate(acc) if acc else acc

  def body(carry, s):
    kv, local, acc = carry
    nxt = rotate(kv)  # in flight while this step computes
    local, acc = step(s, kv, local, acc)
    return (nxt, local, acc), None

  kv, acc = rotate((travel, acc)) if acc else (rotate(travel), acc)
  if g > 2:  # a ring of 2 has no steps between its first and last
    (kv, local, acc), _ = jax.lax.scan(body, (kv, local, acc), jnp.arange(1, g - 1))
  local, acc = step(g - 1, kv, local, acc)
  return _regroup(static, br, (local, acc), back=True) if br.swaps_halves else (local, acc)


def _pair(static: Static, br: Branch, block: Callable[[Queries, Chunk, bool], tuple],
          fold: Fold, queries: Queries, travel: Chunk, own_in_place: bool) -> tuple:
  """A causal segment over two devices with contiguous chunks, balanced
  without swapping halves.

  Device 1 (the later chunk) sees all of device 0's keys: a block of twice
  the diagonal's work. Device 1 sends the first half of its query side to
  device 0, which attends it to its own chunk, while device 1 attends its
  second half to device 0's chunk, which travels the other way; then each
  part of a result goes home: the query part of device 0's block to device
  1, the key part of device 1's block to device 0. Each device does the
  zigzag ring's work (a diagonal block, one half-by-whole block), and the
  own chunks never move, so the diagonal blocks can be read in place.
  """
  axis = static.axis_name
  later = jax.lax.axis_index(axis) % 2 == 1
  up, down = pair_permutations(static.plan.num_shards)  # 0 -> 1, 1 -> 0

  def pick(if_later, if_earlier):
    return jax.tree.map(lambda x, y: jnp.where(later, x, y), if_later, if_earlier)

  local, acc = _own(block, fold, queries, travel, True, own_in_place)
  visitors = jax.lax.ppermute(_at(queries, 0, br.half), axis, down)
  chunk = jax.lax.ppermute(travel, axis, up)
  queries, kv = pick(_at(queries, 1, br.half), visitors), pick(chunk, travel)
  # Two square blocks, one per half of the chunk (what the kernels take).
  q_part, k_part = None, fold.split(fold.empty(queries, kv))[1]
  for ki in (0, 1):
    q_half, k_half = fold.split(_f32(block(queries, _at(kv, ki, br.half), False)))
    q_part = q_half if q_part is None else fold.to_queries(q_part, q_half, None)
    k_part = fold.to_keys(k_part, k_half, ki)
  q_home = jax.lax.ppermute(q_part, axis, up)
  k_home = jax.lax.ppermute(k_part, axis, down) if k_part else k_part
  local = pick(fold.to_queries(fold.to_queries(local, q_home, 0), q_part, 1), local)
  acc = pick(acc, fold.to_keys(fold.to_keys(acc, k_part, None), k_home, None))
  return local, acc


def _branch_forward(static: Static, br: Branch, rng: Array | None, queries: Queries,
                    travel: Chunk, own_in_place: bool = False) -> tuple[Array, Array]:
  """Forward of one branch: (out, lse) for the local compacted queries
  (without the own block's keys if ``own_in_place``)."""
  blocks = _blocks(static, br)

  def block(queries: Queries, kv: Chunk, diagonal: bool):
    vis = _backends.Visibility(kv.valid, queries.seg, kv.seg, diagonal)
    return blocks.forward(queries.q, kv.k, kv.v, vis, scale=static.scale,
                          dropout=_dropout(static, rng, br, queries.pos, kv.pos))

  fold = Fold(
      split=lambda res: (res, ()),
      to_queries=lambda out_lse, res, qi: _with(out_lse, qi, br.half,
                                                lambda cur: merge(*cur, *res)),
      to_keys=lambda acc, part, ki: acc,
      empty=lambda queries, _: unmerged(queries.q, _F32))
  return _ring(static, br, block, fold, queries, travel, own_in_place)[0]


def _branch_backward(static: Static, br: Branch, rng: Array | None, queries: Queries,
                     travel: Chunk, own_in_place: bool = False
                     ) -> tuple[Array, Array, Array]:
  """Backward of one branch: (dq, dk, dv) of the compacted local tensors
  (without the own block's if ``own_in_place``); ``queries`` carries
  ``dout, out, lse``."""
  blocks = _blocks(static, br)

  def block(queries: Queries, kv: Chunk, diagonal: bool):
    vis = _backends.Visibility(kv.valid, queries.seg, kv.seg, diagonal)
    return blocks.backward(queries.q, kv.k, kv.v, vis, queries.dout, queries.out,
                           queries.lse, scale=static.scale,
                           dropout=_dropout(static, rng, br, queries.pos, kv.pos))

  # dQ stays with the queries; dK/dV accumulators travel with their K/V chunk.
  fold = Fold(
      split=lambda res: (res[0], res[1:]),
      to_queries=lambda dq, part, qi: _with(dq, qi, br.half, lambda cur: cur + part),
      to_keys=lambda dkv, part, ki: _with(dkv, ki, br.half,
                                          lambda cur: (cur[0] + part[0], cur[1] + part[1])),
      empty=lambda queries, kv: (jnp.zeros_like(queries.q, _F32),
                                 jnp.zeros_like(kv.k, _F32), jnp.zeros_like(kv.v, _F32)))
  dq, (dk, dv) = _ring(static, br, block, fold, queries, travel, own_in_place)
  return dq, dk, dv


# ----------------------------------------------------------------------------
# All branches, one softmax, one custom_vjp.
# ----------------------------------------------------------------------------


class Tokens(NamedTuple):
  """Per-token vectors of the local sequence, each shape [B, L] or None."""

  valid: Array | None   # key padding mask, True for real tokens
  seg: Array | None     # segment ids
  pos: Array | None     # global positions (for dropout)


def _compact(br: Branch, q: Array, k: Array, v: Array,
             tokens: Tokens) -> tuple[Queries, Chunk]:
  """The branch's compacted query side and travelling K/V chunk."""
  seg, pos = compact_token(br, tokens.seg), compact_token(br, tokens.pos)
  chunk = Chunk(compact_kv(br, k), compact_kv(br, v), compact_token(br, tokens.valid),
                seg, pos)
  return Queries(compact_q(br, q), seg, pos), chunk


def _needs_own_output(static: Static, br: Branch) -> bool:
  """With detached mix weights O = sum_i w_i O_i and the w_i constant, branch
  i's block gradients are the usual ones fed the global lse (P = w_i P_i) but
  the branch's own output O_i in rowsum(dO * O): the backward recomputes it
  when other branches share ``br``'s heads."""
  return static.detach_weights and sum(
      b.q_heads == br.q_heads for b in static.plan.branches) > 1


def _strided(static: Static, br: Branch) -> StridedBranch | None:
  """``br``'s local blocks as the backend reads them in place, or None for
  the generic path.

  In place: a branch whose kv slots are whole GQA groups with the offsets of
  ``"mix"`` (kv head mod r) or one offset (``"partition"``), under a backend
  with that capability and a tile for its pieces. For a local branch that is
  all of it; for a ring, the own (diagonal) block of each piece, unless the
  ring swaps halves of its chunks first (causal, contiguous, ``g > 2``).
  """
  backend = static.backend
  if not backend.capabilities.in_place or br.swaps_halves:
    return None
  if _needs_own_output(static, br) or backend.block_problem(br.kept) is not None:
    return None
  if br.group != static.plan.group:
    return None
  if len(set(br.offsets)) == 1:
    offset = br.offsets[0]
  elif br.offsets == tuple(kv % br.rate for kv in br.kv_heads):
    offset = None
  else:
    return None
  alone = backend.capabilities.whole_heads and br.ring_size == 1 and not any(
      set(range(*b.q_heads)) & set(range(*br.q_heads)) or set(b.kv_heads) & set(br.kv_heads)
      for b in static.plan.branches if b is not br)
  return StridedBranch(kept=br.kept, rate=br.rate, heads=br.q_heads, group=br.group,
                       offset=offset, causal=static.plan.config.causal,
                       scale=static.scale, alone=alone)


def _starts_new(strided: list[tuple[Branch, StridedBranch]], generic: list, q: Array) -> bool:
  """Whether the in-place branches write every element of the outputs and
  gradients, so that they start as the first branch's new ones (None)
  instead of zeros: the first branch keeps every position of every query
  head (rate 1, all heads), or every branch is ``alone`` (``"partition"``
  mode: each writes all rows of its heads). That saves a pass over them
  (LongNet partition 1M on the H200: 3.7 ms of 42) and, more, memory:
  ``zeros_like(k)`` and ``zeros_like(v)`` are equal, so XLA folds them into
  one buffer and copies it for each accumulator that starts there
  (measured on 2 H200s at 8M tokens: one full-size tensor more)."""
  first = strided[0][1]
  return ((first.rate == 1 and first.heads == (0, q.shape[2]))
          or (not generic and all(view.alone for _, view in strided)))


def _split(static: Static) -> tuple[list[tuple[Branch, bool]],
                                    list[tuple[Branch, StridedBranch]]]:
  """([(branch, own block read in place)] for the generic path (compaction
  and rings), [(branch, view)] read in place). A ring whose own blocks are
  read in place is in both."""
  generic, strided = [], []
  for br in static.plan.branches:
    view = _strided(static, br)
    if view is not None:
      strided.append((br, view))
    if view is None or br.ring_size > 1:
      generic.append((br, view is not None))
  return generic, strided


def _in_place_masks(static: Static, br: Branch, tokens: Tokens, rng: Array | None
                    ) -> tuple[_backends.Visibility, _backends.Dropout | None]:
  """The whole local token vectors as an in-place branch reads them."""
  vis = _backends.Visibility(tokens.valid, tokens.seg, tokens.seg,
                             static.plan.config.causal)
  return vis, _dropout(static, rng, br, tokens.pos, tokens.pos)


def _tokens(static: Static, q: Array, key_padding_mask: Array | None,
            segment_ids: Array | None, rng: Array | None) -> Tokens:
  plan = static.plan
  pos = None if rng is None else global_positions(
      plan.config.layout, plan.num_shards, static.axis_name, q.shape[0], q.shape[1])
  return Tokens(key_padding_mask, segment_ids, pos)


def _forward(static: Static, q: Array, k: Array, v: Array, tokens: Tokens,
             rng: Array | None) -> tuple[Array, Array]:
  """(out [B, L, H, D] in q.dtype, lse [B, L, H] float32) over all branches."""
  b = q.shape[0]
  generic, strided = _split(static)
  if strided:
    return _forward_in_place(static, q, k, v, tokens, rng, generic, strided)
  merged = {}  # query-head range -> (out, lse): one range in "mix" mode
  for br, _ in generic:  # (nothing is read in place here)
    ob, lb = _branch_forward(static, br, rng, *_compact(br, q, k, v, tokens))
    ob, lb = expand_q(br, ob, 0.0, b), expand_q(br, lb, -jnp.inf, b)
    if br.q_heads in merged:
      ob, lb = merge(*merged[br.q_heads], ob, lb)
    merged[br.q_heads] = ob, lb
  heads = sorted(merged)
  out = jnp.concatenate([merged[h][0].astype(q.dtype) for h in heads], axis=2)
  return out, jnp.concatenate([merged[h][1] for h in heads], axis=2)


def _forward_in_place(static: Static, q: Array, k: Array, v: Array, tokens: Tokens,
                      rng: Array | None, generic: list[Branch],
                      strided: list[tuple[Branch, StridedBranch]]) -> tuple[Array, Array]:
  """:func:`_forward` when some branches are read in place: they merge into
  full-size ``(out [q.dtype], lse)``; every other branch then merges there at
  the positions it keeps only, so no full-size float32 copy ever exists (a
  ring branch of rate 512 at 8M tokens touches 1/512 of them)."""
  out = lse = None  # new from the first branch, if the branches write everything
  if not _starts_new(strided, generic, q):
    out, lse = unmerged(q)
  for br, view in strided:
    vis, drop = _in_place_masks(static, br, tokens, rng)
    out, lse = static.backend.branch_forward(view, q, k, v, vis, drop, out, lse)
  for br, own_in_place in generic:
    ob, lb = _branch_forward(static, br, rng, *_compact(br, q, k, v, tokens), own_in_place)
    ob, lb = merge(compact_q(br, out).astype(_F32), compact_q(br, lse), ob, lb)
    out, lse = update_q(br, out, ob), update_q(br, lse, lb)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention(static: Static, q: Array, k: Array, v: Array,
              key_padding_mask: Array | None, segment_ids: Array | None,
              rng: Array | None) -> Array:
  """All branches of the plan on local tensors; see the module docstring.

  Args:
    static: the plan and scalar options.
    q: shape [B, L, H, D].
    k: shape [B, L, K, D].
    v: shape [B, L, K, D].
    key_padding_mask: shape [B, L] bool or None.
    segment_ids: shape [B, L] int or None.
    rng: dropout key (used iff given) or None.

  Returns:
    shape [B, L, H, D] in ``q.dtype``.
  """
  tokens = _tokens(static, q, key_padding_mask, segment_ids, rng)
  return _forward(static, q, k, v, tokens, rng)[0]


def _attention_fwd(static: Static, q: Array, k: Array, v: Array,
                   key_padding_mask: Array | None, segment_ids: Array | None,
                   rng: Array | None) -> tuple[Array, tuple]:
  tokens = _tokens(static, q, key_padding_mask, segment_ids, rng)
  out, lse = _forward(static, q, k, v, tokens, rng)
  return out, (q, k, v, key_padding_mask, segment_ids, rng, out, lse)


def _attention_bwd(static: Static, res: tuple, dout: Array) -> tuple:
  q, k, v, key_padding_mask, segment_ids, rng, out, lse = res
  tokens = _tokens(static, q, key_padding_mask, segment_ids, rng)
  generic, strided = _split(static)
  grads = (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v))
  # Each generic branch's rows of `out`, or None where it recomputes its own.
  outs = [None if _needs_own_output(static, br) else compact_q(br, out) for br, _ in generic]
  if strided and outs:
    # The in-place branches consume dout through the barrier, so the generic
    # branches' rows of `out` are cut before them and `out` can go once no
    # in-place branch reads it; else XLA's scheduler may cut them late and
    # keep all of `out` live meanwhile (mocked rings of 4M tokens per H200:
    # one local tensor, 16 GiB, more).
    outs, dout = jax.lax.optimization_barrier((outs, dout))
  if strided:  # in-place branches add into the gradients (first: see _forward)
    if _starts_new(strided, generic, q):
      grads = None  # new: see _starts_new
    delta = None  # rowsum(dout * out), once a branch has formed it for every row
    for br, view in strided:
      vis, drop = _in_place_masks(static, br, tokens, rng)
      grads, delta = static.backend.branch_backward(view, q, k, v, vis, drop, dout, lse, out,
                                                    grads, delta)
  if not generic:
    return (*grads, None, None, None)
  # Compaction is linear: its transpose scatters (and, for kv heads read by
  # several slots, adds) compacted float32 gradients back to the local layout.
  # Next to in-place branches the sums stay in the input dtype (the kernels
  # add in it too; one rounding per branch, no full-size float32 copies),
  # else float32 until the end.
  acc_dtype = q.dtype if strided else _F32
  grads = [g.astype(acc_dtype) for g in grads]
  for (br, own_in_place), own_out in zip(generic, outs):
    queries, chunk = _compact(br, q, k, v, tokens)
    if own_out is None:
      own_out = _branch_forward(static, br, rng, queries, chunk)[0]
    queries = queries._replace(dout=compact_q(br, dout), out=own_out,
                               lse=compact_q(br, lse))
    dqc, dkc, dvc = _branch_backward(static, br, rng, queries, chunk, own_in_place)
    if strided and distinct_kv(br):
      # In the input dtype, at the kept positions only: no full-size float32.
      grads = [add_q(br, grads[0], dqc), add_kv(br, grads[1], dkc),
               add_kv(br, grads[2], dvc)]
      continue
    pull_q = jax.vjp(functools.partial(compact_q, br), q.astype(_F32))[1]
    pull_kv = jax.vjp(functools.partial(compact_kv, br), k.astype(_F32))[1]
    grads = [(g.astype(_F32) + pull(x.astype(_F32))[0]).astype(acc_dtype)
             for g, pull, x in zip(grads, (pull_q, pull_kv, pull_kv), (dqc, dkc, dvc))]
  grads = tuple(g.astype(x.dtype) for g, x in zip(grads, (q, k, v)))
  return (*grads, None, None, None)


attention.defvjp(_attention_fwd, _attention_bwd)
