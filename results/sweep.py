"""
The results grid: every task x method x seed, run on every visible GPU, several runs per GPU at once.
Each finished run appends its JSON line (plus the config name) to --out; runs already there are skipped,
so an interrupted sweep continues where it stopped.

    python results/sweep.py --init SmolLM2-135M-Instruct.Q4_1.gguf --data-dir ../shared/glue --out results/glue.jsonl

The protocol: one fixed setting per method, chosen before any run and never tuned on dev (the same search
budget, zero, for every method): batch 32, 128 tokens, 6% warm-up then linear decay, no weight decay;
lr 5e-4 for the adapters (the PEFT reference's), 3e-5 for full fine-tuning; rank 8, alpha 16 on every
linear layer; dynlora at the same budget (8 x layers) with r_max 16. One epoch of SST-2, three of the rest.
dynlora-rate0.5 came after the first grid, from what its allocation history showed (oscillation), not from
its dev scores; its one setting, 0.5, follows from that analysis and is not tuned either. The first grid ran
compiled (results/glue_first.jsonl), except dynlora and dynlora-rate0.5, which ran later with --no-compile (eager
blocks, still CUDA graphs); the rerun at 23f0789 (the 3-epoch tasks, and SST-2 of dynlora) ran with --no-compile
too, which changes rounding only.
"""
import argparse
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

EPOCHS = {"sst2": 1, "cola": 3, "mrpc": 3, "stsb": 3, "rte": 3}
CONFIGS = {
    "full": ["--method", "full", "--lr", "3e-5"],
    "lora": ["--method", "lora"],
    "dynlora": ["--method", "dynlora"],
    "dynlora-nogate": ["--method", "dynlora", "--no-gate"],
    "dynlora-norealloc": ["--method", "dynlora", "--no-realloc"],
    "dynlora-rate0.5": ["--method", "dynlora", "--realloc-rate", "0.5"],  # half-way moves (RESULTS.md)
}
# settings under test: run only by name, with --holdout, and chosen there, never on dev (what each gave: RESULTS.md)
TRIALS = {
    # every 50 steps: fewer reallocations on the small tasks (13 to 48 steps apart by default), more on SST-2 (126).
    # not adopted: not better than the default on holdout (results/holdout.jsonl)
    "dynlora-every50": ["--method", "dynlora", "--realloc-every", "50"],
    # twice the batch, half the steps: at SST-2's shapes (batches of 32 padded mostly to 64 tokens) a step is
    # thousands of small kernels whose cost hardly grows with the batch, so fewer, larger steps make a faster
    # epoch. lr by the square-root rule for Adam (5e-4 x sqrt 2), fixed before any run (results/holdout_sst2.jsonl)
    "dynlora-b64": ["--method", "dynlora", "--batch-size", "64", "--lr", "7e-4"],
    # rows of similar length batched together (train.py --group-by-length), at batch 64 and 32: less padding.
    # Fixed before any run (results/holdout_sst2.jsonl)
    "dynlora-b64-group": ["--method", "dynlora", "--batch-size", "64", "--lr", "7e-4", "--group-by-length", "50"],
    "dynlora-group": ["--method", "dynlora", "--group-by-length", "50"],
}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--init", required=True, help="backbone for train.py --init")
p.add_argument("--data-dir", required=True, help="GLUE folder")
p.add_argument("--out", default="results/glue.jsonl", help="JSON lines, one per finished run")
p.add_argument("--logs", default="runs/sweep", help="folder for each run's full output")
p.add_argument("--tasks", default=",".join(EPOCHS), help="comma-separated tasks")
p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated configs (default: the grid); "
               f"settings under test, only by name: {', '.join(TRIALS)}")
p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
p.add_argument("--per-gpu", type=int, default=3, help="runs at once on one GPU")
p.add_argument("--holdout", type=int, default=0, help="pass --holdout N to train.py: choose settings on those "
               "examples (results/table.py --split holdout), not on dev")
p.add_argument("--gpus", type=int, default=0, help="GPUs to use (0: all visible)")
p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
               help="pass --compile/--no-compile to train.py (timings only; results do not depend on it)")
args = p.parse_args()
if bad := [c for c in args.configs.split(",") if c not in CONFIGS | TRIALS] + \
        [t for t in args.tasks.split(",") if t not in EPOCHS]:
    p.error(f"unknown config or task {bad}; configs: {', '.join(CONFIGS | TRIALS)}; tasks: {', '.join(EPOCHS)}")
if args.per_gpu < 1 or args.gpus < 0 or args.holdout < 0:
    p.error("--per-gpu must be at least 1, --gpus and --holdout at least 0")
if not all(s.strip().isdigit() for s in args.seeds.split(",")):
    p.error(f"--seeds {args.seeds!r}: give comma-separated whole numbers, e.g. 0,1,2")
if Path(args.out).is_dir():
    p.error(f"--out {args.out} is a folder; give the JSON-lines file to append the runs to")
if Path(args.logs).is_file():
    p.error(f"--logs {args.logs} is a file; give a folder for the runs' output")

import torch  # noqa: E402  (only to count GPUs)

out, logs = Path(args.out), Path(args.logs)
logs.mkdir(parents=True, exist_ok=True)
done = set()
if out.exists():
    for n, line in enumerate(out.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:  # the runs already finished, skipped below
            r = json.loads(line)
            done.add((r["task"], r["config"], r["seed"]))
        except (ValueError, KeyError, TypeError) as e:
            p.error(f"{out}, line {n}: not a run this script wrote ({type(e).__name__}: {e}); move the file aside")
jobs = [(t, c, int(s)) for t in args.tasks.split(",") for s in args.seeds.split(",") for c in args.configs.split(",")
        if (t, c, int(s)) not in done]
slots = queue.Queue()
# CUDA_VISIBLE_DEVICES=1,2,3 python results/sweep.py ... keeps the sweep on those GPUs
visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if os.environ.get("CUDA_VISIBLE_DEVICES") else \
    [str(i) for i in range(max(1, torch.cuda.device_count()))]
for gpu in visible[: args.gpus or None]:
    for _ in range(args.per_gpu):
        slots.put(gpu)
lock = threading.Lock()
print(f"{len(jobs)} runs to go ({len(done)} already in {out})", flush=True)


def run(job):
    task, config, seed = job
    gpu = slots.get()
    try:
        cmd = [sys.executable, "train.py", "--task", task, "--init", args.init, "--data-dir", args.data_dir,
               "--epochs", str(EPOCHS[task]), "--seed", str(seed), "--log-every", "100", *(CONFIGS | TRIALS)[config],
               "--compile" if args.compile else "--no-compile", "--holdout", str(args.holdout)]
        # few threads each: many runs share the machine's cores, compilers included
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, OMP_NUM_THREADS="2", TORCHINDUCTOR_COMPILE_THREADS="4")
        log = logs / f"{task}-{config}-{seed}.log"
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        last = log.read_text().strip().splitlines()[-1] if rc == 0 else ""
        if rc != 0 or not last.startswith("{"):
            print(f"FAILED {task} {config} {seed} (rc {rc}), see {log}", flush=True)
            return
        r = {"config": config, **json.loads(last)}
        with lock:
            with open(out, "a") as f:
                f.write(json.dumps(r) + "\n")
        print(f"done {task} {config} seed {seed}: " + json.dumps({k: v for k, v in r.items()
              if k.split("_")[-1] in ("accuracy", "f1", "mcc", "pearson") or k == "train_time_s"}), flush=True)
    finally:
        slots.put(gpu)


threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
for t in threads:
    t.start()
for t in threads:
    t.join()
