"""
The results grid: every task x method x seed, each run's learning rate chosen on held-out training examples.
Each finished run appends its JSON line (plus the config, holdout and wall time) to --out; runs already there are
skipped, so a sweep cut short, by a budget or a lost machine, continues where it stopped, in another session too.

    python results/sweep.py --init SmolLM2-135M-Instruct.Q4_1.gguf --data-dir ../shared/glue --out results/grid.jsonl
    python results/sweep.py --tiny        # every config at tiny size on CPU (random 2-layer models, 4 steps)
    python results/table.py results/grid.jsonl --split dev

The protocol (this grid; results/glue.jsonl holds the one before it, one fixed lr per method):
- train.py's defaults for every method: batch 32, 128 tokens, 6% warm-up then linear decay, no weight decay, rank 8
  and alpha 16 on every linear layer of every block; dynlora at the same budget (8 x layers) with r_max 16. The
  PEFT peers (results/peers.py) on the same weights, data, order and schedule. One epoch of SST-2, three of the rest.
- Every run holds out --holdout 500 training examples (the same ones in every run; data.hold_out) and reports
  them beside dev. The learning rate of a (task, method) is chosen from LRS below by the holdout headline metric
  (accuracy, MCC, F1 or Pearson) of the first seed, never by dev; the other seeds run at the chosen rate. The
  chosen rate's first-seed run is also that seed's result: each method gets the best of three on holdout for its
  first seed, so any lift that carries over to dev is the same for every method and cancels in differences
  paired by seed. Without --lr-select every seed runs at the middle rate, which is each method's default and
  one of the three: such runs count towards a later selection.
- Order: task by task in --tasks order; within a task seed by seed, every config of a seed before the next seed,
  so that a sweep cut short leaves paired results.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = {"sst2": 1, "cola": 3, "mrpc": 3, "stsb": 3, "rte": 3}
HEADLINE = {"sst2": "accuracy", "cola": "mcc", "mrpc": "f1", "stsb": "pearson", "rte": "accuracy"}  # data.TASKS' first
PEERS = "results/peers.py"
CONFIGS = {  # name: the script, then its flags
    "full": ["train.py", "--method", "full"],
    "lora": ["train.py", "--method", "lora"],
    "dynlora": ["train.py", "--method", "dynlora"],
    "dynlora-nogate": ["train.py", "--method", "dynlora", "--no-gate"],
    "dynlora-norealloc": ["train.py", "--method", "dynlora", "--no-realloc"],
    "peft-lora": [PEERS, "--method", "peft-lora"],
    "peft-adalora": [PEERS, "--method", "peft-adalora"],  # init_r 12 -> target_r 8 (peers.py's defaults)
}
# The learning rates tried, fixed before any run of this grid. The middle one is each method's default.
# Adapters, ours and PEFT's: 5e-4 is the PEFT LoRA reference's and train.py's default; 2e-4 and 1e-3 are a factor
# of about 2 either side, the range the LoRA and AdaLoRA papers' GLUE settings span (4e-4 to 1.2e-3 at rank 8, for
# larger backbones). Full fine-tuning: 3e-5, the earlier grid's, inside BERT's recommended 2e-5 to 5e-5; 1e-5 and
# 1e-4 a factor of about 3 either side.
ADAPTER_LRS = [2e-4, 5e-4, 1e-3]
LRS = {c: [1e-5, 3e-5, 1e-4] if c == "full" else ADAPTER_LRS for c in CONFIGS}
# settings under test: run only by name, at their own fixed lr, chosen on --holdout, never on dev (what each gave: RESULTS.md)
TRIALS = {
    # every 50 steps: fewer reallocations on the small tasks (13 to 48 steps apart by default), more on SST-2 (126).
    # Ran on holdout (results/holdout.jsonl): not better than the default, so not adopted (RESULTS.md)
    "dynlora-every50": ["train.py", "--method", "dynlora", "--realloc-every", "50", "--lr", "5e-4"],
    # twice the batch, half the steps: at SST-2's shapes (batches of 32 padded mostly to 64 tokens) a step is
    # thousands of small kernels whose cost hardly grows with the batch, so fewer, larger steps may reach issue
    # #5's 15 s epoch (timed alone, not in a sweep that shares the GPU). lr by the square-root rule for Adam
    # (5e-4 x sqrt 2), fixed before any run
    # Ran (session 8, one H200): holdout 93.0 +- 0.4 against dynlora's 92.2 +- 0.6 (3 seeds), epoch 21.3 s,
    # results/holdout_sst2.jsonl
    "dynlora-b64": ["train.py", "--method", "dynlora", "--batch-size", "64", "--lr", "7e-4"],
    # rows of similar length batched together (train.py --group-by-length), at batch 64 and 32: SST-2's batches
    # pad to 21.7 tokens on average instead of 51.6 at batch 64 (21.6 instead of 47.0 at 32). Fixed before any run.
    # Ran (session 8, commit ce701d9): holdout 92.3 +- 0.3 (b64-group, epoch 13.5 s) and 92.5 +- 0.3 (group,
    # 22.6 s), results/holdout_sst2.jsonl
    "dynlora-b64-group": ["train.py", "--method", "dynlora", "--batch-size", "64", "--lr", "7e-4",
                          "--group-by-length", "50"],
    "dynlora-group": ["train.py", "--method", "dynlora", "--group-by-length", "50", "--lr", "5e-4"],
}
for _c, _flags in TRIALS.items():
    LRS[_c] = [float(_flags[_flags.index("--lr") + 1])]
TINY_ROWS = (200, 50)  # --tiny: the first rows of each train and dev file


def default_lr(config):
    return LRS[config][len(LRS[config]) // 2]


def key(r):
    """What makes a run: (task, config, lr, seed, holdout, tiny). Lines written before --holdout and --tiny were
    recorded count as holdout 0 and full size."""
    return r["task"], r["config"], float(r["lr"]), int(r["seed"]), int(r.get("holdout", 0)), bool(r.get("tiny"))


def read_runs(path):
    """The runs in a JSON-lines file (none if it does not exist); a line that is not a run raises ValueError."""
    runs = []
    if Path(path).exists():
        for n, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    r = json.loads(line)
                    key(r)
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}, line {n}: not a run this script wrote ({type(e).__name__}: {e}); "
                                     f"move the file aside") from None
                runs.append(r)
    return runs


def choose_lr(runs, task, config, seed, holdout, tiny=False):
    """The learning rate of LRS[config] whose run of this seed scores best on the holdout headline metric, once
    every rate has a run (None before). A tie goes to the rate nearer the default, then to the lower one."""
    by_lr = {key(r)[2]: r for r in runs if key(r) in {(task, config, lr, seed, holdout, tiny) for lr in LRS[config]}}
    if len(by_lr) < len(LRS[config]):
        return None
    mid = len(LRS[config]) // 2
    rank = {lr: (float(by_lr[lr][f"holdout_{HEADLINE[task]}"]), -abs(i - mid), -i) for i, lr in enumerate(LRS[config])}
    return max(rank, key=rank.get)


def plan(runs, tasks, configs, seeds, holdout, select, tiny=False):
    """The runs still to make that can start now, most wanted first: (task, config, lr, seed). With select, a
    config's first seed runs at every rate; its other seeds wait for choose_lr."""
    done = {key(r) for r in runs}
    todo = []
    for task in tasks:
        for i, seed in enumerate(seeds):
            for config in configs:
                if select and len(LRS[config]) > 1:
                    lrs = LRS[config] if i == 0 else [choose_lr(runs, task, config, seeds[0], holdout, tiny)]
                else:
                    lrs = [default_lr(config)]
                todo += [(task, config, lr, seed) for lr in lrs
                         if lr is not None and (task, config, lr, seed, holdout, tiny) not in done]
    return todo


def command(job, args, data_dir):
    """The command line of one run."""
    task, config, lr, seed = job
    script, *flags = (CONFIGS | TRIALS)[config]
    cmd = [sys.executable, str(ROOT / script), *flags, "--task", task, "--init", args.init, "--data-dir", str(data_dir),
           "--seed", str(seed), "--holdout", str(args.holdout), "--log-every", "100",
           "--compile" if args.compile else "--no-compile"]
    if "--lr" not in flags:
        cmd += ["--lr", repr(lr)]
    if args.tiny:  # random two-layer models (a GPT-2 for train.py, a Llama for peers.py), a few steps on CPU
        cmd += ["--max-steps", "4", "--device", "cpu", "--n-layer", "2", "--n-head", "2", "--n-embd", "64"]
    else:
        cmd += ["--epochs", str(EPOCHS[task])]
    return cmd


def tiny_glue(src, dst, tasks):
    """The first rows of each task's train and dev files (header included), for --tiny."""
    import data
    for task in tasks:
        for split, n in zip(("train", "dev"), TINY_ROWS):
            lines = data.split_path(task, src, split).read_bytes().split(b"\n")
            out = data.split_path(task, dst, split)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(b"\n".join(lines[: n + 1]) + b"\n")
    return dst


def run_one(job, gpu, timeout, args, logs, data_dir):
    """One run, its output to a log; returns its result line with the sweep's keys, None if it failed, False
    if the budget's end stopped it."""
    task, config, lr, seed = job
    log = logs / f"{task}-{config}-lr{lr:g}-{seed}{'-tiny' if args.tiny else ''}.log"
    # few threads each: runs share the machine's cores, compilers included
    env = dict(os.environ, OMP_NUM_THREADS="2", TORCHINDUCTOR_COMPILE_THREADS="4", PYTHONUNBUFFERED="1")
    if gpu:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    t0 = time.time()
    cmd = command(job, args, data_dir)
    if timeout < float("inf"):  # timeout(1) ends the run's whole process group, compile workers included
        cmd = ["timeout", "-k", "10", str(max(1, int(timeout))), *cmd]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    lines = log.read_text(errors="replace").strip().splitlines() or [""]
    if rc in (124, 137) and timeout < float("inf"):  # timeout(1)'s TERM, then KILL
        print(f"stopped at the budget's end: {task} {config} lr {lr:g} seed {seed}, {log}", flush=True)
        return False
    if rc != 0 or not lines[-1].startswith("{"):
        print(f"FAILED {task} {config} lr {lr:g} seed {seed} (rc {rc}), {log}:\n    "
              + "\n    ".join(lines[-4:]), flush=True)
        return None
    r = {"config": config, **json.loads(lines[-1]), "holdout": args.holdout, "wall_s": round(time.time() - t0, 1)}
    if args.tiny:
        r["tiny"] = True
    metrics = {k: round(v, 4) for k, v in r.items() if k.split("_")[-1] == HEADLINE[task]}
    print(f"done {task} {config} lr {lr:g} seed {seed}: {json.dumps(metrics)}, train {r['train_time_s']} s, "
          f"wall {r['wall_s']} s", flush=True)
    return r


def parse(argv):
    """The flags, checked: (args, tasks, configs, seeds, out, logs, runs already in out, data_dir)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", help="backbone for train.py and peers.py --init (--tiny: scratch)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "glue"), help="GLUE folder")
    p.add_argument("--out", help="JSON lines, one per finished run (default results/grid.jsonl; --tiny: "
                   "runs/tiny.jsonl)")
    p.add_argument("--logs", default="runs/sweep", help="folder for each run's full output")
    p.add_argument("--tasks", default=",".join(EPOCHS), help="comma-separated tasks, in the order to run them")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated configs, in the order to run "
                   f"them (default: the grid); settings under test, only by name: {', '.join(TRIALS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; the first chooses the learning rate")
    p.add_argument("--lr-select", action=argparse.BooleanOptionalAction, default=True,
                   help="choose each config's lr on holdout (LRS); --no-lr-select: every seed at the default lr")
    p.add_argument("--holdout", type=int, default=500, help="train.py --holdout: the examples the lr is chosen on")
    p.add_argument("--budget-s", type=float, default=0, help="start no run after this many seconds, and stop any "
                   "still running then (0: no limit); what is left runs next time")
    p.add_argument("--min-left", type=float, default=0, help="start a run only if the budget leaves at least this "
                   "many seconds, or as long as the longest run of its task in this sweep took, if longer")
    p.add_argument("--per-gpu", type=int, default=1, help="runs at once on one GPU")
    p.add_argument("--gpus", type=int, default=0, help="GPUs to use (0: all visible)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="pass --compile/--no-compile to train.py (timings only; results do not depend on it)")
    p.add_argument("--tiny", action="store_true", help="dry run: every config at tiny size on CPU (scratch "
                   f"models, 4 steps, the first {TINY_ROWS[0]} training rows, --holdout 40)")
    args = p.parse_args(argv)
    tasks, configs = args.tasks.split(","), args.configs.split(",")
    if bad := [c for c in configs if c not in CONFIGS | TRIALS] + [t for t in tasks if t not in EPOCHS]:
        p.error(f"unknown config or task {bad}; configs: {', '.join(CONFIGS | TRIALS)}; tasks: {', '.join(EPOCHS)}")
    if not all(s.strip().isdigit() for s in args.seeds.split(",")):
        p.error(f"--seeds {args.seeds!r}: give comma-separated whole numbers, e.g. 0,1,2")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.tiny:
        args.init, args.holdout, args.compile = "scratch", 40, False
    if not args.init:
        p.error("--init is needed (the GGUF file), or --tiny")
    if args.per_gpu < 1 or args.gpus < 0 or args.holdout < 0 or args.budget_s < 0:
        p.error("--per-gpu must be at least 1; --gpus, --holdout and --budget-s at least 0")
    out = Path(args.out or ("runs/tiny.jsonl" if args.tiny else "results/grid.jsonl"))
    logs = Path(args.logs)
    if out.is_dir() or logs.is_file():
        p.error(f"--out {out} must be a file and --logs {logs} a folder")
    try:
        runs = read_runs(out)
    except ValueError as e:
        p.error(str(e))
    logs.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir).resolve()
    if args.tiny:
        sys.path.insert(0, str(ROOT))
        data_dir = tiny_glue(data_dir, logs.resolve() / "tiny-glue", tasks)
    args.init = args.init if args.init == "scratch" else str(Path(args.init).expanduser().resolve())

    return args, tasks, configs, seeds, out, logs, runs, data_dir


def main(argv=None):
    args, tasks, configs, seeds, out, logs, runs, data_dir = parse(argv)
    # one slot per run at once: a GPU id each (or "" on a CPU-only machine)
    if os.environ.get("CUDA_VISIBLE_DEVICES"):  # CUDA_VISIBLE_DEVICES=1,2 python results/sweep.py ...: those GPUs
        gpus = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
    else:
        import torch  # only to count GPUs
        gpus = [str(i) for i in range(torch.cuda.device_count())] or [""]
    free = [g for g in gpus[: args.gpus or None] for _ in range(args.per_gpu)]
    t_start = time.time()
    left = lambda: args.budget_s - (time.time() - t_start) if args.budget_s else float("inf")  # noqa: E731
    todo = plan(runs, tasks, configs, seeds, args.holdout, args.lr_select, args.tiny)
    print(f"{len(todo)} runs can start now, {len(runs)} lines already in {out}"
          + (" (with lr selection more follow once the first seed's are done)" if args.lr_select else ""), flush=True)

    # start what can start, as slots free up; a config that fails once is not started again in this sweep
    running, failed, skipped, walls = {}, set(), set(), {}
    with ThreadPoolExecutor(max_workers=len(free)) as pool:
        while True:
            for job in plan(runs, tasks, configs, seeds, args.holdout, args.lr_select, args.tiny):
                if not free:
                    break
                need = max([args.min_left] + [w for (t, _), w in walls.items() if t == job[0]])
                if job in [j for j, _ in running.values()] or job[1] in failed:  # started, not done: still planned
                    continue
                if left() < need:
                    skipped.add(job)
                    continue
                gpu = free.pop()
                running[pool.submit(run_one, job, gpu, left(), args, logs, data_dir)] = (job, gpu)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job, gpu = running.pop(fut)
                free.append(gpu)
                r = fut.result()
                if not r:
                    failed.update([job[1]] if r is None else [])
                    continue
                runs.append(r)
                with open(out, "a") as f:  # here, in the one thread that writes: whole lines
                    f.write(json.dumps(r) + "\n")
                walls[job[0], job[1]] = max(walls.get((job[0], job[1]), 0), r["wall_s"])
    rest = plan(runs, tasks, configs, seeds, args.holdout, args.lr_select, args.tiny)
    print(f"sweep: {time.time() - t_start:.0f} s; {len(rest)} runs left that could start now"
          + (f" ({len(skipped)} not started: the budget was too short)" if skipped else "")
          + (f"; failed, not retried in this sweep: {', '.join(sorted(failed))}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
