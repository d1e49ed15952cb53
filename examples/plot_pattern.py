"""Draw which keys each query sees under a dilated attention configuration.

One panel per branch ``(w_i, r_i)`` and one for all branches combined, from
``ringdilated.reference.dense_mask``. Top row, mode "mix": head ``--head``
(offset ``head mod r_i`` in every branch); the combined shade counts the
branches through which a query sees a key (a key reached by two branches
counts twice). Bottom row, mode "partition": each head uses one branch only,
so panel ``i`` shows the first head of head group ``i`` and the combined panel
counts over those heads.

    python examples/plot_pattern.py                      # -> examples/pattern.png
    python examples/plot_pattern.py --causal --head 1 --out pattern.png
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from ringdilated.reference import dense_mask


def _ints(text):
  return tuple(int(x) for x in text.split(","))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seq-len", type=int, default=32)
  p.add_argument("--segment-lengths", type=_ints, default=(8, 16, 32))
  p.add_argument("--dilation-rates", type=_ints, default=(1, 2, 4))
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--head", type=int, default=0, help="which query head to draw")
  p.add_argument("--causal", action="store_true")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "pattern.png"))
  return p.parse_args(argv)


def masks(args, mode):
  """``[masks of each branch alone..., combined]`` for head ``args.head``, each ``[N, N]``."""
  kw = dict(mode=mode, causal=args.causal)
  full = dense_mask(args.seq_len, args.heads, args.heads,
                    segment_lengths=args.segment_lengths,
                    dilation_rates=args.dilation_rates, **kw)[args.head]
  k = len(args.segment_lengths)
  if mode == "mix":
    # Every head uses every branch: draw each branch alone (same offsets).
    per_branch = [dense_mask(args.seq_len, args.heads, args.heads, segment_lengths=(w,),
                             dilation_rates=(r,), **kw)[args.head]
                  for w, r in zip(args.segment_lengths, args.dilation_rates)]
  else:
    # Heads are split into contiguous groups, group i uses branch i only (offset
    # i mod r_i): panel i shows the first head of group i, "combined" counts
    # over those heads how many see each key (head args.head alone would only
    # ever show its own branch).
    full_all = dense_mask(args.seq_len, args.heads, args.heads,
                          segment_lengths=args.segment_lengths,
                          dilation_rates=args.dilation_rates, **kw)
    base, extra = divmod(args.heads, k)
    starts = np.concatenate([[0], np.cumsum([base + (i < extra) for i in range(k)])])[:-1]
    per_branch = [full_all[s] for s in starts]
    full = np.sum(per_branch, axis=0)
  return per_branch + [full]


def main(argv=None):
  args = parse_args(argv)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
  except ImportError:
    print("matplotlib not installed: no PNG written (pip install matplotlib)")
    return None

  modes = ("mix", "partition")
  k = len(args.segment_lengths)
  rows = {mode: masks(args, mode) for mode in modes}
  base, extra = divmod(args.heads, k)
  partition_heads = [int(x) for x in np.cumsum([0] + [base + (i < extra) for i in range(k)])[:-1]]
  vmax = max(int(m.max()) for ms in rows.values() for m in ms)
  cmap = ListedColormap(["#f4f4f4"] + [plt.cm.viridis(x) for x in np.linspace(0.25, 0.95, max(vmax, 1))])

  fig, axes = plt.subplots(2, k + 1, figsize=(3.0 * (k + 1), 6.4), squeeze=False)
  for row, mode in enumerate(modes):
    for col, m in enumerate(rows[mode]):
      ax = axes[row, col]
      im = ax.imshow(m, cmap=cmap, vmin=-0.5, vmax=vmax + 0.5, interpolation="nearest")
      if col < k:
        title = f"w={args.segment_lengths[col]}, r={args.dilation_rates[col]}"
      else:
        title = "combined"
      if mode == "partition" and col < k:
        title += f"\n(head {partition_heads[col]})"
      elif mode == "partition":
        title = "combined\n(heads " + ",".join(map(str, partition_heads)) + ")"
      ax.set_title(f"{mode}: {title}", fontsize=9)
      ax.set_xlabel("key", fontsize=8)
      if col == 0:
        ax.set_ylabel(f"query ({mode})", fontsize=8)
      ticks = np.arange(0, args.seq_len + 1, max(1, min(args.segment_lengths)))
      ax.set_xticks(ticks - 0.5, [str(t) for t in ticks], fontsize=6)
      ax.set_yticks(ticks - 0.5, [str(t) for t in ticks], fontsize=6)
      ax.grid(color="#bbbbbb", lw=0.3)
      ax.tick_params(length=0)
  cbar = fig.colorbar(im, ax=axes, shrink=0.6, ticks=range(vmax + 1))
  cbar.set_label("branches through which the query sees the key", fontsize=8)
  fig.suptitle(f"dilated attention, N={args.seq_len}, H={args.heads}; mix: head {args.head}, "
               f"partition: first head of each group; "
               f"{'causal' if args.causal else 'non-causal'}", fontsize=10)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=110)
  plt.close(fig)
  print(f"wrote {args.out}")
  return args.out


if __name__ == "__main__":
  main()
