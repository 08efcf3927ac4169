"""
The results grid's peers: Hugging Face transformers with PEFT LoRA or PEFT AdaLoRA, fine-tuned on a GLUE task
under train.py's protocol, so that they can stand in the same table as our methods.

    python results/peers.py --task rte --method peft-lora --init model.gguf --data-dir ../shared/glue --epochs 3
    python results/peers.py --task sst2 --method peft-adalora --init model.gguf --data-dir ../shared/glue --holdout 500
    python results/peers.py --task sst2 --method peft-lora --init scratch --max-steps 4 --device cpu  # tiny, random

What is the same as a train.py run of the same --seed (so only the adapters differ):
- the weights: our own loader (model.GPT.from_pretrained, the GGUF dequantised to float32) builds our GPT, whose
  state dict is renamed into transformers' LlamaForSequenceClassification (no transformers GGUF loading). The
  classification head is our GPT's, drawn from the seed as train.py draws it;
- the data: data.py's files, --holdout examples, the GGUF's own tokenizer, max_len, truncation, the batches of
  iterate_batches with the same (seed, epoch) orders and padding lengths (and --group-by-length); the same metrics;
- the schedule: train.py's get_lr (warm-up 6%, linear decay), AdamW without weight decay (fused on GPU),
  gradient clipping at 1, batch 32, bf16 autocast on GPU with the frozen linear layers stored in bf16;
- adapters of rank 8, alpha 16, no dropout, on every linear layer of every block. PEFT adapts q, k, v, gate and
  up as separate layers (7 a block, 210 on SmolLM2) where ours fuses them (4 a block, 120): the same weights
  adapted, more adapter parameters (2.4M against 2.0M for LoRA).

AdaLoRA (PEFT's AdaLoraConfig): init_r 12 pruned to target_r 8 on average (the same final budget as LoRA), its
orthogonal regularisation (weight 0.5) added to the loss by PEFT's own forward (we pass the labels), and
model.base_model.update_and_allocate(step) after every optimizer step, as PEFT's docs ask. Its schedule follows
dynlora's t_init 0.1 and t_final 0.7: no pruning for the first tinit = int(0.1 T) steps, the budget final for the
last tfinal = T - int(0.7 T), and in between a mask every deltaT = (int(0.7 T) - int(0.1 T)) // 10 steps
(train.py's default --realloc-every), so both decide equally often over the same span (PEFT at the multiples of
deltaT, ours counting from t_init).

Padding. data.py pads with id 0, which in SmolLM2's vocabulary is <|endoftext|>, the token every example ends with
and that the classifier reads. HF finds the last token as the rightmost one that is not pad_token_id, so padding
with the eot would make it read the token before. Here the padding is rewritten to an id that occurs in no
example of any split (SmolLM2: 1, <|im_start|>), and that id is the config's pad_token_id: HF then reads position
length - 1, as ours does (tests/test_grid.py checks the logits against ours).

--cuda-graphs (on by default on a GPU): the training step (forward, backward, clipping, AdamW) is recorded as one
CUDA graph per padding length and replayed, as train.py does. Eager PEFT spends about 20 us of CPU per kernel
launch, which at SmolLM2's 210 adapted layers makes a step about 0.25 s for LoRA and 0.6 s for AdaLoRA (from
bench.py's H200 rows at GPT-2's 48 layers, 56 and 147 ms, results/bench_h200.jsonl): an SST-2 epoch would take 9
and 21 minutes. AdaLoRA's update_and_allocate still runs eagerly after each replay, with two of PEFT's loops
replaced by the same arithmetic in fewer kernels: update_ipt in foreach kernels, and mask_using_rank_pattern with
its masks built once on the GPU (PEFT copies 210 Python lists to the GPU every step). tests/test_grid.py checks
that a run with the graphs faked on CPU follows the eager run's losses.

The last line of output is one JSON object with train.py's key names (task, method, seed, lr, steps,
train_time_s, the metrics; holdout_ and dev_ prefixes with --holdout), which results/sweep.py and results/table.py
read.
"""
import argparse
import json
import math
import subprocess
import sys
import time
import types
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's flat files
import data  # noqa: E402
from model import GPT, GPTConfig, PRESETS  # noqa: E402
from graphs import store_frozen  # noqa: E402  (frozen linear layers in the autocast dtype)
from train import get_lr  # noqa: E402  (the same schedule)

METHODS = ["peft-lora", "peft-adalora"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # every linear of a block

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--task", default="sst2", help=f"GLUE task: {', '.join(data.TASKS)}")
p.add_argument("--method", default="peft-lora", choices=METHODS)
p.add_argument("--init", required=True, help="a Llama-family .gguf file (or safetensors folder), or 'scratch': a "
               "tiny random Llama with GPT-2's tokenizer (tests, dry runs)")
p.add_argument("--data-dir", default=str(data.DEFAULT_DATA_DIR), help="folder in the GLUE layout")
p.add_argument("--epochs", type=float, default=1.0)
p.add_argument("--max-steps", type=int, default=0, help="this many steps instead of --epochs")
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--max-len", type=int, default=128)
p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
p.add_argument("--warmup", type=float, default=0.06, help="fraction of steps of linear warm-up")
p.add_argument("--grad-clip", type=float, default=1.0)
p.add_argument("--rank", type=int, default=8, help="LoRA rank; AdaLoRA's target_r")
p.add_argument("--init-r", type=int, default=12, help="AdaLoRA's initial rank")
p.add_argument("--alpha", type=float, default=16.0)
p.add_argument("--t-init", type=float, default=0.1, help="AdaLoRA: pruning starts after this fraction of steps")
p.add_argument("--t-final", type=float, default=0.7, help="AdaLoRA: the budget is final from this fraction on")
p.add_argument("--realloc-every", type=int, default=0, help="AdaLoRA deltaT (0: train.py's default, a tenth of "
               "the span)")
p.add_argument("--holdout", type=int, default=0, help="as train.py: N training examples set aside and scored")
p.add_argument("--n-layer", type=int, default=2, help="--init scratch: layers")
p.add_argument("--n-head", type=int, default=2, help="--init scratch: heads (key/value heads: half of them)")
p.add_argument("--n-embd", type=int, default=64, help="--init scratch: width")
p.add_argument("--group-by-length", type=int, default=0, help="as train.py: sort windows of this many batches by "
               "length (0: off)")
p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None, help="replay each training "
               "step as a recorded CUDA graph, AdaLoRA's bookkeeping in fewer kernels (default: on with a CUDA device)")
p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="autocast dtype on GPU")
p.add_argument("--device", default="auto")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--log-every", type=int, default=50)
p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
               help="accepted for the sweep's command line; the peers never compile")


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


p.error = fail


def adalora_schedule(total, t_init=0.1, t_final=0.7, every=0):
    """(tinit, tfinal, deltaT) of PEFT's AdaLoraConfig for train.py's dynlora schedule of `total` steps: our
    decisions at steps int(t_init T), +every, ..., int(t_final T); PEFT's tfinal counts the steps after that. The
    final mask comes at step 2 at the earliest: PEFT scores steps before it only, and with none it fails (KeyError)."""
    if total < 2:
        raise ValueError(f"AdaLoRA needs at least 2 steps to score and prune, not {total}")
    a, b = int(t_init * total), max(2, int(t_final * total))
    return a, total - b, every or max(1, (b - a) // 10)


# ----------------------------------------------------------------------------------------- our weights, HF's model
def build_ours(args, n_labels):
    """Our GPT, seeded as train.py seeds it (so the head `score` starts the same as a train.py run's)."""
    torch.manual_seed(args.seed)
    if args.init == "scratch":  # a tiny random Llama (GQA, RoPE, SwiGLU) with GPT-2's 50257-token vocabulary
        kv = max(1, args.n_head // 2)
        cfg = GPTConfig(**{**PRESETS["tiny-llama"], "n_layer": args.n_layer, "n_head": args.n_head, "n_kv_head": kv,
                           "n_embd": args.n_embd, "n_inner": 2 * args.n_embd, "vocab_size": 50257,
                           "block_size": max(128, args.max_len)}, n_labels=n_labels)
        return GPT(cfg)
    return GPT.from_pretrained(args.init, n_labels=n_labels)


def hf_state_dict(gpt):
    """Our state dict in HF Llama names: model._convert_llama in reverse (c_attn's rows are q, k, v; c_fc's are
    gate, up). The lm_head is left out: classification never reads it."""
    c, sd = gpt.config, gpt.state_dict()
    hd = c.head_dim
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"], "score.weight": sd["score.weight"]}
    for i in range(c.n_layer):
        q, h = f"transformer.h.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = sd[q + "ln_1.weight"]
        for name, w in zip("qkv", sd[q + "attn.c_attn.weight"].split([c.n_head * hd, c.n_kv_head * hd,
                                                                       c.n_kv_head * hd])):
            out[h + f"self_attn.{name}_proj.weight"] = w
        out[h + "self_attn.o_proj.weight"] = sd[q + "attn.c_proj.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[q + "ln_2.weight"]
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = sd[q + "mlp.c_fc.weight"].chunk(2)
        out[h + "mlp.down_proj.weight"] = sd[q + "mlp.c_proj.weight"]
    return {k: v.clone() for k, v in out.items()}  # own storage: the HF model must not alias ours


def to_hf(gpt, pad_id):
    """transformers' LlamaForSequenceClassification with our GPT's weights (every key checked: strict)."""
    import transformers
    c = gpt.config
    if c.mlp != "swiglu" or c.pos != "rope" or c.norm != "rmsnorm" or c.bias:
        raise ValueError("the peers run Llama-family backbones only (SmolLM2)")
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.n_inner, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, head_dim=c.head_dim,
        max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=False, num_labels=c.n_labels, pad_token_id=pad_id, bos_token_id=None,
        eos_token_id=None, attention_bias=False, mlp_bias=False, hidden_act="silu", use_cache=False)
    cfg.problem_type = "regression" if c.n_labels == 1 else "single_label_classification"
    cfg._attn_implementation = "sdpa"  # as ours: F.scaled_dot_product_attention, causal
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4
    with no_init_weights():  # every weight is loaded next: skip drawing 135M random numbers (7 s on 2 CPU cores)
        hf = transformers.LlamaForSequenceClassification(cfg)
    hf.load_state_dict(hf_state_dict(gpt), strict=True)
    theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    if theta != c.rope_theta:  # transformers 5 moved it into rope_parameters: make sure it was read
        raise ValueError(f"transformers kept rope_theta {theta}, not the model's {c.rope_theta}")
    return hf


def add_peft(hf, method, args, total):
    """PEFT's adapter on every linear layer of every block; task_type SEQ_CLS trains the `score` head too."""
    import peft
    kw = dict(target_modules=HF_TARGETS, lora_alpha=args.alpha, lora_dropout=0.0, task_type="SEQ_CLS")
    if method == "peft-lora":
        conf = peft.LoraConfig(r=args.rank, **kw)
    else:
        tinit, tfinal, delta = adalora_schedule(total, args.t_init, args.t_final, args.realloc_every)
        conf = peft.AdaLoraConfig(init_r=args.init_r, target_r=args.rank, tinit=tinit, tfinal=tfinal, deltaT=delta,
                                  total_step=total, beta1=0.85, beta2=0.85, orth_reg_weight=0.5, **kw)
    return peft.get_peft_model(hf, conf)


def unused_id(encs, vocab_size, eot):
    """The smallest token id in no example of any split (nor the eot): the padding HF can tell from real tokens."""
    used = np.zeros(vocab_size, dtype=bool)
    used[np.concatenate([ids for e in encs for ids in e.ids] + [np.array([eot])])] = True
    if used.all():
        raise ValueError("every token id occurs in the data: no id is free for padding")
    return int(np.argmin(used))  # the first False


def repad(idx, lengths, pad):
    """data.py's batch (B, T) padded with PAD_ID -> the same ids padded with `pad` after each row's length."""
    return torch.where(torch.arange(idx.shape[1])[None, :] >= lengths[:, None], pad, idx)


def fast_update_ipt(alloc, model):
    """PEFT's RankAllocator.update_ipt (peft/tuners/adalora/layer.py) in foreach kernels: for every lora_ tensor,
    ipt = |p * grad|, exp_avg_ipt = b1 exp_avg_ipt + (1 - b1) ipt, exp_avg_unc = b2 exp_avg_unc + (1 - b2)
    |ipt - exp_avg_ipt|, the same operations in the same order (tests/test_grid.py checks equality)."""
    if not hasattr(alloc, "_fast_names"):
        pairs = [(n, q) for n, q in model.named_parameters() if "lora_" in n and alloc.adapter_name in n]
        alloc._fast_names, alloc._fast_params = [n for n, _ in pairs], [q for _, q in pairs]
    names, ps = alloc._fast_names, alloc._fast_params
    if any(n not in alloc.ipt for n in names):  # first call, or after reset_ipt
        for n, q in zip(names, ps):
            alloc.ipt[n], alloc.exp_avg_ipt[n], alloc.exp_avg_unc[n] = (torch.zeros_like(q) for _ in range(3))
    with torch.no_grad():
        ipt = torch._foreach_abs(torch._foreach_mul(ps, [q.grad for q in ps]))
        ea = torch._foreach_add(torch._foreach_mul([alloc.exp_avg_ipt[n] for n in names], alloc.beta1),
                                torch._foreach_mul(ipt, 1 - alloc.beta1))
        eu = torch._foreach_add(torch._foreach_mul([alloc.exp_avg_unc[n] for n in names], alloc.beta2),
                                torch._foreach_mul(torch._foreach_abs(torch._foreach_sub(ipt, ea)), 1 - alloc.beta2))
    for n, a, b, u in zip(names, ipt, ea, eu):
        alloc.ipt[n], alloc.exp_avg_ipt[n], alloc.exp_avg_unc[n] = a, b, u


def fast_mask_using_rank_pattern(alloc, model, rank_pattern):
    """PEFT's RankAllocator.mask_using_rank_pattern, called every step once the budget is final: each lora_E's
    entries outside the pattern set to 0. PEFT builds each mask from a Python list every step (a host-to-device
    copy that waits for the GPU, 210 of them); here they are built once per pattern and kept on the device."""
    if getattr(alloc, "_fast_pattern", None) is not rank_pattern:
        truncated = alloc.adapter_name not in next(iter(rank_pattern))  # PEFT's test for keys without the name
        masks = []
        for n, q in model.named_parameters():
            if f"lora_E.{alloc.adapter_name}" in n:
                keep = rank_pattern[n.replace(f".{alloc.adapter_name}", "") if truncated else n]
                masks.append((q, ~torch.tensor(keep, dtype=torch.bool, device=q.device).unsqueeze(-1)))  # (r, 1)
        alloc._fast_pattern, alloc._fast_masks = rank_pattern, masks
    with torch.no_grad():
        for q, drop in alloc._fast_masks:
            q.masked_fill_(drop, 0.0)


# ------------------------------------------------------------------------------------------------ CUDA graphs
def can_record(device):
    return device.startswith("cuda")


def record(step_fn, static, stream):
    """One CUDA graph of step_fn(*static) (recording runs nothing); returns replay() -> the loss tensor."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        loss = step_fn(*static)
    return lambda: (g.replay(), loss)[1]


def capture(step_fn, params, opt, lengths, batch_size, label_dtype, device):
    """train.capture_steps for the peers: per padding length, 3 warm-up steps on a side stream, then one recorded
    step. The warm-ups train on dummy batches, so the weights and AdamW's state are put back afterwards.
    Returns {T: (static inputs, replay)}."""
    for group in opt.param_groups:  # the lr as a tensor filled in place; capturable AdamW keeps its steps on the GPU
        group.update(lr=torch.tensor(float(group["lr"]), device=device), capturable=device.startswith("cuda"))
    saved = [q.detach().clone() for q in params]
    cuda = device.startswith("cuda")
    side = torch.cuda.Stream() if cuda else None
    graphs = {}
    for T in lengths:
        static = (torch.ones(batch_size, T, dtype=torch.long, device=device),
                  torch.zeros(batch_size, dtype=label_dtype, device=device))
        if cuda:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if cuda else nullcontext():
            for _ in range(3):
                step_fn(*static)
        if cuda:
            torch.cuda.current_stream().wait_stream(side)
        graphs[T] = (static, record(step_fn, static, side))
    with torch.no_grad():
        torch._foreach_copy_(params, saved)
        for st in opt.state.values():  # a fresh optimizer: zero moments, zero steps
            for v in st.values():
                if torch.is_tensor(v):
                    v.zero_()
    return graphs


# ------------------------------------------------------------------------------------------------ the run
@torch.no_grad()
def evaluate(model, enc, task, batch_size, device, autocast, pad):
    """graphs.evaluate (train.py's): every example once, in file order; dummy rows after the last are dropped."""
    model.eval()
    preds = []
    for idx, lengths, _, _ in data.iterate_batches(enc, batch_size, shuffle=False):
        with autocast:
            out = model(input_ids=repad(idx, lengths, pad).to(device), use_cache=False).logits.float()
        preds.append(out.squeeze(-1) if data.TASKS[task].regression else out.argmax(-1))
    model.train()
    return data.compute_metrics(task, torch.cat(preds)[: len(enc)].cpu().numpy(), enc.labels.numpy())


def load(args):
    """Data and our model, as train.load_data_and_model: (train_enc, eval_enc, our GPT, pad id, total steps)."""
    try:
        data.ensure_glue(args.task, args.data_dir)
        train_ex = data.load_split(args.task, args.data_dir, "train")
        evals = {s: data.load_split(args.task, args.data_dir, s) for s in data.splits(args.task)}
        if args.holdout:
            train_ex, held = data.hold_out(train_ex, args.holdout)
            evals = {"holdout": held, **evals}
        gpt = build_ours(args, data.TASKS[args.task].n_labels)
        tok = data.get_tokenizer(args.init)
    except (data.DataError, ValueError, FileNotFoundError, RuntimeError) as e:
        fail(str(e))
    train_enc = data.encode_split(train_ex, tok, args.max_len)
    eval_enc = {s: data.encode_split(ex, tok, args.max_len) for s, ex in evals.items()}
    pad = unused_id([train_enc, *eval_enc.values()], gpt.config.vocab_size, tok.eot)
    print(f"{args.task}: {len(train_ex)} train, " + ", ".join(f"{len(e)} {s}" for s, e in evals.items())
          + f" examples; padding with id {pad} (eot {tok.eot})")

    steps_per_epoch = len(train_enc) // args.batch_size
    if steps_per_epoch == 0:
        fail(f"{len(train_enc)} training examples are fewer than one batch of {args.batch_size}")
    total = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    return train_enc, eval_enc, gpt, pad, total


def train(args, model, opt, step_fn, graphs, train_enc, pad, total, device):
    """The loop, as train.py's: lr, batch, step (replayed, if recorded), AdaLoRA's update, a log line every
    --log-every steps. Returns (train time, tokens and time of the logged intervals)."""
    steps_per_epoch = len(train_enc) // args.batch_size
    adalora = args.method == "peft-adalora"
    def set_lr(lr):
        for group in opt.param_groups:
            group["lr"].fill_(lr) if torch.is_tensor(group["lr"]) else group.update(lr=lr)

    gpu = device.startswith("cuda")
    t0, train_time, tokens, log_tokens, log_time, last_log = time.time(), 0.0, 0, 0, 0.0, 0
    loss_sum = torch.zeros((), device=device)
    batch_iter, epoch = None, -1
    for step in range(total):  # step: 0-based; train.py's data position and lr of the same step
        set_lr(get_lr(step, total, args.lr, args.warmup))
        e, b = divmod(step, steps_per_epoch)
        if e != epoch:
            epoch = e
            batch_iter = data.iterate_batches(train_enc, args.batch_size, shuffle=True, seed=args.seed, epoch=e,
                                              start=b, group=args.group_by_length)
        idx, lengths, y, _ = next(batch_iter)
        tokens += int(lengths.sum())
        x = repad(idx, lengths, pad)
        if graphs:
            (sx, sy), replay = graphs[x.shape[1]]
            sx.copy_(x.pin_memory() if gpu else x, non_blocking=True)  # pinned: the CPU need not wait
            sy.copy_(y.pin_memory() if gpu else y, non_blocking=True)
            loss = replay()
        else:
            loss = step_fn(x.to(device), y.to(device))
        loss_sum += loss
        if adalora:  # PEFT's order: backward, optimizer step, update_and_allocate(step), zero_grad
            model.base_model.update_and_allocate(step + 1)
        if not graphs:
            opt.zero_grad(set_to_none=True)
        if (step + 1) % args.log_every == 0 or step + 1 == total:
            loss_now = loss_sum.item() / (step + 1 - last_log)  # waits for the GPU
            dt = time.time() - t0
            train_time, log_time, log_tokens = train_time + dt, log_time + dt, log_tokens + tokens
            print(f"step {step + 1:5d} | loss {loss_now:.4f} | lr {get_lr(step, total, args.lr, args.warmup):.2e} | "
                  f"{1000 * dt / (step + 1 - last_log):.0f} ms | {tokens / dt:,.0f} tok/s", flush=True)
            if not math.isfinite(loss_now):
                fail(f"non-finite loss by step {step + 1}; stopped")
            loss_sum.zero_()
            last_log, tokens, t0 = step + 1, 0, time.time()
    return train_time, log_tokens, log_time


def main(argv=None):
    args = p.parse_args(argv)
    if args.task not in data.TASKS:
        fail(f"unknown task {args.task!r}; choose one of {', '.join(data.TASKS)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.cuda_graphs and not can_record(device):
        fail(f"--cuda-graphs needs a CUDA device, not {device}")
    if args.cuda_graphs is None:
        args.cuda_graphs = can_record(device)
    if device == "cpu":
        torch.set_flush_denormal(True)
    import peft
    import transformers
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    print(f"git {git or '?'} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"peft {peft.__version__} | device {device}")
    print("args " + json.dumps(vars(args)))
    train_enc, eval_enc, gpt, pad, total = load(args)
    try:
        hf = to_hf(gpt, pad)
        del gpt
        model = add_peft(hf, args.method, args, total)
    except ValueError as e:
        fail(str(e))
    model.to(device)
    amp = getattr(torch, args.dtype) if device.startswith("cuda") and args.dtype != "float32" else None
    autocast = torch.autocast("cuda", amp, cache_enabled=False) if amp else nullcontext()
    if amp:  # PEFT's base layers; adapters and the head keep float32 masters, embeddings and norms stay float32
        store_frozen(model.base_model.model.model.layers, amp)
    params = [q for q in model.parameters() if q.requires_grad]
    n_train, n_all = sum(q.numel() for q in params), sum(q.numel() for q in model.parameters())
    print(f"trainable {n_train:,} / {n_all:,} ({100 * n_train / n_all:.3f}%)")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=device.startswith("cuda"))
    adalora = args.method == "peft-adalora"
    if adalora and args.cuda_graphs:  # the same arithmetic in fewer kernels, so that the GPU stays busy
        alloc = model.base_model.rankallocator
        alloc.update_ipt = types.MethodType(fast_update_ipt, alloc)
        alloc.mask_using_rank_pattern = types.MethodType(fast_mask_using_rank_pattern, alloc)

    def step_fn(x, y, grads=None):
        """Forward (PEFT adds AdaLoRA's orthogonal regularisation to the loss), backward, clip, AdamW."""
        if grads is not None:  # recorded: gradients live in fixed tensors, zeroed first
            torch._foreach_zero_(grads)
        with autocast:
            loss = model(input_ids=x, labels=y, use_cache=False).loss
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        return loss.detach()

    model.train()
    t_compile, graphs = time.time(), None
    if args.cuda_graphs:  # gradients as fixed tensors that every graph writes, so update_and_allocate reads this step's
        for q in params:
            q.grad = torch.zeros_like(q)
        grads = [q.grad for q in params]
        graphs = capture(lambda x, y: step_fn(x, y, grads), params, opt, data.buckets(args.max_len),
                         args.batch_size, train_enc.labels.dtype, device)
        # backward adds into an existing .grad in place; had it made new ones, AdaLoRA would score stale gradients
        assert all(q.grad is g for q, g in zip(params, grads)), "the recorded step replaced the gradient tensors"
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    compile_time = time.time() - t_compile

    train_time, log_tokens, log_time = train(args, model, opt, step_fn, graphs, train_enc, pad, total, device)
    t_eval = time.time()
    metrics = {s: evaluate(model, e, args.task, args.batch_size, device, autocast, pad) for s, e in eval_enc.items()}
    eval_time = time.time() - t_eval
    flat = {f"{s}_{k}" if len(metrics) > 1 else k: v for s, m in metrics.items() for k, v in m.items()}
    result = {"task": args.task, "method": args.method, "init": args.init, "seed": args.seed, "steps": total,
              "rank": args.rank, "init_r": args.init_r if adalora else None, "lr": args.lr,
              "batch_size": args.batch_size, "cuda_graphs": graphs is not None, "pad_id": pad, "trainable": n_train,
              "peft": peft.__version__, "transformers": transformers.__version__,
              "train_time_s": round(train_time, 2), "compile_time_s": round(compile_time, 2),
              "eval_time_s": round(eval_time, 2),
              "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None,
              "tokens_per_s": round(log_tokens / log_time) if log_time else None, **flat}
    print(json.dumps(result))  # the last line: what results/sweep.py parses
    return result


if __name__ == "__main__":
    try:
        main()
    except torch.cuda.OutOfMemoryError as e:
        fail(f"out of GPU memory ({str(e).splitlines()[0]}); run fewer at once (sweep.py --per-gpu)")
