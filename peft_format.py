"""
Our adapters in Hugging Face PEFT's LoRA format and back: transformers + PEFT (and servers that load PEFT LoRA
adapters) can use what train.py trained, and train.py can start from a PEFT adapter.

    python peft_format.py export RUN_DIR   # RUN_DIR/config.json + adapter.safetensors -> RUN_DIR/peft/
    export_peft(gpt, args, out_dir, log)   # the same from train.py, or one line saying why not
    load_peft(gpt, peft_dir)               # a PEFT LoRA folder into a model built with add_dynlora

PEFT stores base_model.model.<module>.lora_A.weight (r, d_in) and .lora_B.weight (d_out, r) and adds
s B A x, s = lora_alpha / r per module (alpha / sqrt(r) with rsLoRA). Module names:

    ours                         GPT-2 (GPT2ForSequenceClassification)  Llama (LlamaForSequenceClassification)
    transformer.h.i.attn.c_attn  transformer.h.i.attn.c_attn            model.layers.i.self_attn.{q,k,v}_proj
    transformer.h.i.attn.c_proj  transformer.h.i.attn.c_proj            model.layers.i.self_attn.o_proj
    transformer.h.i.mlp.c_fc     transformer.h.i.mlp.c_fc               model.layers.i.mlp.{gate,up}_proj
    transformer.h.i.mlp.c_proj   transformer.h.i.mlp.c_proj             model.layers.i.mlp.down_proj
    score                        score (in modules_to_save)             score (in modules_to_save)

- Only active components go out: layer l's rank r_l is its count of components in use; rank_pattern holds each r_l != r0.
  Our scale alpha / r0 is fixed at the initial rank, so alpha_pattern sets alpha_l = alpha r_l / r0.
- GPT-2's Conv1D stores W as (in, out), but PEFT keeps lora_A, lora_B in nn.Linear layout there too
  (fan_in_fan_out only changes merging): GPT-2's layers map as they are, fused c_attn included.
- A fused Llama layer splits exactly: q = s B[q rows] A x, so q, k and v (gate and up) each get the same A
  and their own row block of B.
- Import inverts this for any PEFT LoRA of the same backbone. Parts of a fused layer with one A (our exports)
  join back at rank r; parts with their own A (q_proj and v_proj trained alone, say) stack, also exactly:
  A = [A_q; A_v], B = blockdiag(B_q, 0, B_v), rank r_q + r_v. Each part's scale is folded into B (s_m / s).
- Inputs as train.py's: enc(a) + [eot] (+ enc(b) + [eot]); the head reads the last token. Hugging Face reads the
  last token that is not pad_token_id, so batches are right-padded with an id other than eot, set as pad_token_id.
- Not expressible: a gated adapter (its gate scales each component per token: no fixed B A), DoRA and the
  other PEFT variants that change the formula.
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dynlora import adapter_state_dict, add_dynlora, dynlora_layers, load_adapter
from model import GPT

PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the Hugging Face model
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # every nn.Linear of a block
LLAMA_PARTS = {"attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "attn.c_proj": ("self_attn.o_proj",), "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
               "mlp.c_proj": ("mlp.down_proj",)}
# LoraConfig fields that change the formula s B A x or the base model: refused rather than silently dropped
VARIANTS = ("use_dora", "lora_bias", "use_qalora", "use_bdlora", "kasa_config", "monteclora_config",
            "alora_invocation_tokens", "layer_replication", "target_parameters", "trainable_token_indices")
GATED = "a gated adapter (dynlora with --gate) has no PEFT form: its gate scales each component per token"
FULL = "no LoRA layers to export (--method full trains every weight)"
SCRATCH = "--init scratch has no Hugging Face base model for PEFT to load the adapter onto"


def weight_shape(gpt, name):
    """(d_out, d_in) of the linear layer `name`, adapted (a DynLoRALinear around it) or not."""
    module = gpt.get_submodule(name)
    return getattr(module, "base", module).weight.shape


def hf_parts(gpt, name):
    """Our layer `name` -> [(Hugging Face module, its rows of our d_out)], or None for a layer outside the
    blocks (a --targets that caught lm_head, say)."""
    m = re.fullmatch(r"transformer\.h\.(\d+)\.(" + "|".join(map(re.escape, BLOCK_LINEARS)) + ")", name)
    if m is None:
        return None
    if gpt.config.pos == "learned":  # GPT-2: Hugging Face's names are ours
        return [(name, weight_shape(gpt, name)[0])]
    c, (i, kind) = gpt.config, m.groups()
    rows = {"attn.c_attn": [c.n_head * c.head_dim] + [c.n_kv_head * c.head_dim] * 2, "attn.c_proj": [c.n_embd],
            "mlp.c_fc": [c.n_inner] * 2, "mlp.c_proj": [c.n_embd]}[kind]  # model.py's fused row order
    return [(f"model.layers.{i}.{part}", n) for part, n in zip(LLAMA_PARTS[kind], rows)]


def hf_shapes(gpt):
    """{Hugging Face module: (d_out, d_in)} for every linear layer of every block of this model."""
    names = [f"transformer.h.{i}.{kind}" for i in range(gpt.config.n_layer) for kind in BLOCK_LINEARS]
    return {hf: (rows, weight_shape(gpt, name)[1]) for name in names for hf, rows in hf_parts(gpt, name)}


def peft_form(gpt, saved: dict):
    """(adapter_config.json as a dict, adapter_model.safetensors' tensors) for this model's adapters; a ValueError
    of one line when the run has none. saved: train.py's SAVED_ARGS values (its config.json)."""
    layers = dynlora_layers(gpt)
    if not layers:
        raise ValueError(FULL)
    if any(layer.gate for layer in layers.values()):
        raise ValueError(GATED)
    if saved["init"] == "scratch":
        raise ValueError(SCRATCH)
    packed = {k: v.cpu() for k, v in adapter_state_dict(gpt).items()}
    extra = set(packed) - {f"{n}.{p}" for n in layers for p in "AB"} - {"score.weight"}
    if extra:
        raise ValueError(f"trainable tensors besides the adapters and the head ({sorted(extra)[0]}, ...) "
                         "have no PEFT place")
    r0, alpha = saved["rank"], saved["alpha"]
    tensors, ranks = {PREFIX + "score.weight": packed["score.weight"]}, {}
    for name in layers:
        parts = hf_parts(gpt, name)
        if parts is None:
            raise ValueError(f"{name} has no counterpart in Hugging Face's sequence-classification model")
        A, B = packed[f"{name}.A"], packed[f"{name}.B"]  # (r_l, d_in), (d_out, r_l): active components only
        for (hf, _), B_part in zip(parts, B.split([n for _, n in parts])):
            tensors[f"{PREFIX}{hf}.lora_A.weight"] = A.clone()  # one copy each: safetensors refuses shared memory
            tensors[f"{PREFIX}{hf}.lora_B.weight"] = B_part.contiguous()  # (rows of this part, r_l)
            ranks[hf] = A.shape[0]
    # target_modules: the leaf names ("c_attn", "q_proj") when they catch exactly our layers, else every name
    leaves = sorted({hf.rpartition(".")[2] for hf in ranks})
    caught = {hf for hf in hf_shapes(gpt) if hf.rpartition(".")[2] in leaves}
    config = {"peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": saved["init"],
              "r": r0, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
              "fan_in_fan_out": gpt.config.pos == "learned",  # GPT-2's Conv1D, or PEFT warns and sets it
              "target_modules": leaves if caught == set(ranks) else sorted(ranks), "modules_to_save": ["score"],
              "rank_pattern": {hf: r for hf, r in ranks.items() if r != r0},
              "alpha_pattern": {hf: alpha * r / r0 for hf, r in ranks.items() if r != r0}, "inference_mode": True}
    return config, tensors


def export_peft(gpt, args, out_dir, log=print) -> bool:
    """Write out_dir/peft/{adapter_config.json, adapter_model.safetensors} and log one line saying so; or, for a
    run with no PEFT form (full, gated, scratch), log one line saying why and write nothing. args: train.py's
    parsed arguments, or its config.json as a dict. True when written."""
    saved = args if isinstance(args, dict) else vars(args)
    try:
        config, tensors = peft_form(gpt, saved)
    except ValueError as e:
        log(f"no PEFT export: {e}")
        return False
    peft_dir = Path(out_dir) / "peft"
    peft_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(peft_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (peft_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    base = saved["init"]  # a file (.gguf, a bare .safetensors) is no base from_pretrained reads as it is
    note = f"; {base} is a file: give from_pretrained a Hugging Face copy of its weights" + (
        " (or its folder and gguf_file=)" if base.endswith(".gguf") else "") if Path(base).is_file() else ""
    log(f"wrote {peft_dir}: a PEFT LoRA adapter for {base} with num_labels={gpt.config.n_labels}{note}")
    return True


def pattern(patterns, module, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key that
    matches the end of the module name, as a regular expression."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), default)


def read_peft(peft_dir):
    """adapter_config.json and the tensors of a PEFT LoRA folder, prefix stripped; refuses what is not LoRA."""
    d = Path(peft_dir)
    if not (d / "adapter_config.json").is_file():
        ours = " (a folder written by --out: load it with --adapter, or give its peft/ folder)" if (
            d / "adapter.safetensors").exists() else ""
        raise ValueError(f"no adapter_config.json in {d}, so not a PEFT adapter folder{ours}")
    if not (d / "adapter_model.safetensors").is_file():
        raise ValueError(f"no adapter_model.safetensors in {d} (only the safetensors format is read)")
    try:
        cfg = json.loads((d / "adapter_config.json").read_text())
        sd = load_file(str(d / "adapter_model.safetensors"))
    except Exception as e:  # not JSON, not safetensors, cut short: its first line says which
        raise ValueError(f"cannot read {d}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise ValueError(f"peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r} is not LORA")
    init = str(cfg.get("init_lora_weights", True)).lower()
    used = [k for k in VARIANTS if cfg.get(k)] + (["bias"] if cfg.get("bias", "none") != "none" else []) + (
        ["init_lora_weights"] if init.startswith(("pissa", "olora", "corda")) else [])  # these edit the base W
    if used:
        raise ValueError(f"the adapter uses {', '.join(used)}: not plain LoRA, which is all that loads here")
    return cfg, {k.removeprefix(PREFIX): v for k, v in sd.items()}


@torch.no_grad()
def load_peft(gpt, peft_dir):
    """Load a PEFT LoRA adapter (and its head `score`) into a model built with add_dynlora on the same
    backbone; gated layers get the identity gate (G = 0, c = 0). Every check runs before anything is written;
    bad input is a ValueError of one line."""
    cfg, sd = read_peft(peft_dir)
    made_for = f" (the adapter was made for {cfg.get('base_model_name_or_path')})"
    shapes, ours = hf_shapes(gpt), {}  # ours: {Hugging Face module: our layer it is part of}
    for name in dynlora_layers(gpt):
        parts = hf_parts(gpt, name)
        if parts is None:
            raise ValueError(f"{name} is adapted here but has no counterpart in a PEFT adapter")
        ours |= {hf: name for hf, _ in parts}
    lora = {}  # {module: (A (r_m, d_in), B (d_out, r_m), s_m)}
    for key in sorted(sd):
        module, _, kind = key.rpartition(".lora_")
        if key == "score.weight":
            continue
        if kind not in ("A.weight", "B.weight") or not {f"{module}.lora_{x}.weight" for x in "AB"} <= set(sd):
            raise ValueError(f"tensor {key} is neither half of a LoRA A/B pair nor the head score.weight")
        if kind == "B.weight":
            continue
        if module not in shapes:  # GPT-2 names on a Llama, or a 30th layer on a 24-layer model
            raise ValueError(f"the adapter adapts {module}, which this model does not have{made_for}")
        A, B = sd[key], sd[f"{module}.lora_B.weight"]
        r = pattern(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))  # LoraConfig's defaults: r 8, alpha 8
        if A.shape[1:] != shapes[module][1:] or B.shape[:1] != shapes[module][:1]:
            raise ValueError(f"{module}: lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)} do not fit this model's "
                             f"{shapes[module][1]} -> {shapes[module][0]} layer{made_for}")
        if not A.shape[0] == B.shape[1] == r:
            raise ValueError(f"{module}: rank {r} in adapter_config.json (r, rank_pattern) but lora_A has "
                             f"{A.shape[0]} rows and lora_B {B.shape[1]} columns")
        if module not in ours:
            raise ValueError(f"the adapter adapts {module}, which this model does not: add it to --targets")
        alpha = pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
        lora[module] = (A, B, alpha / (math.sqrt(r) if cfg.get("use_rslora") else r))  # PEFT's scaling
    uncovered = sorted({ours[m] for m in ours} - {ours[m] for m in lora})
    if uncovered:  # PEFT leaves them at W x: rank 0 here, which train.py (--r-min >= 1) never allows
        raise ValueError(f"the adapter has no LoRA weights for {len(uncovered)} of this model's adapted layers "
                         f"(e.g. {uncovered[0]}): give --targets only what it adapts")
    state = {}
    for name, layer in dynlora_layers(gpt).items():
        A, B = fuse([(lora.get(hf), n) for hf, n in hf_parts(gpt, name)], layer.scale)
        if A.shape[0] > layer.r_max:
            raise ValueError(f"{name}: the adapter's rank {A.shape[0]} is more than this model's r_max "
                             f"{layer.r_max} (--r-max; for lora, --rank)")
        state |= {f"{name}.A": A, f"{name}.B": B}
        if layer.gate:  # the identity gate, g = 2 sigmoid(0) = 1: the layer is plain LoRA
            state |= {f"{name}.G": A.new_zeros(len(A), len(A)), f"{name}.c": A.new_zeros(len(A))}
    head = sd.get("score.weight")
    if head is None or head.shape != gpt.score.weight.shape:
        raise ValueError(f"the adapter's head score.weight is {None if head is None else tuple(head.shape)}, this "
                         f"model's {tuple(gpt.score.weight.shape)} (another task, or no score in modules_to_save)")
    load_adapter(gpt, state | {"score.weight": head})


def fuse(parts, scale):
    """[((A_m, B_m, s_m) or None, rows_m)] of one fused layer -> our (A, B) at our scale s."""
    # s_m B_m A_m x = s (s_m / s) B_m A_m x; a ratio within rounding of 1 is 1, so that a round trip is exact
    def b(B, s):
        return B.float() if math.isclose(s / scale, 1, rel_tol=1e-9) else B.float() * (s / scale)
    got = [p for p, _ in parts if p is not None]
    if len(got) == len(parts) and all(torch.equal(p[0], got[0][0]) for p in got):  # one A: rank r, B's blocks
        return got[0][0].float(), torch.cat([b(B, s) for _, B, s in got])  # (r, d_in), (d_out, r)
    A = torch.cat([p[0].float() for p in got])  # (sum r_m, d_in): every part's A, stacked
    return A, torch.block_diag(*[b(p[1], p[2]) if p else A.new_zeros(n, 0) for p, n in parts])  # (d_out, sum r_m)


def rebuild(run_dir):
    """The model a train.py --out folder was trained with, its adapter loaded; and its saved arguments."""
    saved = json.loads((run_dir / "config.json").read_text())
    adapter = load_file(str(run_dir / "adapter.safetensors"))
    gated = any(k.endswith(".G") for k in adapter)
    why = FULL if saved["method"] == "full" else GATED if gated else SCRATCH if saved["init"] == "scratch" else None
    if why:  # before the backbone is loaded
        raise ValueError(why)
    gpt = GPT.from_pretrained(saved["init"], n_labels=adapter["score.weight"].shape[0])
    gpt.requires_grad_(False)
    gpt.score.requires_grad_(True)  # as train.py's setup_method: the head trains with the adapters
    lora = saved["method"] == "lora"
    add_dynlora(gpt, saved["targets"].split(","), r_max=saved["rank"] if lora else saved["r_max"], r=saved["rank"],
                alpha=saved["alpha"], gate=False)
    load_adapter(gpt, adapter)
    return gpt, saved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write RUN_DIR/peft/ (adapter_config.json, adapter_model.safetensors) for "
                        "an ungated run (lora, dynlora --no-gate)")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by train.py --out")

    def fail(msg):  # one line, as train.py: argparse would add its usage
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    ap.error = ex.error = fail
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    for f in ("config.json", "adapter.safetensors"):
        if not (run_dir / f).is_file():
            fail(f"no {f} in {run_dir}: RUN_DIR must be a folder written by train.py --out")
    try:
        gpt, saved = rebuild(run_dir)
        peft_form(gpt, saved)  # why there is no PEFT form, if there is none, as one error: line
    except KeyError as e:
        fail(f"{run_dir}: config.json or adapter.safetensors has no {e}: not as train.py --out writes them")
    except Exception as e:  # a foreign or corrupt file, a base model gone: its first line
        fail(f"cannot export {run_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    export_peft(gpt, saved, run_dir)


if __name__ == "__main__":
    main()
