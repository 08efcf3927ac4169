"""
Time one training step (forward, backward, clipping, allocator, optimizer) of each method on the same model
shape, batch and dtype, eager and compiled, and report what the adapters cost next to plain LoRA.

    python bench.py                                   # GPT-2 124M shape, batch 32 x 128, bf16 autocast
    python bench.py --model smollm2-135m --compile no
    python bench.py --device cpu --model tiny --batch-size 4 --seq-len 32 --steps 3   # seconds: a smoke test
    python bench.py --profile dynlora                 # the top 15 GPU kernels of a compiled dynlora step

Weights are random: a step's speed does not depend on their values. Where `transformers` (and `peft`) import,
the same shape is also timed as Hugging Face's model: fully trained (hf-full), with PEFT LoRA and with PEFT
AdaLoRA. On a GPU under bf16, every adapter row (ours and PEFT's) keeps its frozen base layers in bf16
(graphs.store_frozen). The last line of output is one JSON object with every figure.
"""
import argparse
import gc
import json
import statistics
import time
from collections import Counter
from contextlib import nullcontext
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList

import graphs
import train
from dynlora import RankAllocator
from graphs import number
from model import PRESETS, GPT, GPTConfig

OURS = ["full", "lora", "dynlora", "dynlora-nogate", "dynlora-norealloc"]
HF = ["hf-full", "peft-lora", "peft-adalora"]
SHAPES = {"gpt2": "gpt2", "smollm2-135m": "HuggingFaceTB/SmolLM2-135M", "tiny": "tiny", "tiny-llama": "tiny-llama"}
TARGETS = train.p.get_default("targets").split(",")  # train.py's: c_attn, c_proj, c_fc, also GPT-2's HF names
HF_LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# ----------------------------------------------------------------------------- arguments
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default="gpt2", choices=list(SHAPES), help="shape from model.PRESETS (random weights)")
p.add_argument("--batch-size", type=number(int, 1), default=32, help="sequences per step")
p.add_argument("--seq-len", type=number(int, 1), default=128, help="tokens per sequence (every row full)")
p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="autocast dtype on GPU")
p.add_argument("--device", default="auto", help="cuda, cpu, ... (auto: cuda if available)")
p.add_argument("--steps", type=number(int, 1), default=50, help="timed steps per method (the median and mean are over these)")
p.add_argument("--warmup", type=number(int, 0), default=10, help="untimed steps first: compilation and allocator warm-up")
p.add_argument("--methods", default="all", help=f"comma list from {','.join(OURS + HF)} (all: every one)")
p.add_argument("--compile", default="auto", choices=["auto", "both", "yes", "no"],
               help="eager, torch.compile'd or both (auto: both on GPU, eager on CPU)")
p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
               help="compiled rows of our methods: record the whole step (forward, backward, AdamW) as one "
                    "CUDA graph and replay it, as train.py does on one GPU (default: on GPU)")
p.add_argument("--hf-compile-mode", default="reduce-overhead", choices=["default", "reduce-overhead", "max-autotune"],
               help="torch.compile mode of the compiled Hugging Face rows (reduce-overhead: CUDA graphs, their best)")
p.add_argument("--rank", type=number(int, 1), default=8, help="LoRA rank; dynlora's budget is rank x adapted layers")
p.add_argument("--r-max", type=number(int, 1), default=16, help="dynlora: the most components one layer can hold")
p.add_argument("--realloc-every", type=number(int, 1), default=10, help="dynlora and AdaLoRA: steps between reallocations")
p.add_argument("--peft", action=argparse.BooleanOptionalAction, default=True,
               help="also time Hugging Face + PEFT (skipped with a note when not importable)")
p.add_argument("--profile", default="", metavar="METHOD", help="instead of the table: torch.profiler over one "
               "reallocation period of METHOD (compiled unless --compile no; eager on CPU under auto), printing the "
               "top 15 GPU kernels by time and how busy the GPU was")
p.error = lambda message: graphs.fail(message)  # one line, as train.py (argparse would add its usage)

# dense bf16/fp16 tensor-core peaks from the vendors' datasheets, for MFU as it is usually quoted; the table's MFU
# is against the matmul peak measured here (matmul_peak), below the datasheet's (RESULTS.md has an H200's)
# (the first name found in the device's name counts: the PCIe and NVL H100s before the SXM one)
DATASHEET_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                  "L40S": 362e12}


def datasheet_peak(device_name):
    """The datasheet's dense bf16 FLOP/s of a GPU by its name, or None when it is not in the table."""
    return next((v for k, v in DATASHEET_PEAK.items() if k in device_name), None)


def flops_per_token(cfg, n, method, seq_len):
    """Matmul FLOPs of one training step per token (the PaLM appendix B / nanoGPT estimate):
    weights: forward 2N, gradient wrt inputs 2N, gradient wrt weights 2N (full only: frozen weights get none);
    attention: 12 L C T (forward Q K^T and A V, 2 * 2 T C per layer, backward twice that). The adapter
    methods still need dQ, dK, dV to reach earlier layers, so attention counts the same for them. Causal
    masking is ignored, as is customary. Adapter FLOPs (about 6 r (d_in + d_out) per layer and token) are left
    out: they are the overhead this benchmark measures, so MFU shows how well the backbone's work is done."""
    return (6 if method.endswith("full") else 4) * n + 12 * cfg.n_layer * cfg.n_embd * seq_len


def add_adapters(method, gpt, args):
    """train.py's setup_method for one of our methods; a rank this shape cannot hold is one error line."""
    try:
        return train.setup_method(gpt, method.split("-")[0], rank=args.rank, r_max=args.r_max,
                                  gate=method != "dynlora-nogate")[0]
    except ValueError as e:
        p.error(f"{method}: {e}")


def setup_ours(method, cfg, args, device):
    """Our GPT, set up by train.py's own setup_method, so the benchmark times what training runs.
    Returns (model, loss_fn, allocator, after_opt)."""
    gpt = GPT(cfg)
    layers = add_adapters(method, gpt, args)
    gpt.to(device)
    if amp := graphs.autocast_dtype(args.dtype, device):  # as train.py: frozen weights in the autocast dtype
        graphs.store_frozen(gpt.transformer.h, amp)
    allocator = None
    if method in ("dynlora", "dynlora-nogate"):
        # t_init 0 and a far t_final: reallocation every `every` steps all through warm-up and the timed
        # window, so its cost lands in the mean (and the median shows the steps between)
        allocator = RankAllocator(layers, gpt, t_init=0, t_final=10**9, every=args.realloc_every)
    loss_fn = lambda m, idx, lengths, y: F.cross_entropy(m(idx, lengths).float(), y)
    return gpt, loss_fn, allocator, None


def setup_hf(method, cfg, args, device):
    """Hugging Face's model of the same shape (random weights), fully trained or with a PEFT adapter."""
    import transformers  # lazy: optional, only for these reference rows
    llama = cfg.mlp == "swiglu"
    pad = cfg.vocab_size - 1  # batches never contain it, so HF pools the last position, as ours does
    ids = dict(vocab_size=cfg.vocab_size, num_labels=cfg.n_labels, pad_token_id=pad, bos_token_id=pad, eos_token_id=pad)
    if llama:
        hf_cfg = transformers.LlamaConfig(hidden_size=cfg.n_embd, intermediate_size=cfg.n_inner,
                                          num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                                          num_key_value_heads=cfg.n_kv_head, max_position_embeddings=cfg.block_size,
                                          tie_word_embeddings=cfg.tie_embeddings, **ids)
        model, targets = transformers.LlamaForSequenceClassification(hf_cfg), HF_LLAMA_TARGETS
    else:  # no dropout, as ours
        hf_cfg = transformers.GPT2Config(n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                         n_inner=cfg.n_inner, n_positions=cfg.block_size,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        model, targets = transformers.GPT2ForSequenceClassification(hf_cfg), TARGETS
    model.to(device)
    loss_fn = lambda m, idx, lengths, y: m(input_ids=idx, labels=y).loss
    if method == "hf-full":
        return model, loss_fn, None, None
    import peft
    # task_type SEQ_CLS keeps the new `score` head trainable, as ours; GPT-2's Conv1D stores W as (in, out)
    kw = dict(target_modules=targets, lora_alpha=16, lora_dropout=0.0, fan_in_fan_out=not llama, task_type="SEQ_CLS")
    # AdaLoRA prunes from init_r = 1.5 x rank (its paper's ratio) to the same final budget as dynlora, rank x
    # layers, on a cubic schedule over warm-up + timed steps, masking every `realloc_every` steps
    conf = peft.LoraConfig(r=args.rank, **kw) if method == "peft-lora" else \
        peft.AdaLoraConfig(init_r=args.rank * 3 // 2, target_r=args.rank, tinit=0, tfinal=0,
                           deltaT=args.realloc_every, total_step=args.warmup + args.steps, **kw)
    model = peft.get_peft_model(model, conf)
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layer, weight stored (in, out)
    if amp := graphs.autocast_dtype(args.dtype, device):  # frozen base layers in bf16, as ours (a fair race)
        graphs.store_frozen(model, amp, kinds=(torch.nn.Linear, Conv1D))
    if method == "peft-lora":
        return model, loss_fn, None, None
    # PEFT's documented order: backward, optimizer.step(), update_and_allocate(step), zero_grad()
    return model, loss_fn, None, lambda step: model.base_model.update_and_allocate(step)


def time_each(fn, steps, start, device):
    """Milliseconds of each call fn(start + i). CUDA: an event pair per call, read after one synchronize at the
    end, so the loop never waits for the GPU; CPU: perf_counter."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for i, (a, b) in enumerate(events):
            a.record()
            fn(start + i)
            b.record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in events]
    ms = []
    for i in range(steps):
        t0 = time.perf_counter()
        fn(start + i)
        ms.append(1000 * (time.perf_counter() - t0))
    return ms


def matmul_peak(device, dtype):
    """The ceiling for MFU, measured here rather than read off a datasheet: a square matmul on random data
    (8192 in `dtype` on GPU, 1024 in float32 on CPU), the best of 20 timed after 5 untimed."""
    n, dtype = (8192, dtype) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = time_each(lambda i: a @ b, 25, 0, device)[5:]
    return 2 * n**3 / (min(ms) / 1000)  # FLOP/s


def run(method, compiled, cfg, args, device, autocast, batch, profile=False):
    """Build one method, warm it up untimed, then time `steps` steps (or profile a few). Returns a row."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    raw, loss_fn, allocator, after_opt = (setup_hf if method in HF else setup_ours)(method, cfg, args, device)
    raw.train()
    params = [p for p in raw.parameters() if p.requires_grad]  # the optimizer sees only trainable tensors
    n_train, n_all = sum(p.numel() for p in params), sum(p.numel() for p in raw.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")  # train.py's default
    model = raw  # hooks keep using `raw`
    if compiled and method in OURS:  # as train.py compiles: block by block
        graphs.compile_blocks(raw, n_shapes=1)
    elif compiled:  # Hugging Face's model as its users would compile it: whole
        model = torch.compile(raw, dynamic=False, mode=args.hf_compile_mode)

    def update(i=None):  # train.py's update() at its default --grad-clip 1
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if after_opt:
            after_opt(i)  # AdaLoRA's update_and_allocate (Hugging Face rows, never recorded)
        opt.zero_grad(set_to_none=True)

    def eager_step(i, *batch):
        if compiled and method in HF and args.hf_compile_mode != "default":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are dead
        with autocast:
            loss = loss_fn(model, *batch)
        loss.backward()
        update(i)
        return loss.detach()

    train_step = eager_step
    if args.cuda_graphs and compiled and method in OURS:  # the whole step recorded, as train.py does
        def step_fn(batches, lr):  # graphs.capture_steps' kind of step; the lr a tensor it fills, as train.py's
            for group in opt.param_groups:
                group["lr"] = lr
            return eager_step(None, *batches[0])

        extra = allocator.step_state() if allocator else []
        replay = graphs.capture_steps(step_fn, opt, params, batch_size=args.batch_size, lengths=[args.seq_len],
                                      device=str(device), extra=extra)
        train_step = lambda i, *b: replay([b], 1e-4)

    def step(i):
        train_step(i, *batch)
        if allocator:
            allocator.step(i, opt)  # eager, after the step, as in train.py: fading, and reallocation when due

    for i in range(args.warmup):  # compilation and the first reallocation happen here, off the clock
        step(i)
    if profile:  # one reallocation period timed, then the same again under the profiler
        n = args.realloc_every
        ms = statistics.mean(time_each(step, n, args.warmup, device))
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            for i in range(n):
                step(args.warmup + n + i)
            if device.type == "cuda":
                torch.cuda.synchronize()
        if device.type != "cuda":
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            return None
        # GPU kernels only: the op rows above them, and the GPU ranges of record_function, would count each twice
        kernels = EventList([a for a in prof.key_averages() if a.device_type == DeviceType.CUDA
                             and not getattr(a, "is_user_annotation", False)], use_device="cuda")
        print(kernels.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=90))
        busy = sum(a.self_device_time_total for a in kernels) / 1000 / n  # microseconds -> ms per step
        kinds = Counter()  # the same kernels summed by kind, ms a step
        for a in kernels:
            kinds[kernel_kind(a.key)] += a.self_device_time_total / 1000 / n
        print("GPU ms a step by kind: " + ", ".join(f"{k} {v:.2f}" for k, v in kinds.most_common()))
        print(f"{method} ({'compiled' if compiled else 'eager'}): {ms:.2f} ms a step (mean of {n}, unprofiled), "
              f"GPU kernels {busy:.2f} ms of it ({100 * busy / ms:.0f}% busy): the rest is the CPU "
              f"launching work (Python, dispatch, kernel launches) and synchronizing")
        return None
    ms = time_each(step, args.steps, args.warmup, device)
    # what one reallocation adds: its steps' mean over the median of the steps between (None: it never reallocates)
    hit = [(args.warmup + i) % args.realloc_every == 0 for i in range(len(ms))]
    between = [t for t, h in zip(ms, hit) if not h]
    realloc_ms = None
    if method in ("dynlora", "dynlora-nogate", "peft-adalora") and any(hit) and between:
        realloc_ms = statistics.mean(t for t, h in zip(ms, hit) if h) - statistics.median(between)
    return {"method": method, "compile": compiled, "median_ms": statistics.median(ms), "mean_ms": statistics.mean(ms),
            "min_ms": min(ms), "max_ms": max(ms), "realloc_ms": realloc_ms, "trainable": n_train, "params": n_all,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def kernel_kind(name):
    """A GPU kernel's kind, from its name: cuBLAS/CUTLASS matmuls, attention, Inductor's fused Triton kernels,
    multi-tensor kernels (fused AdamW, the clipping's norms and scaling), or other (copies, eager elementwise)."""
    n = name.lower()
    for kind, marks in [("attention", ["flash", "fmha", "attention"]), ("triton", ["triton"]),
                        ("matmul", ["gemm", "nvjet", "cutlass", "xmma", "cublas"]), ("multi-tensor", ["multi_tensor"])]:
        if any(m in n for m in marks):
            return kind
    return "other"


def free(device, compiled):
    """Let the next method start from an empty GPU and a fresh compiler cache."""
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def hf_missing(methods, peft_on):
    """{method: why it cannot run} for the Hugging Face rows: they need transformers (hf-full) and peft (the
    adapters); missing, they are skipped with a note."""
    skip = {}
    for m in methods:
        try:
            if not peft_on:
                raise ImportError("--no-peft")
            import transformers  # noqa: F401
            if m != "hf-full":
                import peft  # noqa: F401
        except ImportError as e:
            skip[m] = str(e)
    return skip


def print_table(rows, realloc_every, peak, sheet):
    """The rows as a table, each method's cost next to plain LoRA's."""
    print(f"\n{'method':<18} {'compile':<8} {'median ms':>10} {'x lora':>7} {'mean ms':>9} {'x lora':>7} "
          f"{'realloc ms':>11} {'tok/s':>10} {'peak GiB':>9} {'MFU':>7} {'trainable':>12}")
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in rows:
        print(f"{r['method']:<18} {'yes' if r['compile'] else 'no':<8} {r['median_ms']:>10.2f} "
              f"{fmt(r['vs_lora_median'], '.3f'):>7} {r['mean_ms']:>9.2f} {fmt(r['vs_lora'], '.3f'):>7} "
              f"{fmt(r['realloc_ms'], '.1f'):>11} {r['tokens_per_s']:>10,.0f} {fmt(r['peak_mem_gib'], '.2f'):>9} "
              f"{100 * r['mfu']:>6.2f}% {r['trainable']:>12,}")
    print(f"median: the steps between reallocations; mean: with one every {realloc_every} steps; realloc ms: what "
          f"one reallocation adds to its step. tok/s and MFU use the mean; MFU counts 4N (6N full) + 12 L C T FLOPs "
          f"per token against the measured matmul peak, adapter FLOPs excluded"
          + (f"; against the datasheet's {sheet / 1e12:.0f} TFLOP/s (mfu_datasheet in the JSON) multiply by "
             f"{peak / sheet:.2f}" if sheet else ""))


def main(argv=None):
    args = p.parse_args(argv)
    name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if why := graphs.device_problem(name):
        p.error(f"--device {name} cannot run here: {why}")
    device = torch.device(name)
    if device.type == "cuda":  # "cuda" means the current GPU; name it, so memory stats and events agree
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    else:  # x86 CPUs slow down 10-100x on subnormal floats, which Adam's second moments of tiny gradients reach
        torch.set_flush_denormal(True)
    if args.cuda_graphs is None:
        args.cuda_graphs = device.type == "cuda"
    elif args.cuda_graphs and device.type != "cuda":
        p.error("--cuda-graphs needs a CUDA device")
    cfg = GPTConfig(**PRESETS[SHAPES[args.model]])
    if args.seq_len > cfg.block_size:
        p.error(f"--seq-len {args.seq_len} is longer than the model's block size {cfg.block_size}")
    amp = graphs.autocast_dtype(args.dtype, device)
    autocast = torch.autocast(device.type, amp, cache_enabled=False) if amp else nullcontext()  # as train.py
    modes = {"auto": [False, True] if device.type == "cuda" else [False], "both": [False, True],
             "yes": [True], "no": [False]}[args.compile]
    methods = OURS + HF if args.methods == "all" else args.methods.split(",")
    if bad := [m for m in methods + ([args.profile] if args.profile else []) if m not in OURS + HF]:
        p.error(f"unknown method(s) {bad}; choose from {OURS + HF}")
    if len(set(methods)) < len(methods):
        p.error(f"--methods {args.methods} names a method twice")
    if True in modes and args.warmup < 3:  # compiled rows: compilation and graph recording must stay off the clock
        p.error(f"--warmup {args.warmup}: compiled rows need at least 3 untimed steps (or --compile no)")
    with torch.device("meta"):  # a rank this shape cannot hold: one line now, not after timing the methods before it
        for m in [m for m in methods + [args.profile] if m in OURS]:
            add_adapters(m, GPT(cfg), args)
    git = graphs.git_hash()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"git {git} | torch {torch.__version__} | device {dev_name} | args {json.dumps(vars(args))}")

    # one fixed batch for every method: random tokens (never zeros: values can change kernel speed), full rows
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size - 1, (args.batch_size, args.seq_len), generator=g)  # (B, T), no pad id
    lengths = torch.full((args.batch_size,), args.seq_len)  # (B,)
    y = torch.randint(0, cfg.n_labels, (args.batch_size,), generator=g)  # (B,)
    batch = [t.to(device) for t in (idx, lengths, y)]

    skip = hf_missing([m for m in methods + [args.profile] if m in HF], args.peft)
    if args.profile:
        if args.profile in skip:
            p.error(f"--profile {args.profile} cannot run: {skip[args.profile]}")
        run(args.profile, modes[-1], cfg, args, device, autocast, batch, profile=True)  # compiled if any mode is
        return None
    for m, why in skip.items():
        print(f"skipping {m}: {why}")
    methods = [m for m in methods if m not in skip]

    peak = matmul_peak(device, amp or torch.float32)
    sheet = datasheet_peak(dev_name) if amp else None
    with torch.device("meta"):  # N without allocating: the shape is all it needs
        n = GPT(cfg).num_params(non_embedding=True)
    tokens = args.batch_size * args.seq_len
    print(f"{args.model}: N = {n / 1e6:.1f}M non-embedding params | batch {args.batch_size} x {args.seq_len} | "
          f"{'autocast ' + args.dtype if amp else 'float32'} | matmul peak {peak / 1e12:.3g} TFLOP/s")
    if device.type == "cpu" and n > 10**7:  # the default GPT-2 shape: seconds a step on a CPU, 60 steps a method
        print(f"note: on a CPU one step of this shape takes seconds, and each method runs "
              f"{args.warmup + args.steps} of them. `--device cpu --model tiny --batch-size 4 --seq-len 32 --steps 3` "
              f"checks that everything runs, in seconds")
    if realloc := [m for m in methods if m in ("dynlora", "dynlora-nogate", "peft-adalora")]:
        print(f"{', '.join(realloc)} reallocate every {args.realloc_every} steps, inside the timed window too: the "
              f"mean step includes it, the median shows the steps between (train.py's default rate is lower: "
              f"11 reallocations over 60% of the run)")

    rows = []
    for compiled in modes:
        for m in methods:
            if compiled and m == "peft-adalora":
                continue  # AdaLoRA's allocator is eager Python by design; timed eager only
            row = run(m, compiled, cfg, args, device, autocast, batch)
            free(device, compiled)
            # throughput and MFU from the mean: an epoch pays for the reallocation steps too
            row["tokens_per_s"] = tokens / (row["mean_ms"] / 1000)
            row["flops_per_token"] = flops_per_token(cfg, n, m, args.seq_len)
            row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / peak
            row["mfu_datasheet"] = row["flops_per_token"] * row["tokens_per_s"] / sheet if sheet else None
            rows.append(row)
            print(f"  {m} ({'compiled' if compiled else 'eager'}): median {row['median_ms']:.2f} ms, "
                  f"mean {row['mean_ms']:.2f} ms", flush=True)  # progress, and a record if a later one fails
    for row in rows:  # the cost of each method next to plain LoRA, compiled against compiled, eager against eager
        lora = next((r for r in rows if r["method"] == "lora" and r["compile"] == row["compile"]), None)
        row["vs_lora"] = row["mean_ms"] / lora["mean_ms"] if lora else None
        row["vs_lora_median"] = row["median_ms"] / lora["median_ms"] if lora else None

    print_table(rows, args.realloc_every, peak, sheet)
    config = {**vars(args), "n_params_non_embedding": n, "compute": args.dtype if amp else "float32",
              "skipped": skip}
    date = datetime.now(timezone.utc).isoformat()
    result = {"device": dev_name, "torch": torch.__version__, "git": git, "date": date,
              "config": config, "matmul_peak_flops": peak, "datasheet_peak_flops": sheet, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
