"""Train a small dilated-attention transformer on a synthetic passkey task.

Each sequence hides a *passkey* (one of ``--num-values`` value tokens, written
``--repeat`` times right after a marker token) at a random position in its
first ``--key-window`` tokens; everything else is random filler, and the last
token is a query marker: the model must predict the passkey there, at least
``N - key_window`` tokens after it was shown (the loss is taken at that one
position only). Chance accuracy is ``1 / num_values``. The repetition makes
one copy land on every residue class of the largest dilation rate, so the
query can reach it through the sparsest branch.

Defaults (N=512, batch 16, 250 steps) reach 100% accuracy in about 2.5 minutes
on 2 CPU cores.

The model is a decoder-only transformer: token + learned position embeddings,
``--layers`` pre-LN blocks of causal ``rd.MultiHeadDilatedAttention``
(LongNet-style ``segment_lengths`` / ``dilation_rates`` doubling up to ``N``)
and an MLP, trained with optax (adamw, warmup + cosine decay, gradient
clipping) on the cross entropy of the answer token only.

    python examples/train_long_context.py                 # one device
    python examples/train_long_context.py --mesh 4        # ring over 4 devices
    python examples/train_long_context.py --mesh 4 --layout zigzag   # balanced ring
    python examples/train_long_context.py --docs 4        # 4 packed documents per row

``--docs K`` packs ``K`` passkey documents of ``N / K`` tokens into each row,
as training on packed data does: positions restart in every document,
``segment_ids`` (the document index) keep attention inside each document,
and the loss is taken at every document's query marker.

``--mesh P`` shards the sequence over ``P`` devices with ``jax.shard_map``
(parameters replicated, tokens split on the sequence axis, attention as a
``ppermute`` ring over mesh axis ``"sp"``). On CPU the devices are simulated:
the script asks XLA for ``P`` host devices before jax is imported.
``--layout zigzag`` lays the sequence out so that every device has the same
causal work (``rd.to_layout`` on token ids and positions going in,
``rd.from_layout`` on the logits coming out).

At the end it writes ``loss.png`` (if matplotlib is installed) and a
``flax.serialization`` checkpoint ``params.msgpack`` to ``--out-dir``, reloads
the checkpoint and evaluates it on fresh sequences.
"""

from __future__ import annotations

import os
import sys


def _early_mesh(argv) -> int:
  """``--mesh`` value, read before argparse so XLA_FLAGS can be set in time."""
  for i, arg in enumerate(argv):
    if arg == "--mesh" and i + 1 < len(argv):
      return int(argv[i + 1])
    if arg.startswith("--mesh="):
      return int(arg.split("=", 1)[1])
  return 1


if __name__ == "__main__":
  _p = _early_mesh(sys.argv[1:])
  if _p > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_p}"
        " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import flax.serialization  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as PS  # noqa: E402

import ringdilated as rd  # noqa: E402

# Token ids: 0 query marker, 1 key marker, 2 .. 2+V-1 values, then filler.
QUERY, MARK, FIRST_VALUE = 0, 1, 2


# --------------------------------------------------------------------- data

def make_batch(rng: np.random.Generator, batch: int, seq_len: int, num_values: int,
               vocab: int, key_window: int, repeat: int = 1, docs: int = 1):
  """Rows ``[B, N]`` int32 of ``docs`` passkey documents of ``N / docs``
  tokens each, and their answers ``[B, docs]`` (0-based value ids)."""
  if docs > 1:
    tokens, answers = make_batch(rng, batch * docs, seq_len // docs, num_values, vocab,
                                 key_window, repeat)
    return tokens.reshape(batch, seq_len), answers.reshape(batch, docs)
  first_filler = FIRST_VALUE + num_values
  tokens = rng.integers(first_filler, vocab, size=(batch, seq_len), dtype=np.int32)
  answers = rng.integers(0, num_values, size=batch, dtype=np.int32)
  where = rng.integers(0, key_window - repeat, size=batch)
  rows = np.arange(batch)
  tokens[rows, where] = MARK
  for j in range(1, repeat + 1):  # "the pass key is v. v. v. v."
    tokens[rows, where + j] = FIRST_VALUE + answers
  tokens[:, -1] = QUERY
  return tokens, answers[:, None]


def document_layout(seq_len: int, docs: int):
  """Positions ``[N]`` (restarting in each document) and ``segment_ids``
  ``[N]`` (the document index, None for one document) of a packed row."""
  doc_len = seq_len // docs
  ids = np.arange(seq_len, dtype=np.int32)
  return ids % doc_len, (ids // doc_len if docs > 1 else None)


# -------------------------------------------------------------------- model

def longnet_config(seq_len: int, first_segment: int, num_heads: int):
  """LongNet-style ``(w_i, r_i)``: w doubles from ``first_segment`` to N, r = 1, 2, 4...

  ``r`` is capped at ``num_heads``: in mode "mix" head ``h`` uses offset
  ``h mod r``, so with ``r <= H`` every position (the query at the end
  included) is kept by some head in every branch.
  """
  ws, rs, w, r = [], [], min(first_segment, seq_len), 1
  while True:
    ws.append(w)
    rs.append(r)
    if w >= seq_len:
      break
    w, r = min(2 * w, seq_len), min(2 * r, num_heads)
  return tuple(ws), tuple(rs)


class Block(nn.Module):
  num_heads: int
  segment_lengths: tuple
  dilation_rates: tuple
  axis_name: str | None = None
  layout: str = "contiguous"

  @nn.compact
  def __call__(self, x, segment_ids=None):
    e = x.shape[-1]
    y = nn.LayerNorm(name="ln_attn")(x)
    x = x + rd.MultiHeadDilatedAttention(
        num_heads=self.num_heads, segment_lengths=self.segment_lengths,
        dilation_rates=self.dilation_rates, causal=True, axis_name=self.axis_name,
        layout=self.layout, name="attn")(y, segment_ids=segment_ids)
    y = nn.LayerNorm(name="ln_mlp")(x)
    y = nn.Dense(4 * e, name="mlp_in")(y)
    y = nn.Dense(e, name="mlp_out")(nn.gelu(y))
    return x + y


class Transformer(nn.Module):
  """Decoder-only transformer; under ``axis_name`` it sees one sequence shard.

  Called on token ids, their positions (within their document) and, for
  packed documents, their document ids, all [B, T] (the shard of the
  sequence in ``layout`` under ``axis_name``).
  """

  vocab: int
  seq_len: int  # global N (size of the position table)
  num_outputs: int
  d_model: int
  num_heads: int
  num_layers: int
  segment_lengths: tuple
  dilation_rates: tuple
  axis_name: str | None = None
  layout: str = "contiguous"

  @nn.compact
  def __call__(self, tokens, positions, segment_ids=None):  # -> logits [B, T, num_outputs]
    pos_table = self.param("pos_embed", nn.initializers.normal(0.02),
                           (self.seq_len, self.d_model))
    x = nn.Embed(self.vocab, self.d_model, name="embed")(tokens) + pos_table[positions]
    for i in range(self.num_layers):
      x = Block(self.num_heads, self.segment_lengths, self.dilation_rates,
                self.axis_name, self.layout, name=f"block_{i}")(x, segment_ids)
    x = nn.LayerNorm(name="ln_final")(x)
    return nn.Dense(self.num_outputs, name="head")(x)


def build_logits_fn(args, mesh_size: int):
  """``(model, logits_fn(params, tokens) -> [B, N, V])``, natural token order,
  over rows of ``args.docs`` packed documents."""
  ws, rs = longnet_config(args.seq_len, args.first_segment, args.heads)
  kw = dict(vocab=args.vocab, seq_len=args.seq_len, num_outputs=args.num_values,
            d_model=args.d_model, num_heads=args.heads, num_layers=args.layers,
            segment_lengths=ws, dilation_rates=rs)
  model = Transformer(**kw)
  positions, segment_ids = document_layout(args.seq_len, args.docs)

  def rows(tokens, x):  # x [N] broadcast to the rows of tokens, or None
    return None if x is None else jnp.broadcast_to(jnp.asarray(x), tokens.shape)

  if mesh_size <= 1:
    return model, lambda params, tokens: model.apply(
        params, tokens, rows(tokens, positions), rows(tokens, segment_ids))
  if len(jax.devices()) < mesh_size:
    raise SystemExit(
        f"--mesh {mesh_size} needs {mesh_size} devices, {len(jax.devices())} visible "
        "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count before jax is imported)")
  ring_model = Transformer(**kw, axis_name="sp", layout=args.layout)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:mesh_size]), ("sp",))
  # Parameters replicated, tokens sharded on the sequence axis; the logits come
  # back sharded the same way, the loss is taken outside.
  spec = PS(None, "sp")
  sharded = jax.shard_map(ring_model.apply, mesh=mesh,
                          in_specs=(PS(),) + (spec,) * (2 if segment_ids is None else 3),
                          out_specs=spec)

  def logits_fn(params, tokens):
    laid = [rd.to_layout(x, args.layout, mesh_size)
            for x in (tokens, rows(tokens, positions), rows(tokens, segment_ids))
            if x is not None]
    return rd.from_layout(sharded(params, *laid), args.layout, mesh_size)
  return model, logits_fn


# -------------------------------------------------------------- train / eval

def answer_loss(logits_fn, params, tokens, answers):
  """Cross entropy and accuracy at every document's query marker (its last
  token); ``answers`` [B, docs]."""
  docs = answers.shape[1]
  ends = jnp.arange(1, docs + 1) * (tokens.shape[1] // docs) - 1
  logits = logits_fn(params, tokens)[:, ends].astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, answers).mean()
  acc = jnp.mean(jnp.argmax(logits, -1) == answers)
  return loss, acc


def evaluate(eval_step, params, rng, args, batches: int) -> float:
  correct = 0.0
  for _ in range(batches):
    tokens, answers = make_batch(rng, args.batch, args.seq_len, args.num_values,
                                 args.vocab, args.key_window, args.repeat, args.docs)
    _, acc = eval_step(params, tokens, answers)
    correct += float(acc)
  return correct / batches


class _Progress:
  """tqdm if installed, else a plain line every ``every`` steps."""

  def __init__(self, total: int, every: int):
    self.total, self.every = total, max(every, 1)
    try:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total, desc="train")
    except ImportError:
      self.bar = None

  def update(self, step: int, loss: float, acc: float):
    if self.bar is not None:
      self.bar.update(1)
      self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}")
    elif step % self.every == 0 or step == self.total:
      print(f"step {step:5d}/{self.total}  loss {loss:.4f}  acc {acc:.2f}", flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def save_plot(path: str, losses, accs, chance: float) -> bool:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not installed: skipping the loss plot")
    return False
  steps = np.arange(1, len(losses) + 1)
  window = max(1, len(losses) // 50)
  smooth = np.convolve(accs, np.ones(window) / window, mode="valid")
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
  ax1.plot(steps, losses, lw=0.8)
  ax1.set_xlabel("step")
  ax1.set_ylabel("answer cross entropy")
  ax1.set_title("training loss")
  ax2.plot(steps[window - 1:], smooth, lw=1.0, label=f"train accuracy ({window}-step mean)")
  ax2.axhline(chance, color="gray", ls="--", lw=0.8, label=f"chance {chance:.3f}")
  ax2.set_ylim(0, 1.02)
  ax2.set_xlabel("step")
  ax2.set_title("answer accuracy")
  ax2.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=250)
  p.add_argument("--seq-len", type=int, default=512, help="global sequence length N")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--mesh", type=int, default=1, help="shard the sequence over this many devices")
  p.add_argument("--docs", type=int, default=1,
                 help="pack this many passkey documents into each row (segment_ids)")
  p.add_argument("--layout", choices=("contiguous", "zigzag"), default="contiguous",
                 help="how the sequence lies on the devices (zigzag: balanced causal work)")
  p.add_argument("--out-dir", default="runs")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num-values", type=int, default=16, help="passkey alphabet (chance = 1/this)")
  p.add_argument("--vocab", type=int, default=32, help="total vocabulary (markers+values+filler)")
  p.add_argument("--key-window", type=int, default=64, help="passkey lies in the first tokens")
  p.add_argument("--repeat", type=int, default=4, help="the passkey is written this many times")
  p.add_argument("--first-segment", type=int, default=128, help="smallest segment length w_0")
  p.add_argument("--d-model", type=int, default=64)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--warmup", type=int, default=None, help="default: steps // 10")
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--quiet", action="store_true", help="no progress output")
  args = p.parse_args(argv)
  if args.vocab < FIRST_VALUE + args.num_values + 1:
    p.error(f"--vocab={args.vocab} must exceed num_values + 2 = {args.num_values + 2}")
  if args.docs < 1 or args.seq_len % args.docs:
    p.error(f"--docs={args.docs} must be positive and divide --seq-len={args.seq_len}")
  doc_len = args.seq_len // args.docs
  if not 1 <= args.repeat < args.key_window <= doc_len - 1:
    p.error(f"need 1 <= --repeat={args.repeat} < --key-window={args.key_window} <= "
            f"seq_len / docs - 1 = {doc_len - 1}")
  return args


def main(argv=None) -> dict:
  """Trains, saves, reloads, evaluates; returns a summary dict (used by the tests)."""
  args = parse_args(argv)
  t_start = time.perf_counter()
  model, logits_fn = build_logits_fn(args, args.mesh)
  ws, rs = longnet_config(args.seq_len, args.first_segment, args.heads)
  chance = 1.0 / args.num_values
  print(f"N={args.seq_len} docs={args.docs} batch={args.batch} mesh={args.mesh} "
        f"layout={args.layout} "
        f"segment_lengths={ws} dilation_rates={rs} layers={args.layers} "
        f"d_model={args.d_model} heads={args.heads}; chance accuracy {chance:.3f}")

  rng = np.random.default_rng(args.seed)
  blank = jnp.zeros((1, args.seq_len), jnp.int32)
  # Under jit: one compile, not one per operation of an eager forward pass.
  init = jax.jit(model.init)
  params = init(jax.random.key(args.seed), blank, blank)  # tokens, positions
  n_params = sum(x.size for x in jax.tree.leaves(params))
  warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, args.lr, warmup_steps=min(warmup, args.steps),
      decay_steps=max(args.steps, warmup + 1), end_value=args.lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, weight_decay=0.01))
  opt_state = tx.init(params)
  loss_fn = functools.partial(answer_loss, logits_fn)

  @jax.jit
  def train_step(params, opt_state, tokens, answers):
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens, answers)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, acc

  eval_step = jax.jit(loss_fn)
  print(f"{n_params:,} parameters")

  losses, accs = [], []
  progress = _Progress(args.steps, every=max(1, args.steps // 20)) if not args.quiet else None
  for step in range(1, args.steps + 1):
    tokens, answers = make_batch(rng, args.batch, args.seq_len, args.num_values,
                                 args.vocab, args.key_window, args.repeat, args.docs)
    params, opt_state, loss, acc = train_step(params, opt_state, tokens, answers)
    if step == 1:
      print(f"first step (compile) {time.perf_counter() - t_start:.1f} s", flush=True)
    losses.append(float(loss))
    accs.append(float(acc))
    if progress is not None:
      progress.update(step, losses[-1], accs[-1])
  if progress is not None:
    progress.close()
  train_time = time.perf_counter() - t_start

  os.makedirs(args.out_dir, exist_ok=True)
  plot_path = os.path.join(args.out_dir, "loss.png")
  if not save_plot(plot_path, losses, accs, chance):
    plot_path = None
  ckpt_path = os.path.join(args.out_dir, "params.msgpack")
  with open(ckpt_path, "wb") as f:
    f.write(flax.serialization.to_bytes(params))

  # Reload into a freshly initialized template and evaluate on new sequences.
  template = init(jax.random.key(args.seed + 1), blank, blank)
  with open(ckpt_path, "rb") as f:
    restored = flax.serialization.from_bytes(template, f.read())
  eval_rng = np.random.default_rng(args.seed + 12345)
  accuracy = evaluate(eval_step, restored, eval_rng, args, args.eval_batches)
  total_time = time.perf_counter() - t_start
  print(f"checkpoint {ckpt_path}" + (f", plot {plot_path}" if plot_path else ""))
  print(f"final accuracy of the reloaded checkpoint on "
        f"{args.eval_batches * args.batch * args.docs} fresh passkey documents: "
        f"{accuracy:.3f} (chance {chance:.3f}); "
        f"train {train_time:.1f} s, total {total_time:.1f} s")
  return dict(losses=losses, accs=accs, accuracy=accuracy, chance=chance,
              params=params, restored=restored, checkpoint=ckpt_path, plot=plot_path,
              seconds=total_time)


if __name__ == "__main__":
  main()
