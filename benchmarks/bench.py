"""GPU benchmarks of ringdilated against the references a user would pick.

Run on a GPU machine (one GPU is used: ``jax.devices()[0]``, also on a
machine with several)::

  python benchmarks/bench.py --out benchmarks/results/h200.json [--only dense,longnet]
  python benchmarks/bench.py --out ... --only masked,slice --time-budget 120
  python benchmarks/bench.py --out ... --isolate     # one subprocess per case
  python benchmarks/bench.py --smoke                 # tiny sizes, CPU

Every case is timed side by side with its reference on the same GPU:
forward and forward+backward (median of repeated runs after a warm-up,
synchronised with ``block_until_ready``; fewer runs when one takes seconds),
peak memory from the compiled program's memory analysis (arguments + outputs
+ temporaries), and TFLOP/s from the attention FLOPs the pattern really
needs (causal halves included; backward counted as 2.5x forward; masks and
dropout do not change the count).

Power: an H200 under attention's load runs at its power cap (700 W), so
its SM clock falls below the 1980 MHz it reports idle, and a case's time
is its energy per step divided by the cap. Where ``nvidia-smi`` exists, it
samples the SM clock and the clock's limiting reasons every 20 ms while a
case's forward+backward runs: each record keeps the clock's median
(``sm_clock_mhz``) and the share of samples the software power cap held
(``power_capped``); where NVML's library loads and the runs last at least
:data:`POWER_WINDOW_S`, the GPU's energy counter gives their mean power
(``power_w``; over shorter runs it read 118-789 W against the 700 W cap in
sessions 17-32, so no figure is kept for them; ``nvidia-smi``'s
``power.draw`` is a one-second average).

Runtime memory: the device's ``peak_bytes_in_use`` is a high-water mark of
the whole process (JAX cannot reset it). Each record keeps it before and
after the case (``process_peak_bytes_before/after``: the case raised the
mark iff after > before). With ``--isolate`` every case runs in a fresh
``python bench.py --only NAME --seqs N`` subprocess, whose peak is the case's
own (inputs included): recorded as ``runtime_peak_bytes``. A case that
kills its subprocess is recorded with its exit code.

``--time-budget S`` stops starting cases after S seconds (the skipped ones
are recorded as ``skipped``, never over a measured record). Cases run most
important first (:data:`PRIORITY`: the targets of ``check_targets.py``),
then in the order of their groups.

Cases (bf16, B=1, H=16, D=128):
  dense      one branch w=N, r=1, causal: cuDNN, ours, ours on a 1-device ring.
  longnet    segment_lengths=(2048, 4096, 8192, 16384), rates (1, 2, 4, 8),
             causal, both modes: ours vs the hand-written baselines (strided
             slices + cuDNN, the reference of the targets; gather + cuDNN,
             kept as history).
  slice      the honest-baseline subset at 512K and 1M: slice + cuDNN (both
             write-backs in partition mode), ours (default and Pallas).
  masked     issue 15, LongNet at 256K and 1M, both modes: unmasked,
             ``segment_ids`` with documents of 64K and 8K tokens and of
             varied length (:func:`doc_lengths`: most start inside a tile), the last
             10% of keys padded, dropout 0.1 (masks and key are inputs of
             the jitted program); plus the portable block (backend="xla")
             with 64K documents in mix mode.
  ringattn   the ``ringattention`` package (if importable) at 8K/32K causal.
  pallas     backend="pallas" (strided in-place Triton kernels) on the dense
             and LongNet cases, with the default backend and the cuDNN /
             strided-slice references at the same lengths.
  mosaic     the same with backend="mosaic" (the Hopper kernels).
  packed     dense causal attention over packed documents at 32K-512K
             (documents of 8K tokens, and of varied lengths: :func:`doc_lengths`):
             ours (``segment_ids``; the Hopper kernels on Hopper, and
             backend="pallas") against cuDNN's own packed layout (sequence
             lengths and offsets, what Transformer Engine and MaxText run),
             one cuDNN call over documents of equal length reshaped into the
             batch (the strongest by-hand form when they are equal), and
             unmasked cuDNN. FLOPs count the visible pairs only.
  zigzag     the dense causal case on a 1-device ring in the zigzag layout
             (overhead vs the contiguous ``ours_dense_ring1`` of ``dense``:
             run both groups together), and the attention work of one ring
             step of the busiest device for P = 8 (cuDNN blocks): contiguous
             (one L x L block) vs zigzag (two L/2 x L/2 blocks), which with
             one GPU stands in for the multi-GPU wall time.

``--smoke`` (CPU): lengths and segments / 128, H=8, D=32, cuDNN calls of
the baselines replaced by XLA; by default the masked group and the slice
baselines at the smallest lengths (:data:`SMOKE_ONLY`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

# Let XLA's allocator use the whole GPU (default 75%): the 1M-token cases need it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ringdilated as rd  # noqa: E402

B, H, D = 1, 16, 128
LONGNET = dict(segment_lengths=(2048, 4096, 8192, 16384), dilation_rates=(1, 2, 4, 8))
# Lengths and segments are divided by SCALE (128 with --smoke); case names and
# PRIORITY speak of the nominal lengths.
SCALE = 1
# Stamped on every record of one invocation: check_targets.py compares only
# records of one run (side by side). --isolate children inherit it.
RUN = os.environ.setdefault("RINGDILATED_BENCH_RUN", time.strftime("%Y-%m-%dT%H:%M:%S"))
# implementation= of the raw jax.nn.dot_product_attention calls of the
# baselines: "cudnn" on GPU, None (XLA) with --smoke on CPU.
CUDNN = "cudnn"

_M = 1 << 20
# Most important first: the targets of check_targets.py (issue 15 at 1M,
# then the honest baselines at 1M), then context. (name, nominal N).
PRIORITY = (
    ("ours_longnet_mix", _M), ("ours_docs8k_longnet_mix", _M),  # (the open target first)
    ("ours_cudnn_longnet_mix", _M),
    ("ours_mosaic_longnet_partition", _M), ("ours_mosaic_dense", 32768),
    ("cudnn_dense", 32768), ("ours_docs64k_longnet_mix", _M),
    ("ours_pad10_longnet_mix", _M), ("ours_dropout_longnet_mix", _M),
    ("slice_cudnn_longnet_partition", _M), ("ours_pallas_longnet_partition", _M),
    ("ours_longnet_partition", _M), ("slice_cudnn_longnet_mix", _M),
    ("ours_pallas_longnet_mix", _M), ("ours_xla_docs64k_longnet_mix", _M),
    ("ours_pallas_longnet_mix", _M // 2), ("ours_pallas_longnet_partition", _M // 2),
    ("slice_cudnn_set_longnet_partition", _M),
    ("ours_docs64k_longnet_partition", _M), ("ours_pad10_longnet_partition", _M),
    ("ours_dropout_longnet_partition", _M), ("ours_docs8k_longnet_partition", _M),
    ("cudnn_dense", 32768), ("ours_dense", 32768), ("ours_dense_ring1", 32768),
    ("ours_dense_ring1_zigzag", 32768),
    ("ours_xla_docs64k_longnet_mix", _M // 4), ("ours_longnet_mix", _M // 4),
    ("ours_docs64k_longnet_mix", _M // 4), ("ours_docs8k_longnet_mix", _M // 4),
    ("ours_pad10_longnet_mix", _M // 4), ("ours_dropout_longnet_mix", _M // 4),
)


def _configure(smoke: bool) -> None:
  """Sizes and the baselines' cuDNN switch (tiny and XLA with ``--smoke``)."""
  global H, D, LONGNET, SCALE, CUDNN  # pylint: disable=global-statement
  if smoke:
    H, D, SCALE, CUDNN = 8, 32, 128, None
    LONGNET = dict(segment_lengths=tuple(w // SCALE for w in (2048, 4096, 8192, 16384)),
                   dilation_rates=(1, 2, 4, 8))


def attention_flops(n: int, segment_lengths, dilation_rates, mode: str, causal: bool,
                    heads: int | None = None, head_dim: int | None = None) -> float:
  """Forward FLOPs of the attention matmuls (QK^T and PV) the pattern needs."""
  heads, head_dim = heads or H, head_dim or D
  k = len(segment_lengths)
  total = 0.0
  for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
    hb = heads if mode == "mix" else heads // k + (i < heads % k)
    t = w // r
    pairs = t * (t + 1) / 2 if causal else t * t
    total += (n // w) * hb * 4 * pairs * head_dim
  return total


# ----------------------------------------------------------------------------
# Implementations under test, each (q, k, v, *extra) -> out.
# ----------------------------------------------------------------------------


def cudnn_dense(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=CUDNN)


def ours(q, k, v, *, backend="auto", **kw):
  return rd.dilated_attention(q, k, v, causal=True, backend=backend, **kw)


def ours_docs(q, k, v, segment_ids, **kw):
  """``ours`` on packed documents: ``segment_ids`` is a program input."""
  return ours(q, k, v, segment_ids=segment_ids, **kw)


def ours_padded(q, k, v, key_padding_mask, **kw):
  """``ours`` with key padding: ``key_padding_mask`` is a program input."""
  return ours(q, k, v, key_padding_mask=key_padding_mask, **kw)


def ours_dropout(q, k, v, dropout_rng, *, rate=0.1, **kw):
  """``ours`` with attention dropout: the key is a program input."""
  return ours(q, k, v, dropout_rate=rate, dropout_rng=dropout_rng, **kw)


def _packed_ids(offsets, n: int):
  """Document index of each of ``n`` tokens from cuDNN's packed-layout
  ``offsets`` [B, M + 1] (-1 past the last document)."""
  starts = jnp.where(offsets[:, 1:] >= 0, offsets[:, 1:], n)
  return jax.vmap(lambda s: jnp.searchsorted(s, jnp.arange(n), side="right"))(starts)


def same_document(ids):
  """[B, 1, N, N] bool: query ``i`` and key ``j`` share a document of the
  segment ids ``ids`` [B, N] (the dense mask of the XLA stand-ins and oracles)."""
  return ids[:, None, :, None] == ids[:, None, None, :]


def cudnn_packed(q, k, v, seqlen, offsets):
  """cuDNN's packed layout: documents given by their lengths ``seqlen`` [B, M]
  and first tokens ``offsets`` [B, M + 1], causal inside each; no tile of two
  documents is computed. jax exposes it only in its internal cuDNN module.
  With ``--smoke`` (no cuDNN): XLA with the same mask built densely."""
  if CUDNN is None:
    return jax.nn.dot_product_attention(
        q, k, v, mask=same_document(_packed_ids(offsets, q.shape[1])), is_causal=True)
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
  return fa.dot_product_attention(
      q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets, kv_offsets=offsets,
      scale=q.shape[-1] ** -0.5, mask_type=fa.MaskType.PADDING_CAUSAL)


def cudnn_per_doc(q, k, v, *, doc: int):
  """Documents of ``doc`` tokens each, reshaped into the batch: one causal
  cuDNN call (the strongest by-hand form where all are equally long)."""
  b, n = q.shape[:2]
  fold = lambda x: x.reshape(b * n // doc, doc, *x.shape[2:])  # noqa: E731
  return cudnn_dense(fold(q), fold(k), fold(v)).reshape(q.shape)


def cudnn_block(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation=CUDNN)


def step_contiguous(q, k, v):
  """Busiest device, one causal ring step, contiguous layout: an L x L block."""
  return cudnn_block(q, k, v)


def step_zigzag(q, k, v):
  """Every device, one causal ring step, zigzag: two L/2 x L/2 blocks."""
  c = q.shape[1] // 2
  # half 1 sees the visiting half 0; plus one same-half block (here half 0)
  cross = cudnn_block(q[:, c:], k[:, :c], v[:, :c])
  same = cudnn_block(q[:, :c], k[:, :c], v[:, :c])
  return jnp.concatenate([same, cross], axis=1)


def ours_ring1(q, k, v, **kw):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("sp",))
  f = jax.shard_map(functools.partial(ours, axis_name="sp", **kw), mesh=mesh,
                    in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"))
  return f(q, k, v)


def gather_cudnn(q, k, v, *, segment_lengths, dilation_rates, mode, remat=False):
  """History (the reference of the H100 table): gather each branch, cuDNN,
  scatter, combine. Superseded as the target reference by the strided-slice
  baselines below, which need no gather.

  Mix weights come from cuDNN's returned log-sum-exp, which jax treats as
  constant: this baseline's gradient is *not* exact in mix mode (ours is); it
  is here for speed only. ``remat``: each branch under ``jax.checkpoint``
  (what the user does when the plain version runs out of memory).
  """
  b, n, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  k_ = len(segment_lengths)
  outs, lses = [], []
  bounds = np.cumsum([0] + [h // k_ + (i < h % k_) for i in range(k_)])
  for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
    if mode == "mix":
      heads, offs = np.arange(h), (np.arange(h) // g) % r
    else:
      heads = np.arange(bounds[i], bounds[i + 1])
      offs = np.full(len(heads), i % r)
    def pick(x, hs, os_):
      x = x[:, :, hs].reshape(b * n // w, w // r, r, len(hs), d)
      idx = jnp.asarray(os_).reshape(1, 1, 1, -1, 1)
      return jnp.take_along_axis(x, idx, axis=2)[:, :, 0]
    kvh = heads // g

    def branch(q, k, v, heads=heads, offs=offs, kvh=kvh, w=w, r=r):
      qb = pick(q, heads, offs)
      kb, vb = pick(k, kvh, offs), pick(v, kvh, offs)
      ob, lb = jax.nn.dot_product_attention(qb, kb, vb, is_causal=True,
                                            implementation=CUDNN, return_residual=True)
      hit = (np.arange(r)[:, None] == offs[None, :]).reshape(1, 1, r, len(heads), 1)
      full = jnp.where(hit, ob[:, :, None], 0).reshape(b, n, len(heads), d)
      lfull = jnp.where(hit[..., 0], lb[:, :, None].astype(jnp.float32), -jnp.inf)
      return full, lfull.reshape(b, n, len(heads))

    full, lfull = (jax.checkpoint(branch) if remat else branch)(q, k, v)
    outs.append((heads, full))
    lses.append(lfull)
  if mode == "partition":
    return jnp.concatenate([o for _, o in outs], axis=2)
  lse = jnp.stack(lses)
  wts = jax.nn.softmax(lse, axis=0)
  wts = jnp.where(jnp.isfinite(lse), wts, 0.0)
  return sum(wts[i][..., None] * outs[i][1].astype(jnp.float32)
             for i in range(k_)).astype(q.dtype)


def _offset_slice(x, w: int, r: int, o: int):
  """[B, N, h, D] -> [B * N / w, w / r, h, D]: in every segment of ``w``
  tokens, the positions ``o, o + r, ...``. A static strided slice (no gather):
  the [B, N / w, w / r, r, h, D] view indexed at ``o`` on its rate axis."""
  b, n = x.shape[:2]
  view = x.reshape(b, n // w, w // r, r, *x.shape[2:])
  return jax.lax.index_in_dim(view, o, axis=3, keepdims=False).reshape(
      b * (n // w), w // r, *x.shape[2:])


def _offset_unslice(y, b: int, n: int, w: int, r: int, o: int, fill, writeback: str):
  """Inverse of :func:`_offset_slice`: [B * N / w, w / r, h, ...] ->
  [B, N, h, ...], ``fill`` at the positions of the other offsets.

  ``writeback="pad"``: build the [.., r, ..] tensor with ``fill`` elsewhere
  by one ``pad`` of the new rate axis (its transpose is a slice; no zeros
  buffer is read). ``"set"``: write into a ``fill`` buffer, what
  ``.at[:, :, :, o].set`` means, as the dynamic-update-slice it should be
  (``.at[...].set`` with a static index lowers to a scatter)."""
  rest = y.shape[2:]
  y = y.reshape(b, n // w, w // r, 1, *rest)
  if writeback == "pad":
    pads = [(0, 0)] * y.ndim
    pads[3] = (o, r - 1 - o)
    full = jnp.pad(y, pads, constant_values=fill)
  elif writeback == "set":
    full = jnp.full((b, n // w, w // r, r, *rest), fill, y.dtype)
    full = jax.lax.dynamic_update_slice_in_dim(full, y, o, axis=3)
  else:
    raise ValueError(f"writeback={writeback!r} must be 'pad' or 'set'")
  return full.reshape(b, n, *rest)


def slice_cudnn_partition(q, k, v, *, segment_lengths, dilation_rates, causal=True,
                          writeback="pad", attend: Callable | None = None):
  """The strongest hand-written partition baseline: strided slices + cuDNN.

  Branch ``i`` (head group ``g_i``, the first ``H mod k`` groups one head
  larger, offset ``o = i mod r``): view the group's heads as
  [B, N / w, w / r, r, g, D], take offset ``o`` (a static strided slice, no
  gather), one ``jax.nn.dot_product_attention(implementation="cudnn")`` over
  [B * N / w, w / r, g, D], write the result back (``writeback``, see
  :func:`_offset_unslice`; default ``"pad"``: one pad per branch whose
  backward is a slice, where ``"set"`` also reads and writes a zeros buffer),
  concatenate the groups. Gradients are exact. ``attend(q, k, v,
  is_causal=...)`` replaces cuDNN's call (``bench_competitors.py``: the same
  baseline on another library's kernel).
  """
  b, n, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  nb = len(segment_lengths)
  bounds = np.cumsum([0] + [h // nb + (i < h % nb) for i in range(nb)])
  outs = []
  for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
    s, e, o = int(bounds[i]), int(bounds[i + 1]), i % r
    if s % g == 0 and e % g == 0:  # whole GQA groups: cuDNN's own GQA
      ks, vs = k[:, :, s // g:e // g], v[:, :, s // g:e // g]
    else:
      ks, vs = (jnp.repeat(x, g, axis=2)[:, :, s:e] for x in (k, v))
    qb, kb, vb = (_offset_slice(x, w, r, o) for x in (q[:, :, s:e], ks, vs))
    ob = (attend(qb, kb, vb, is_causal=causal) if attend else
          jax.nn.dot_product_attention(qb, kb, vb, is_causal=causal, implementation=CUDNN))
    outs.append(_offset_unslice(ob, b, n, w, r, o, 0, writeback))
  return jnp.concatenate(outs, axis=2)


def slice_cudnn_mix(q, k, v, *, segment_lengths, dilation_rates, causal=True,
                    writeback="pad"):
  """The strongest hand-written mix baseline: strided slices + cuDNN + lse merge.

  Per branch ``(w, r)``, heads are grouped by offset (query head ``h`` uses
  ``o = (h // G) mod r``, ``G = H / Hkv``): the kv heads ``o, o + r, ...`` and
  their query heads are a strided head slice, their kept positions a strided
  sequence slice; one cuDNN call per (branch, offset group) with
  ``return_residual=True`` for the log-sum-exp; results scattered back (one
  pad each), and branches combined with weights softmax over branches of
  the log-sum-exps (``-inf`` where a branch does not see the position).

  Not exact in its gradient: jax treats cuDNN's returned log-sum-exp as a
  constant (and returns it in bf16), so the gradient through the branch
  weights is missing. A speed baseline, nothing more (ours is exact).
  Needs ``Hkv % r == 0`` for every rate.
  """
  b, n, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  q5 = q.reshape(b, n, hkv, g, d)
  outs, lses = [], []
  for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
    if hkv % r:
      raise ValueError(f"slice_cudnn_mix needs kv heads {hkv} divisible by "
                       f"dilation_rates[{i}]={r}")
    per_out, per_lse = [], []
    for o in range(r):
      qo = q5[:, :, o::r].reshape(b, n, (hkv // r) * g, d)
      qb, kb, vb = (_offset_slice(x, w, r, o) for x in (qo, k[:, :, o::r], v[:, :, o::r]))
      ob, lb = jax.nn.dot_product_attention(qb, kb, vb, is_causal=causal,
                                            implementation=CUDNN, return_residual=True)
      per_out.append(_offset_unslice(ob, b, n, w, r, o, 0, writeback)
                     .reshape(b, n, hkv // r, g, d))
      per_lse.append(_offset_unslice(lb.astype(jnp.float32), b, n, w, r, o, -jnp.inf,
                                     writeback).reshape(b, n, hkv // r, g))
    # offset group o holds kv heads j * r + o: interleave on a new axis after j
    outs.append(jnp.stack(per_out, axis=3).reshape(b, n, h, d))
    lses.append(jnp.stack(per_lse, axis=3).reshape(b, n, h))
  lse = jnp.stack(lses)
  wts = jax.nn.softmax(lse, axis=0)
  wts = jnp.where(jnp.isfinite(lse), wts, 0.0)
  return sum(wts[i][..., None] * outs[i].astype(jnp.float32)
             for i in range(len(outs))).astype(q.dtype)


def ringattention_pkg(q, k, v):
  """The published JAX ring attention (``ringattention`` on PyPI), 1-device ring."""
  if not hasattr(jax.lib, "xla_bridge"):  # it reads jax.lib.xla_bridge at import
    import types  # pylint: disable=g-import-not-at-top
    jax.lib.xla_bridge = types.SimpleNamespace(get_backend=jax.extend.backend.get_backend)
  from ringattention import ringattention  # pylint: disable=g-import-not-at-top
  n = q.shape[1]
  chunk = min(n, 512)
  kwargs = dict(causal_block_size=1, deterministic=True, dropout_rng=None, attn_pdrop=0.0,
                query_chunk_size=chunk, key_chunk_size=chunk, dtype=jnp.bfloat16,
                policy=jax.checkpoint_policies.nothing_saveable, precision=None,
                prevent_cse=True)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("sp",))
  f = jax.shard_map(
      lambda q, k, v: ringattention(q, k, v, None, None, None, "sp", True, kwargs),
      mesh=mesh, check_vma=False, in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"))
  return f(q, k, v)


# ----------------------------------------------------------------------------
# Extra program inputs of the masked cases: n -> tuple of host arrays / keys.
# ----------------------------------------------------------------------------


def doc_lengths(n: int, doc: int | None) -> np.ndarray:
  """Lengths of the packed documents of ``n`` tokens: ``doc`` long, or
  (``doc=None``) varied: log-normal around 4K tokens (from 1/32 to 8x that),
  drawn with a fixed seed; the last cut to fit."""
  rng, lengths = np.random.default_rng(0), []
  mean = 4096 // SCALE
  while sum(lengths) < n:
    lengths.append(doc or int(np.clip(rng.lognormal(np.log(mean), 1.0), mean // 32, 8 * mean)))
  lengths[-1] -= sum(lengths) - n
  return np.array(lengths)


def _documents(doc: int | None) -> Callable[[int], tuple]:
  """segment_ids [B, N] int32 of the packed documents of :func:`doc_lengths`."""
  def make(n):
    ls = doc_lengths(n, doc)
    return (np.broadcast_to(np.repeat(np.arange(len(ls), dtype=np.int32), ls), (B, n)),)
  return make


def _packed_layout(doc: int | None) -> Callable[[int], tuple]:
  """cuDNN's packed layout of the same documents: lengths [B, M], offsets
  [B, M + 1] (int32)."""
  def make(n):
    ls = doc_lengths(n, doc)
    offsets = np.concatenate([[0], np.cumsum(ls)]).astype(np.int32)
    return (np.broadcast_to(ls.astype(np.int32), (B, len(ls))),
            np.broadcast_to(offsets, (B, len(offsets))))
  return make


def packed_flops(n: int, doc: int | None) -> float:
  """Forward FLOPs of the visible pairs: causal inside each document."""
  ls = doc_lengths(n, doc).astype(float)
  return float(np.sum(ls * (ls + 1) / 2)) * H * 4 * D


def _padding(fraction: float) -> Callable[[int], tuple]:
  """key_padding_mask [B, N] bool, the last ``fraction`` of the tokens padded."""
  return lambda n: (np.broadcast_to(np.arange(n) < n - int(n * fraction), (B, n)),)


def _dropout_key(seed: int) -> Callable[[int], tuple]:
  return lambda n: (jax.random.key(seed),)


# ----------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------


def _median_ms(fn, args, iters, seconds=5.0):
  """Median wall time after one warm-up call; at most ``seconds`` of runs."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  iters = max(1, min(iters, int(seconds / max(first, 1e-6))))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


_POWER_CAP = 0x4  # NVML's clocks-event reason: the software power cap


def clock_medians(lines) -> dict:
  """``{"sm_clock_mhz", "power_capped"}`` from ``nvidia-smi``'s
  ``clocks.sm,clocks_event_reasons.active`` CSV lines (no header, no
  units): the clock's median and the share of samples whose reasons hold
  the software power cap; lines it could not measure (``[N/A]``) left out,
  empty without a sample."""
  samples = []
  for line in lines:
    try:
      clock, reasons = line.split(",")
      samples.append((float(clock), int(reasons, 16)))
    except ValueError:  # [N/A], or not two fields
      continue
  if not samples:
    return {}
  clock, reasons = zip(*samples)
  return dict(sm_clock_mhz=statistics.median(clock),
              power_capped=sum(bool(r & _POWER_CAP) for r in reasons) / len(reasons))


def nvml_energy(index: int) -> Callable[[], float] | None:
  """A reader of GPU ``index``'s energy counter (mJ since the driver
  loaded), through NVML's C library; None where it does not load or the
  GPU keeps no counter."""
  try:
    nvml = ctypes.CDLL("libnvidia-ml.so.1")
  except OSError:
    return None
  handle, mj = ctypes.c_void_p(), ctypes.c_ulonglong()
  if nvml.nvmlInit_v2() or nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)):
    return None

  def read() -> float:
    if nvml.nvmlDeviceGetTotalEnergyConsumption(handle, ctypes.byref(mj)):
      raise OSError(f"NVML keeps no energy counter for GPU {index}")
    return float(mj.value)

  try:
    read()
  except OSError:
    return None
  return read


POWER_WINDOW_S = 2.0  # shortest run whose mean power the energy counter gives


@contextlib.contextmanager
def sampled_clocks(device, rec: dict, power_window_s: float = POWER_WINDOW_S):
  """Records in ``rec`` what the GPU ``device`` ran at while the block
  runs: :func:`clock_medians` of ``nvidia-smi`` samples every 20 ms (its
  GPU index taken as the device's id: CUDA's and nvidia-smi's orders agree
  on a host of equal GPUs), and the mean power ``power_w`` from
  :func:`nvml_energy`'s counter if the block ran ``power_window_s`` or
  longer. Nothing where neither exists (CPU)."""
  if device.platform != "gpu":
    yield
    return
  smi, energy = shutil.which("nvidia-smi"), nvml_energy(device.id)
  with tempfile.TemporaryFile("w+") as log:
    proc = smi and subprocess.Popen(
        [smi, "-i", str(device.id), "--query-gpu=clocks.sm,clocks_event_reasons.active",
         "--format=csv,noheader,nounits", "-lms", "20"], stdout=log, stderr=subprocess.DEVNULL)
    start = (energy(), time.perf_counter()) if energy else None
    try:
      yield
    finally:
      if start and (seconds := time.perf_counter() - start[1]) >= power_window_s:
        rec["power_w"] = (energy() - start[0]) / 1e3 / seconds
      if proc:
        proc.terminate()
        proc.wait()
        log.seek(0)
        rec.update(clock_medians(log))


def _peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def runtime_peak(device) -> int | None:
  """The device's ``peak_bytes_in_use`` (a process-wide high-water mark), or
  None where the runtime keeps no statistics (CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


def _inputs(n: int, device, seed: int):
  """q, k, v, dout: bf16 [B, n, H, D] normal, generated on ``device``."""
  gen = jax.jit(lambda key: jax.random.normal(key, (B, n, H, D), jnp.bfloat16),
                out_shardings=jax.sharding.SingleDeviceSharding(device))
  return [gen(key) for key in jax.random.split(jax.random.key(seed), 4)]


def fwd_bwd(impl: Callable) -> Callable:
  """Jitted ``(q, k, v, dout, *extra) -> (dq, dk, dv)`` of
  ``impl(q, k, v, *extra)``: what every case times."""
  @jax.jit
  def fwd_bwd(q, k, v, dout, *extra):  # (memory_report.py finds its dumps by this name)
    _, pull = jax.vjp(lambda q, k, v: impl(q, k, v, *extra), q, k, v)
    return pull(dout)
  return fwd_bwd


class Case(NamedTuple):
  """One benchmark case: ``impl(q, k, v, *extra(n)) -> out`` at length ``n``."""

  name: str
  impl: Callable
  n: int
  flops: float
  config: dict
  extra: Callable[[int], tuple] | None = None


def measure(case: Case, iters=10, *, fwd=True, isolated=False) -> dict:
  """Times one case on ``jax.devices()[0]``; a failure is recorded, not raised."""
  name, impl, n = case.name, case.impl, case.n
  device = jax.devices()[0]
  rec = dict(name=name, config=case.config, seq_len=n, dtype="bfloat16", batch=B, heads=H,
             head_dim=D, device=device.device_kind, jax_version=jax.__version__, run=RUN,
             xla_flags=os.environ.get("XLA_FLAGS", "").strip())
  before = runtime_peak(device)
  try:
    q, k, v, dout = _inputs(n, device, n)
    extra = tuple(jax.device_put(x, device) for x in case.extra(n)) if case.extra else ()
    compiled = fwd_bwd(impl).lower(q, k, v, dout, *extra).compile()
    rec["peak_bytes"] = _peak_bytes(compiled)
    if fwd:
      rec["fwd_ms"] = _median_ms(jax.jit(impl), (q, k, v, *extra), iters)
    with sampled_clocks(device, rec):
      rec["fwd_bwd_ms"] = _median_ms(compiled, (q, k, v, dout, *extra), iters)
  except Exception as e:  # a failing case is recorded, not fatal
    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(f"{name:32s} N={n:>8d}  ERROR {rec['error']}", flush=True)
    return rec
  after = runtime_peak(device)
  if after is not None:
    if isolated:
      rec["runtime_peak_bytes"] = after
    else:
      rec["process_peak_bytes_before"], rec["process_peak_bytes_after"] = before, after
  rec["qkv_out_grad_bytes"] = 7 * B * n * H * D * 2
  if "fwd_ms" in rec:
    rec["tflops_fwd"] = case.flops / rec["fwd_ms"] / 1e9
  rec["tflops_fwd_bwd"] = 3.5 * case.flops / rec["fwd_bwd_ms"] / 1e9
  fwd_text = f"fwd {rec['fwd_ms']:9.3f} ms  " if "fwd_ms" in rec else ""
  run_text = (f"  runtime {rec['runtime_peak_bytes'] / 2**30:7.2f} GiB"
              if "runtime_peak_bytes" in rec else "")
  run_text += (f"  {rec['sm_clock_mhz']:.0f} MHz ({100 * rec['power_capped']:.0f}% capped)"
               if "sm_clock_mhz" in rec else "")
  run_text += f" {rec['power_w']:.0f} W" if "power_w" in rec else ""
  print(f"{name:32s} N={n:>8d} {fwd_text}fwd+bwd {rec['fwd_bwd_ms']:9.3f} ms"
        f"  {rec['tflops_fwd_bwd']:6.1f} TFLOP/s  peak {rec['peak_bytes'] / 2**30:7.2f} GiB"
        + run_text, flush=True)
  return rec


# ----------------------------------------------------------------------------
# The cases.
# ----------------------------------------------------------------------------


def _dense(n: int):
  """(config, forward FLOPs) of the dense causal case: one branch w=N, r=1."""
  cfg = dict(segment_lengths=(n,), dilation_rates=(1,), mode="mix", causal=True)
  return cfg, attention_flops(n, (n,), (1,), "mix", True)


def _longnet(n: int, mode: str):
  """(config, forward FLOPs) of the causal LongNet case."""
  cfg = dict(LONGNET, mode=mode, causal=True)
  return cfg, attention_flops(n, LONGNET["segment_lengths"], LONGNET["dilation_rates"],
                              mode, True)


def _slice_baseline(mode: str, writeback: str = "pad"):
  fn = slice_cudnn_mix if mode == "mix" else slice_cudnn_partition
  return functools.partial(fn, writeback=writeback, **LONGNET)


def _ns(*nominal: int) -> tuple[int, ...]:
  return tuple(x // SCALE for x in nominal)


def cases(only):
  """Yields every :class:`Case` of the groups in ``only``, in group order."""
  if "dense" in only:
    for n in _ns(8192, 32768, 131072):
      cfg, fl = _dense(n)
      yield Case("cudnn_dense", cudnn_dense, n, fl, cfg)
      yield Case("ours_dense", functools.partial(ours, segment_lengths=(n,),
                                                 dilation_rates=(1,)), n, fl, cfg)
      yield Case("ours_dense_ring1", functools.partial(
          ours_ring1, segment_lengths=(n,), dilation_rates=(1,)), n, fl, cfg)
  if "longnet" in only:
    for n in _ns(65536, 262144, 524288, 1048576):
      for mode in ("mix", "partition"):
        cfg, fl = _longnet(n, mode)
        yield Case(f"ours_longnet_{mode}", functools.partial(ours, mode=mode, **LONGNET),
                   n, fl, cfg)
        yield Case(f"slice_cudnn_longnet_{mode}", _slice_baseline(mode), n, fl, cfg)
        yield Case(f"gather_cudnn_longnet_{mode}", functools.partial(
            gather_cudnn, mode=mode, **LONGNET), n, fl, cfg)
        if n == _M // SCALE and mode == "mix":  # the plain one needs 100 GiB here
          yield Case(f"gather_cudnn_remat_longnet_{mode}", functools.partial(
              gather_cudnn, mode=mode, remat=True, **LONGNET), n, fl, cfg)
  if "slice" in only:
    for n in _ns(524288, 1048576):
      for mode in ("partition", "mix"):
        cfg, fl = _longnet(n, mode)
        yield Case(f"slice_cudnn_longnet_{mode}", _slice_baseline(mode), n, fl, cfg)
        if mode == "partition":
          yield Case("slice_cudnn_set_longnet_partition", _slice_baseline(mode, "set"),
                     n, fl, cfg)
        yield Case(f"ours_longnet_{mode}", functools.partial(ours, mode=mode, **LONGNET),
                   n, fl, cfg)
        yield Case(f"ours_pallas_longnet_{mode}", functools.partial(
            ours, mode=mode, backend="pallas", **LONGNET), n, fl, dict(cfg, backend="pallas"))
  if "masked" in only:
    for n in _ns(262144, 1048576):
      for mode in ("mix", "partition"):
        cfg, fl = _longnet(n, mode)
        base = dict(mode=mode, **LONGNET)
        yield Case(f"ours_longnet_{mode}", functools.partial(ours, **base), n, fl, cfg)
        for tag, doc in (("docs64k", 65536), ("docs8k", 8192)):
          yield Case(f"ours_{tag}_longnet_{mode}", functools.partial(ours_docs, **base), n,
                     fl, dict(cfg, segment_ids=f"documents of {doc} tokens"),
                     _documents(doc // SCALE))
        yield Case(f"ours_docsvar_longnet_{mode}", functools.partial(ours_docs, **base), n,
                   fl, dict(cfg, segment_ids="documents of varied length (doc_lengths)"),
                   _documents(None))
        yield Case(f"ours_pad10_longnet_{mode}", functools.partial(ours_padded, **base), n,
                   fl, dict(cfg, key_padding_mask="last 10% of tokens padded"),
                   _padding(0.1))
        yield Case(f"ours_dropout_longnet_{mode}", functools.partial(ours_dropout, **base),
                   n, fl, dict(cfg, dropout_rate=0.1), _dropout_key(0))
      cfg, fl = _longnet(n, "mix")
      yield Case("ours_xla_docs64k_longnet_mix", functools.partial(
          ours_docs, mode="mix", backend="xla", **LONGNET), n, fl,
          dict(cfg, backend="xla", segment_ids="documents of 65536 tokens"),
          _documents(65536 // SCALE))
  for kernels in ("pallas", "mosaic"):  # the in-place kernel families
    if kernels not in only:
      continue
    for n in _ns(8192, 32768):
      cfg, fl = _dense(n)
      yield Case("cudnn_dense", cudnn_dense, n, fl, cfg)
      yield Case("ours_dense", functools.partial(ours, segment_lengths=(n,),
                                                 dilation_rates=(1,)), n, fl, cfg)
      yield Case(f"ours_{kernels}_dense", functools.partial(
          ours, segment_lengths=(n,), dilation_rates=(1,), backend=kernels), n, fl,
          dict(cfg, backend=kernels))
    for n in _ns(65536, 262144, 524288, 1048576):
      for mode in ("mix", "partition"):
        cfg, fl = _longnet(n, mode)
        yield Case(f"ours_{kernels}_longnet_{mode}", functools.partial(
            ours, mode=mode, backend=kernels, **LONGNET), n, fl, dict(cfg, backend=kernels))
        yield Case(f"ours_longnet_{mode}", functools.partial(ours, mode=mode, **LONGNET),
                   n, fl, cfg)
        yield Case(f"ours_cudnn_longnet_{mode}", functools.partial(
            ours, mode=mode, backend="cudnn", **LONGNET), n, fl, dict(cfg, backend="cudnn"))
        yield Case(f"slice_cudnn_longnet_{mode}", _slice_baseline(mode), n, fl, cfg)
  if "packed" in only:
    for n in _ns(32768, 131072, 262144, 524288):
      cfg, fl = _dense(n)
      yield Case("cudnn_dense", cudnn_dense, n, fl, cfg)
      for tag, doc in (("docs8k", 8192 // SCALE), ("docsvar", None)):
        fl = packed_flops(n, doc)
        docs = dict(cfg, segment_ids=(f"documents of {doc * SCALE} tokens" if doc else
                                      "documents of varied length (doc_lengths)"),
                    documents=len(doc_lengths(n, doc)))
        base = dict(segment_lengths=(n,), dilation_rates=(1,))
        yield Case(f"ours_{tag}_dense", functools.partial(ours_docs, **base), n, fl, docs,
                   _documents(doc))
        yield Case(f"ours_pallas_{tag}_dense", functools.partial(
            ours_docs, backend="pallas", **base), n, fl, dict(docs, backend="pallas"),
                   _documents(doc))
        yield Case(f"cudnn_packed_{tag}_dense", cudnn_packed, n, fl, docs, _packed_layout(doc))
        if doc:
          yield Case(f"cudnn_per_doc_{tag}_dense", functools.partial(cudnn_per_doc, doc=doc),
                     n, fl, docs)
  if "zigzag" in only:  # run with "dense": its ours_dense_ring1 is the reference
    for n in _ns(8192, 32768, 131072):
      cfg, fl = _dense(n)
      yield Case("ours_dense_ring1_zigzag", functools.partial(
          ours_ring1, segment_lengths=(n,), dilation_rates=(1,), layout="zigzag"), n, fl, cfg)
    for n in _ns(131072, 1048576):  # per-device length L = n / 8
      local = n // 8
      cfg = dict(segment_lengths=(n,), dilation_rates=(1,), mode="mix", causal=True,
                 ring_size=8)
      yield Case("step_contiguous_p8", step_contiguous, local, 4.0 * local**2 * H * D, cfg)
      yield Case("step_zigzag_p8", step_zigzag, local, 2.0 * local**2 * H * D, cfg)
  if "ringattn" in only:
    for n in _ns(8192, 32768):
      cfg, fl = _dense(n)
      yield Case("ringattention_pkg", ringattention_pkg, n, fl, cfg)
      yield Case("ours_dense_ring1", functools.partial(
          ours_ring1, segment_lengths=(n,), dilation_rates=(1,)), n, fl, cfg)


# --smoke without --only: the masked group and the slice baselines at the two
# smallest lengths (the Pallas kernels run in interpret mode on CPU: minutes).
SMOKE_ONLY = ("masked,slice_cudnn_longnet_mix,slice_cudnn_longnet_partition,"
              "slice_cudnn_set_longnet_partition")
SMOKE_SEQS = "262144,524288"
GROUPS = ("dense", "longnet", "slice", "masked", "ringattn", "zigzag", "pallas", "mosaic",
          "packed")


def plan(only: set[str], seqs: set[int], max_seq: int) -> list[Case]:
  """The cases of the groups and case names in ``only`` (nominal lengths
  ``seqs``, or all up to ``max_seq``), deduplicated, most important
  (:data:`PRIORITY`) first."""
  todo, seen = [], set()
  for group in GROUPS:
    for case in cases({group}):
      if group not in only and case.name not in only:
        continue
      nominal = case.n * SCALE
      if nominal > max_seq or (seqs and nominal not in seqs) or (case.name, case.n) in seen:
        continue
      seen.add((case.name, case.n))
      todo.append(case)
  rank = {key: i for i, key in reversed(list(enumerate(PRIORITY)))}
  order = {id(c): i for i, c in enumerate(todo)}
  return sorted(todo, key=lambda c: (rank.get((c.name, c.n * SCALE), len(PRIORITY)),
                                     order[id(c)]))


def _exit_text(code: int | None) -> str:
  """How a subprocess ended (None: it timed out)."""
  if code is None:
    return "timed out"
  if code < 0:
    try:
      return f"killed by {signal.Signals(-code).name}"
    except ValueError:
      return f"killed by signal {-code}"
  return f"exit code {code}"


def run_isolated(case: Case, args, timeout: float | None) -> dict:
  """Runs ``case`` in a fresh ``bench.py`` subprocess; its record, or an error."""
  fd, path = tempfile.mkstemp(suffix=".json", prefix="bench_case_")
  os.close(fd)
  os.unlink(path)
  cmd = [sys.executable, os.path.abspath(__file__), "--only", case.name,
         "--seqs", str(case.n * SCALE), "--out", path, "--iters", str(args.iters), "--child"]
  cmd += ["--smoke"] * args.smoke + ["--no-fwd"] * (not args.fwd)
  try:
    code = subprocess.run(cmd, timeout=timeout, check=False).returncode
    why = _exit_text(code)
  except subprocess.TimeoutExpired:
    code, why = None, f"timed out after {timeout:.0f} s"
  recs = []
  if os.path.exists(path):
    with open(path) as f:
      recs = json.load(f)
    os.unlink(path)
  if recs:
    return recs[-1]
  rec = dict(name=case.name, config=case.config, seq_len=case.n, dtype="bfloat16",
             batch=B, heads=H, head_dim=D, jax_version=jax.__version__,
             error=f"SubprocessError: {why}")
  print(f"{case.name:32s} N={case.n:>8d}  ERROR {rec['error']}", flush=True)
  return rec


def merge_record(records: list, rec: dict) -> list:
  """``records`` with ``rec`` appended, replacing its case's record of the
  same run and its unmeasured (skipped, failed) ones: records of earlier
  runs stay, since check_targets.py divides only records of one run."""
  key = (rec["name"], rec["seq_len"])

  def replaced(r):
    return (r["name"], r["seq_len"]) == key and (r.get("run") == rec.get("run")
                                                  or "fwd_bwd_ms" not in r)

  return [r for r in records if not replaced(r)] + [rec]


def _save(path: str | None, records: list) -> None:
  if path:  # after every case, so a run cut short keeps what it measured
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(records, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=None, help="results JSON path (merged into)")
  parser.add_argument("--only", default=None,
                      help="comma list of case groups and/or case names (default "
                      "dense,longnet,ringattn,zigzag; see SMOKE_ONLY for --smoke)")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--max-seq", type=int, default=1 << 20)
  parser.add_argument("--seqs", default="", help="comma list: only these lengths "
                      "(nominal: as named without --smoke)")
  parser.add_argument("--time-budget", type=float, default=None,
                      help="seconds; no case starts after that (skipped ones are recorded)")
  parser.add_argument("--isolate", action="store_true",
                      help="each case in a fresh subprocess (per-case runtime peak)")
  parser.add_argument("--no-fwd", dest="fwd", action="store_false",
                      help="time forward+backward only (one compile per case)")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, XLA baselines (CPU)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  _configure(args.smoke)
  start = time.monotonic()
  only = set((args.only or (SMOKE_ONLY if args.smoke else "dense,longnet,ringattn,zigzag"))
             .split(","))
  seqs = {int(x) for x in (args.seqs or (SMOKE_SEQS if args.smoke and not args.only else ""))
          .split(",") if x}
  max_seq = max(seqs) if seqs else args.max_seq  # --seqs: exactly those
  records = []
  if args.out and os.path.exists(args.out):
    with open(args.out) as f:
      records = json.load(f)
  todo = plan(only, seqs, max_seq)
  skipped = []
  for case in todo:
    key = (case.name, case.n)
    left = None if args.time_budget is None else args.time_budget - (time.monotonic() - start)
    if left is not None and left <= 0:
      skipped.append(case)
      if not any((r["name"], r["seq_len"]) == key for r in records):
        records.append(dict(name=case.name, config=case.config, seq_len=case.n,
                            skipped=f"time budget of {args.time_budget:.0f} s spent"))
      continue
    if args.isolate:
      # The case may overrun the budget by its own length, not forever.
      rec = run_isolated(case, args, None if left is None else left + 600)
    else:
      rec = measure(case, args.iters, fwd=args.fwd, isolated=args.child)
    records = merge_record(records, rec)
    _save(args.out, records)
  if skipped:
    _save(args.out, records)
    print(f"time budget of {args.time_budget:.0f} s spent: skipped "
          + ", ".join(f"{c.name}@{c.n}" for c in skipped), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
