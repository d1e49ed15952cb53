"""The ring schedule and the ``custom_vjp`` that runs every branch.

For each branch of the plan, every device compacts its local tensors to the
positions the branch keeps (``[B * pieces, T, K_b, G_b, D]``), attends its own
chunk, then -- when a segment spans ``g > 1`` devices -- passes its compacted
K/V chunk around the sub-ring of the ``g`` devices of its segment with
``jax.lax.ppermute``. Step ``s``: device ``d`` (position ``c = d mod g`` in
its group) holds the chunk of group position ``(c - s) mod g``. Each visit is
a block of one global softmax, merged with :func:`_blocks.merge`.

With a causal mask a device skips chunks that come after its own; in the
contiguous layout the last device of a ring then works at every step while
the first idles (``max / mean`` work per step up to ``g``). In the zigzag
layout (``rd.to_layout``) each device holds two half-chunks, and
:func:`_pairs` picks per step the half-blocks that are visible: exactly the
same amount of work on every device at every step, chosen by index
arithmetic on ``axis_index`` (no data-dependent branches), see
:func:`step_work`.

The backward pass recomputes every block from the saved local ``q, k, v`` and
the global ``(out, lse)``; the K/V chunks travel again, together with their
``dK/dV`` accumulators, which after ``g`` hops are back on their owner. Nothing
is saved per ring step, so memory does not grow with the ring size.

With ``axis_name=None`` the same code runs on one device (every ``g`` is 1).

Under the Pallas backend, local branches (``g = 1``) skip compaction: the
kernels of :mod:`._pallas` read their strided positions from the whole
arrays and merge into ``(out, lse)`` / add into ``(dq, dk, dv)`` in place
(:func:`_split` decides which branches).

Shape legend: B batch, L local sequence length, H query heads,
K kv heads, D head dim; per branch X = B * pieces, T kept tokens per piece,
K_b kv slots, G_b query heads per slot.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Hashable

import jax
import jax.numpy as jnp
import numpy as np

from . import _blocks, _layout, _pallas
from ._plan import Branch, Plan

Array = jax.Array

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything static about one call: the ``nondiff`` argument of the vjp."""

  plan: Plan
  scale: float
  dropout_rate: float
  axis_name: Hashable | None
  backend: _blocks.Backend = _blocks.XLA
  detach_weights: bool = False


# ----------------------------------------------------------------------------
# Compaction: the positions and heads a branch keeps, as dense blocks.
# ----------------------------------------------------------------------------


def _take_heads(x: Array, heads: tuple[int, ...]) -> Array:
  """``x[:, :, heads]`` as a slice when ``heads`` is a range, else a gather."""
  start = heads[0]
  if heads == tuple(range(start, start + len(heads))):
    return x[:, :, start:start + len(heads)]
  return x[:, :, np.asarray(heads)]


def _take_offsets(x: Array, br: Branch) -> Array:
  """[B, L, K_b, ...] -> [B * pieces, T, K_b, ...]: slot j keeps ``offsets[j]``."""
  b, length = x.shape[:2]
  rest = x.shape[3:]
  x = x.reshape(b * (length // br.piece), br.kept, br.rate, br.num_kv, *rest)
  if len(set(br.offsets)) == 1:
    return x[:, :, br.offsets[0]]
  # A masked sum rather than a gather: elementwise, so XLA fuses it, and its
  # transpose (the backward scatter) is elementwise too: no full-size buffer.
  zero = jnp.zeros((), x.dtype)
  return jnp.sum(jnp.where(_hits(br, len(rest)), x, zero), axis=2, dtype=x.dtype)


def _hits(br: Branch, rest: int) -> np.ndarray:
  """[1, 1, r, K_b, 1...] bool: slot j keeps position ``offsets[j]`` mod r."""
  hit = np.arange(br.rate)[:, None] == np.asarray(br.offsets)[None, :]
  return hit.reshape((1, 1, br.rate, br.num_kv) + (1,) * rest)


def _put_offsets(xc: Array, br: Branch, fill: float, batch: int) -> Array:
  """Inverse of :func:`_take_offsets`: [X, T, K_b, ...] -> [B, L, K_b, ...]."""
  rest = xc.shape[3:]
  full = jnp.where(_hits(br, len(rest)), xc[:, :, None], jnp.asarray(fill, xc.dtype))
  return full.reshape(batch, -1, br.num_kv, *rest)


def _compact_q(br: Branch, x: Array) -> Array:
  """Query-side [B, L, H, ...] -> [X, T, K_b, G_b, ...]."""
  a, b = br.q_heads
  x = x[:, :, a:b]
  x = x.reshape(*x.shape[:2], br.num_kv, br.group, *x.shape[3:])
  return _take_offsets(x, br)


def _expand_q(br: Branch, xc: Array, fill: float, batch: int) -> Array:
  """[X, T, K_b, G_b, ...] -> [B, L, H_b, ...] with ``fill`` where not kept."""
  full = _put_offsets(xc, br, fill, batch)
  return full.reshape(*full.shape[:2], br.num_kv * br.group, *full.shape[4:])


def _compact_kv(br: Branch, x: Array) -> Array:
  """Key-side [B, L, K, ...] -> [X, T, K_b, ...]."""
  return _take_offsets(_take_heads(x, br.kv_heads), br)


def _compact_token(br: Branch, x: Array | None) -> Array | None:
  """Per-token [B, L] (mask or ids) -> [X, T, K_b], or None."""
  if x is None:
    return None
  x = jnp.broadcast_to(x[:, :, None], (*x.shape, br.num_kv))
  return _take_offsets(x, br)


# ----------------------------------------------------------------------------
# The ring.
# ----------------------------------------------------------------------------


def _ring_position(static: Static, br: Branch):
  """(position ``c`` of this device in its segment group, sub-ring permutation)."""
  g, p = br.ring_size, static.plan.num_shards
  perm = [(d, d - d % g + (d % g + 1) % g) for d in range(p)]
  return jax.lax.axis_index(static.axis_name) % g, perm


def _pairs(br: Branch, causal: bool, c, src) -> list[tuple[Any, Any, Any]]:
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
        for qi, _, when in _pairs(br, causal, c, (c - s) % br.ring_size):
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


def _half(x: Array, i, half: int) -> Array:
  """Local half ``i`` (int or traced) of compacted [X, T, ...]; all if None."""
  if i is None:
    return x
  x = x.reshape(-1, 2, half, *x.shape[2:])
  if isinstance(i, (bool, int, np.integer, np.bool_)):
    return x[:, int(i)]
  return jax.lax.dynamic_index_in_dim(x, i.astype(jnp.int32), 1, keepdims=False)


def _put_half(x: Array, i, half: int, value: Array) -> Array:
  view = x.reshape(-1, 2, half, *x.shape[2:])
  if isinstance(i, (bool, int, np.integer, np.bool_)):
    view = view.at[:, int(i)].set(value)
  else:
    view = jax.lax.dynamic_update_index_in_dim(view, value, i.astype(jnp.int32), 1)
  return view.reshape(x.shape)


def _at(tree, i, half: int):
  return jax.tree.map(lambda x: _half(x, i, half), tree)


def _with(tree, i, half: int, fn):
  """``tree`` with local half ``i`` (all if None) replaced by ``fn`` of it."""
  if i is None:
    return fn(tree)
  return jax.tree.map(lambda x, y: _put_half(x, i, half, y), tree, fn(_at(tree, i, half)))


def _dropout(static: Static, rng, br: Branch, q_pos, k_pos) -> Any:
  """Dropout of a block of ``br`` (see :class:`_blocks.Dropout`), or None."""
  if rng is None:
    return None
  seed = jax.random.bits(jax.random.fold_in(rng, br.index), (), jnp.uint32)
  heads = np.arange(*br.q_heads).reshape(br.num_kv, br.group)
  return _blocks.Dropout(static.dropout_rate, seed, heads, q_pos, k_pos)


def _positions(static: Static, batch: int, length: int) -> Array:
  """shape [B, L] int32: the global position of each local token."""
  local = jnp.arange(length, dtype=jnp.int32)
  plan = static.plan
  if static.axis_name is not None:
    d = jax.lax.axis_index(static.axis_name)
    if plan.layout == "zigzag" and plan.num_shards > 1:
      # This device's two half-chunks, in the order of rd.to_layout.
      order = _layout.half_chunk_order(plan.layout, plan.num_shards).reshape(-1, 2)
      half = length // 2
      local = jnp.asarray(order, jnp.int32)[d, local // half] * half + local % half
    else:
      local = d * length + local
  return jnp.broadcast_to(local, (batch, length))


def _f32(arrays):
  return tuple(x.astype(_F32) for x in arrays)


def _ring(static, br, block, queries, travel, first, add):
  """Runs the blocks of one branch: the own chunk, then the sub-ring.

  Args:
    static, br: the call and the branch.
    block: ``(queries, kv, diagonal) -> result``, the block of ``queries``
      against chunk ``kv``.
    queries: the query-side compacted arrays (they stay on the device).
    travel: the local compacted K/V chunk (with its masks).
    first: ``result -> (local, acc)`` from the own (diagonal) block; ``acc``
      travels with the K/V chunk it belongs to and ends on its owner.
    add: ``(local, acc, result, q_half, kv_half) -> (local, acc)``, adding a
      block of local query half ``q_half`` and key half ``kv_half`` (see
      :func:`_pairs`).

  Returns:
    ``(local, acc)``; on a ring, results are float32 whatever the backend
    returns, so the error does not grow with the number of steps.
  """
  causal = static.plan.config.causal
  if br.ring_size == 1:
    return first(block(queries, travel, causal))
  c, perm = _ring_position(static, br)
  rotate = functools.partial(jax.lax.ppermute, axis_name=static.axis_name, perm=perm)
  g = br.ring_size
  local, acc = first(_f32(block(queries, travel, causal)))

  def step(s, kv, local, acc):
    # step s: this device holds the chunk of group position (c - s) mod g.
    src = (c - s) % g
    for qi, ki, when in _pairs(br, causal, c, src):
      def visit(local, acc, qi=qi, ki=ki):
        res = _f32(block(_at(queries, qi, br.half), _at(kv, ki, br.half), False))
        return add(local, acc, res, qi, ki)
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
  (kv, local, acc), _ = jax.lax.scan(body, (kv, local, acc), jnp.arange(1, g - 1))
  return step(g - 1, kv, local, acc)


def _branch_forward(static, br, rng, queries, travel):
  """Forward of one branch: (out, lse) for the local compacted queries."""
  def block(queries, kv, diagonal):
    (qc, q_seg, q_pos), (k, v, kv_valid, kv_seg, k_pos) = queries, kv
    vis = _blocks.Visibility(kv_valid, q_seg, kv_seg, diagonal)
    return static.backend.forward(qc, k, v, vis, scale=static.scale,
                                  dropout=_dropout(static, rng, br, q_pos, k_pos))

  def add(out_lse, _, res, qi, ki):
    return _with(out_lse, qi, br.half, lambda cur: _blocks.merge(*cur, *res)), ()

  return _ring(static, br, block, queries, travel,
               first=lambda res: (res, ()), add=add)[0]


def _branch_backward(static, br, rng, queries, travel, dout, out, lse):
  """Backward of one branch: (dq, dk, dv) of the compacted local tensors."""
  def block(queries, kv, diagonal):
    (qc, q_seg, q_pos, dout, out, lse), (k, v, kv_valid, kv_seg, k_pos) = queries, kv
    vis = _blocks.Visibility(kv_valid, q_seg, kv_seg, diagonal)
    return static.backend.backward(qc, k, v, vis, dout, out, lse,
                                   scale=static.scale,
                                   dropout=_dropout(static, rng, br, q_pos, k_pos))

  def add(dq, dkv, res, qi, ki):
    # dK/dV accumulators travel with their K/V chunk; dQ stays.
    return (_with(dq, qi, br.half, lambda cur: cur + res[0]),
            _with(dkv, ki, br.half, lambda cur: (cur[0] + res[1], cur[1] + res[2])))

  dq, (dk, dv) = _ring(static, br, block, (*queries, dout, out, lse), travel,
                       first=lambda res: (res[0], res[1:]), add=add)
  return dq, dk, dv


# ----------------------------------------------------------------------------
# All branches, one softmax, one custom_vjp.
# ----------------------------------------------------------------------------


def _compact_inputs(br, q, k, v, key_padding_mask, segment_ids, positions):
  """The branch's compacted (queries, query segment ids, query positions) and
  travelling (K, V, key padding, key segment ids, key positions)."""
  seg, pos = _compact_token(br, segment_ids), _compact_token(br, positions)
  travel = (_compact_kv(br, k), _compact_kv(br, v),
            _compact_token(br, key_padding_mask), seg, pos)
  return (_compact_q(br, q), seg, pos), travel


def _needs_own_output(static: Static, br: Branch) -> bool:
  """With detached mix weights O = sum_i w_i O_i and the w_i constant, branch
  i's block gradients are the usual ones fed the global lse (P = w_i P_i) but
  the branch's own output O_i in rowsum(dO * O): the backward recomputes it
  when other branches share ``br``'s heads."""
  return static.detach_weights and sum(
      b.q_heads == br.q_heads for b in static.plan.branches) > 1


def _geometry(static: Static, br: Branch):
  """The Pallas kernels' view of ``br`` when they read it in place, or None.

  They do for a local branch (no ring) whose kv slots are whole GQA groups
  with the offsets of ``"mix"`` (kv head mod r) or one offset (``"partition"``),
  under the Pallas backend; any other branch takes the generic path.
  """
  if static.backend.name != "pallas" or br.ring_size != 1:
    return None
  if _needs_own_output(static, br):
    return None
  plan = static.plan
  if br.group != plan.num_heads // plan.num_kv_heads or _pallas.branch_unavailable(br.kept):
    return None
  if len(set(br.offsets)) == 1:
    offset = br.offsets[0]
  elif br.offsets == tuple(kv % br.rate for kv in br.kv_heads):
    offset = None
  else:
    return None
  return _pallas.Geometry(
      kept=br.kept, rate=br.rate, heads=br.q_heads, group=br.group, offset=offset,
      causal=plan.config.causal, scale=static.scale,
      interpret=static.backend.interpret)


def _split(static: Static):
  """(branches for the generic path, [(branch, geometry)] read in place)."""
  generic, fused = [], []
  for br in static.plan.branches:
    geo = _geometry(static, br)
    if geo is None:
      generic.append(br)
    else:
      fused.append((br, geo))
  return generic, fused


def _forward(static, q, k, v, key_padding_mask, segment_ids, rng):
  """(out [B, L, H, D] in q.dtype, lse [B, L, H] float32) over all branches."""
  b = q.shape[0]
  positions = None if rng is None else _positions(static, b, q.shape[1])
  generic, fused = _split(static)
  merged = {}  # query-head range -> (out, lse): one range in "mix" mode
  for br in generic:
    ob, lb = _branch_forward(static, br, rng, *_compact_inputs(
        br, q, k, v, key_padding_mask, segment_ids, positions))
    ob, lb = _expand_q(br, ob, 0.0, b), _expand_q(br, lb, -jnp.inf, b)
    if br.q_heads in merged:
      ob, lb = _blocks.merge(*merged[br.q_heads], ob, lb)
    merged[br.q_heads] = ob, lb
  if not fused:
    heads = sorted(merged)
    out = jnp.concatenate([merged[h][0].astype(q.dtype) for h in heads], axis=2)
    return out, jnp.concatenate([merged[h][1] for h in heads], axis=2)
  # The Pallas kernels merge into full-size accumulators in place.
  out = jnp.zeros_like(q)  # zeros_like: varies over the mesh axes as q does
  lse = jnp.full_like(q[..., 0], -jnp.inf, _F32)
  for (start, stop), (ob, lb) in merged.items():
    out = out.at[:, :, start:stop].set(ob.astype(q.dtype))
    lse = lse.at[:, :, start:stop].set(lb)
  for _, geo in fused:
    out, lse = _pallas.forward(geo, q, k, v, out, lse)
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
    rng: dropout key (used iff ``static.dropout_rate > 0``) or None.

  Returns:
    shape [B, L, H, D] in ``q.dtype``.
  """
  return _forward(static, q, k, v, key_padding_mask, segment_ids, rng)[0]


def _attention_fwd(static, q, k, v, key_padding_mask, segment_ids, rng):
  out, lse = _forward(static, q, k, v, key_padding_mask, segment_ids, rng)
  return out, (q, k, v, key_padding_mask, segment_ids, rng, out, lse)


def _attention_bwd(static, res, dout):
  q, k, v, key_padding_mask, segment_ids, rng, out, lse = res
  generic, fused = _split(static)
  # Compaction is linear: its transpose scatters (and, for kv heads read by
  # several slots, adds) compacted float32 gradients back to the local layout.
  grads = [jnp.zeros(x.shape, _F32) for x in (q, k, v)] if generic else None
  positions = None if rng is None else _positions(static, q.shape[0], q.shape[1])
  for br in generic:
    inputs = _compact_inputs(br, q, k, v, key_padding_mask, segment_ids, positions)
    if _needs_own_output(static, br):
      own_out = _branch_forward(static, br, rng, *inputs)[0]
    else:
      own_out = _compact_q(br, out)
    dqc, dkc, dvc = _branch_backward(
        static, br, rng, *inputs,
        _compact_q(br, dout), own_out, _compact_q(br, lse))
    pull_q = jax.vjp(functools.partial(_compact_q, br), q.astype(_F32))[1]
    pull_kv = jax.vjp(functools.partial(_compact_kv, br), k.astype(_F32))[1]
    grads = [grads[0] + pull_q(dqc.astype(_F32))[0],
             grads[1] + pull_kv(dkc.astype(_F32))[0],
             grads[2] + pull_kv(dvc.astype(_F32))[0]]
  if grads is None:
    grads = (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v))
  grads = tuple(g.astype(x.dtype) for g, x in zip(grads, (q, k, v)))
  if fused:  # the Pallas kernels add into the gradients in place
    delta = _blocks.row_delta(dout, out)
    for _, geo in fused:
      grads = _pallas.backward(geo, q, k, v, dout, lse, delta, grads)
  return (*grads, None, None, None)


attention.defvjp(_attention_fwd, _attention_bwd)
