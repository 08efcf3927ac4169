"""model.py against Hugging Face transformers on the same weights: GPT-2, Llama, and the real SmolLM2 GGUF."""
import functools
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import model as M
from model import GPT

transformers = pytest.importorskip("transformers")


def randomize(hf_model, std=0.05):
    """HF inits norms to 1/0 and biases to 0; random values make the comparison cover every tensor."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            is_norm_weight = ("norm" in name or ".ln_" in name) and name.endswith("weight")
            p.copy_(torch.randn_like(p) * (0.2 if p.ndim == 1 else std) + (1.0 if is_norm_weight else 0.0))
    return hf_model.eval()


def rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_same_logits(model, hf, idx, name):
    """Our logits equal the Hugging Face model's on idx, to float32 rounding."""
    with torch.no_grad():
        d = rel_diff(model(idx), hf(idx).logits)
    print(f"{name}: max |logits diff| / max |logits| = {d:.2e}")
    assert d < 1e-5


def tiny_gpt2():
    # n_embd / n_head = 64 so that a bare .safetensors file without config.json can be read too
    cfg = transformers.GPT2Config(vocab_size=1000, n_positions=64, n_embd=128, n_layer=2, n_head=2,
                                  pad_token_id=0, num_labels=3)
    return randomize(transformers.GPT2LMHeadModel(cfg))


@pytest.mark.parametrize("layout", ["save_pretrained", "bare_file"])
def test_gpt2_matches_hf(tmp_path, layout):
    hf = tiny_gpt2()
    if layout == "save_pretrained":  # folder with config.json; keys carry 'transformer.'
        hf.save_pretrained(tmp_path, safe_serialization=True)
        src = tmp_path
    else:  # like the hub file: no prefix, no lm_head, with the old causal-mask buffers
        sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        sd.update({f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 64, 64)) for i in range(2)})
        src = tmp_path / "gpt2.safetensors"
        save_file(sd, str(src))
    model = GPT.from_pretrained(src).eval()
    assert model.config.n_head == 2 and model.config.block_size == 64
    assert_same_logits(model, hf, torch.randint(0, 1000, (3, 50)), f"gpt2 {layout}")


def test_gpt2_classify_matches_hf(tmp_path):
    hf_lm = tiny_gpt2()
    hf_lm.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path, n_labels=3).eval()
    hf = transformers.GPT2ForSequenceClassification(hf_lm.config)  # num_labels=3
    hf.transformer.load_state_dict(hf_lm.transformer.state_dict())
    hf.score.weight.data.copy_(model.score.weight)
    hf.eval()
    # right padding with pad id 0; real tokens are never 0, so HF finds the same last token
    lengths = torch.tensor([5, 20, 1, 13])
    idx = torch.randint(1, 1000, (4, 20))
    idx[torch.arange(20)[None, :] >= lengths[:, None]] = 0
    with torch.no_grad():
        ours, ref = model.classify(idx, lengths), hf(idx).logits
    assert ours.shape == (4, 3)
    assert rel_diff(ours, ref) < 1e-5


def tiny_llama(tie):
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie)
    return randomize(transformers.LlamaForCausalLM(cfg))


@pytest.mark.parametrize("tie", [True, False])
def test_llama_matches_hf(tmp_path, tie):
    hf = tiny_llama(tie)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path).eval()
    assert model.config.tie_embeddings == tie and model.config.n_kv_head == 2
    assert_same_logits(model, hf, torch.randint(0, 1000, (3, 64)), f"llama tie={tie}")
    # a classification checkpoint (no lm_head: untied, it would be missing) loads with its score head
    cls = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**{**hf.config.to_dict(),
                                                                                "num_labels": 3}))
    cls.save_pretrained(tmp_path / "cls")
    assert torch.equal(GPT.from_pretrained(tmp_path / "cls", n_labels=3).score.weight, cls.score.weight)
    if not tie:  # a state with both the score head and an untied lm_head loads (they are both needed then)
        M._load_state(GPT(model.config), model.state_dict())


@pytest.mark.parametrize("scaled", [False, True])
def test_llama_gguf_permutation(tmp_path, scaled):
    """A tiny GGUF written the way llama.cpp's converter writes one (Q and K rows permuted) loads back
    to the HF model's logits. Runs without the real file. One that declares RoPE scaling is refused, as the
    same weights in safetensors are (loading it would silently compute unscaled positions)."""
    gguf = pytest.importorskip("gguf")
    hf = tiny_llama(tie=True)
    c = hf.config

    def permute(w, n):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    for fn, v in [(w.add_block_count, 2), (w.add_context_length, 64), (w.add_embedding_length, 64),
                  (w.add_feed_forward_length, 128), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                  (w.add_rope_freq_base, 10000.0), (w.add_layer_norm_rms_eps, 1e-5)]:
        fn(v)
    if scaled:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight":
            continue
        v = v.numpy()
        if "q_proj" in k:
            v = permute(v, c.num_attention_heads)
        if "k_proj" in k:
            v = permute(v, c.num_key_value_heads)
        base = k.removesuffix(".weight")
        if base.startswith("model.layers."):
            i, rest = base.removeprefix("model.layers.").split(".", 1)
            base = f"blk.{i}.{names[rest]}"
        else:
            base = names[base]
        w.add_tensor(base + ".weight", np.ascontiguousarray(v, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if scaled:
        with pytest.raises(ValueError, match="unsupported RoPE scaling.*linear"):
            GPT.from_pretrained(tmp_path / "tiny.gguf")
        return
    (tmp_path / "short.gguf").write_bytes((tmp_path / "tiny.gguf").read_bytes()[:50_000])
    with pytest.raises(ValueError, match="short.gguf: not a readable GGUF file, or cut short"):
        GPT.from_pretrained(tmp_path / "short.gguf")
    model = GPT.from_pretrained(tmp_path / "tiny.gguf").eval()
    idx = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        assert rel_diff(model(idx), hf(idx).logits) < 1e-5


def test_smollm2_gguf_matches_transformers(gguf_path, monkeypatch):
    """The real SmolLM2-135M-Instruct Q4_1 GGUF: our loader against transformers' GGUF loader, which
    dequantises with the same gguf package and undoes llama.cpp's Q/K permutation with its own code.
    (transformers' from_pretrained(gguf_file=...) needs `accelerate`; we call its loader function directly.)"""
    gguf = pytest.importorskip("gguf")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4
    # speed only: transformers rebuilds gguf's tensor-name table once per submodule (~10 s): cache it; and
    # parsing the file's metadata (49k tokens and merges) takes ~5 s: both loaders share one parsed reader
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
    reader = gguf.GGUFReader(str(gguf_path))
    monkeypatch.setattr(gguf, "GGUFReader", lambda *args, **kwargs: reader)
    # SmolLM2-135M's published config, written out so that neither side's metadata parsing is trusted
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
    with no_init_weights():  # every weight is loaded below; skip the random init
        hf = transformers.LlamaForCausalLM(cfg).eval()
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=hf)["tensors"]
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # lm_head is tied to the embedding
    hf.tie_weights()
    model = GPT.from_pretrained(gguf_path).eval()
    c = model.config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.n_inner, c.vocab_size) == (30, 9, 3, 576, 1536, 49152)
    assert c.rope_theta == 100000.0 and c.tie_embeddings and c.block_size == 8192
    idx = torch.randint(0, c.vocab_size, (2, 24))
    with torch.no_grad():
        ours, ref = model(idx), hf(idx).logits
    d = (ours - ref).abs().max().item()
    print(f"smollm2 gguf: max |logits diff| = {d:.2e} (max |logits| {ref.abs().max():.1f})")
    assert d < 1e-3


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPT.from_pretrained("gpt3")
    with pytest.raises(FileNotFoundError):
        GPT.from_pretrained(tmp_path / "nope.safetensors")
    sd = {k.removeprefix("transformer."): v for k, v in tiny_gpt2().state_dict().items() if k != "lm_head.weight"}
    bad = dict(sd, **{"h.1.mlp.c_fc.weight": torch.zeros(128, 100)})  # Conv1D layout (in, out): wrong out
    save_file(bad, str(tmp_path / "shape.safetensors"))
    shape_msg = r"transformer\.h\.1\.mlp\.c_fc\.weight: checkpoint \(100, 128\) vs model \(512, 128\)"
    with pytest.raises(ValueError, match=shape_msg):
        GPT.from_pretrained(tmp_path / "shape.safetensors")
    missing = {k: v for k, v in sd.items() if k != "h.0.ln_2.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing key transformer\.h\.0\.ln_2\.bias"):
        GPT.from_pretrained(tmp_path / "missing.safetensors")
    save_file(dict(sd, extra=torch.zeros(3)), str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match="unexpected key transformer.extra"):
        GPT.from_pretrained(tmp_path / "extra.safetensors")
    save_file(tiny_llama(tie=False).state_dict(), str(tmp_path / "llama.safetensors"))  # no config.json beside it
    with pytest.raises(ValueError, match="Llama-family weights, which need the config.json"):
        GPT.from_pretrained(tmp_path / "llama.safetensors")
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "t5" / "model.safetensors"))
    with pytest.raises(ValueError, match="model_type"):
        GPT.from_pretrained(tmp_path / "t5")

    # no network: a download fails with one clear line naming the URL (urlopen is stubbed: tests stay offline)
    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setenv("DYNLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(M.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match="https://huggingface.co/gpt2/resolve/main/model.safetensors"):
        GPT.from_pretrained("gpt2")
    assert not list((tmp_path / "cache").rglob("*.part"))

    class CutShort(io.BytesIO):  # a server that promises 1,000 bytes and closes the connection after 500
        headers = {"Content-Length": "1000"}
    monkeypatch.setattr(M.urllib.request, "urlopen", lambda *a, **k: CutShort(b"x" * 500))
    with pytest.raises(RuntimeError, match="closed after 500 of 1,000 bytes"):
        GPT.from_pretrained("gpt2")
    assert not list((tmp_path / "cache").rglob("*.*"))  # neither the file nor its .part: the next try downloads


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_compile_fullgraph_classify(preset):
    torch._dynamo.reset()
    model = GPT(GPT.config_from_name(preset, vocab_size=256, n_labels=3))
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    idx, lengths = torch.randint(0, 256, (2, 16)), torch.tensor([16, 7])
    out = compiled(idx, lengths)  # forward(idx, lengths) = classify; compiled.classify would run uncompiled
    out.sum().backward()
    assert out.shape == (2, 3) and model.score.weight.grad is not None
    torch.testing.assert_close(out, model.classify(idx, lengths))


def test_embed_matches_torch_embedding():
    """model.Embed (index_add_ backward, recordable in a CUDA graph) against F.embedding, ids repeated."""
    from model import Embed
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 10, (3, 40))  # 120 ids into 10 rows: many repeats, 40 rows untouched
    out, ref = Embed.apply(idx, weight), F.embedding(idx, weight)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    (mine,), (theirs,) = torch.autograd.grad(out, weight, g), torch.autograd.grad(ref, weight, g)
    torch.testing.assert_close(mine, theirs)
    assert mine[10:].abs().sum() == 0
