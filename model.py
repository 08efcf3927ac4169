"""
A small GPT in the nanoGPT mould. One model class serves two families, switched by config fields:

    GPT-2  (learned positions, LayerNorm with bias, GELU MLP, tied embeddings)
    Llama  (RoPE, RMSNorm, SwiGLU MLP, grouped-query attention: SmolLM2-135M/360M)

Module names follow Hugging Face's GPT-2 keys for both families, with fused projections
(attn.c_attn = q,k,v; mlp.c_fc = gate,up for SwiGLU), so a LoRA target such as "c_attn" means the same
thing on every backbone. Every projection is a plain nn.Linear called as a module, so dynlora.py can
replace it with a wrapper of the same call signature.

Pretrained weights (GPT.from_pretrained): GPT-2 or Llama-family safetensors (downloaded by name or a local
file/folder) and llama GGUF files (dequantised by the `gguf` package). Each format is first turned into a
state dict with our names; _load_state then checks every key and shape and copies.
"""
import http.client
import json
import math
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024         # longest sequence (GPT-2 n_positions, Llama max_position_embeddings)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None   # grouped-query attention: key/value heads; None means n_head
    n_embd: int = 768
    n_inner: int | None = None     # MLP hidden size; None means 4 * n_embd
    bias: bool = True              # biases in Linear layers and LayerNorm (GPT-2: True, Llama: False)
    norm: str = "layernorm"        # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"              # "gelu" (GPT-2, tanh approximation) | "swiglu" (Llama)
    pos: str = "learned"           # "learned" (GPT-2 wpe) | "rope" (Llama, HF rotate_half convention)
    rope_theta: float = 10000.0
    tie_embeddings: bool = True    # lm_head.weight is transformer.wte.weight
    n_labels: int = 2              # classification head outputs (1 = regression, for STS-B)

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.n_inner = self.n_inner or 4 * self.n_embd
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be a multiple of n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        assert self.norm in ("layernorm", "rmsnorm") and self.mlp in ("gelu", "swiglu")
        assert self.pos in ("learned", "rope")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


_LLAMA = dict(bias=False, norm="rmsnorm", mlp="swiglu", pos="rope", vocab_size=49152, block_size=8192,
              rope_theta=100000.0)
PRESETS = {  # shapes by name: GPT.config_from_name (the tests), bench.py --model, and the GPT-2 downloads
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),                    # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),            # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),             # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),                # 1558M
    "HuggingFaceTB/SmolLM2-135M": dict(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, n_inner=1536, **_LLAMA),
    "HuggingFaceTB/SmolLM2-360M": dict(n_layer=32, n_head=15, n_kv_head=5, n_embd=960, n_inner=2560, **_LLAMA),
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=128),       # GPT-2 vocab, for tests and CPU runs
    "tiny-llama": dict(_LLAMA, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, n_inner=128, block_size=128),
}
for _s in ("135M", "360M"):  # the instruction-tuned variants share their base model's shapes
    PRESETS[f"HuggingFaceTB/SmolLM2-{_s}-Instruct"] = PRESETS[f"HuggingFaceTB/SmolLM2-{_s}"]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 as HF's LlamaRMSNorm does."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.type_as(x)


def make_norm(config):
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_cache(seq_len, head_dim, theta):
    """cos, sin of shape (seq_len, head_dim): frequencies repeated twice, HF Llama's layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)                # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)                                                   # (T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hd). Non-interleaved: dimension i pairs with i + hd/2 (rotate_half), not with i + 1.
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    # cos/sin may be float32 while x is bf16 under autocast: compute in the wider type, return x's dtype
    return (x * cos + rotated * sin).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # fused q,k,v: n_head query heads, then n_kv_head key heads, then n_kv_head value heads
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=config.bias)

    def forward(self, x, rope=None):
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, T, nh, hd).transpose(1, 2)   # (B, nh, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if nkv != nh:
            # GQA: key/value head j serves query heads j*rep .. (j+1)*rep-1, as HF's repeat_kv
            k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, T, hd)
            v = v.repeat_interleave(nh // nkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, nh * hd))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        # SwiGLU fuses gate and up projections into one Linear: rows [0, n_inner) gate, [n_inner, 2 n_inner) up
        n_out = 2 * config.n_inner if self.swiglu else config.n_inner
        self.c_fc = nn.Linear(config.n_embd, n_out, bias=config.bias)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd, bias=config.bias)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, n_out)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None):
        x = x + self.attn(self.ln_1(x), rope)  # pre-norm residual blocks, both families
        return x + self.mlp(self.ln_2(x))


class Embed(torch.autograd.Function):
    """F.embedding(idx, weight), with a backward that never waits for the CPU, so that train.py can record a
    whole step of full fine-tuning as one CUDA graph: torch's own sorts the ids and reads a count back to the
    CPU above 3,072 of them (pytorch/pytorch#82886). Here the rows' gradients are added into a zero table
    (index_add_: atomic adds on a GPU, so the order of each row's sum varies from run to run)."""

    @staticmethod
    def forward(ctx, idx, weight):
        ctx.save_for_backward(idx)
        ctx.n_rows = weight.shape[0]
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad):  # grad (..., C); called only when weight trains
        idx, = ctx.saved_tensors
        C = grad.shape[-1]
        return None, grad.new_zeros(ctx.n_rows, C).index_add_(0, idx.flatten(), grad.reshape(-1, C))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.vocab_size, config.n_embd)))
        if config.pos == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.transformer.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.transformer.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.score = nn.Linear(config.n_embd, config.n_labels, bias=False)  # as GPT2ForSequenceClassification
        if config.pos == "rope":
            # non-persistent: recomputed from the config, never saved in a checkpoint
            cos, sin = rope_cache(config.block_size, config.head_dim, config.rope_theta)
            self.register_buffer("cos", cos, persistent=False)  # (block_size, hd)
            self.register_buffer("sin", sin, persistent=False)
        # nanoGPT init: N(0, 0.02), residual projections scaled down by sqrt(2 * n_layer) (GPT-2 paper)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Unique parameters; non_embedding leaves out wte, wpe and lm_head (the 'N' of 6N FLOPs per token)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            emb = [self.transformer.wte, self.lm_head] + ([self.transformer.wpe] if "wpe" in self.transformer else [])
            skip = {id(m.weight) for m in emb}
            n -= sum(p.numel() for p in self.parameters() if id(p) in skip)
        return n

    def hidden(self, idx):
        """idx (B, T) token ids -> final normed hidden states (B, T, C)."""
        B, T = idx.shape
        x = Embed.apply(idx, self.transformer.wte.weight)  # (B, T, C)
        rope = None  # RoPE's (cos, sin), each (T, hd), broadcast over (B, nh)
        if self.config.pos == "learned":
            x = x + Embed.apply(torch.arange(T, device=idx.device), self.transformer.wpe.weight)  # (T, C) over B
        else:
            rope = (self.cos[:T], self.sin[:T])
        for block in self.transformer.h:
            x = block(x, rope)
        return self.transformer.ln_f(x)

    def forward(self, idx, lengths=None):
        """idx (B, T) -> next-token logits (B, T, vocab_size); with lengths, classify(idx, lengths).
        (torch.compile(model) compiles forward only, so compiled classification goes through here.)"""
        if lengths is not None:
            return self.classify(idx, lengths)
        return self.lm_head(self.hidden(idx))

    def classify(self, idx, lengths):
        """idx (B, T) right-padded, lengths (B,) real tokens per row -> (B, n_labels).
        With a causal mask the padding after a sequence cannot affect its last real token, so no
        attention mask is needed: we read the hidden state at position lengths - 1."""
        h = self.hidden(idx)  # (B, T, C)
        last = h[torch.arange(idx.shape[0], device=idx.device), lengths - 1]  # (B, C)
        return self.score(last)

    @staticmethod
    def config_from_name(name, **overrides):
        """A GPTConfig for a preset name (random init; the tests' tiny models)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model {name!r}; known names: {', '.join(PRESETS)}")
        return GPTConfig(**{**PRESETS[name], **overrides})

    @classmethod
    def from_pretrained(cls, name_or_path, n_labels=2, dtype=torch.float32):
        """A known name (downloaded and cached), a .safetensors file, a folder with model.safetensors
        (and config.json), or a llama .gguf file. The classification head `score` stays freshly initialised
        unless the checkpoint has one."""
        name, path = str(name_or_path), Path(os.path.expanduser(str(name_or_path)))
        if name in HUB_NAMES and not path.exists():
            path = _download_hub(name)
        elif not path.exists():
            if path.suffix in (".safetensors", ".gguf", ".json") or name.startswith(("/", ".", "~")):
                raise FileNotFoundError(f"no such file or folder: {path}")
            raise ValueError(f"unknown model {name!r} (and no such file); known names: {', '.join(HUB_NAMES)}")
        if path.suffix == ".gguf":
            config, sd = _convert_gguf(path)
        else:
            folder = path if path.is_dir() else path.parent
            file = folder / "model.safetensors" if path.is_dir() else path
            if not file.exists():
                raise FileNotFoundError(f"no model.safetensors in {folder}")
            hf = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
            if name in PRESETS and name.startswith("gpt2"):
                hf = {"n_layer": PRESETS[name]["n_layer"], "n_head": PRESETS[name]["n_head"], **hf}
            from safetensors.torch import load_file
            sd = load_file(str(file))
            model_type = hf.get("model_type", "gpt2")
            if model_type == "gpt2" and not hf and any(k.startswith("model.layers.") for k in sd):
                raise ValueError(f"{file} holds Llama-family weights, which need the config.json beside them "
                                 f"(no {folder / 'config.json'})")
            if model_type == "llama":
                config, sd = _convert_llama(sd, hf)
            elif model_type == "gpt2":
                config, sd = _convert_gpt2(sd, hf)
            else:
                raise ValueError(f"{folder / 'config.json'}: model_type {model_type!r} is not 'gpt2' or 'llama'")
        model = cls(GPTConfig(**config, n_labels=n_labels))
        _load_state(model, sd)
        return model.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Loading: each format -> (GPTConfig kwargs, state dict with our names); _load_state checks and copies.

def _load_state(model, sd):
    """Copy sd into model; any missing or unexpected key or shape mismatch is a ValueError (all listed)."""
    ours = model.state_dict()
    required = set(ours) - {"score.weight"}  # the head is new unless the checkpoint brings one
    if model.config.tie_embeddings:
        required.discard("lm_head.weight")  # the same tensor as transformer.wte.weight
    elif "score.weight" in sd and "lm_head.weight" not in sd:  # a classification checkpoint without an LM head:
        required.discard("lm_head.weight")                    # classifying never reads it
    errors = [f"missing key {k} (model shape {tuple(ours[k].shape)})" for k in sorted(required - set(sd))]
    for k, v in sd.items():
        if k not in required and k != "score.weight":
            errors.append(f"unexpected key {k} (checkpoint shape {tuple(v.shape)})")
        elif v.shape != ours[k].shape:
            errors.append(f"shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}")
    if errors:
        raise ValueError("cannot load checkpoint:\n  " + "\n  ".join(errors[:20]))
    with torch.no_grad():
        for k, v in sd.items():
            ours[k].copy_(v)  # state_dict tensors share storage with the parameters; copy_ casts dtype


def _convert_gpt2(sd, hf):
    """HF GPT-2 keys, with or without the 'transformer.' prefix. Conv1D stores weights (in, out): transpose."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers of old checkpoints; lm_head is tied to wte
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()
        out[k if k.startswith("score.") else "transformer." + k] = v
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT-2 activation {hf['activation_function']!r} is not the tanh GELU")
    wte, wpe = out.get("transformer.wte.weight"), out.get("transformer.wpe.weight")
    if wte is None or wpe is None:
        raise ValueError("missing key wte.weight or wpe.weight in the GPT-2 checkpoint")
    n_embd = hf.get("n_embd", wte.shape[1])
    config = dict(  # from config.json where there is one, else from the shapes
        vocab_size=hf.get("vocab_size", wte.shape[0]), block_size=hf.get("n_positions", wpe.shape[0]),
        n_layer=hf.get("n_layer", sum(k.endswith(".ln_1.weight") for k in out)),
        n_head=hf.get("n_head", n_embd // 64),  # every GPT-2 size has 64-dim heads
        n_embd=n_embd, n_inner=hf.get("n_inner"), norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    return config, out


def _convert_llama(sd, hf):
    """HF Llama keys -> ours: q,k,v rows concatenated into c_attn; gate then up rows into c_fc."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"unsupported RoPE scaling {rope}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("Llama checkpoints with attention_bias or mlp_bias are not supported")
    C, nh = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", C // nh) != C // nh:
        raise ValueError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads = {C // nh}")
    config = dict(
        vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"], n_head=nh, n_kv_head=hf.get("num_key_value_heads", nh), n_embd=C,
        n_inner=hf["intermediate_size"], bias=False, norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu", pos="rope", rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
        tie_embeddings=hf.get("tie_word_embeddings", False))  # HF LlamaConfig's defaults
    sd = dict(sd)  # we pop what we use; whatever is left over is reported as unexpected

    def take(*keys):  # concatenate rows of one or more HF tensors
        missing = [k for k in keys if k not in sd]
        if missing:
            raise ValueError(f"missing key {missing[0]} in the Llama checkpoint")
        return torch.cat([sd.pop(k) for k in keys], dim=0)

    out = {"transformer.wte.weight": take("model.embed_tokens.weight"),
           "transformer.ln_f.weight": take("model.norm.weight")}
    for i in range(config["n_layer"]):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        out[q + "ln_1.weight"] = take(p + "input_layernorm.weight")
        out[q + "attn.c_attn.weight"] = take(*(p + f"self_attn.{x}_proj.weight" for x in "qkv"))
        out[q + "attn.c_proj.weight"] = take(p + "self_attn.o_proj.weight")
        out[q + "ln_2.weight"] = take(p + "post_attention_layernorm.weight")
        out[q + "mlp.c_fc.weight"] = take(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
        out[q + "mlp.c_proj.weight"] = take(p + "mlp.down_proj.weight")
    if config["tie_embeddings"]:
        sd.pop("lm_head.weight", None)  # some files store the tied copy too
    return config, {**out, **sd}  # leftovers such as lm_head.weight, score.weight keep their names


def _convert_gguf(path):
    """llama GGUF -> HF Llama names and config -> _convert_llama. Every tensor dequantised to float32."""
    import gguf
    unreadable = lambda e: ValueError(f"{path}: not a readable GGUF file, or cut short ({type(e).__name__}: {e})")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as e:  # numpy's words for a short file: "cannot reshape"
        raise unreadable(e) from e

    def meta(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        v = f.parts[f.data[0]]  # the value's bytes (string) or a 1-element array (number)
        return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0].item()

    if meta("general.architecture") != "llama":  # before dequantising gigabytes of another model
        raise ValueError(f"{path}: GGUF architecture {meta('general.architecture')!r} is not 'llama'")
    try:  # numpy shapes (out, in): the reverse of ggml's ne order, and the same as HF/nn.Linear
        tensors = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
                   for t in reader.tensors}
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise unreadable(e) from e
    nh, nkv = meta("llama.attention.head_count"), meta("llama.attention.head_count_kv")
    nkv = nkv or nh
    hf = dict(model_type="llama", vocab_size=tensors["token_embd.weight"].shape[0],
              hidden_size=meta("llama.embedding_length"), num_hidden_layers=meta("llama.block_count"),
              num_attention_heads=nh, num_key_value_heads=nkv, intermediate_size=meta("llama.feed_forward_length"),
              max_position_embeddings=meta("llama.context_length", 2048),
              rms_norm_eps=meta("llama.attention.layer_norm_rms_epsilon", 1e-5),
              rope_theta=meta("llama.rope.freq_base", 10000.0), tie_word_embeddings="output.weight" not in tensors,
              rope_scaling={"rope_type": meta("llama.rope.scaling.type", "none").replace("none", "default")})
    if meta("llama.rope.dimension_count", hf["hidden_size"] // nh) != hf["hidden_size"] // nh:
        raise ValueError(f"{path}: partial RoPE (rope.dimension_count != head_dim) is not supported")

    def unpermute(w, n):
        # llama.cpp's converter reorders each head's rows from HF's rotate_half layout (first half, second
        # half) to interleaved pairs: reshape(n, 2, hd/2, C).swapaxes(1, 2). This is its inverse.
        return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    sd = {}
    for k, w in tensors.items():
        base, _, suffix = k.rpartition(".")  # e.g. "blk.3.attn_q", "weight"
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in names:
            w = unpermute(w, nh) if parts[2] == "attn_q" else unpermute(w, nkv) if parts[2] == "attn_k" else w
            k = f"model.layers.{parts[1]}.{names[parts[2]]}.{suffix}"
        elif base in names:
            k = f"{names[base]}.{suffix}"
        sd[k] = w  # unknown GGUF tensors keep their names and are reported as unexpected
    return _convert_llama(sd, hf)


# ----------------------------------------------------------------------------------------------------------
# Downloads: https://huggingface.co/{name}/resolve/main/{file} into $DYNLORA_CACHE (default ~/.cache/dynlora)

HUB_NAMES = [n for n in PRESETS if not n.startswith("tiny")]


def _download_hub(name):
    folder = Path(os.environ.get("DYNLORA_CACHE", "~/.cache/dynlora")).expanduser() / name  # as data.cache_dir()
    # GPT-2's tokenizer ships in tokenizers/; a Llama-family checkpoint brings its own
    files = ["model.safetensors"] if name.startswith("gpt2") else ["config.json", "model.safetensors", "tokenizer.json"]
    for f in files:
        _download(f"https://huggingface.co/{name}/resolve/main/{f}", folder / f)
    return folder


def _download(url, dest):
    if dest.exists():
        return
    from tqdm import tqdm
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")  # written in full, then renamed: never a half file at dest
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            size, got = int(r.headers.get("Content-Length") or 0), 0
            bar = tqdm(total=size or None, unit="B", unit_scale=True, desc=dest.name)
            while chunk := r.read(1 << 20):
                got += f.write(chunk)
                bar.update(len(chunk))
            bar.close()
            if size and got != size:  # a connection closed early ends the loop like the end of the file
                raise OSError(f"the connection closed after {got:,} of {size:,} bytes")
    except (OSError, http.client.HTTPException) as e:  # URLError is an OSError: no network, 404, timeout
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"could not download {url} ({e}); pass a local path to the weights instead") from e
    os.replace(tmp, dest)
