"""
Fine-tune a GPT on a GLUE task with full fine-tuning, LoRA or dynamic LoRA, and print the dev metrics.

    python train.py --task sst2                                    # dynamic LoRA on GPT-2
    python train.py --task sst2 --init model.gguf --method lora    # LoRA on a local SmolLM2 GGUF
    torchrun --nproc_per_node=2 train.py --task sst2               # DistributedDataParallel

The last line of output is one JSON object with the run's settings, its time and its dev metrics. Read it from
main() down: setup() builds the run, train() is the loop, train_step() the step, finish() evaluates and saves.
What --out holds, resuming and Ctrl-C are in checkpoint.py; the log points, evaluation, compiling and CUDA graphs
in graphs.py.
"""
import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import data
import graphs
import peft_format
from dynlora import RankAllocator, add_dynlora
from graphs import fail, number
from model import GPT, GPTConfig

# ----------------------------------------------------------------------------- arguments
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
METHODS, BOOL = ["full", "lora", "dynlora"], argparse.BooleanOptionalAction
p.add_argument("--task", default="sst2", help=f"GLUE task: {', '.join(data.TASKS)}")
p.add_argument("--method", default="dynlora", choices=METHODS, help="what to train")
p.add_argument("--init", default="gpt2", help="gpt2[-medium|-large|-xl], a SmolLM2 name, a local .safetensors, "
               "folder or .gguf file, or 'scratch' for random weights")
p.add_argument("--data-dir", default=str(data.DEFAULT_DATA_DIR), help="folder in the GLUE layout (TASK/train.tsv)")
p.add_argument("--epochs", type=number(float, 0, above=True), default=1.0, help="passes over the training data")
p.add_argument("--max-steps", type=number(int, 0), default=0, help="optimizer steps instead of --epochs (0: use "
               "--epochs); warm-up, decay and --t-init/--t-final are fractions of the run")
p.add_argument("--batch-size", type=number(int, 1), default=32, help="sequences per optimizer step, over all GPUs")
p.add_argument("--grad-accum", type=number(int, 1), default=1, help="micro-batches per optimizer step")
p.add_argument("--max-len", type=int, default=128, help="tokens per example; longer ones are truncated")
p.add_argument("--group-by-length", type=number(int, 0, 10**6), default=0, help="sort each window of this many "
               "(micro-)batches by length, then shuffle the batches: less padding (0: off; try 50)")
p.add_argument("--lr", type=number(float, 0, above=True), help="peak learning rate (default: 2e-5 full, 5e-4 adapters)")
p.add_argument("--warmup", type=number(float, 0, 1), default=0.06, help="fraction of steps of linear warm-up")
p.add_argument("--weight-decay", type=number(float, 0), default=0.0, help="AdamW weight decay")
p.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="clip the gradient norm (0: off)")
p.add_argument("--rank", type=number(int, 1), default=8, help="LoRA rank; dynlora's budget is rank x adapted layers")
p.add_argument("--r-max", type=number(int, 1), default=16, help="dynlora: the most components one layer can hold")
p.add_argument("--r-min", type=number(int, 1), default=1, help="dynlora: the fewest components one layer keeps")
p.add_argument("--alpha", type=number(float, 0, above=True), default=16.0, help="LoRA scale: s = alpha / rank")
p.add_argument("--dropout", type=number(float, 0, 1), default=0.0, help="dropout on the adapter input")
p.add_argument("--targets", default="c_attn,c_proj,c_fc", help="comma-separated parts of module names: a linear "
               "layer whose name contains one is adapted (c_proj: both attention output and MLP down projection)")
p.add_argument("--gate", action=BOOL, default=True, help="dynlora: input gate")
p.add_argument("--realloc", action=BOOL, default=True, help="dynlora: move rank")
p.add_argument("--t-init", type=number(float, 0, 1), default=0.1, help="dynlora: first reallocation, a fraction")
p.add_argument("--t-final", type=number(float, 0, 1), default=0.7, help="dynlora: last reallocation, a fraction")
p.add_argument("--realloc-every", type=number(int, 0), default=0, help="dynlora: steps between reallocations "
               "(0: a tenth of the span from t-init to t-final, rounded down, at least 1)")
p.add_argument("--realloc-ratio", type=number(float, 1), default=2.0, help="dynlora: a unit of rank moves only if "
               "the receiving layer's demand is this many times the giving layer's")
p.add_argument("--holdout", type=number(int, 0), default=0, help="set this many training examples aside (the same "
               "ones in every run) and score them beside dev: choose settings there, not on dev")
p.add_argument("--n-layer", type=number(int, 1, 1024), default=12, help="--init scratch only: layers")
p.add_argument("--n-head", type=number(int, 1, 1024), default=12, help="--init scratch only: attention heads")
p.add_argument("--n-embd", type=number(int, 1, 65536), default=768, help="--init scratch only: width")
p.add_argument("--compile", action=BOOL, default=True, help="torch.compile each transformer block")
p.add_argument("--cuda-graphs", action=BOOL, help="replay each whole training step as a recorded CUDA graph, one "
               "per padding length (default: on with one CUDA device and no --grad-accum; off on CPU, torchrun)")
p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
               help="autocast dtype on GPU (no float16: it would need loss scaling)")
p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, ... (auto: cuda if available; under torchrun, "
               "cuda or cpu: each process takes the GPU of its LOCAL_RANK)")
p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="seed for weights, data order and dropout "
               "(under torchrun each process draws its own dropout masks, from the seed and its rank)")
p.add_argument("--out", default="", help="folder for the adapter, allocation history and checkpoint")
p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
p.add_argument("--ckpt-every", type=number(int, 0), default=0, help="checkpoint every N steps (0: only at the end)")
p.add_argument("--log-every", type=number(int, 1), default=50, help="one log line every N steps")
p.add_argument("--eval-only", action="store_true", help="only evaluate (with --adapter: a saved run)")
p.add_argument("--adapter", default="", help="folder written by --out, to evaluate with --eval-only")
p.add_argument("--peft", default="", help="start from a Hugging Face PEFT LoRA adapter for --init's backbone: "
               "evaluate it with --eval-only, or train on from it")
p.error = lambda message: fail(message)  # one line, as every other bad input (argparse would add its usage)


def main(argv=None):
    """Train (or only evaluate) as the flags say; returns the summary that the last line prints. The one error
    boundary: bad input, wherever it is found, ends here in one `error:` line. Our checks raise ValueError in
    words for the user; data.py's, model.py's and dynlora.py's messages are clear as they are."""
    args = p.parse_args(argv)
    try:
        run = setup(args)
        train(run)
        return finish(run)
    except (ValueError, data.DataError) as e:
        fail(str(e), mine=isinstance(e, graphs.OwnError))
    except torch.cuda.OutOfMemoryError as e:  # the commonest failure on a GPU: say what to change
        fail(f"out of GPU memory ({str(e).splitlines()[0]}); lower --batch-size or --max-len, or keep the batch and "
             f"raise --grad-accum", mine=True)


# ----------------------------------------------------------------------------- the loop
def train(run):
    """The training loop: lr, batch, step, reallocate; every --log-every steps the one sync with the device (log),
    then a checkpoint when one is due; a first Ctrl-C stops after the step, saving."""
    args, step = run.args, run.step
    if step >= run.total or args.eval_only:
        return
    meter = graphs.Meter(run.device, run.total, step)
    batches = data.train_batches(run.train_enc, run.micro, args.seed, run.steps_per_epoch, args.grad_accum, step,
                                 run.rank, run.world, args.group_by_length)  # on the CPU
    bar = tqdm(total=run.total, initial=step, disable=None if run.rank == 0 else True, desc=args.task,
               dynamic_ncols=True)
    with checkpoint.ctrl_c_stops_after_the_step(run.ddp) as stop:
        try:
            while step < run.total:
                lr = get_lr(step, run.total, run.lr, args.warmup)
                micro = [next(batches) for _ in range(args.grad_accum)]
                meter.tokens += sum(int(b.lengths.sum()) for b in micro)  # this process's rows: no device sync
                loss = run.step_fn([[graphs.to_device(t, run.device) for t in b[:3]] for b in micro], lr)
                meter.add(loss, step)
                step += 1  # steps done: the number the log lines, the history and the checkpoints give
                if run.allocator:  # dynlora: fade dropped components, reallocate when due; eager (graphs.py's rule 2)
                    run.allocator.step(step, run.opt)
                bar.update()
                ckpt_due = step == run.total or (args.ckpt_every and step % args.ckpt_every == 0)
                asked = 0 if run.ddp else len(stop)  # under torchrun only a sync stops, so that all stop together
                if step % args.log_every == 0 or ckpt_due:
                    asked = graphs.log_point(run, meter, step, len(stop), lr)
                    if ckpt_due and run.ckpt_path:
                        checkpoint.save(run, step)
                    meter.restart()  # checkpoints' time left out
                if asked and step < run.total:  # a Ctrl-C in the last step comes too late: the run is done
                    checkpoint.interrupted(run, step, int(meter.first_bad), saved=bool(ckpt_due))
        except KeyboardInterrupt:
            run.log(f"\nstopped at once in step {step + 1}; the last checkpoint is as it was")
            sys.exit(130)
    bar.close()
    run.step, run.train_time, run.train_tokens = step, meter.train_time, meter.train_tokens
    if stop:
        run.log("Ctrl-C in the last steps: training had finished, so the run evaluates and saves (Ctrl-C again "
                "stops it)")


def train_step(run, batches, lr):
    """One optimizer step, the function that --cuda-graphs records (graphs.py): forward and backward over the
    micro-batches, then clip, AdamW, zero_grad. No host sync. lr: a float, or under a recording the
    tensor it reads. Returns the step's loss, the mean over its micro-batches, on the device."""
    for group in run.opt.param_groups:
        group["lr"] = lr
    loss_sum = 0
    for i, (idx, lengths, y) in enumerate(batches):
        # DDP averages the gradients once, in the backward of the step's last micro-batch
        with run.model.no_sync() if run.ddp and i < len(batches) - 1 else nullcontext():
            with run.autocast:
                logits = run.model(idx, lengths).float()  # (B, n_labels)
                loss = F.mse_loss(logits.squeeze(-1), y) if run.task.regression else F.cross_entropy(logits, y)
            (loss / len(batches)).backward()  # the mean over the accumulated micro-batches
        loss_sum = loss_sum + loss.detach() / len(batches)
    if run.args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.params, run.args.grad_clip)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return loss_sum


def get_lr(step, total, peak, warmup):
    """The lr of step `step` (0-based) of `total`: linear warm-up over the first w steps to the peak at step
    w - 1, then a straight line down to zero at step `total`, which never runs (so the last step still learns)."""
    w = max(1, int(warmup * total))
    return peak * (step + 1) / w if step < w else peak * max(0.0, (total - step) / (total - w + 1))


# ----------------------------------------------------------------------------- the allocator and its schedule
def make_allocator(args, layers, total, gpt, task):
    """dynlora's RankAllocator, its schedule in steps of this run's `total`; None when nothing reallocates.
    Returns (allocator, the tensors a step changes in place besides the optimizer's, which a recording puts back:
    the probes' gradients and input powers, which backward() and forward() add to)."""
    if args.method != "dynlora" or not args.realloc:
        return None, []
    if args.t_init > args.t_final:
        raise ValueError(f"--t-init {args.t_init} comes after --t-final {args.t_final}: no step would reallocate")
    t_init, t_final = int(args.t_init * total), int(args.t_final * total)
    every = args.realloc_every or max(1, (t_final - t_init) // 10)
    try:
        allocator = RankAllocator(layers, gpt, t_init=t_init, t_final=t_final, every=every, r_min=args.r_min,
                                  ratio=args.realloc_ratio, seed=args.seed,
                                  output="gaussian" if task.regression else "softmax")
    except ValueError as e:
        raise ValueError(f"{e} (from --rank, --r-min and --realloc-ratio)") from e
    return allocator, allocator.step_state()


# ----------------------------------------------------------------------------- setup
@dataclass
class Run:
    """What setup() builds from the flags; the loop, evaluation and saving read it."""
    args: argparse.Namespace
    task: data.Task
    device: str
    ddp: bool                # launched by torchrun
    rank: int
    world: int
    log: callable            # prints on rank 0 only
    gpt: GPT                 # the classifier; save and load through it (never through DDP's wrapper)
    gate: bool
    autocast: object         # a context: autocast on a GPU, nullcontext on a CPU
    params: list             # the trainable tensors: all the optimizer sees
    train_enc: data.Encoded
    dev_enc: dict            # {split: encoded examples} to score after training
    micro: int               # sequences per micro-batch on one process
    steps_per_epoch: int
    total: int               # optimizer steps of the whole run
    lr: float                # the peak of the schedule
    opt: torch.optim.Optimizer
    allocator: RankAllocator | None
    out: Path | None
    ckpt_path: Path | None
    step: int = 0            # steps done: a resumed run's checkpoint step, then the loop's
    model: nn.Module = None  # what the step runs: gpt, or DDP around it
    step_fn: callable = None  # step_fn(batches, lr) -> loss: train_step, or its recorded replay
    recorded: bool = False
    compile_time: float = 0.0
    train_time: float = 0.0
    train_tokens: int = 0


def setup(args):
    """The run the flags ask for: checked, built, resumed, then compiled and recorded off the clock."""
    if args.task not in data.TASKS:
        raise ValueError(f"unknown task {args.task!r}; choose one of {', '.join(data.TASKS)}")
    device, ddp, rank, world = graphs.start_processes(args.device)
    log = tqdm.write if rank == 0 else (lambda msg: None)  # only rank 0 speaks; tqdm.write keeps the bar intact
    check_flags(args, device, ddp, rank == 0, log)
    log(f"git {graphs.git_hash()} | torch {torch.__version__} | device {device} | world {world}")
    log("args " + json.dumps(vars(args)))
    task = data.TASKS[args.task]
    train_ex, dev_ex, gpt, tok = graphs.in_turn(partial(load_data_and_model, args, task), ddp, rank == 0)
    if args.max_len > gpt.config.block_size:
        raise ValueError(f"--max-len {args.max_len} is longer than the model's {gpt.config.block_size} positions")
    train_enc = data.encode_split(train_ex, tok, args.max_len)
    dev_enc = {s: data.encode_split(ex, tok, args.max_len) for s, ex in dev_ex.items()}
    n_trunc = train_enc.n_truncated + sum(e.n_truncated for e in dev_enc.values())
    log(f"{args.task}: {len(train_ex)} train, " + ", ".join(f"{len(e)} {s}" for s, e in dev_ex.items())
        + f" examples; {n_trunc} truncated to {args.max_len} tokens")
    layers, gate = setup_method(gpt, args.method, rank=args.rank, r_max=args.r_max, alpha=args.alpha,
                                dropout=args.dropout, targets=args.targets, gate=args.gate)
    gpt.to(device)
    if amp := graphs.autocast_dtype(args.dtype, device):
        graphs.store_frozen(gpt.transformer.h, amp)  # frozen blocks kept in the autocast dtype
    # cache_enabled=False: PyTorch's notes on CUDA graphs ask for it when autocast runs inside a recording
    autocast = torch.autocast("cuda", amp, cache_enabled=False) if amp else nullcontext()
    if args.adapter:
        checkpoint.load_saved_adapter(gpt, args.adapter, device)
    if args.peft:  # its ranks, A, B and head; gated layers start with the identity gate, as plain LoRA
        try:
            peft_format.load_peft(gpt, args.peft)
        except ValueError as e:
            raise ValueError(f"--peft {args.peft}: {e}") from e
    params = [p for p in gpt.parameters() if p.requires_grad]
    n_train, n_all = sum(p.numel() for p in params), sum(p.numel() for p in gpt.parameters())
    log(f"trainable {n_train:,} / {n_all:,} ({100 * n_train / n_all:.3f}%)")
    if args.compile:
        graphs.compile_blocks(gpt, n_shapes=len(data.buckets(args.max_len)))
    micro = args.batch_size // (args.grad_accum * world)  # sequences per micro-batch on one process
    if micro * args.grad_accum * world != args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --grad-accum x GPUs = "
                         f"{args.grad_accum * world}")
    steps_per_epoch = len(train_enc) // args.batch_size
    if not args.eval_only and steps_per_epoch == 0:
        raise ValueError(f"{len(train_enc)} training examples are fewer than one batch of {args.batch_size}")
    total = args.max_steps or math.ceil(args.epochs * steps_per_epoch)  # optimizer steps
    lr = args.lr or (2e-5 if args.method == "full" else 5e-4)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, fused=device.startswith("cuda"))
    allocator, probes = make_allocator(args, layers, total, gpt, task)
    if ddp:  # the weights came from one seed on every process (and DDP copies rank 0's); dropout masks should not
        torch.manual_seed(args.seed * 65536 + rank)
    out = Path(args.out) if args.out else None
    run = Run(args, task, device, ddp, rank, world, log, gpt, gate, autocast, params, train_enc, dev_enc, micro,
              steps_per_epoch, total, lr, opt, allocator, out, out / "ckpt.pt" if out else None)
    if args.resume:
        run.step = checkpoint.resume(run, default=p.get_default)
        log(f"resumed from {run.ckpt_path} at step {run.step}")
        if run.step >= total and not args.eval_only:
            log(f"nothing left to train: the run had reached step {run.step} of {total}; evaluating")
    gpt.train()
    graphs.compile_and_record(run, partial(train_step, run), data.buckets(args.max_len), probes)
    return run


def check_flags(args, device, ddp, master, log):
    """What the flags alone can get wrong, before any data or model is read; --cuda-graphs resolved, --adapter's
    saved flags taken over."""
    args.cuda_graphs = graphs.resolve_cuda_graphs(args.cuda_graphs, device, args.grad_accum, ddp, args.eval_only)
    if args.out and master:
        checkpoint.check_writable(Path(args.out))
    clash = {"--adapter": args.adapter, "--resume": args.resume, "--method full": args.method == "full"}
    if args.peft and any(clash.values()):
        raise ValueError(f"--peft cannot go with {next(k for k, on in clash.items() if on)}: --peft gives the adapters "
                         f"to start from, as --adapter and --resume's checkpoint do, and --method full has none")
    if args.adapter:  # a saved run: rebuild the model it was trained with
        checkpoint.take_adapter_config(args, p.get_default, {"task": data.TASKS, "method": METHODS}, log)
    torch.manual_seed(args.seed)  # after --adapter's config, which restores the seed of a scratch backbone
    targets = [t.strip() for t in args.targets.split(",")]
    if not all(targets):  # "" is part of every name: it would adapt every linear layer, the head included
        raise ValueError(f"--targets {args.targets!r} has an empty name; give comma-separated parts of module names")
    args.targets = ",".join(targets)
    if args.max_len < 4:
        raise ValueError(f"--max-len {args.max_len} leaves no room for two texts and their end tokens; use at least 4")


def load_data_and_model(args, task):
    """The task's examples (train, and {split: examples} to score: dev, and the holdout when asked), the model
    and its tokenizer; fetched first when missing."""
    train_ex, dev_ex = data.load_task(args.task, args.data_dir, args.holdout, args.eval_only)
    if args.init == "scratch":
        cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, n_labels=task.n_labels)
        return train_ex, dev_ex, GPT(cfg), data.get_tokenizer(args.init)
    try:
        gpt = GPT.from_pretrained(args.init, n_labels=task.n_labels)  # first: a hub download brings its tokenizer
        return train_ex, dev_ex, gpt, data.get_tokenizer(args.init)
    except Exception as e:  # a file that is not what it says (cut short, another format, a broken config): name it
        why = str(e) if isinstance(e, (ValueError, OSError)) else \
            f"not a model file, or cut short ({type(e).__name__}: {e})"
        raise ValueError(f"--init {args.init}: {why.removeprefix(f'{args.init}: ')}") from e  # the file, named once


D = p.get_default  # setup_method's defaults are train.py's flags'


def setup_method(gpt, method, rank=D("rank"), r_max=D("r_max"), alpha=D("alpha"), dropout=D("dropout"),
                 targets=D("targets"), gate=D("gate")):
    """Freeze the backbone and add adapters (lora: rank r_max = rank, no gate; dynlora), or train everything
    (full). targets: comma-separated parts of module names. Returns ({name: layer}, whether they are gated)."""
    if method == "full":
        if not gpt.config.tie_embeddings:  # classification never reads it, and DDP would wait for its gradient
            gpt.lm_head.requires_grad_(False)
        return {}, None
    gpt.requires_grad_(False)
    gpt.score.requires_grad_(True)  # the classification head is new: it always trains
    gate = gate and method == "dynlora"
    try:
        layers = add_dynlora(gpt, targets.split(","), r_max=r_max if method == "dynlora" else rank, r=rank,
                             alpha=alpha, dropout=dropout, gate=gate)
    except ValueError as e:  # r_max is --rank for lora, --r-max for dynlora
        raise ValueError(f"{e} (from --rank and --r-max)" if "r_max" in str(e) else str(e)) from e
    return layers, gate


# ----------------------------------------------------------------------------- evaluate and save
def finish(run):
    """Score every split, save the run to --out, and print and return the summary."""
    args, t0 = run.args, time.time()
    metrics = {s: graphs.evaluate(run, enc) for s, enc in run.dev_enc.items()}
    eval_time = time.time() - t0
    history = {"layers": run.allocator.names, "history": run.allocator.history} if run.allocator else None
    if history and history["history"]:
        run.log(checkpoint.rank_table(history, run.allocator.layers[0].r_max))
    if run.out and run.rank == 0 and not args.eval_only:
        checkpoint.save_run(run.out, args, run.gpt, history)
        if args.method != "full":  # out/peft/, or one line saying why not (a gated run)
            peft_format.export_peft(run.gpt, args, run.out, run.log)
    flat = {f"{s}_{k}" if len(metrics) > 1 else k: v for s, m in metrics.items() for k, v in m.items()}
    gpu = run.device.startswith("cuda")
    result = {"task": args.task, "method": args.method, "init": args.init, "seed": args.seed, "steps": run.step,
              "gate": bool(run.gate), "realloc": run.allocator is not None, "realloc_ratio": args.realloc_ratio,
              "rank": args.rank, "r_max": args.r_max, "lr": run.lr, "batch_size": args.batch_size,
              "cuda_graphs": run.recorded,  # False for a finished run resumed: nothing recorded
              "train_time_s": round(run.train_time, 2), "compile_time_s": round(run.compile_time, 2),
              "eval_time_s": round(eval_time, 2),  # and the most GPU memory tensors held at once, graphs included
              "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
              "train_tokens": run.train_tokens,  # under torchrun those of every process
              "tokens_per_s": round(run.train_tokens / run.train_time) if run.train_time else None, **flat}
    if run.ddp:
        graphs.check_ranks_agree(run.gpt, run.rank)
    run.log(json.dumps(result))  # the last line: what scripts parse
    if run.ddp:
        graphs.end_processes(run)
    return result


if __name__ == "__main__":
    main()
