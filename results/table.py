"""Build the results table from the raw JSON lines: mean ± standard deviation over seeds (RESULTS.md has it whole,
the README its first metrics).

    python results/table.py results/glue.jsonl
    python results/table.py runs.jsonl --split holdout    # runs made with train.py --holdout: the held-out slice
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

TASKS = [("sst2", ["accuracy", "f1"]), ("cola", ["mcc"]), ("mrpc", ["f1", "accuracy"]),
         ("stsb", ["pearson", "spearman"]), ("rte", ["accuracy"])]
# dynlora-bscore: dynlora as first run, scoring components by B's side (dynlora.py's docstring says why no longer)
CONFIGS = ["full", "lora", "dynlora", "dynlora-bscore", "dynlora-nogate", "dynlora-norealloc", "dynlora-rate0.5"]

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("file", nargs="?", default="results/glue.jsonl", help="JSON lines written by results/sweep.py")
p.add_argument("--split", choices=["holdout", "dev"],
               help="holdout or dev, for runs that report both (train.py --holdout)")
args = p.parse_args()
if not Path(args.file).is_file():
    p.error(f"{args.file} not found: give the JSON lines that results/sweep.py wrote")
runs = defaultdict(list)
for n, line in enumerate(open(args.file, encoding="utf-8", errors="replace"), 1):
    if not line.strip():
        continue
    try:  # a run: one JSON object with its config, task and metrics
        r = json.loads(line)
        runs[r["config"], r["task"]].append(r)
    except (ValueError, KeyError, TypeError) as e:
        p.error(f"{args.file}, line {n}: not a run that results/sweep.py wrote ({type(e).__name__}: {e})")
    if bool(args.split) != any(k.startswith("holdout_") for k in r):  # --split exactly for runs with --holdout
        p.error(f"{args.file} has runs made with --holdout, which report two splits: add --split holdout or dev"
                if not args.split else f"{args.file} has runs without --holdout, which report dev only: drop --split")
if not runs:
    p.error(f"{args.file} has no runs")
key = (lambda m: f"{args.split}_{m}") if args.split else (lambda m: m)
TASKS = [(t, ms) for t, ms in TASKS if any(k[1] == t for k in runs)]  # only the tasks the file has runs of
extra = sorted({c for c, _ in runs} - set(CONFIGS))  # settings under test (sweep.py's TRIALS), after the grid

header = ["method"] + [f"{t} {m}" for t, ms in TASKS for m in ms] + ["avg (first metric)"]
print("| " + " | ".join(header) + " |")
print("|" + "---|" * len(header))
for c in [c for c in CONFIGS if any(k[0] == c for k in runs)] + extra:  # configs with no run yet get no row
    cells, firsts = [], []
    for t, ms in TASKS:
        for i, m in enumerate(ms):
            try:
                v = [100 * float(r[key(m)]) for r in runs[c, t]]
            except (KeyError, TypeError, ValueError) as e:
                p.error(f"a {c} run on {t} has no number for {key(m)} ({type(e).__name__}: {e})")
            cells.append(f"{np.mean(v):.1f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.1f} ({len(v)})" if v else "-")
            if i == 0 and v:
                firsts.append(np.mean(v))
    avg = f"{np.mean(firsts):.1f}" if len(firsts) == len(TASKS) else "-"
    print(f"| {c} | " + " | ".join(cells) + f" | {avg} |")
print(f"\nEach cell: mean ± sample standard deviation over seeds (number of seeds), {args.split or 'dev'} split, "
      "x100.")
