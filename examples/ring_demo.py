"""Dilated attention as a ring over 8 (simulated) devices vs one device.

Runs a LongNet-style configuration forward and backward, sequence-parallel
with ``jax.shard_map`` (the sequence split in ``P`` contiguous shards, K/V
chunks passed around with ``jax.lax.ppermute``) and on a single device, then
prints how far apart outputs and gradients are, per-device memory of the
compiled programs, how many bytes the ring sends per device compared with
an all-gather of the full K/V, and (causal) the same ring in the zigzag layout,
which gives every device the same work at every ring step.

    python examples/ring_demo.py                  # N=8192 over 8 CPU devices
    python examples/ring_demo.py --dtype bfloat16 --devices 4

On CPU the devices are simulated: this script asks XLA for 8 host devices
before importing jax (no effect on GPU/TPU, where the real devices are used).
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # (and no concurrency-optimized CPU scheduler: it can run the collectives
  # of independent rings out of step across simulated devices; see README)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8"
                             " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.extend.core  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as PS  # noqa: E402

import ringdilated as rd  # noqa: E402


def _ints(text):
  return tuple(int(x) for x in text.split(","))


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seq-len", type=int, default=8192, help="global sequence length N")
  parser.add_argument("--devices", type=int, default=8, help="ring size P")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--head-dim", type=int, default=32)
  parser.add_argument("--segment-lengths", type=_ints, default=(512, 1024, 2048, 4096, 8192))
  parser.add_argument("--dilation-rates", type=_ints, default=(1, 2, 4, 8, 16))
  parser.add_argument("--mode", choices=("mix", "partition"), default="mix")
  parser.add_argument("--no-causal", dest="causal", action="store_false")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  return parser.parse_args()


def _mib(n):
  return f"{n / 2**20:9.2f} MiB"


def _ppermute_bytes(jaxpr, times=1):
  """Bytes one device sends: every ppermute operand, times enclosing scan lengths."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "ppermute":
      total += times * sum(v.aval.size * v.aval.dtype.itemsize for v in eqn.invars)
    inner = times * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          sub = sub.jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          total += _ppermute_bytes(sub, inner)
  return total


def main():
  args = parse_args()
  n, p, b = args.seq_len, args.devices, args.batch
  h, hkv, d = args.heads, args.kv_heads, args.head_dim
  dtype = jnp.dtype(args.dtype)
  if len(jax.devices()) < p:
    raise SystemExit(f"--devices={p} but only {len(jax.devices())} devices are visible")
  kw = dict(segment_lengths=args.segment_lengths, dilation_rates=args.dilation_rates,
            mode=args.mode, causal=args.causal)

  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((b, n, x, d)), dtype) for x in (h, hkv, hkv))
  cot = jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32)

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:p]), ("sp",))
  ring = jax.shard_map(
      lambda q, k, v: rd.dilated_attention(q, k, v, axis_name="sp", **kw),
      mesh=mesh, in_specs=PS(None, "sp"), out_specs=PS(None, "sp"))

  def single(q, k, v):
    return rd.dilated_attention(q, k, v, **kw)

  out_and_grads = functools.partial(_out_and_grads, cot=cot)

  print(f"N={n} B={b} H={h} K={hkv} D={d} {dtype.name} mode={args.mode} "
        f"causal={args.causal}, ring of P={p} devices (L={n // p} tokens each)")
  print(f"segment_lengths={args.segment_lengths} dilation_rates={args.dilation_rates}\n")

  results, memory = {}, {}
  for name, fn in (("ring", ring), ("single", single)):
    t0 = time.perf_counter()
    compiled = jax.jit(out_and_grads(fn)).lower(q, k, v).compile()
    t1 = time.perf_counter()
    results[name] = jax.block_until_ready(compiled(q, k, v))
    t2 = time.perf_counter()
    memory[name] = compiled.memory_analysis()
    print(f"{name:6s}: compile {t1 - t0:5.1f} s, forward+backward {t2 - t1:5.2f} s")

  print("\nmax |ring - single device|")
  for label, a, c in zip(("out", "dq", "dk", "dv"), results["ring"], results["single"]):
    err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - c.astype(jnp.float32))))
    scale = float(jnp.max(jnp.abs(c.astype(jnp.float32))))
    print(f"  {label:3s} {err:.2e}   (max |value| {scale:.2f})")

  print("\nper-device memory of the compiled forward+backward program")
  print(f"  {'':14s}{'temp':>13s}{'arguments':>13s}{'total':>13s}")
  for name in ("ring", "single"):
    m = memory[name]
    print(f"  {name + ' device':14s}{_mib(m.temp_size_in_bytes):>13s}"
          f"{_mib(m.argument_size_in_bytes):>13s}"
          f"{_mib(m.temp_size_in_bytes + m.argument_size_in_bytes):>13s}")
  print(f"  (dense attention: one [H, N, N] float32 score tensor is {_mib(h * n * n * 4).strip()})")

  # Bytes the ring's ppermutes carry, from the configuration: a branch whose
  # segment spans g devices rotates its compacted K/V chunk [B, L/r, K_b, D]
  # g - 1 times forward; backward rotates it again plus the float32 dK/dV
  # accumulators, which travel g hops back to their owner. A causal ring
  # with chunks in device order shares the work evenly: with g = 2 the later
  # device sends half its queries [B, L/2r, H_b, D] (backward: with dout, out,
  # lse) to the earlier one, which attends them to its own chunk while the
  # later device attends its other half to the earlier chunk; then the
  # float32 out and lse (backward: dq) come back, and the float32 dK/dV of the
  # later device's block go to the chunk's owner. With g > 2 half of each
  # compacted chunk (q and K/V) is swapped into the zigzag order first, and
  # the float32 results back.
  item = dtype.itemsize
  print("\nring communication per device (from the configuration)")
  print(f"  {'w':>6s}{'r':>4s}{'g':>4s}  {'chunk [B,L/r,K,D]':18s}{'forward':>13s}{'fwd+bwd':>13s}")
  fwd_total = both_total = 0
  local = n // p
  for i, (w, r) in enumerate(zip(args.segment_lengths, args.dilation_rates)):
    g = max(1, w // local)
    slots = _kv_slots(args.mode, i, len(args.segment_lengths), h, hkv)
    chunk = b * (local // r) * slots * d if g > 1 else 0
    fwd = (g - 1) * 2 * chunk * item
    both = 2 * fwd + g * 2 * chunk * 4
    if args.causal and g > 1 and (local // r) % 2 == 0:
      half = b * (local // r) // 2
      hq = _q_heads(args.mode, i, len(args.segment_lengths), h)
      if g == 2:  # queries down, K/V up, out and lse (dq) up, dK/dV down
        fwd = half * (hq * d * item + hq * (d + 1) * 4) + 2 * chunk * item
        both = fwd + half * (3 * hq * d * item + hq * 4 + hq * d * 4) + 2 * chunk * (item + 4)
      else:
        swap = half * ((hq + 2 * slots) * d * item + hq * (d + 1) * 4)  # q, k, v; out, lse
        swap_bwd = half * ((3 * hq + 2 * slots) * d * item + hq * 4     # q, dout, out, k, v, lse
                           + (hq + 2 * slots) * d * 4)                  # dq, dk, dv
        fwd, both = fwd + 2 * swap, both + 2 * (swap + swap_bwd)
    fwd_total, both_total = fwd_total + fwd, both_total + both
    shape = f"[{b},{local // r},{slots},{d}]" if chunk else "local"
    print(f"  {w:6d}{r:4d}{g:4d}  {shape:18s}{_mib(fwd):>13s}{_mib(both):>13s}")
  print(f"  {'ring total':34s}{_mib(fwd_total):>13s}{_mib(both_total):>13s}")
  gather = (p - 1) * (n // p) * b * hkv * d * 2 * item
  scatter = (p - 1) * (n // p) * b * hkv * d * 2 * 4
  print(f"  {'all-gather of full K/V (*)':34s}{_mib(gather):>13s}{_mib(gather + scatter):>13s}")
  print("  (*) (P-1)/P * N * K * D * 2 tensors; backward adds a reduce-scatter of "
        "float32 dK/dV")
  print(f"  ring sends {gather / max(fwd_total, 1):.1f}x fewer bytes forward, "
        f"{(gather + scatter) / max(both_total, 1):.1f}x fewer forward+backward")

  # Cross-check: the ppermutes the traced program actually contains.
  traced_fwd = _ppermute_bytes(jax.make_jaxpr(ring)(q, k, v).jaxpr)
  traced_both = _ppermute_bytes(jax.make_jaxpr(out_and_grads(ring))(q, k, v).jaxpr)
  print(f"  ppermute bytes in the traced program: forward {_mib(traced_fwd).strip()}, "
        f"forward+backward {_mib(traced_both).strip()}")
  if (traced_fwd, traced_both) != (fwd_total, both_total):
    raise SystemExit("traced communication differs from the configuration")
  if args.causal:
    _zigzag(args, kw, mesh, (q, k, v), cot, results["single"])


def _q_heads(mode: str, i: int, k: int, h: int) -> int:
  """Query heads branch ``i`` of ``k`` reads: all in "mix", its group in
  "partition" (the first ``h % k`` groups have one more)."""
  return h if mode == "mix" else h // k + (i < h % k)


def _kv_slots(mode: str, i: int, k: int, h: int, hkv: int) -> int:
  """K/V heads branch ``i`` of ``k`` reads (its compacted chunk's heads):
  all in "mix"; in "partition" those of its head group, one per query head
  when the group cuts a GQA group (the rule of the README)."""
  if mode == "mix":
    return hkv
  base, extra = divmod(h, k)
  start = i * base + min(i, extra)
  stop = start + base + (i < extra)
  g = h // hkv
  return (stop - start) // g if start % g == 0 and stop % g == 0 else stop - start


def _out_and_grads(fn, cot):
  """``(q, k, v) -> (out, dq, dk, dv)`` of ``sum(fn(q, k, v) * cot)``."""
  def run(q, k, v):
    def loss(q, k, v):
      out = fn(q, k, v)
      return jnp.sum(out.astype(jnp.float32) * cot), out
    grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return (out,) + grads
  return run


def _zigzag(args, kw, mesh, qkv, cot, single):
  """The causal ring in the zigzag layout: error and per-step work balance.

  As in training, the data are laid out once (``rd.to_layout``) and the
  jitted program runs in that order; results are mapped back afterwards.
  """
  n, p = args.seq_len, args.devices
  print("\nzigzag layout (device d holds half-chunks d and 2P-1-d)")
  try:
    balance = {layout: rd.ring_balance(rd.DilatedConfig(**kw, layout=layout), n, p)
               for layout in ("contiguous", "zigzag")}
  except ValueError as e:
    print(f"  not available for this configuration: {e}")
    return
  ring = jax.shard_map(
      lambda q, k, v: rd.dilated_attention(q, k, v, axis_name="sp", layout="zigzag", **kw),
      mesh=mesh, in_specs=PS(None, "sp"), out_specs=PS(None, "sp"))
  q, k, v, cot = (rd.to_layout(x, "zigzag", p) for x in (*qkv, cot))
  got = [rd.from_layout(x, "zigzag", p) for x in jax.jit(_out_and_grads(ring, cot))(q, k, v)]
  err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - c.astype(jnp.float32))))
            for a, c in zip(got, single))
  print(f"  max |zigzag ring - single device| over out, dq, dk, dv: {err:.2e}")
  print("  busiest device / mean, work per ring step (from the static schedule):")
  for layout, (worst, whole) in balance.items():
    print(f"    {layout:10s}  worst step {worst:.2f}, whole pass {whole:.2f}")


if __name__ == "__main__":
  main()
