"""Plots time and peak memory vs sequence length from a results JSON.

Usage: ``python benchmarks/plot.py benchmarks/results/h100.json`` writes the
PNG next to the JSON (``h100.png``). Needs matplotlib (not a dependency of the
library: ``pip install matplotlib``).
"""

from __future__ import annotations

import collections
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

GROUPS = {
    "dense causal": ("cudnn_dense", "ours_dense", "ours_dense_ring1", "ours_dense_ring1_zigzag",
                     "ringattention_pkg"),
    "LongNet mix": ("gather_cudnn_longnet_mix", "ours_longnet_mix", "ours_pallas_longnet_mix"),
    "LongNet partition": ("gather_cudnn_longnet_partition", "ours_longnet_partition",
                          "ours_pallas_longnet_partition"),
}


def main(argv) -> int:
  path = argv[1]
  with open(path) as f:
    records = [r for r in json.load(f) if "error" not in r]
  series = collections.defaultdict(list)
  for r in records:
    series[r["name"]].append((r["seq_len"], r["fwd_bwd_ms"], r["peak_bytes"] / 2**30))
  device = records[0]["device"] if records else "?"
  fig, axes = plt.subplots(2, len(GROUPS), figsize=(5 * len(GROUPS), 8))
  for col, (title, names) in enumerate(GROUPS.items()):
    for name in names:
      pts = sorted(series.get(name, []))
      if not pts:
        continue
      n, ms, gib = zip(*pts)
      style = "-o" if name.startswith("ours") else "--s"
      axes[0, col].plot(n, ms, style, label=name)
      axes[1, col].plot(n, gib, style, label=name)
    axes[0, col].set_title(f"{title}: fwd+bwd time")
    axes[1, col].set_title(f"{title}: peak memory")
    axes[0, col].set_ylabel("ms")
    axes[1, col].set_ylabel("GiB")
    for ax in axes[:, col]:
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("sequence length")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend(fontsize=8)
  fig.suptitle(f"ringdilated vs references, bf16 B=1 H=16 D=128 ({device})")
  fig.tight_layout()
  out = os.path.splitext(path)[0] + ".png"
  fig.savefig(out, dpi=90)
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
