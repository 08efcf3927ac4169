"""
Where the training step runs and how it is made fast, for train.py and bench.py: the device and torchrun's
processes, the loop's sync points and evaluation, frozen weights kept in the autocast dtype, compiling, and
CUDA-graph recording; and the two scripts' shared command line (number flags, one-line errors, the git hash).

Processes: under torchrun each process takes one GPU, DDP averages the gradients in the backward, and every other
agreement (rank 0 loading first, the log points' reductions, evaluation's gather, the end-of-run check that
weights and masks are the same everywhere) is an explicit collective here.

Frozen weights: autocast would cast each frozen weight to bf16 on every forward; store_frozen does it once.

Compiling: each transformer block is torch.compile'd on its own (regional compilation), for every padding
length a batch can have, before the clock starts.

Recording (--cuda-graphs): at short lengths a step is bound by the CPU (Python launching a few thousand small
kernels and looping over hundreds of trainable tensors in clipping, scoring and AdamW). capture_steps records the
whole step (forward, backward, clipping, AdamW) once per padding length; a replay is then one launch.
A replay reads every tensor where it lay when the step was recorded, and runs no Python. So:

1. Inputs are copied in, never passed: a replay copies its batch and its lr into the recording's own input
   tensors (the lr is a tensor in the optimizer from then on; a float would have been recorded as a constant).
2. Nothing the step reads is replaced: .to(), new adapters, a new optimizer or its load_state_dict() after
   recording leave the graph reading the old tensors. Reallocation edits masks and slices in place, so it
   runs between replays, outside the graph.
3. No host sync inside the step (.item(), a Python branch on a tensor): recording forbids it.
4. The gradients live in graph memory and the step's loss is the same tensor after every replay; so one
   micro-batch a step (no --grad-accum).
5. Recording needs a few untimed steps first (compilation, the optimizer's state), which train on dummy
   batches: afterwards the weights, the optimizer state, the allocator's probes and the random state are put
   back, so the run trains as if nothing had happened.
6. Under DDP, PyTorch asks for the model to be wrapped on the stream that records (DDP's hooks hold each
   parameter's gradient accumulator, made on the stream current then) and for 11 steps before the first
   recording (DDP rebuilds its buckets in its first iterations).

tests/fake_graphs.py replaces `record` and `can_record` to run all of this on a CPU.
"""
import argparse
import gc
import math
import os
import subprocess
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import data
from checkpoint import rng_state, set_rng_state


# ----------------------------------------------------------------------------- train.py's and bench.py's command line
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


def fail(msg, mine=False):
    """Bad input ends in one clear line, not a traceback. Under torchrun every process meets the same bad input,
    so only rank 0 says it, unless the trouble is this process's own (mine=True)."""
    if mine or int(os.environ.get("RANK", 0)) == 0:  # RANK: set by torchrun, read before or after init
        print(f"error: {msg}", file=sys.stderr)
    else:  # torchrun stops the others when one exits: give rank 0 time to say why
        time.sleep(2)
    sys.exit(2)


def git_hash():
    """This checkout's commit, for the first log line ('?' outside a git checkout)."""
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip()
    return git or "?"


# ----------------------------------------------------------------------------- the device and its processes
class OwnError(ValueError):
    """Bad input that this process met on its own: said by it, where rank 0 speaks for every process otherwise."""


def start_processes(device):
    """--device resolved for this process and, under torchrun, the process group: (device, ddp, rank, world)."""
    ddp = "RANK" in os.environ  # launched by torchrun
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if ddp:  # one process per GPU: process i of this machine takes GPU i; on CPU, gloo
        if device not in ("cuda", "cpu"):
            raise ValueError(f"under torchrun --device is cuda, cpu or auto (each process takes its own GPU), not "
                             f"{device!r}")
        device = f"cuda:{os.environ['LOCAL_RANK']}" if device == "cuda" else device
    if why := device_problem(device):
        hint = " (under torchrun: at most one process per GPU, or --device cpu)" if ddp else ""
        raise (OwnError if ddp else ValueError)(f"--device {device} cannot run here: {why}{hint}")
    rank, world = 0, 1
    if ddp:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)
    if device == "cpu":
        torch.set_flush_denormal(True)  # Adam's tiny second moments would otherwise crawl through subnormal math
    return device, ddp, rank, world


def device_problem(device):
    """Why `device` cannot run on this machine (a bad name, a backend torch lacks, a GPU index too high), or None."""
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


def all_agree(ok, ddp):
    """True when every process says ok (a single process: its own answer)."""
    if not ddp:
        return ok
    flag = torch.tensor([float(ok)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def in_turn(load, ddp, master):
    """load(), rank 0 first, so that a download happens once; then the others read what it fetched. A process
    that cannot load stops every process together: none waits forever."""
    for turn in ([True, False] if ddp else [True]):  # turn True: rank 0 loads; turn False: the others do
        err = None
        if master == turn:
            try:
                loaded = load()
            except (data.DataError, ValueError, FileNotFoundError, RuntimeError) as e:
                err = e
        if not all_agree(err is None, ddp):
            raise OwnError(str(err)) if err else ValueError("another process could not load the data or the model")
    return loaded


def to_device(t, device):
    """Copy a batch tensor to the GPU without making the CPU wait: from pinned memory, asynchronously (a
    plain copy would wait for all queued GPU work, and the CPU could no longer run ahead of it)."""
    return t.pin_memory().to(device, non_blocking=True) if device.startswith("cuda") else t


def wrap_ddp(gpt, device, stream=None):
    """DistributedDataParallel around the model, built on `stream` when steps are recorded there (rule 6). No
    buffer broadcast: masks stay equal by identical decisions (checked at the end), the rest is constant.
    Gradients as views into DDP's buckets spare a copy back per tensor and step."""
    if stream:  # DDP broadcasts rank 0's weights on it: after they were loaded, before they are used
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream) if stream else nullcontext():
        model = nn.parallel.DistributedDataParallel(gpt, device_ids=[device] if device.startswith("cuda") else None,
                                                    broadcast_buffers=False, gradient_as_bucket_view=True)
    if stream:
        torch.cuda.current_stream().wait_stream(stream)
    return model


def fingerprint(gpt):
    """Each floating-point tensor's sum and sum of squares, and the `active` masks whole: other components at
    the same rank would keep a mask's sum."""
    state = gpt.state_dict()
    floats = [t.double() for t in state.values() if t.dtype.is_floating_point]
    sums = torch.stack([t.sum() for t in floats] + [t.pow(2).sum() for t in floats])
    return torch.cat([sums, *(t.double().flatten() for n, t in state.items() if n.endswith(".active"))])


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


# ----------------------------------------------------------------------------- the loop's sync points, evaluation
class Meter:
    """What train.py's loop measures. The loss and the first bad step stay on the device between sync points, so
    that no step waits for the GPU; tokens and time are counted on the CPU."""

    def __init__(self, device, total, step):
        self.total, self.last_log = total, step
        self.loss = torch.zeros((), device=device)  # summed since the last log line
        self.first_bad = torch.full((), total + 1, device=device)  # first step with a non-finite loss (total + 1: none)
        self.train_time, self.train_tokens = 0.0, 0  # in all
        self.log_time, self.log_tokens = 0.0, 0  # since the last log line
        self.restart()

    def add(self, loss, step):
        self.loss += loss
        self.first_bad = torch.where((self.first_bad > self.total) & ~torch.isfinite(loss), step + 1, self.first_bad)

    def restart(self):
        self.t0, self.tokens = time.time(), 0  # tokens since the last sync: this process's, then (DDP) every one's


def log_point(run, meter, step, asked, lr):
    """train.py's one wait for the device, every --log-every steps and at checkpoints, after step `step` (its lr
    `lr`). Under torchrun the processes' reductions happen here: the earliest bad step of any, their Ctrl-Cs, and
    the tokens of the global batch (grouped by length, process 0's rows are the longest: they must not stand for
    all). A non-finite loss stops the run. Returns the Ctrl-Cs `asked` of this process, under torchrun those of all."""
    m = meter
    if run.ddp:
        dist.all_reduce(m.first_bad, op=dist.ReduceOp.MIN)
        seen = torch.tensor([asked, m.tokens], device=m.first_bad.device)
        dist.all_reduce(seen)
        asked, m.tokens = int(seen[0]), int(seen[1])
    if (bad := int(m.first_bad)) <= run.total:
        last = f", last good checkpoint {run.ckpt_path}" if run.ckpt_path and run.ckpt_path.exists() else ""
        raise ValueError(f"non-finite loss at step {bad}; stopped{last}")
    dt = time.time() - m.t0
    m.train_time, m.train_tokens = m.train_time + dt, m.train_tokens + m.tokens
    m.log_time, m.log_tokens = m.log_time + dt, m.log_tokens + m.tokens
    if step % run.args.log_every == 0 or step == run.total:
        n = step - m.last_log
        if run.ddp:  # the mean over all processes: the loss of the global batch
            dist.all_reduce(m.loss)
            m.loss /= run.world
        run.log(f"step {step:5d} | loss {m.loss.item() / n:.4f} | lr {lr:.2e} | {1000 * m.log_time / n:.0f} ms"
                f" | {m.log_tokens / m.log_time:,.0f} tok/s")
        m.loss.zero_()
        m.last_log, m.log_time, m.log_tokens = step, 0.0, 0
    return asked


@torch.no_grad()
def evaluate(run, enc):
    """The task's metrics over every example once, for train.py's run. Under torchrun each process scores its
    slice of each global batch and the slices are gathered back in order, so every process reports the same
    numbers."""
    run.model.eval()
    preds = []
    for idx, lengths, _, _ in data.iterate_batches(enc, run.micro, shuffle=False, rank=run.rank, world_size=run.world):
        with run.autocast:
            out = run.model(to_device(idx, run.device), to_device(lengths, run.device)).float()
        pred = out.squeeze(-1) if run.task.regression else out.argmax(-1)  # (B,)
        if run.world > 1:  # the global batch: process r's rows are its r-th slice
            parts = [torch.empty_like(pred) for _ in range(run.world)]
            dist.all_gather(parts, pred)
            pred = torch.cat(parts)
        preds.append(pred)
    run.model.train()
    preds = torch.cat(preds)[: len(enc)].cpu().numpy()  # file order; the dummy rows come after every example
    return data.compute_metrics(run.args.task, preds, enc.labels.numpy())


def end_processes(run):
    """Leave torchrun's process group at the end of train.py's run. A recorded all-reduce holds the communicator:
    the graphs are freed first, or this waits forever (pytorch/pytorch#115388)."""
    run.step_fn = None
    gc.collect()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- frozen weights, compiling, recording
def autocast_dtype(dtype, device):
    """The dtype autocast computes in: `dtype` (a name) on a GPU; None, float32 throughout, on a CPU or for
    "float32". Under it the frozen linear layers are stored in that dtype too (store_frozen)."""
    return getattr(torch, dtype) if str(device).startswith("cuda") and dtype != "float32" else None


def store_frozen(modules, dtype, kinds=(nn.Linear,)):
    """Keep the frozen linear layers among `modules` in the autocast dtype. Autocast would cast each of them on
    every forward anyway (a copy of every frozen weight, every step), to the same numbers in eager mode; compiled,
    a float32 bias may be added without that rounding, so GPT-2's biases can differ by one bf16 rounding. Only
    layers whose every parameter is frozen change: trainable tensors keep their float32 masters. train.py passes
    the blocks (embeddings and norms, which autocast leaves alone, keep float32); bench.py passes the Hugging Face
    model with its Conv1D as a kind too. A layer that shares a parameter (an lm_head tied to the token embedding)
    is left alone. Call it after the adapters are added (they take the base weight's dtype). A merge() into such a
    weight rounds the sum to its dtype, so unmerge() no longer restores it exactly."""
    seen = Counter(id(p) for _, p in modules.named_parameters(remove_duplicate=False))
    for m in modules.modules():
        if isinstance(m, kinds) and not any(p.requires_grad or seen[id(p)] > 1 for p in m.parameters()):
            m.to(dtype)


def compile_and_record(run, step_fn, lengths, extra):
    """train.py's run (its Run), made ready off the clock: every padding length in `lengths` compiled, the model
    wrapped in DDP under torchrun, and with --cuda-graphs step_fn(batches, lr) recorded. Sets run.model, run.step_fn
    (step_fn, or its replay), run.recorded and run.compile_time. extra: as capture_steps'."""
    args, t0 = run.args, time.time()
    run.model, run.step_fn = run.gpt, step_fn
    run.recorded = args.cuda_graphs and run.step < run.total and not args.eval_only
    side = torch.cuda.Stream() if run.recorded else None  # the recording's stream; under DDP, wrapped on it

    def over(what):  # a line and a bar: compiling and recording take a minute or two on a GPU
        run.log(f"{what} for each padding length {lengths}, off the clock")
        return tqdm(lengths, desc=what, unit="length", leave=False, disable=None if run.rank == 0 else True,
                    dynamic_ncols=True)
    try:
        if args.compile and not args.eval_only:  # a finished run too: evaluation's compilation stays off its clock
            warm_up(run.gpt, run.params, run.micro, over("compiling"), run.device, run.autocast)
        if run.ddp:
            run.model = wrap_ddp(run.gpt, run.device, side)
        if run.recorded:
            run.step_fn = capture_steps(step_fn, run.opt, run.params, batch_size=run.micro,
                                        lengths=over("recording a CUDA graph"), device=run.device,
                                        regression=run.task.regression, extra=extra, stream=side,
                                        warmup=11 if run.ddp else 3,
                                        on_replay=run.allocator.replayed if run.allocator else None)
    except KeyboardInterrupt:  # recording trains on dummy batches: nothing of the run is lost, nothing to save
        run.log("\ninterrupted while compiling and recording, before this run's first step: nothing to save")
        sys.exit(130)
    if run.device.startswith("cuda"):
        torch.cuda.synchronize()
    run.compile_time = time.time() - t0


def compile_blocks(gpt, n_shapes):
    """Regional compilation: the n_layer identical blocks share one compiled graph per input shape, so compiling
    takes seconds where the whole model takes minutes. Static shapes: per padding length, a graph for training
    and one for evaluation (no autograd). Embeddings, final norm and head stay eager (a few small kernels). The
    cache limit leaves room beyond those 2 * n_shapes graphs, so that a recompile shows up as slowness, not an
    error."""
    torch._dynamo.config.cache_size_limit = max(8, 4 * n_shapes)
    for block in gpt.transformer.h:
        block.compile(dynamic=False)


def dummy_batch(batch_size, T, device, regression=False):
    """(idx, lengths, y) of the right shapes: any tokens, every row T long. Only shapes matter for compiling."""
    return (torch.zeros(batch_size, T, dtype=torch.long, device=device), torch.full((batch_size,), T, device=device),
            torch.zeros(batch_size, dtype=torch.float32 if regression else torch.long, device=device))


def warm_up(model, params, batch_size, lengths, device, autocast):
    """Compile the graph of every padding length, for training and evaluation, before the clock starts; then
    leave no trace: gradients dropped, random state restored."""
    rng = rng_state(device)
    for T in lengths:
        idx, full, _ = dummy_batch(batch_size, T, device)
        with autocast:
            model(idx, full).float().sum().backward()
        for p in params:  # a CUDA graph's gradients live in its memory until the next replay
            p.grad = None
        model.eval()
        with torch.no_grad(), autocast:
            model(idx, full)
        model.train()
    set_rng_state(rng, device)


def can_record(device):
    """Whether --cuda-graphs can record on this device."""
    return device.startswith("cuda")


def resolve_cuda_graphs(flag, device, grad_accum, ddp, eval_only):
    """--cuda-graphs checked against rule 4, and its default (None) resolved: on with one CUDA device."""
    if flag and not can_record(device):
        raise ValueError(f"--cuda-graphs needs a CUDA device, not {device}")
    if flag and grad_accum > 1:
        raise ValueError("--cuda-graphs cannot accumulate gradients: each replay reuses the memory of the last "
                         "gradients")
    if flag is None:  # not yet by default under torchrun: recorded DDP steps are untested on 2 GPUs
        flag = can_record(device) and grad_accum == 1 and not ddp
    return flag and not eval_only  # evaluation alone runs no training graph


def record(step_fn, inputs, stream):
    """One call of step_fn(batches, lr) recorded as a CUDA graph; returns (graph, its loss tensor)."""
    idx, lengths, y, lr = inputs
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        loss = step_fn([(idx, lengths, y)], lr)
    return graph, loss


def capture_steps(step_fn, opt, params, *, batch_size, lengths, device, regression=False, extra=(), stream=None,
                  warmup=3, on_replay=None):
    """Record step_fn(batches, lr) -> loss, the whole training step, once per padding length in `lengths`.
    `extra`: tensors the step changes in place besides params and the optimizer state (the allocator's probes),
    put back with them (rule 5). Under DDP pass the stream the model was wrapped on and warmup=11 (rule 6).
    on_replay(idx, lengths): called at each replay with the recording's input tensors, which then hold the
    batch; a replay runs no Python, so no forward hook sees it (RankAllocator.replayed).
    Returns replay(batches, lr) -> loss: batches is one (idx, lengths, y), lr a float (rule 1)."""
    for group in opt.param_groups:  # capturable: AdamW's step counts stay on the GPU
        group.update(capturable=device.startswith("cuda"))
    lr = torch.tensor(float(opt.param_groups[0]["lr"]), device=device)  # the step sets it in each group (rule 1)
    keep = list(params) + list(extra)  # detached clones: a clone of a parameter would keep its AccumulateGrad alive
    rng, saved = rng_state(device), [t.detach().clone() for t in keep]
    state_before = {id(v): v.clone() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)}
    recorded, side = {}, stream or torch.cuda.Stream()  # one stream for warm-up and recording
    for i, T in enumerate(lengths):
        inputs = (*dummy_batch(batch_size, T, device, regression), lr)
        side.wait_stream(torch.cuda.current_stream())  # the inputs above are written on the default stream
        with torch.cuda.stream(side):  # as PyTorch's docs ask: warm-up on a side stream
            for _ in range(warmup if i == 0 else 3):
                step_fn([inputs[:3]], lr)
        torch.cuda.current_stream().wait_stream(side)
        recorded[T] = (*record(step_fn, inputs, side), inputs)
    with torch.no_grad():  # rule 5: put back what the dummy steps changed
        torch._foreach_copy_(keep, saved)
        for st in opt.state.values():  # the state a resumed run loaded, or a fresh one's zeros
            for v in st.values():
                if torch.is_tensor(v):
                    v.copy_(state_before[id(v)]) if id(v) in state_before else v.zero_()
    set_rng_state(rng, device)

    def replay(batches, lr):
        (batch,) = batches  # one micro-batch a step (rule 4)
        graph, loss, inputs = recorded[batch[0].shape[1]]
        for dst, src in zip(inputs, batch):
            dst.copy_(src, non_blocking=True)
        inputs[3].fill_(lr)
        graph.replay()
        if on_replay:
            on_replay(*inputs[:2])
        return loss
    return replay
