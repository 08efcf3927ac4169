"""Render the rank allocation of a dynlora run (train.py --out DIR writes DIR/history.json) to a PNG:
left, the rank of every adapted layer at each reallocation (a heatmap); right, the final rank per layer.

    python results/plot_ranks.py runs/sst2/history.json results/ranks_sst2.png

matplotlib is an optional dependency: pip install matplotlib.
"""
import json
import sys

import numpy as np

try:
    import matplotlib
    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("error: plotting needs matplotlib (pip install matplotlib)")

if len(sys.argv) != 3:
    sys.exit(__doc__)
try:
    hist = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"error: cannot read {sys.argv[1]} ({e}); give the history.json that train.py --out wrote")
names, steps = hist["layers"], [h["step"] for h in hist["history"]]
ranks = np.array([h["ranks"] for h in hist["history"]]).T  # (layers, reallocations)
short = [n.replace("transformer.h.", "") for n in names]  # "3.attn.c_attn"

fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, max(4, len(names) * 0.14)), width_ratios=[3, 1], sharey=True)
im = ax.imshow(ranks, aspect="auto", cmap="viridis", interpolation="nearest")
ax.set_xticks(range(len(steps)), steps, rotation=90, fontsize=7)
ax.set_yticks(range(len(names)), short, fontsize=6)
ax.set_xlabel("training step of the reallocation")
ax.set_title("rank per adapted layer")
fig.colorbar(im, ax=ax, label="rank", fraction=0.04)
bx.barh(range(len(names)), ranks[:, -1], color="tab:blue")
bx.axvline(ranks[:, 0].mean(), color="gray", ls="--", lw=1, label="mean (= LoRA's rank)")
bx.set_xlabel("final rank")
bx.legend(fontsize=7, loc="best")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=120)
print(f"wrote {sys.argv[2]}")
