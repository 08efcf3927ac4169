"""Build the results tables (RESULTS.md has them whole, the README its headline) from the raw JSON lines that
results/sweep.py wrote.

    python results/table.py results/grid.jsonl --split dev       # runs made with --holdout: report dev
    python results/table.py results/grid.jsonl --split holdout   # the split the learning rates were chosen on
    python results/table.py results/glue.jsonl                   # the earlier grid (no --holdout): dev

1. Each method on each task: mean ± sample standard deviation over seeds, and the average of the tasks' headline
   metrics (the five-task average once all five have runs).
2. Each method minus lora, paired by seed: per task and for the task average, the mean and standard deviation of
   the differences over the seeds both have, and on how many of them the method is ahead.
Where a method has runs of a task at several learning rates, the rate is the one results/sweep.py chooses: the
best on holdout for the first seed (sweep.choose_lr). Until every rate has run, the default rate's runs stand in,
marked * in the table of rates.
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

import sweep

TASKS = [("sst2", ["accuracy", "f1"]), ("cola", ["mcc"]), ("mrpc", ["f1", "accuracy"]),
         ("stsb", ["pearson", "spearman"]), ("rte", ["accuracy"])]
# earlier names: dynlora-bscore, dynlora as first run, scoring components by B's side (dynlora.py's docstring says
# why no longer); dynlora-rate0.5, the first allocator moving half way to its targets (--realloc-rate, gone with it)
CONFIGS = list(sweep.CONFIGS) + ["dynlora-firstorder", "dynlora-bscore", "dynlora-rate0.5"]  # earlier allocators' runs


def pick_runs(runs, split):
    """{(config, task): the runs at the chosen learning rate}, and {(config, task): (lr, chosen)}."""
    cells = defaultdict(lambda: defaultdict(list))  # (config, task) -> lr -> runs
    for r in runs:
        cells[r["config"], r["task"]][r.get("lr")].append(r)
    picked, rates = {}, {}
    for (c, t), by_lr in cells.items():
        lr, chosen = next(iter(by_lr)), True
        if split and c in sweep.LRS and len(sweep.LRS[c]) > 1:  # runs with holdout metrics: choose as the sweep does
            some = next(iter(by_lr.values()))[0]
            first = min(int(r["seed"]) for rs in by_lr.values() for r in rs)
            lr = sweep.choose_lr(runs, t, c, first, int(some.get("holdout", 0)), bool(some.get("tiny")))
            chosen = lr is not None
            if not chosen:  # the default rate's runs, or failing those any one rate's
                lr = sweep.default_lr(c) if sweep.default_lr(c) in by_lr else next(iter(by_lr))
        elif len(by_lr) > 1:
            raise ValueError(f"{c} on {t} has runs at learning rates {sorted(by_lr)} and no holdout to choose by")
        picked[c, t], rates[c, t] = by_lr[lr], (lr, chosen)
    return picked, rates


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", nargs="?", default="results/glue.jsonl", help="JSON lines written by results/sweep.py")
    p.add_argument("--split", choices=["holdout", "dev"],
                   help="holdout or dev, for runs that report both (train.py --holdout)")
    args = p.parse_args(argv)
    if not Path(args.file).is_file():
        p.error(f"{args.file} not found: give the JSON lines that results/sweep.py wrote")
    runs = []
    for n, line in enumerate(open(args.file, encoding="utf-8", errors="replace"), 1):
        if not line.strip():
            continue
        try:  # a run: one JSON object with its config, task and metrics
            r = json.loads(line)
            r["config"], r["task"]
        except (ValueError, KeyError, TypeError) as e:
            p.error(f"{args.file}, line {n}: not a run that results/sweep.py wrote ({type(e).__name__}: {e})")
        if bool(args.split) != any(k.startswith("holdout_") for k in r):  # --split exactly for runs with --holdout
            p.error(f"{args.file} has runs made with --holdout, which report two splits: add --split holdout or dev"
                    if not args.split else f"{args.file} has runs without --holdout, which report dev only: drop "
                                           f"--split")
        runs.append(r)
    if not runs:
        p.error(f"{args.file} has no runs")
    try:
        picked, rates = pick_runs(runs, args.split)
    except (ValueError, KeyError, TypeError) as e:
        p.error(f"{args.file}: {type(e).__name__}: {e}")
    key = (lambda m: f"{args.split}_{m}") if args.split else (lambda m: m)
    tasks = [(t, ms) for t, ms in TASKS if any(k[1] == t for k in picked)]  # only the tasks the file has runs of
    configs = [c for c in CONFIGS if any(k[0] == c for k in picked)]  # configs with no run get no row
    configs += sorted({c for c, _ in picked} - set(configs))  # settings under test (sweep.py's TRIALS), last

    def scores(c, t, m):
        """{seed: 100 x metric m} of the chosen runs of c on t."""
        try:
            return {r.get("seed", i): 100 * float(r[key(m)]) for i, r in enumerate(picked.get((c, t), []))}
        except (KeyError, TypeError, ValueError) as e:
            p.error(f"a {c} run on {t} has no number for {key(m)} ({type(e).__name__}: {e})")

    def spread(v):
        return f"{np.mean(v):.1f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.1f} ({len(v)})" if len(v) else "-"

    def task_average(c):
        """{seed: the mean over tasks of the headline metric}, for the seeds that have every task."""
        per_task = [scores(c, t, ms[0]) for t, ms in tasks]
        common = set.intersection(*(set(s) for s in per_task))
        return {s: np.mean([d[s] for d in per_task]) for s in sorted(common, key=str)}

    avg_name = "five-task avg" if len(tasks) == 5 else f"{len(tasks)}-task avg"
    header = ["method"] + [f"{t} {m}" for t, ms in tasks for m in ms] + [f"avg (first metric)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for c in configs:
        cells = [spread(list(scores(c, t, m).values())) for t, ms in tasks for m in ms]
        firsts = [np.mean(list(v.values())) for t, ms in tasks if (v := scores(c, t, ms[0]))]
        avg = f"{np.mean(firsts):.1f}" if len(firsts) == len(tasks) else "-"
        print(f"| {c} | " + " | ".join(cells) + f" | {avg} |")
    print(f"\nEach cell: mean ± sample standard deviation over seeds (number of seeds), {args.split or 'dev'} split, "
          f"x100; avg: the mean of the first metric's means.")

    if "lora" in configs and len(configs) > 1:
        print(f"\n| method - lora, paired by seed | " + " | ".join(f"{t} {ms[0]}" for t, ms in tasks)
              + f" | {avg_name} |")
        print("|" + "---|" * (len(tasks) + 2))
        base = {t: scores("lora", t, ms[0]) for t, ms in tasks}
        base_avg = task_average("lora")
        for c in [c for c in configs if c != "lora"]:
            cells = []
            for mine, ref in [(scores(c, t, ms[0]), base[t]) for t, ms in tasks] + [(task_average(c), base_avg)]:
                d = [mine[s] - ref[s] for s in mine if s in ref]
                cells.append(f"{spread(d)}, ahead on {sum(x > 0 for x in d)}" if d else "-")
            print(f"| {c} - lora | " + " | ".join(cells) + " |")
        print("\nEach cell: mean ± standard deviation of the differences over the seeds both methods have (their "
              "number), and on how many seeds the method is ahead of lora.")

    if any(lr is not None for lr, _ in rates.values()) and (args.split or len(set(rates.values())) > 1):
        print("\n| learning rate | " + " | ".join(t for t, _ in tasks) + " |")
        print("|" + "---|" * (len(tasks) + 1))
        for c in configs:
            cells = [f"{rates[c, t][0]:g}" + ("" if rates[c, t][1] else "*") if (c, t) in rates else "-"
                     for t, _ in tasks]
            print(f"| {c} lr | " + " | ".join(cells) + " |")
        print("\n*: not chosen yet (not every rate of sweep.LRS has a run of the first seed): the default rate's runs.")


if __name__ == "__main__":
    main()
