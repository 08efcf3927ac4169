"""
Fine-tune a GPT on a GLUE task with full fine-tuning, LoRA or dynamic LoRA, and print the dev metrics.

    python train.py --task sst2                                    # dynamic LoRA on GPT-2
    python train.py --task sst2 --init model.gguf --method lora    # LoRA on a local SmolLM2 GGUF
    torchrun --nproc_per_node=2 train.py --task sst2               # DistributedDataParallel

The last line of output is one JSON object with the run's settings, its time and its dev metrics.
"""
import argparse
import gc
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
from dynlora import RankAllocator, add_dynlora, adapter_state_dict, load_adapter
from model import GPT, GPTConfig

# ----------------------------------------------------------------------------- arguments
def number(kind, lo, hi=math.inf, above=False):
    """An argparse type: a `kind` number no less than lo (greater, with above=True) and no more than hi."""
    def parse(text):
        v = kind(text)
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if v < lo or (above and v == lo) or v > hi:
            raise argparse.ArgumentTypeError(f"{text} must be {'greater than' if above else 'at least'} {lo}"
                                             + (f" and at most {hi}" if hi < math.inf else ""))
        return v
    parse.__name__ = kind.__name__  # argparse's "invalid int value" message names the type
    return parse


p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--task", default="sst2", help=f"GLUE task: {', '.join(data.TASKS)}")
METHODS = ["full", "lora", "dynlora"]
p.add_argument("--method", default="dynlora", choices=METHODS, help="what to train")
p.add_argument("--init", default="gpt2", help="gpt2[-medium|-large|-xl], a SmolLM2 name, a local .safetensors, "
               "folder or .gguf file, or 'scratch' for random weights")
p.add_argument("--data-dir", default=str(data.DEFAULT_DATA_DIR), help="folder in the GLUE layout (TASK/train.tsv)")
p.add_argument("--epochs", type=number(float, 0, above=True), default=1.0, help="passes over the training data")
p.add_argument("--max-steps", type=number(int, 0), default=0, help="train this many optimizer steps instead of --epochs "
               "(0: use --epochs); warm-up, decay and --t-init/--t-final are fractions of it")
p.add_argument("--batch-size", type=number(int, 1), default=32, help="sequences per optimizer step, over all GPUs")
p.add_argument("--grad-accum", type=number(int, 1), default=1, help="micro-batches per optimizer step")
p.add_argument("--max-len", type=int, default=128, help="tokens per example; longer ones are truncated")
p.add_argument("--group-by-length", type=number(int, 0, 10**6), default=0, help="sort each window of this many "
               "(micro-)batches by length before batching, then shuffle the batches: less padding, faster steps "
               "(0: off; try 50)")
p.add_argument("--lr", type=number(float, 0, above=True), default=None, help="peak learning rate (default: 2e-5 full, 5e-4 adapters)")
p.add_argument("--warmup", type=number(float, 0, 1), default=0.06, help="fraction of steps of linear warm-up")
p.add_argument("--weight-decay", type=number(float, 0), default=0.0, help="AdamW weight decay")
p.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="clip the gradient norm (0: off)")
p.add_argument("--rank", type=number(int, 1), default=8, help="LoRA rank; dynlora's budget is rank x adapted layers")
p.add_argument("--r-max", type=number(int, 1), default=16, help="dynlora: the most components one layer can hold")
p.add_argument("--r-min", type=number(int, 1), default=1, help="dynlora: the fewest components one layer keeps")
p.add_argument("--alpha", type=number(float, 0, above=True), default=16.0, help="LoRA scale numerator: s = alpha / rank")
p.add_argument("--dropout", type=number(float, 0, 1), default=0.0, help="dropout on the adapter input")
p.add_argument("--targets", default="c_attn,c_proj,c_fc", help="comma-separated parts of module names: a linear "
               "layer whose name contains one is adapted (c_proj: both attention output and MLP down projection)")
p.add_argument("--gate", action=argparse.BooleanOptionalAction, default=True, help="dynlora: input gate")
p.add_argument("--realloc", action=argparse.BooleanOptionalAction, default=True, help="dynlora: move rank")
p.add_argument("--t-init", type=number(float, 0, 1), default=0.1, help="dynlora: first reallocation, as a fraction of steps")
p.add_argument("--t-final", type=number(float, 0, 1), default=0.7, help="dynlora: last reallocation, as a fraction of steps")
p.add_argument("--realloc-every", type=number(int, 0), default=0, help="dynlora: steps between reallocations "
               "(0: a tenth of the span from t-init to t-final, rounded down, at least 1: 11 reallocations, both ends "
               "included, when the span is a multiple of 10; more when it is not, up to one a step below 20 steps)")
p.add_argument("--realloc-rate", type=number(float, 0, 1, above=True), default=1.0, help="dynlora: the fraction of the way to its target "
               "rank a layer moves per reallocation (1: all the way; 0.5 damps the back-and-forth swings)")
p.add_argument("--holdout", type=number(int, 0), default=0, help="set this many training examples aside (the same ones in "
               "every run) and report metrics on them beside dev: choose settings there, not on dev")
p.add_argument("--n-layer", type=number(int, 1, 1024), default=12, help="--init scratch only: layers")
p.add_argument("--n-head", type=number(int, 1, 1024), default=12, help="--init scratch only: attention heads")
p.add_argument("--n-embd", type=number(int, 1, 65536), default=768, help="--init scratch only: width")
p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
               help="torch.compile each transformer block")
p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
               help="replay each training step (forward, backward, clipping, scores, AdamW) as one recorded CUDA "
                    "graph per padding bucket (default: on with one CUDA device and without --grad-accum; off on CPU "
                    "and, until tested on 2 GPUs, under torchrun)")
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

p.error = lambda message: fail(message)  # one line, as every other bad input (argparse would add its usage)


# written to config.json: what --adapter needs to rebuild the model and read the data as it was trained
SAVED_ARGS = ["task", "method", "init", "rank", "r_max", "alpha", "targets", "gate", "n_layer", "n_head", "n_embd",
              "max_len", "seed"]  # seed: an --init scratch backbone is rebuilt from it
# what --resume must find unchanged: everything that shapes the model, the numbers, the data order or the schedule
RESUME_ARGS = SAVED_ARGS + ["batch_size", "grad_accum", "dtype", "epochs", "max_steps", "lr", "warmup",
                            "weight_decay", "grad_clip", "dropout", "r_min", "realloc", "t_init", "t_final",
                            "realloc_every", "realloc_rate", "holdout", "group_by_length"]


def all_agree(ok, ddp):
    """True when every process says ok (a single process: its own answer)."""
    if not ddp:
        return ok
    flag = torch.tensor([float(ok)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def fail(msg, mine=False):
    """Bad input ends in one clear line, not a traceback. Under torchrun every process meets the same bad input,
    so only rank 0 says it, unless the trouble is this process's own (mine=True)."""
    if mine or int(os.environ.get("RANK", 0)) == 0:  # RANK: set by torchrun, read before or after init
        print(f"error: {msg}", file=sys.stderr)
    else:  # torchrun stops the others when one exits: give rank 0 time to say why
        time.sleep(2)
    sys.exit(2)


def device_problem(device):
    """Why --device cannot run on this machine (a bad name, a backend torch lacks, a GPU index too high), or None."""
    try:
        d = torch.device(device)
        if d.type == "meta":
            return "meta tensors hold no data"
        if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
            return f"{torch.cuda.device_count()} CUDA GPUs are visible"
        torch.empty(0, device=d)
    except Exception as e:  # whatever the backend raises (RuntimeError, AssertionError): its first line says why
        return str(e).strip().splitlines()[0]
    return None


def get_lr(step, total, peak, warmup):
    """The lr of step `step` (0-based) of `total`: linear warm-up over the first w steps to the peak at step
    w - 1, then a straight line down to zero at step `total`, which never runs (so the last step still learns)."""
    w = max(1, int(warmup * total))
    return peak * (step + 1) / w if step < w else peak * max(0.0, (total - step) / (total - w + 1))


def build_model(args, n_labels):
    if args.init == "scratch":
        cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, n_labels=n_labels)
        return GPT(cfg)
    return GPT.from_pretrained(args.init, n_labels=n_labels)


def load_data_and_model(args, task):
    """The task's examples (train, and {split: examples} to score: dev, and the holdout when asked), the model
    and its tokenizer; fetched first when missing."""
    need_train = not args.eval_only or args.holdout
    data.ensure_glue(args.task, args.data_dir, None if need_train else data.splits(args.task))
    train_ex = data.load_split(args.task, args.data_dir, "train") if need_train else []
    dev_ex = {s: data.load_split(args.task, args.data_dir, s) for s in data.splits(args.task)}
    if args.holdout:  # scored after training, like dev
        train_ex, held = data.hold_out(train_ex, args.holdout)
        dev_ex = {"holdout": held, **dev_ex}
    train_ex = [] if args.eval_only else train_ex
    try:
        gpt = build_model(args, task.n_labels)  # first: a hub checkpoint's download brings its tokenizer
        return train_ex, dev_ex, gpt, data.get_tokenizer(args.init)
    except Exception as e:  # a file that is not what it says (cut short, another format, a broken config): name it
        if args.init == "scratch":
            raise
        why = str(e) if isinstance(e, (ValueError, OSError)) else f"not a model file, or cut short ({type(e).__name__}: {e})"
        raise ValueError(f"--init {args.init}: {why.removeprefix(f'{args.init}: ')}") from e  # the file, named once


def setup_method(args, gpt):
    """Freeze the backbone and add adapters (lora, dynlora), or train everything (full)."""
    if args.method == "full":
        if not gpt.config.tie_embeddings:  # classification never reads it, and DDP would wait for its gradient
            gpt.lm_head.requires_grad_(False)
        return {}, None
    gpt.requires_grad_(False)
    gpt.score.requires_grad_(True)  # the classification head is new: it always trains
    gate = args.gate and args.method == "dynlora"
    layers = add_dynlora(gpt, args.targets.split(","), r_max=args.r_max if args.method == "dynlora" else args.rank,
                         r=args.rank, alpha=args.alpha, dropout=args.dropout, gate=gate)
    return layers, gate


def autocast_dtype(dtype, device):
    """The dtype autocast computes in: `dtype` (a name) on a GPU; None, float32 throughout, on a CPU or for
    "float32". Under it the frozen linear layers are stored in that dtype too (store_frozen)."""
    return getattr(torch, dtype) if str(device).startswith("cuda") and dtype != "float32" else None


def store_frozen(modules, dtype, kinds=(nn.Linear,)):
    """Keep the frozen linear layers among `modules` in the autocast dtype. Autocast would cast each of them on
    every forward anyway (a copy of every frozen weight, every step), to the same numbers in eager mode; compiled,
    a float32 bias may be added without that rounding, so GPT-2's biases can differ by one bf16 rounding. Only
    layers whose every parameter is frozen change: trainable tensors keep their float32 masters. Ours passes the
    blocks (embeddings and norms, which autocast leaves alone, keep float32); bench.py passes the Hugging Face
    model with its Conv1D as a kind too. A layer that shares a parameter (an lm_head tied to the token embedding)
    is left alone. Call it after the adapters are added (they take the base weight's dtype). A merge() into such a
    weight rounds the sum to its dtype, so unmerge() no longer restores it exactly."""
    seen = Counter(id(p) for _, p in modules.named_parameters(remove_duplicate=False))
    for m in modules.modules():
        if isinstance(m, kinds) and not any(p.requires_grad or seen[id(p)] > 1 for p in m.parameters()):
            m.to(dtype)


def trainable_state(gpt):
    """What a checkpoint must hold of the model: the trainable tensors and the adapters' masks."""
    keep = {n for n, p in gpt.named_parameters() if p.requires_grad}
    return {k: v for k, v in gpt.state_dict().items() if k in keep or k.endswith(".mask")}


def rng_state(device):
    """The random state that dropout draws from: CPU, plus the GPU's when there is one."""
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if device.startswith("cuda") else [])


def set_rng_state(state, device):
    torch.set_rng_state(state[0].cpu())
    if device.startswith("cuda") and len(state) > 1:  # a CPU run's state has no GPU part: the GPU's stays seeded
        torch.cuda.set_rng_state(state[1].cpu())


def compile_blocks(gpt, n_shapes):
    """Regional compilation: the n_layer identical blocks share one compiled graph per input shape, so compiling
    takes seconds where the whole model took minutes. Static shapes: per padding bucket, a graph for training and
    one for evaluation (no autograd). Embeddings, final norm and head stay eager (a few small kernels). The cache
    limit leaves room beyond those 2 * n_shapes graphs, so that a recompile shows up as slowness, not an error."""
    torch._dynamo.config.cache_size_limit = max(8, 4 * n_shapes)
    for block in gpt.transformer.h:
        block.compile(dynamic=False)


def warm_up(model, params, batch_size, lengths, device, autocast):
    """Compile the graph of every padding length, for training and evaluation, before the clock starts;
    then leave no trace: gradients dropped, random state restored."""
    rng = rng_state(device)
    for T in lengths:
        idx = torch.randint(0, 100, (batch_size, T), device=device)  # any tokens: only shapes matter
        full = torch.full((batch_size,), T, device=device)  # every row T tokens long
        with autocast:
            model(idx, full).float().sum().backward()
        for p in params:  # a CUDA graph's gradients live in its memory until the next replay
            p.grad = None
        model.eval()
        with torch.no_grad(), autocast:
            model(idx, full)
        model.train()
    set_rng_state(rng, device)


def grad_step(loss_fn, update):
    """The step that capture_steps records: loss, backward(), update(); returns the loss."""
    def step_fn(*batch):
        loss = loss_fn(*batch)
        loss.backward()
        update()
        return loss.detach()
    return step_fn


def capture_steps(loss_fn, update, opt, params, *, batch_size, lengths, device, regression=False, extra=(),
                  stream=None, warmup=3):
    """--cuda-graphs: record the whole training step (forward loss_fn(idx, lengths, y) -> loss, backward,
    then update(): clipping, scores, AdamW) as one CUDA graph per padding length. At SST-2's short lengths a step
    would be bound by the CPU: Python launching ~2,000 kernels and looping over ~500 trainable tensors in the
    optimizer, the clipping and the scores. A replay is one launch. Recording needs a few untimed steps first
    (compilation, the optimizer's state); they train on dummy batches (recording runs nothing), so afterwards
    `params`, the `extra` tensors that update() changes in place (the allocator's scores) and the optimizer's
    state are put back (a replay reads every tensor where it lay at recording time).
    Returns {T: replay(idx, lengths, y) -> loss}.
    Hazards for whoever changes the loop: a tensor replaced rather than updated in place (.to(), new adapters, a
    new optimizer or its load_state_dict) is no longer the one the graph reads; the gradients live in graph
    memory, and the step's loss is the same tensor after every replay. Each length holds its own memory pool.
    Under DDP, PyTorch asks for the model to be wrapped on the stream that records (its hooks hold on to each
    parameter's gradient accumulator, made on the stream current then) and for 11 steps before the first
    recording (DDP rebuilds its buckets and logs in its first iterations): pass that stream and warmup=11."""
    recordable_optimizer(opt, device)
    keep = list(params) + list(extra)  # detached clones: a clone of a parameter would keep its AccumulateGrad alive
    rng, saved = rng_state(device), [t.detach().clone() for t in keep]
    state_before = {id(v): v.clone() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)}
    step_fn = grad_step(loss_fn, update)
    graphs, side = {}, stream or torch.cuda.Stream()  # one stream for warm-up and recording
    for i, T in enumerate(lengths):
        static = (torch.zeros(batch_size, T, dtype=torch.long, device=device),  # any tokens: only shapes matter
                  torch.full((batch_size,), T, device=device),
                  torch.zeros(batch_size, dtype=torch.float32 if regression else torch.long, device=device))
        side.wait_stream(torch.cuda.current_stream())  # the inputs above are written on the default stream
        with torch.cuda.stream(side):  # as PyTorch's docs ask: warm-up on a side stream
            for _ in range(warmup if i == 0 else 3):
                step_fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            loss = step_fn(*static)
        graphs[T] = lambda *batch, g=graph, inputs=static, out=loss: replay(g, inputs, out, batch)
    with torch.no_grad():
        torch._foreach_copy_(keep, saved)
        for st in opt.state.values():  # the state a resumed run loaded, or a fresh one's zeros
            for v in st.values():
                if torch.is_tensor(v):
                    v.copy_(state_before[id(v)]) if id(v) in state_before else v.zero_()
    set_rng_state(rng, device)
    return graphs


def can_record(device):
    """Whether --cuda-graphs can record on this device. (tests/fake_graphs.py says yes on CPU, with fake graphs.)"""
    return device.startswith("cuda")


def recordable_optimizer(opt, device):
    """What a recorded AdamW step needs: the learning rate as a tensor, which set_lr() fills in place (a float
    would be recorded as a constant), and capturable=True on CUDA (its step counts stay on the GPU)."""
    for group in opt.param_groups:
        group.update(lr=torch.tensor(float(group["lr"]), device=device), capturable=device.startswith("cuda"))


def replay(graph, inputs, loss, batch):
    """Copy a batch into the recorded step's input tensors and replay it; returns its loss tensor."""
    for dst, src in zip(inputs, batch):
        dst.copy_(src, non_blocking=True)
    graph.replay()
    return loss


def set_lr(opt, lr):
    for group in opt.param_groups:  # in place when it is a tensor: a recorded step reads it there
        group["lr"].fill_(lr) if torch.is_tensor(group["lr"]) else group.update(lr=lr)


def to_device(t, device):
    """Copy a batch tensor to the GPU without making the CPU wait: from pinned memory, asynchronously (a
    plain copy would wait for all queued GPU work, and the CPU could no longer run ahead of it)."""
    return t.pin_memory().to(device, non_blocking=True) if device.startswith("cuda") else t


def save_atomic(obj, path, save=torch.save):
    """Write to a temporary file, then rename: a crash at any moment leaves the previous file whole."""
    tmp = f"{path}.tmp"
    save(obj, tmp)
    os.replace(tmp, path)


def resume(ckpt_path, args, gpt, opt, allocator, device, total, rank=0):
    """Load the checkpoint of a run with these same settings and `total` steps into the model, optimizer,
    allocator and random state (process `rank`'s); returns the step to continue from. A missing, corrupt or
    foreign file, or other settings: one line."""
    if not (ckpt_path and ckpt_path.exists()):
        fail(f"--resume needs a checkpoint: {ckpt_path or '--out'} not found")
    try:
        with warnings.catch_warnings():  # torch warns at length about pickles; our one line says it
            warnings.simplefilter("ignore")
            ck = torch.load(ckpt_path, map_location=device, weights_only=True)  # tensors and plain data only
    except pickle.UnpicklingError:  # torch's own text would suggest weights_only=False: never here
        fail(f"cannot resume from {ckpt_path}: it is not a checkpoint of tensors and plain data "
             f"(corrupt, or it carries code, which is never run)")
    except Exception as e:  # torch's own words for garbage can be as bare as "pop from empty list"
        fail(f"cannot resume from {ckpt_path}: it cannot be read (corrupt or truncated; {type(e).__name__}: "
             f"{str(e).splitlines()[0] if str(e) else 'no message'})")
    try:
        was = {k: ck["args"].get(k, p.get_default(k)) for k in RESUME_ARGS}  # a flag newer than the run: default
        changed = [f"--{k.replace('_', '-')} {was[k]} -> {getattr(args, k)}" for k in RESUME_ARGS
                   if was[k] != getattr(args, k)]
        if changed:  # each would leave the loss curve the run was on
            raise ValueError(f"the run was started with other settings: {', '.join(changed)}")
        if ck.get("total", total) != total:  # same flags, other data: the schedule and data order would move
            raise ValueError(f"the run had {ck['total']} steps and would now have {total}: has the training data "
                             f"(--data-dir) changed?")
        want = trainable_state(gpt).keys()  # trainable tensors and masks; the rest is frozen
        if set(ck["model"]) != set(want):
            odd = sorted(set(ck["model"]) ^ set(want))
            raise ValueError(f"its tensors differ from this model's ({len(odd)} names, e.g. {odd[0]}): "
                             f"was it written with other --method, --init or --targets?")
        gpt.load_state_dict(ck["model"], strict=False)
        flags = {k: opt.param_groups[0][k] for k in ("fused", "capturable")}  # this run's, not the checkpoint's
        opt.load_state_dict(ck["optimizer"])
        for group in opt.param_groups:  # the lr as a float again: capture_steps makes its own tensor
            group.update(flags, lr=float(group["lr"]))
        if allocator:
            allocator.load_state_dict(ck["allocator"])
    except Exception as e:  # a foreign file, or one of another run: say so in one line
        fail(f"cannot resume from {ckpt_path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    states = [ck["rng"]] if torch.is_tensor(ck["rng"][0]) else ck["rng"]  # older checkpoints hold one state
    set_rng_state(states[rank % len(states)], device)  # another number of processes than saved: theirs, in turn
    return ck["step"]


@torch.no_grad()
def evaluate(model, enc, task, batch_size, device, autocast, rank=0, world=1):
    """The task's metrics over every example once. Under torchrun each process scores its slice of each global
    batch and the slices are gathered back in order, so every process reports the same numbers."""
    model.eval()
    preds = []
    for idx, lengths, _, _ in data.iterate_batches(enc, batch_size, shuffle=False, rank=rank, world_size=world):
        with autocast:
            out = model(to_device(idx, device), to_device(lengths, device)).float()
        pred = out.squeeze(-1) if data.TASKS[task].regression else out.argmax(-1)  # (B,)
        if world > 1:  # the global batch: process r's rows are its r-th slice
            parts = [torch.empty_like(pred) for _ in range(world)]
            dist.all_gather(parts, pred)
            pred = torch.cat(parts)
        preds.append(pred)
    model.train()
    preds = torch.cat(preds)[: len(enc)].cpu().numpy()  # file order; the dummy rows come after every example
    return data.compute_metrics(task, preds, enc.labels.numpy())


def main(argv=None):
    args = p.parse_args(argv)
    if args.task not in data.TASKS:
        fail(f"unknown task {args.task!r}; choose one of {', '.join(data.TASKS)}")
    ddp = "RANK" in os.environ  # launched by torchrun
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if ddp:  # one process per GPU: process i of this machine takes GPU i; on CPU, gloo
        if device not in ("cuda", "cpu"):
            fail(f"under torchrun --device is cuda, cpu or auto (each process takes its own GPU), not {device!r}")
        device = f"cuda:{os.environ['LOCAL_RANK']}" if device == "cuda" else device
    if why := device_problem(device):
        hint = " (under torchrun: at most one process per GPU, or --device cpu)" if ddp else ""
        fail(f"--device {device} cannot run here: {why}{hint}", mine=ddp)
    rank, world = 0, 1
    if ddp:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)
    if device == "cpu":
        torch.set_flush_denormal(True)  # Adam's tiny second moments would otherwise crawl through subnormal math
    master = rank == 0
    log = tqdm.write if master else (lambda msg: None)  # only rank 0 speaks; tqdm.write keeps the bar intact
    if args.cuda_graphs and not can_record(device):
        fail(f"--cuda-graphs needs a CUDA device, not {device}")
    if args.cuda_graphs and args.grad_accum > 1:
        fail("--cuda-graphs cannot accumulate gradients: each replay reuses the memory of the last gradients")
    if args.cuda_graphs is None:  # not yet by default under torchrun: recorded DDP steps are untested on 2 GPUs
        args.cuda_graphs = can_record(device) and args.grad_accum == 1 and not ddp
    args.cuda_graphs = args.cuda_graphs and not args.eval_only  # evaluation alone runs no training graph
    out = Path(args.out) if args.out else None
    if out and master:  # now, not when the first checkpoint is due: a run must not train for nothing
        if out.exists() and not out.is_dir():
            fail(f"--out {out} is a file; give a folder")
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / ".write-test").touch()
            (out / ".write-test").unlink()
        except OSError as e:
            fail(f"--out {out}: cannot write there ({e.strerror or e})")
    if args.adapter:  # a saved run: rebuild the model it was trained with
        cfg_path = Path(args.adapter) / "config.json"
        if not cfg_path.exists():
            fail(f"{cfg_path} not found: --adapter must be a folder written by --out")
        try:
            saved, choices = json.loads(cfg_path.read_text()), {"task": data.TASKS, "method": METHODS}
            for k in SAVED_ARGS:  # each value of the type its flag gives, and a task and method that exist
                default, flag = p.get_default(k), getattr(args, k)
                # a flag newer than the adapter: its default; but adapters saved before "seed" was did not use 0
                v = saved.get(k, flag if k == "seed" else default)
                if type(v) is not type(default) or (k in choices and v not in choices[k]):
                    raise ValueError(f"{k} = {v!r}")
                if flag != v and flag != default:
                    log(f"--{k.replace('_', '-')} {flag} replaced by the adapter's {v}")
                setattr(args, k, v)
        except (ValueError, TypeError, AttributeError) as e:  # AttributeError: a list, not a dict
            fail(f"{cfg_path} is not a config written by --out ({type(e).__name__}: {e})")
    torch.manual_seed(args.seed)  # after --adapter's config, which restores the seed of a scratch backbone
    targets = [t.strip() for t in args.targets.split(",")]
    if not all(targets):  # "" is part of every name: it would adapt every linear layer, the head included
        fail(f"--targets {args.targets!r} has an empty name; give comma-separated parts of module names")
    args.targets = ",".join(targets)
    if args.max_len < 4:
        fail(f"--max-len {args.max_len} leaves no room for two texts and their end tokens; use at least 4")
    task = data.TASKS[args.task]
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip()
    log(f"git {git or '?'} | torch {torch.__version__} | device {device} | world {world}")
    log("args " + json.dumps(vars(args)))

    # ----------------------------------------------------------------------------- data and model
    # rank 0 goes first, so that a download happens once; then the others read what it fetched
    for turn in ([True, False] if ddp else [True]):  # turn True: rank 0 loads; turn False: the others do
        err = None
        if master == turn:
            try:
                train_ex, dev_ex, gpt, tok = load_data_and_model(args, task)
            except (data.DataError, ValueError, FileNotFoundError, RuntimeError) as e:
                err = str(e)
        if not all_agree(err is None, ddp):  # every process stops together, none waits forever
            fail(err or "another process could not load the data or the model", mine=err is not None)
    if args.max_len > gpt.config.block_size:
        fail(f"--max-len {args.max_len} is longer than the model's {gpt.config.block_size} positions")
    train_enc = data.encode_split(train_ex, tok, args.max_len)
    dev_enc = {s: data.encode_split(ex, tok, args.max_len) for s, ex in dev_ex.items()}
    n_trunc = train_enc.n_truncated + sum(e.n_truncated for e in dev_enc.values())
    log(f"{args.task}: {len(train_ex)} train, " + ", ".join(f"{len(e)} {s}" for s, e in dev_ex.items())
        + f" examples; {n_trunc} truncated to {args.max_len} tokens")
    try:
        layers, gate = setup_method(args, gpt)
    except ValueError as e:  # r_max is --rank for lora, --r-max for dynlora
        fail(f"{e} (from --rank and --r-max)" if "r_max" in str(e) else str(e))
    gpt.to(device)
    amp = autocast_dtype(args.dtype, device)
    # cache_enabled=False: PyTorch's notes on CUDA graphs ask for it when autocast runs inside a recording
    autocast = torch.autocast("cuda", amp, cache_enabled=False) if amp else nullcontext()
    if amp:
        store_frozen(gpt.transformer.h, amp)
    if args.adapter:
        try:
            load_adapter(gpt, load_file(str(Path(args.adapter) / "adapter.safetensors"), device=device))
        except Exception as e:  # a missing, corrupt or foreign file: one line
            fail(f"adapter {args.adapter} does not fit this model: {e}")
    params = [p for p in gpt.parameters() if p.requires_grad]
    n_train, n_all = sum(p.numel() for p in params), sum(p.numel() for p in gpt.parameters())
    log(f"trainable {n_train:,} / {n_all:,} ({100 * n_train / n_all:.3f}%)")
    padded = data.buckets(args.max_len)  # the lengths a batch is padded to: one compiled shape and graph each
    if args.compile:
        compile_blocks(gpt, n_shapes=len(padded))

    # ----------------------------------------------------------------------------- schedule and optimizer
    micro = args.batch_size // (args.grad_accum * world)  # sequences per micro-batch on one process
    if micro * args.grad_accum * world != args.batch_size:
        fail(f"--batch-size {args.batch_size} must be a multiple of --grad-accum x GPUs = {args.grad_accum * world}")
    steps_per_epoch = len(train_enc) // args.batch_size
    total = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    if not args.eval_only and steps_per_epoch == 0:
        fail(f"{len(train_enc)} training examples are fewer than one batch of {args.batch_size}")
    lr = args.lr or (2e-5 if args.method == "full" else 5e-4)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, fused=device.startswith("cuda"))
    allocator = None
    if args.method == "dynlora" and args.realloc:
        if args.t_init > args.t_final:
            fail(f"--t-init {args.t_init} comes after --t-final {args.t_final}: no step would reallocate")
        t_init, t_final = int(args.t_init * total), int(args.t_final * total)
        every = args.realloc_every or max(1, (t_final - t_init) // 10)
        try:
            allocator = RankAllocator(layers, budget=args.rank * len(layers), t_init=t_init, t_final=t_final,
                                      every=every, r_min=args.r_min, seed=args.seed, rate=args.realloc_rate)
        except ValueError as e:
            fail(f"{e} (from --rank, --r-min, --r-max and --realloc-rate)")

    # ----------------------------------------------------------------------------- resume
    if ddp:  # the weights came from one seed on every process (and DDP copies rank 0's); dropout masks should not
        torch.manual_seed(args.seed * 65536 + rank)
    step = last_log = 0
    ckpt_path = out / "ckpt.pt" if out else None
    if args.resume:
        step = last_log = resume(ckpt_path, args, gpt, opt, allocator, device, total, rank)
        log(f"resumed from {ckpt_path} at step {step}")

    def checkpoint():
        """Called by every process: each one's random state is gathered, then process 0 writes."""
        if not torch.isfinite(torch.stack(torch._foreach_norm(params)).sum()):  # a finite loss, non-finite gradients
            fail(f"non-finite weights after step {step}; stopped without saving, the last checkpoint is as it was")
        rng = [rng_state(device)]
        if ddp:
            rng = [None] * world
            dist.all_gather_object(rng, rng_state(device))
        if not master:
            return
        ck = {"model": trainable_state(gpt), "optimizer": opt.state_dict(), "step": step, "total": total, "rng": rng,
              "args": {k: getattr(args, k) for k in RESUME_ARGS},
              "allocator": allocator.state_dict() if allocator else {}}
        try:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            save_atomic(ck, ckpt_path)
        except OSError as e:  # a full disk, a folder gone: the previous checkpoint is whole (save_atomic)
            fail(f"cannot write the checkpoint {ckpt_path} after step {step} ({e.strerror or e}); the last one is as "
                 f"it was")

    # ----------------------------------------------------------------------------- train
    def compute_loss(model, idx, lengths, y):
        with autocast:
            logits = model(idx, lengths).float()
            return F.mse_loss(logits.squeeze(-1), y) if task.regression else F.cross_entropy(logits, y)

    def update():
        """After the step's last backward: clip, score, AdamW, clear. No host sync: --cuda-graphs records it."""
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        if allocator:
            allocator.update_scores()  # from this step's clipped gradients; reallocation comes after, outside the graph
        opt.step()
        opt.zero_grad(set_to_none=True)

    gpt.train()
    t_compile = time.time()  # compile_time_s: compilation and CUDA-graph capture, off the training clock
    training = step < total and not args.eval_only
    if args.resume and not args.eval_only and step >= total:
        log(f"nothing left to train: the run had reached step {step} of {total}; evaluating")
    model = gpt  # what DDP wraps; gpt(idx, lengths) is the classifier; save and load through gpt itself
    # graphs are recorded on a side stream, and under DDP the model must be wrapped on that same stream
    side = torch.cuda.Stream() if args.cuda_graphs and training else None
    step_graphs = None  # {T: replay of the recorded step}
    # a line and a bar over the padding lengths: compiling and recording take a minute or two on a GPU
    def over_lengths(what):
        log(f"{what} for each padding length {padded}, off the clock")
        return tqdm(padded, desc=what, unit="length", leave=False, disable=None if master else True, dynamic_ncols=True)

    try:
        if args.compile and not args.eval_only:  # a finished run too: evaluation's compilation stays off its clock
            warm_up(gpt, params, micro, over_lengths("compiling"), device, autocast)
        if ddp:
            model = wrap_ddp(gpt, device, side)
        if side:
            scores = [allocator.ipt, allocator.unc] if allocator else []
            step_graphs = capture_steps(lambda *batch: compute_loss(model, *batch), update, opt, params,
                                        batch_size=micro, lengths=over_lengths("recording a CUDA graph"), device=device,
                                        regression=task.regression, extra=scores, stream=side,
                                        warmup=11 if ddp else 3)
    except KeyboardInterrupt:  # recording trains on dummy batches: nothing of the run is lost, nothing to save
        log("\ninterrupted while compiling and recording, before this run's first step: nothing to save")
        sys.exit(130)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    compile_time = time.time() - t_compile
    t0, tokens, train_time, train_tokens = time.time(), 0, 0.0, 0
    log_time, log_tokens = 0.0, 0  # since the last log line, checkpoints' time left out
    loss_sum = torch.zeros((), device=device)  # summed on the device: no sync inside the loop
    first_bad = torch.full((), total + 1, device=device)  # first step with a non-finite loss (total + 1: none), no sync
    # data position: step s starts at micro-batch s * grad_accum of the epoch order seeded by (seed, epoch)
    batches_per_epoch = steps_per_epoch * args.grad_accum
    batch_iter, epoch = None, -1
    bar = tqdm(total=total, initial=step, disable=None if master and not args.eval_only else True, desc=args.task,
               dynamic_ncols=True)
    # a first Ctrl-C lets the step finish, then saves and exits; a second one stops at once. Under torchrun every
    # process gets the terminal's SIGINT and then torchrun's copy of it, so repeats are ignored (torchrun kills its
    # processes 30 s after its own), and they all stop after the same step: the next that synchronises them
    stop = []

    def on_sigint(signum, frame):
        if stop and not ddp:
            raise KeyboardInterrupt
        stop.append(signum)

    signal.signal(signal.SIGINT, on_sigint)
    try:  # a step: grad_accum micro-batches (or one replay, update() included), update(), maybe a reallocation
        while step < total and not args.eval_only:
            set_lr(opt, get_lr(step, total, lr, args.warmup))
            for i in range(args.grad_accum):
                e, b = divmod(step * args.grad_accum + i, batches_per_epoch)
                if e != epoch:  # a new epoch, or the first batch after a resume
                    epoch = e
                    batch_iter = data.iterate_batches(train_enc, micro, shuffle=True, seed=args.seed, epoch=e,
                                                      start=b, rank=rank, world_size=world,
                                                      group=args.group_by_length)
                idx, lengths, y, _valid = next(batch_iter)
                tokens += int(lengths.sum())  # this process's rows, on the CPU copy: no device sync
                idx, lengths, y = (to_device(t, device) for t in (idx, lengths, y))
                if step_graphs:  # the whole step: forward, backward and update() in one replay
                    loss = step_graphs[idx.shape[1]](idx, lengths, y)
                else:  # DDP averages gradients once, on the last micro-batch of the step
                    with model.no_sync() if ddp and i < args.grad_accum - 1 else nullcontext():
                        loss = compute_loss(model, idx, lengths, y)
                        (loss / args.grad_accum).backward()  # the mean over the accumulated micro-batches
                        loss = loss.detach()
                loss_sum += loss / args.grad_accum
                first_bad = torch.where((first_bad > total) & ~torch.isfinite(loss), step + 1, first_bad)
            if not step_graphs:
                update()
            step += 1  # steps done: the number the log lines, the history and the checkpoints give
            if allocator and allocator.due(step):  # eager: decisions on the CPU, edits in place
                allocator.reallocate(step, opt)
            bar.update()
            halt = bool(stop) and not ddp and step < total  # a Ctrl-C in the last step: the run is done; it ends
            ckpt_due = step == total or (args.ckpt_every and step % args.ckpt_every == 0)
            # the loop's only waits for the GPU: every log_every and ckpt_every steps (bad losses, log, checkpoint)
            if step % args.log_every == 0 or ckpt_due:
                if ddp:  # any process's bad step stops them all (the message names the earliest); so does its Ctrl-C
                    dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
                    # and the tokens of the global batch: grouped by length, process 0's rows are the longest
                    seen = torch.tensor([len(stop), tokens], device=first_bad.device)
                    dist.all_reduce(seen)
                    halt, tokens = bool(seen[0]) and step < total, int(seen[1])
                if (bad := int(first_bad)) <= total:
                    fail(f"non-finite loss at step {bad}; stopped" + (f", last good checkpoint {ckpt_path}"
                                                                       if ckpt_path and ckpt_path.exists() else ""))
                dt = time.time() - t0
                train_time, train_tokens = train_time + dt, train_tokens + tokens
                log_time, log_tokens = log_time + dt, log_tokens + tokens
                if step % args.log_every == 0 or step == total:
                    n = step - last_log
                    if ddp:  # the mean over all processes: the loss of the global batch
                        dist.all_reduce(loss_sum)
                        loss_sum /= world
                    lr_now = get_lr(step - 1, total, lr, args.warmup)  # of the step just done (step counts steps done)
                    log(f"step {step:5d} | loss {loss_sum.item() / n:.4f} | lr {lr_now:.2e}"
                        f" | {1000 * log_time / n:.0f} ms | {log_tokens / log_time:,.0f} tok/s")
                    loss_sum.zero_()
                    last_log, log_time, log_tokens = step, 0.0, 0
                if ckpt_path and ckpt_due:
                    checkpoint()
                t0, tokens = time.time(), 0
            if halt:
                if int(first_bad) <= total:
                    fail(f"non-finite loss at step {int(first_bad)}; stopped without saving")
                if ckpt_path:
                    if not ckpt_due:  # (a due one was just written above)
                        checkpoint()
                    log(f"interrupted after step {step}: checkpoint saved to {ckpt_path}; continue with --resume")
                else:
                    log(f"interrupted after step {step}")
                if ddp:  # none leaves before the checkpoint is written: torchrun ends the rest when one exits
                    dist.barrier()
                sys.exit(130)
    except KeyboardInterrupt:
        log(f"\nstopped at once in step {step + 1}; the last checkpoint is as it was")
        sys.exit(130)
    finally:  # however the loop ends (an error line too): from here on Ctrl-C stops at once, as usual
        signal.signal(signal.SIGINT, signal.default_int_handler)
    bar.close()
    if stop:
        log("Ctrl-C in the last steps: training had finished, so the run evaluates and saves (Ctrl-C again stops it)")

    # ----------------------------------------------------------------------------- evaluate and save
    t_eval = time.time()
    metrics = {s: evaluate(model, e, args.task, micro, device, autocast, rank, world) for s, e in dev_enc.items()}
    eval_time = time.time() - t_eval
    if allocator and allocator.history and master:
        log(rank_table(allocator))
    if out and master and not args.eval_only:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({k: getattr(args, k) for k in SAVED_ARGS}, indent=1))
        adapter = {k: v.cpu() for k, v in adapter_state_dict(gpt).items()}
        save_atomic(adapter, str(out / "adapter.safetensors"), save_file)
        if allocator:
            (out / "history.json").write_text(json.dumps({"layers": allocator.names, "history": allocator.history}))
    flat = {f"{s}_{k}" if len(metrics) > 1 else k: v for s, m in metrics.items() for k, v in m.items()}
    gpu = device.startswith("cuda")
    result = {"task": args.task, "method": args.method, "init": args.init, "seed": args.seed, "steps": step,
              "gate": bool(gate), "realloc": allocator is not None, "realloc_rate": args.realloc_rate,
              "rank": args.rank, "r_max": args.r_max, "lr": lr, "batch_size": args.batch_size,
              "cuda_graphs": step_graphs is not None,  # False for a finished run resumed: nothing recorded
              "train_time_s": round(train_time, 2), "compile_time_s": round(compile_time, 2),
              "eval_time_s": round(eval_time, 2),  # and the most GPU memory tensors held at once, graphs included
              "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
              "tokens_per_s": round(train_tokens / train_time) if train_time else None, **flat}
    if ddp:
        check_ranks_agree(gpt, rank)
    log(json.dumps(result))  # the last line: what scripts parse
    if ddp:  # a recorded all-reduce holds the communicator: free the graphs first, or this waits forever
        step_graphs = None  # (pytorch/pytorch#115388)
        gc.collect()
        dist.destroy_process_group()
    return result


def wrap_ddp(gpt, device, stream=None):
    """DistributedDataParallel around the model, built on `stream` when steps are recorded there (PyTorch's
    rule for DDP inside CUDA graphs). No buffer broadcast: masks stay equal by identical decisions (checked at
    the end), the rest is constant. Gradients as views into DDP's buckets spare a copy back per tensor and
    step (+8% tokens/s)."""
    if stream:  # DDP broadcasts rank 0's weights on it: after they were loaded, before they are used
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream) if stream else nullcontext():
        model = nn.parallel.DistributedDataParallel(gpt, device_ids=[device] if device.startswith("cuda") else None,
                                                    broadcast_buffers=False, gradient_as_bucket_view=True)
    if stream:
        torch.cuda.current_stream().wait_stream(stream)
    return model


def fingerprint(gpt):
    """Each floating-point tensor's sum and sum of squares, and the masks whole: other components at the same
    rank would keep a mask's sums."""
    state = {n: t for n, t in gpt.state_dict().items() if t.dtype.is_floating_point}
    sums = torch.stack([t.double().sum() for t in state.values()] + [t.double().pow(2).sum() for t in state.values()])
    return torch.cat([sums, *(t.double().flatten() for n, t in state.items() if n.endswith(".mask"))])


def check_ranks_agree(gpt, rank):
    """DDP keeps weights equal by averaging gradients; masks stay equal only if every process makes the same
    reallocation. Compare a fingerprint of both across processes, and stop loudly if they differ."""
    fp = fingerprint(gpt)
    fps = [torch.empty_like(fp) for _ in range(dist.get_world_size())]
    dist.all_gather(fps, fp)
    if any(not torch.equal(f, fps[0]) for f in fps):
        raise RuntimeError(f"rank {rank}: weights or masks differ between processes")
    if rank == 0:
        print(f"ddp check: weights and masks identical on all {len(fps)} processes")


def rank_table(allocator):
    """Plain-text heatmap of the allocation: a row per layer, a column per reallocation, darker = more rank."""
    shades, r_max = " .:-=+*#%@", allocator.layers[0].r_max
    hist = allocator.history
    width = max(len(n) for n in allocator.names)
    lines = [f"rank per layer, reallocations at steps {hist[0]['step']}..{hist[-1]['step']} ('@' = r_max {r_max}), "
             f"final rank on the right"]
    for i, name in enumerate(allocator.names):
        cells = "".join(shades[round(9 * h["ranks"][i] / r_max)] for h in hist)
        lines.append(f"{name:<{width}} |{cells}| {hist[-1]['ranks'][i]:2d}")  # masks change only at reallocations
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except torch.cuda.OutOfMemoryError as e:  # the commonest failure on a GPU: say what to change
        fail(f"out of GPU memory ({str(e).splitlines()[0]}); lower --batch-size or --max-len, or keep the batch and "
             f"raise --grad-accum", mine=True)
