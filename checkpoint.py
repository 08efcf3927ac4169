"""
What train.py writes to --out and reads back, and its crash safety: checkpoints that a crash cannot leave
half-written, a resume that continues the same loss curve or refuses, and Ctrl-C as a request to stop after the
current step.

--out holds config.json (the flags of SAVED_ARGS), adapter.safetensors (dynlora.adapter_state_dict: the active
components, the gates, the head), history.json (the allocation at each reallocation), ckpt.pt, and for an ungated
run peft/, the adapter in Hugging Face PEFT's format (peft_format.py).

A checkpoint holds what the run cannot recompute: the trainable tensors and the adapters' masks, the optimizer
state, the step (which fixes the learning rate and the position in the data order), the run's step count, every
process's random state, every flag, and the allocator's state. It is written to a temporary file and renamed
into place, and read with torch.load(weights_only=True), so a file carrying code is refused, never run.
"""
import json
import os
import pickle
import signal
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from dynlora import adapter_state_dict, load_adapter

# written to config.json: what --adapter needs to rebuild the model and read the data as it was trained
SAVED_ARGS = ["task", "method", "init", "rank", "r_max", "alpha", "targets", "gate", "n_layer", "n_head", "n_embd",
              "max_len", "seed"]  # seed: an --init scratch backbone is rebuilt from it
# --resume refuses a change to any flag the run was started with, a flag added later too, except these: they do
# not move its loss curve (--peft only gave the adapters' start, which the checkpoint holds: it resumes without)
FREE_ON_RESUME = {"data_dir", "compile", "cuda_graphs", "device", "out", "resume", "ckpt_every", "log_every",
                  "eval_only", "adapter", "peft"}


# ----------------------------------------------------------------------------- the run's folder
def check_writable(out):
    """--out, tried before any data is read: a run must not train for nothing."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from e


def save_run(out, args, gpt, history=None):
    """After training: config.json, adapter.safetensors and, when rank moved, history.json."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({k: getattr(args, k) for k in SAVED_ARGS}, indent=1))
    save_atomic({k: v.cpu() for k, v in adapter_state_dict(gpt).items()}, str(out / "adapter.safetensors"), save_file)
    if history is not None:
        (out / "history.json").write_text(json.dumps(history))


def rank_table(history, r_max):
    """history.json's allocation as a plain-text heatmap, for the log: a row per layer, a column per
    reallocation, darker = more rank."""
    shades, names, hist = " .:-=+*#%@", history["layers"], history["history"]
    width = max(len(n) for n in names)
    lines = [f"rank per layer, reallocations at steps {hist[0]['step']}..{hist[-1]['step']} ('@' = r_max {r_max}), "
             f"final rank on the right"]
    for i, name in enumerate(names):
        cells = "".join(shades[round(9 * h["ranks"][i] / r_max)] for h in hist)
        lines.append(f"{name:<{width}} |{cells}| {hist[-1]['ranks'][i]:2d}")  # masks change only at reallocations
    return "\n".join(lines)


def take_adapter_config(args, default, choices, log):
    """--adapter: the flags of SAVED_ARGS as the saved run had them, from its config.json. default(flag): the
    parser's; choices: {flag: the values it may take}."""
    cfg_path = Path(args.adapter) / "config.json"
    if not cfg_path.exists():
        raise ValueError(f"{cfg_path} not found: --adapter must be a folder written by --out")
    try:
        saved = json.loads(cfg_path.read_text())
        for k in SAVED_ARGS:  # each value of the type its flag gives, and a task and method that exist
            flag = getattr(args, k)
            # a flag newer than the adapter: its default; but adapters saved before "seed" was did not use 0
            v = saved.get(k, flag if k == "seed" else default(k))
            if type(v) is not type(default(k)) or (k in choices and v not in choices[k]):
                raise ValueError(f"{k} = {v!r}")
            if flag != v and flag != default(k):
                log(f"--{k.replace('_', '-')} {flag} replaced by the adapter's {v}")
            setattr(args, k, v)
    except (ValueError, TypeError, AttributeError) as e:  # AttributeError: a list, not a dict
        raise ValueError(f"{cfg_path} is not a config written by --out ({type(e).__name__}: {e})") from e


def load_saved_adapter(gpt, folder, device):
    """--adapter's weights into the model built from its config."""
    try:
        load_adapter(gpt, load_file(str(Path(folder) / "adapter.safetensors"), device=device))
    except Exception as e:  # a missing, corrupt or foreign file: one line
        raise ValueError(f"adapter {folder} does not fit this model: {e}") from e


# ----------------------------------------------------------------------------- checkpoints


def trainable_state(gpt):
    """What a checkpoint must hold of the model: the trainable tensors and the adapters' masks."""
    keep = {n for n, p in gpt.named_parameters() if p.requires_grad}
    return {k: v for k, v in gpt.state_dict().items() if k in keep or k.endswith(".active")}


def rng_state(device):
    """The random state that dropout draws from: CPU, plus the GPU's when there is one."""
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if device.startswith("cuda") else [])


def set_rng_state(state, device):
    torch.set_rng_state(state[0].cpu())
    if device.startswith("cuda") and len(state) > 1:  # a CPU run's state has no GPU part: the GPU's stays seeded
        torch.cuda.set_rng_state(state[1].cpu())


def save_atomic(obj, path, save=torch.save):
    """Write to a temporary file, then rename: a crash at any moment leaves the previous file whole."""
    tmp = f"{path}.tmp"
    save(obj, tmp)
    os.replace(tmp, path)


def save(run, step):
    """Write run.ckpt_path after `step` (run: train.py's Run). Called by every process: each one's random state
    and the allocator's probes are gathered, then process 0 writes. Weights that are not finite (a finite loss with NaN gradients) are not
    saved: the last checkpoint stays a good one."""
    if not torch.isfinite(torch.stack(torch._foreach_norm(run.params)).sum()):
        raise ValueError(f"non-finite weights after step {step}; stopped without saving, the last checkpoint is as "
                         f"it was")
    rng = [rng_state(run.device)]
    if run.world > 1:
        rng = [None] * run.world
        dist.all_gather_object(rng, rng_state(run.device))
        if run.allocator:
            run.allocator.share()  # the demand every process gathered, into process 0's copy
    if run.rank > 0:
        return
    ck = {"model": trainable_state(run.gpt), "optimizer": run.opt.state_dict(), "step": step, "total": run.total,
          "rng": rng, "args": dict(vars(run.args)), "allocator": run.allocator.state_dict() if run.allocator else {}}
    try:
        run.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(ck, run.ckpt_path)
    except OSError as e:  # a full disk, a folder gone: the previous checkpoint is whole (save_atomic)
        raise ValueError(f"cannot write the checkpoint {run.ckpt_path} after step {step} ({e.strerror or e}); the "
                         f"last one is as it was") from e


def read(path, device):
    """The checkpoint at `path`, tensors and plain data only; a missing, corrupt or hostile file is one line."""
    if not (path and path.exists()):
        raise ValueError(f"--resume needs a checkpoint: {path or '--out'} not found")
    try:
        with warnings.catch_warnings():  # torch warns at length about pickles; our one line says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # torch's own text would suggest weights_only=False: never here
        raise ValueError(f"cannot resume from {path}: it is not a checkpoint of tensors and plain data (corrupt, "
                         f"or it carries code, which is never run)") from None
    except Exception as e:  # torch's own words for garbage can be as bare as "pop from empty list"
        raise ValueError(f"cannot resume from {path}: it cannot be read (corrupt or truncated; {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no message'})") from None


def changed_flags(saved, args, default):
    """The flags of `args` but FREE_ON_RESUME that the run was started with otherwise, as '--flag old -> new'. A
    flag newer than the checkpoint counts as its default(name), as the run had it."""
    now = {k: v for k, v in vars(args).items() if k not in FREE_ON_RESUME}
    was = {k: saved.get(k, default(k)) for k in now}
    return [f"--{k.replace('_', '-')} {was[k]} -> {v}" for k, v in now.items() if was[k] != v]


def resume(run, default):
    """Load the checkpoint of this same run (its flags, run.total steps) into the model, optimizer, allocator and
    random state (this process's); returns the step to continue from. A foreign file, or one of another run: one
    line, and nothing is resumed. default(flag): the parser's, for a flag newer than the checkpoint."""
    path, opt = run.ckpt_path, run.opt
    ck = read(path, run.device)
    try:
        if changed := changed_flags(ck["args"], run.args, default):  # each would leave the run's loss curve
            raise ValueError(f"the run was started with other settings: {', '.join(changed)}")
        if ck.get("total", run.total) != run.total:  # same flags, other data: the schedule and data order move
            raise ValueError(f"the run had {ck['total']} steps and would now have {run.total}: has the training "
                             f"data (--data-dir) changed?")
        want = trainable_state(run.gpt).keys()  # trainable tensors and masks; the rest is frozen
        if set(ck["model"]) != set(want):
            odd = sorted(set(ck["model"]) ^ set(want))
            raise ValueError(f"its tensors differ from this model's ({len(odd)} names, e.g. {odd[0]}): was it "
                             f"written with other --method, --init or --targets?")
        run.gpt.load_state_dict(ck["model"], strict=False)
        settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        opt.load_state_dict(ck["optimizer"])
        for group, mine in zip(opt.param_groups, settings):  # the state is the run's; lr, fused... this run's
            group.update(mine)
        if run.allocator:
            run.allocator.load_state_dict(ck["allocator"])
    except Exception as e:  # a foreign file, or one of another run: say so in one line
        raise ValueError(f"cannot resume from {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    states = [ck["rng"]] if torch.is_tensor(ck["rng"][0]) else ck["rng"]  # older checkpoints hold one state
    set_rng_state(states[run.rank % len(states)], run.device)  # another number of processes: theirs, in turn
    return ck["step"]


# ----------------------------------------------------------------------------- Ctrl-C
@contextmanager
def ctrl_c_stops_after_the_step(ddp):
    """Inside, a first Ctrl-C asks the loop to stop after the step under way: the list this yields fills. A second
    one stops at once (KeyboardInterrupt). Under torchrun every process gets the terminal's SIGINT and then
    torchrun's copy of it, so repeats are ignored there (torchrun kills its processes 30 s after its own), and
    every process stops after the same step: the next that synchronises them. However the block ends, Ctrl-C
    is the default again."""
    stop = []

    def on_sigint(signum, frame):
        if stop and not ddp:
            raise KeyboardInterrupt
        stop.append(signum)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupted(run, step, first_bad, saved):
    """What a first Ctrl-C leads to, after the step: a checkpoint (unless this step's was just written), then exit
    130. A bad step (first_bad <= run.total) stops without saving."""
    if first_bad <= run.total:
        raise ValueError(f"non-finite loss at step {first_bad}; stopped without saving")
    if run.ckpt_path:
        if not saved:
            save(run, step)
        run.log(f"interrupted after step {step}: checkpoint saved to {run.ckpt_path}; continue with --resume")
    else:
        run.log(f"interrupted after step {step}")
    if run.ddp:  # none leaves before the checkpoint is written: torchrun ends the rest when one exits
        dist.barrier()
    sys.exit(130)
