"""peft_format.py against Hugging Face PEFT on the same random weights, written in Hugging Face's format: an
export loads in PeftModel with our logits (GPT-2 and Llama, unequal per-layer ranks), export then import is
exact, an adapter PEFT trained imports, and a bad adapter is refused in one line. No network."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import peft_format
from dynlora import adapter_state_dict, add_dynlora, dynlora_layers
from model import GPT

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from test_model import randomize, rel_diff, tiny_gpt2, tiny_llama  # noqa: E402  (the same random HF models)

TARGETS = ["c_attn", "c_proj", "c_fc"]
SAVED = dict(method="dynlora", rank=4, alpha=8.0, gate=False)  # what export_peft reads of train.py's SAVED_ARGS


def write_base(tmp_path, arch):
    """A random Hugging Face checkpoint folder (config.json, model.safetensors): what --init would be given."""
    (tiny_gpt2() if arch == "gpt2" else tiny_llama(tie=False)).save_pretrained(tmp_path / arch)
    return tmp_path / arch


def ours(base, r_max=8, r=4, targets=TARGETS, gate=False, n_labels=3, seed=0):
    """As train.py builds a lora/dynlora model: frozen backbone, trainable head, adapters."""
    torch.manual_seed(seed)
    gpt = GPT.from_pretrained(base, n_labels=n_labels) if not isinstance(base, GPT) else base
    gpt.requires_grad_(False)
    gpt.score.requires_grad_(True)
    add_dynlora(gpt, targets, r_max=r_max, r=r, alpha=8.0, gate=gate)
    return gpt.eval()


@torch.no_grad()
def train_like(gpt, seed=1):
    """Random A (inactive slots too: their rows, probes in training, must not leak), B, head and gate, and unequal
    ranks on scattered components, as after reallocations. A zero B would test nothing."""
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(dynlora_layers(gpt).values()):
        layer.active.zero_()
        layer.active[torch.randperm(layer.r_max, generator=g)[: 1 + (3 * i) % layer.r_max]] = True  # ranks 1, 4, 7, 2, ...
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1, generator=g)
        layer.B[:, ~layer.active] = 0  # the layer's invariant: a slot not in use adds nothing, and no gate reads it
        if layer.gate:
            layer.G[:, ~layer.active] = 0
    gpt.score.weight.normal_(0, 0.5, generator=g)
    return gpt


def batch():
    """Right-padded with pad id 0, which no real token is, so Hugging Face finds the same last token."""
    lengths = torch.tensor([5, 20, 1, 13])
    idx = torch.randint(1, 1000, (4, 20), generator=torch.Generator().manual_seed(0))
    idx[torch.arange(20)[None, :] >= lengths[:, None]] = 0
    return idx, lengths


def hf_classifier(base):
    return transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=3, pad_token_id=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_export_loads_in_peft_with_our_logits(tmp_path, arch):
    base = write_base(tmp_path, arch)
    gpt = train_like(ours(base))
    lines = []
    assert peft_format.export_peft(gpt, dict(SAVED, init=str(base)), tmp_path / "run", lines.append)
    assert lines == [f"wrote {tmp_path / 'run/peft'}: a PEFT LoRA adapter for {base} with num_labels=3"]
    cfg = json.loads((tmp_path / "run/peft/adapter_config.json").read_text())
    assert len(set(cfg["rank_pattern"].values())) > 2  # unequal per-layer ranks, through rank_pattern
    pm = peft.PeftModel.from_pretrained(hf_classifier(base), tmp_path / "run/peft").eval()  # no code of ours
    idx, lengths = batch()
    with torch.no_grad():
        d = rel_diff(gpt.classify(idx, lengths), pm(idx).logits)
    print(f"{arch}: PEFT vs ours, max |logits diff| / max |logits| = {d:.2e}")
    assert d < 1e-4
    # PEFT writes back what we wrote, key for key and bit for bit: our names are the ones it expects
    pm.save_pretrained(tmp_path / "again")
    mine, theirs = (peft_format.read_peft(d)[1] for d in (tmp_path / "run/peft", tmp_path / "again"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_export_then_import_is_exact(tmp_path, arch):
    base = write_base(tmp_path, arch)
    gpt = train_like(ours(base))
    peft_format.export_peft(gpt, dict(SAVED, init=str(base)), tmp_path / "run")
    back = ours(base, seed=1)  # other random A to start from: all of it must be overwritten
    peft_format.load_peft(back, tmp_path / "run/peft")
    want, got = adapter_state_dict(gpt), adapter_state_dict(back)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    gated = ours(base, gate=True)  # a gated model starts from it with the identity gate: the same function
    peft_format.load_peft(gated, tmp_path / "run/peft")
    idx, lengths = batch()
    with torch.no_grad():
        torch.testing.assert_close(gated.classify(idx, lengths), gpt.classify(idx, lengths), rtol=1e-5, atol=1e-6)


def test_import_an_adapter_peft_trained(tmp_path):
    """PEFT's own LoRA on q_proj, v_proj (each its own A) and down_proj, rsLoRA scaling, regex rank and alpha
    patterns: our fused c_attn takes it at rank r_q + r_v (k's rows of B stay zero), exactly PEFT's function."""
    base = write_base(tmp_path, "llama")
    lc = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"],
                         use_rslora=True, rank_pattern={r"layers\.1\.self_attn\.v_proj": 3},
                         alpha_pattern={"v_proj": 2})
    pm = peft.get_peft_model(hf_classifier(base), lc)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:  # lora_A, lora_B (zero at init) and the head
                p.normal_(0, 0.2)
    pm.save_pretrained(tmp_path / "peft")
    gpt = ours(base, targets=["c_attn", "mlp.c_proj"])
    peft_format.load_peft(gpt, tmp_path / "peft")
    assert dynlora_layers(gpt)["transformer.h.1.attn.c_attn"].rank == 2 + 3
    idx, lengths = batch()
    with torch.no_grad():
        assert rel_diff(gpt.classify(idx, lengths), pm.eval()(idx).logits) < 1e-4


def edit(key, value):
    """A change to adapter_config.json."""
    def apply(d):
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, key: value(cfg) if callable(value) else value}))
    return apply


def extra_tensor(d):
    sd = load_file(str(d / "adapter_model.safetensors"))
    sd["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"] = torch.ones(192)  # DoRA's
    save_file(sd, str(d / "adapter_model.safetensors"))


BAD = {  # case: (the model to load into, the run exported (arch, targets), a change to its folder, the message)
    "narrower base": (lambda base: ours(GPT(GPT.config_from_name("tiny", n_labels=3))), ("gpt2", TARGETS), None,
                      r"transformer.h.0.attn.c_attn: lora_A \(1, 128\).* do not fit this model's 64 -> 192 layer "
                      r"\(the adapter was made for .*gpt2\)"),
    "llama adapter, gpt2 model": (ours, ("llama", TARGETS), None,
                                  "adapts model.layers.0.mlp.down_proj, which this model does not have"),
    "mismatched rank": (ours, ("gpt2", TARGETS), edit("rank_pattern", lambda c: {**c["rank_pattern"],
                        "transformer.h.0.attn.c_attn": 5}),
                        r"h.0.attn.c_attn: rank 5 in adapter_config.json .* but lora_A has 1 rows and lora_B 1 col"),
    "rank over r_max": (lambda base: ours(base, r_max=4), ("gpt2", TARGETS), None,
                        "transformer.h.0.mlp.c_fc: the adapter's rank 7 is more than this model's r_max 4"),
    "layers it lacks": (ours, ("gpt2", ["c_attn"]), None, r"no LoRA weights for 6 of this model's adapted layers "
                        r"\(e.g. transformer.h.0.attn.c_proj\): give --targets only what it adapts"),
    "layer not adapted here": (lambda base: ours(base, targets=["c_attn"]), ("gpt2", TARGETS), None,
                               "adapts transformer.h.0.attn.c_proj, which this model does not: add it to --targets"),
    "layer outside the blocks": (lambda base: ours(base, targets=TARGETS + ["lm_head"]), ("gpt2", TARGETS), None,
                                 "lm_head is adapted here but has no counterpart"),
    "other head": (lambda base: ours(base, n_labels=2), ("gpt2", TARGETS), None,
                   r"head score.weight is \(3, 128\), this model's \(2, 128\)"),
    "dora": (ours, ("gpt2", TARGETS), edit("use_dora", True), "uses use_dora: not plain LoRA"),
    "extra tensor": (ours, ("gpt2", TARGETS), extra_tensor, "lora_magnitude_vector is neither half of a LoRA A/B"),
    "our own folder": (ours, ("gpt2", TARGETS), "ours", "no adapter_config.json in .*: load it with --adapter"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_adapter_is_one_line_and_changes_nothing(tmp_path, case):
    make_model, (arch, targets), change, msg = BAD[case]
    base, src = write_base(tmp_path, "gpt2"), write_base(tmp_path, arch)
    run = tmp_path / "run"
    peft_format.export_peft(train_like(ours(src, targets=targets)), dict(SAVED, init=str(src)), run)
    if change == "ours":  # a train.py --out folder, not the peft/ inside it
        save_file({}, str(run / "adapter.safetensors"))
    elif change:
        change(run / "peft")
    gpt = make_model(base)
    before = {k: v.clone() for k, v in gpt.state_dict().items()}
    with pytest.raises(ValueError, match=msg) as e:
        peft_format.load_peft(gpt, run if change == "ours" else run / "peft")
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, gpt.state_dict()[k]) for k, v in before.items())  # refused: nothing written


def test_cli_export(tmp_path, capsys):
    """python peft_format.py export RUN_DIR on a folder as train.py --out writes it; bad input: one error: line."""
    import checkpoint
    import train
    base, models = write_base(tmp_path, "gpt2"), {}
    for name, gate in [("run", False), ("gated", True)]:
        gpt = models[name] = train_like(ours(base, gate=gate))
        (tmp_path / name).mkdir()
        saved = {k: train.p.get_default(k) for k in checkpoint.SAVED_ARGS}
        saved |= dict(SAVED, init=str(base), r_max=8, gate=gate)
        (tmp_path / name / "config.json").write_text(json.dumps(saved))
        save_file(adapter_state_dict(gpt), str(tmp_path / name / "adapter.safetensors"))
    peft_format.main(["export", str(tmp_path / "run")])
    assert "wrote" in capsys.readouterr().out
    back = ours(base, seed=1)
    peft_format.load_peft(back, tmp_path / "run/peft")
    want, got = adapter_state_dict(models["run"]), adapter_state_dict(back)
    assert all(torch.equal(want[k], got[k]) for k in want)
    for argv, msg in [(["export", str(tmp_path / "gated")], "gated adapter"), ([], "required: command"),
                      (["export", str(tmp_path / "nope")], "no config.json in")]:
        with pytest.raises(SystemExit) as e:
            peft_format.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
    # train.py's call after saving the adapter: its parsed arguments, and one log line
    lines, args = [], train.p.parse_args(["--init", str(base), "--rank", "4", "--alpha", "8"])
    assert not peft_format.export_peft(models["gated"], args, tmp_path / "gated", lines.append)
    assert lines == [f"no PEFT export: {peft_format.GATED}"]
    assert not (tmp_path / "gated" / "peft").exists()
    assert peft_format.export_peft(models["run"], args, tmp_path / "again", lines.append) and len(lines) == 2
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "again/peft" / f).read_bytes() == (tmp_path / "run/peft" / f).read_bytes()


def gpt2_folder(tmp_path):
    """A random GPT-2 in Hugging Face's folder format with GPT-2's 50257 tokens, so that train.py reads it with
    GPT-2's own encoding: an --init that PEFT has a base model for, as --init scratch is not."""
    base = tmp_path / "gpt2"
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    randomize(transformers.GPT2LMHeadModel(cfg)).save_pretrained(base)
    return base


def train_py(base, data_dir, *flags):
    """train.main in this process: 8 steps on the random GPT-2 and the small SST-2, on the CPU, uncompiled."""
    import train
    try:
        return train.main(["--task", "sst2", "--init", str(base), "--data-dir", str(data_dir), "--max-steps", "8",
                           "--batch-size", "8", "--max-len", "24", "--device", "cpu", "--no-compile", *flags])
    finally:
        torch.set_flush_denormal(False)  # main() sets it on CPU; later tests in this process expect the default


def test_train_py_writes_peft_and_reads_it_back(tmp_path, small_sst2, capsys):
    """train.py --out writes out/peft/, which load_peft takes back to the run's logits bit for bit; --peft
    --eval-only on it scores as --adapter on the run does; a run trained on from --peft resumes without it."""
    base, run = gpt2_folder(tmp_path), tmp_path / "run"
    lora = ["--method", "lora", "--rank", "4", "--alpha", "8", "--lr", "1e-2"]
    trained = train_py(base, small_sst2, *lora, "--max-steps", "16", "--out", str(run))
    assert trained["accuracy"] > 0.8  # it learned (untrained: 0.5), so an adapter left unloaded below would show
    assert f"wrote {run / 'peft'}: a PEFT LoRA adapter for {base} with num_labels=2" in capsys.readouterr().out
    gpt, _ = peft_format.rebuild(run)  # the run's model, from its adapter.safetensors
    back = ours(base, r_max=4, r=4, n_labels=2, seed=1)
    peft_format.load_peft(back, run / "peft")
    idx, lengths = batch()
    with torch.no_grad():
        assert torch.equal(back.classify(idx, lengths), gpt.eval().classify(idx, lengths))
    by_adapter = train_py(base, small_sst2, "--eval-only", "--adapter", str(run))
    by_peft = train_py(base, small_sst2, *lora, "--eval-only", "--peft", str(run / "peft"))
    assert (by_peft["accuracy"], by_peft["f1"]) == (by_adapter["accuracy"], by_adapter["f1"]) == (
        trained["accuracy"], trained["f1"])
    on = ["--peft", str(run / "peft"), "--max-steps", "2", "--out", str(tmp_path / "on")]
    first = train_py(base, small_sst2, *lora, *on)
    capsys.readouterr()
    again = train_py(base, small_sst2, *lora, *on[2:], "--resume")  # the checkpoint holds where --peft started
    assert "nothing left to train" in capsys.readouterr().out
    assert (again["steps"], again["accuracy"]) == (2, first["accuracy"])


def test_a_gated_run_says_why_it_has_no_peft_export(tmp_path, small_sst2, capsys):
    """A gated run logs one line instead of out/peft/; a full one has no adapters and says nothing of PEFT."""
    base = gpt2_folder(tmp_path)
    for method, want in [("dynlora", [f"no PEFT export: {peft_format.GATED}"]), ("full", [])]:
        train_py(base, small_sst2, "--method", method, "--max-steps", "2", "--out", str(tmp_path / method))
        lines = capsys.readouterr().out.splitlines()
        assert [line for line in lines if line.startswith(("no PEFT export", "wrote"))] == want, method
        assert not (tmp_path / method / "peft").exists()


CLASHES = {"--adapter": ["--adapter", "run"], "--resume": ["--resume", "--out", "run"],  # run: a folder in tmp_path
           "--method full": ["--method", "full"]}


@pytest.mark.parametrize("name", CLASHES)
def test_peft_beside_another_start_is_one_line(tmp_path, name, capsys):
    """Refused before any data or model is read: the flags alone say it."""
    from test_train import fails_in_process
    clash = [str(tmp_path / a) if a == "run" else a for a in CLASHES[name]]
    args = ["--task", "rte", "--peft", str(tmp_path), *clash]
    assert fails_in_process(args, capsys, f"--peft cannot go with {name}")


def test_a_bad_peft_folder_is_one_line(tmp_path, small_sst2, capsys):
    from test_train import TINY, fails_in_process
    args = ["--task", "sst2", "--data-dir", str(small_sst2), *TINY, "--peft", str(tmp_path)]
    assert fails_in_process(args, capsys, f"--peft {tmp_path}: no adapter_config.json in {tmp_path}")


def test_a_train_py_run_exports_and_peft_alone_reproduces_it(tmp_path, small_sst2):
    """The whole way: train.py --out on a GPT-2 folder (dynlora --no-gate, reallocating: unequal ranks), the
    CLI export, then transformers + PEFT alone give our eval's logits on the dev set, and train.py's accuracy."""
    base, run = gpt2_folder(tmp_path), tmp_path / "run"
    result = train_py(base, small_sst2, "--method", "dynlora", "--no-gate", "--rank", "4", "--r-max", "8", "--alpha",
                      "8", "--t-init", "0.2", "--t-final", "0.8", "--realloc-every", "1", "--out", str(run))
    peft_format.main(["export", str(run)])
    config = json.loads((run / "peft/adapter_config.json").read_text())
    ranks = config["rank_pattern"]
    assert len(set(ranks.values())) > 1 and config["r"] == 4  # reallocation moved rank, unequally
    assert config["alpha_pattern"] == {m: 8 * r / 4 for m, r in ranks.items()}  # s = alpha / r0 in every layer
    # our eval: train.py's batches (right-padded, read at lengths - 1) through the model rebuilt from --out
    gpt, _ = peft_format.rebuild(run)
    enc = data.encode_split(data.load_split("sst2", small_sst2, "dev"), data.get_tokenizer(str(base)), 24)
    with torch.no_grad():
        mine = torch.cat([gpt.eval()(idx, lengths) for idx, lengths, _, _ in data.iterate_batches(enc, 16, False)])
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)  # pad: none, as gpt2
        pm = peft.PeftModel.from_pretrained(hf, run / "peft").eval()
        theirs = torch.cat([pm(torch.from_numpy(ids)[None]).logits for ids in enc.ids])  # one at a time: no padding
    d = rel_diff(mine[: len(enc)], theirs)
    print(f"train.py run, CLI export, PEFT: max |logits diff| / max |logits| = {d:.2e}")
    assert d < 1e-4
    assert (theirs.argmax(-1) == enc.labels).float().mean().item() == pytest.approx(result["accuracy"])
