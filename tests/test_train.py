"""train.py end to end: real SST-2 with a tiny random GPT, each method overfitting a batch, save/reload, bad input."""
import argparse
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from model import GPT, GPTConfig

TINY = ["--init", "scratch", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--device", "cpu", "--no-compile"]


def run(*args, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def test_end_to_end_sst2_and_reload(glue_dir, tmp_path):
    out = tmp_path / "run"
    proc = run("--task", "sst2", "--data-dir", str(glue_dir), *TINY, "--max-steps", "40", "--batch-size", "16",
               "--log-every", "10", "--t-init", "0.25", "--t-final", "0.75", "--realloc-every", "5", "--out", str(out),
               "--max-len", "24", "--seed", "7")  # the scratch backbone of seed 7: the adapter says so
    result = last_json(proc.stdout)
    assert result["task"] == "sst2" and result["method"] == "dynlora" and result["steps"] == 40
    assert 0 <= result["accuracy"] <= 1 and "f1" in result and result["peak_mem_gib"] is None  # on CPU
    assert "trainable" in proc.stdout and "step    40 | loss" in proc.stdout
    assert "rank per layer" in proc.stdout  # the plain-text allocation picture
    history = json.loads((out / "history.json").read_text())
    assert len(history["layers"]) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert [h["step"] for h in history["history"]] == [10, 15, 20, 25, 30]  # steps done, as the log lines count
    # --eval-only --adapter reproduces the same dev metrics from the saved adapter, truncated as in training
    assert json.loads((out / "config.json").read_text())["max_len"] == 24
    again = last_json(run("--eval-only", "--adapter", str(out), "--data-dir", str(glue_dir), "--device", "cpu",
                          "--no-compile").stdout)
    assert again["accuracy"] == result["accuracy"] and again["f1"] == result["f1"]
    config = json.loads((out / "config.json").read_text())
    del config["seed"]  # as adapters were saved before the seed was: the flag's seed stands
    (out / "config.json").write_text(json.dumps(config))
    older = last_json(run("--eval-only", "--adapter", str(out), "--data-dir", str(glue_dir), "--device", "cpu",
                          "--no-compile", "--seed", "7").stdout)
    assert older["accuracy"] == result["accuracy"]
    (out / "adapter.safetensors").write_bytes(b"not a safetensors file")
    broken = run("--eval-only", "--adapter", str(out), "--data-dir", str(glue_dir), "--device", "cpu", check=False)
    assert broken.returncode == 2 and "does not fit" in broken.stderr and len(broken.stderr.strip().splitlines()) == 1


def test_fingerprint_sees_which_components_are_active():
    """The DDP end-of-run check: the same rank with other components active is a difference."""
    import graphs
    import train
    models = []
    for active in ([0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]):
        torch.manual_seed(0)
        gpt = tiny_gpt()
        layers, _ = train.setup_method(gpt, "dynlora", rank=4, r_max=8)
        layer = next(iter(layers.values()))
        layer.active.zero_()
        layer.active[active] = True
        models.append(graphs.fingerprint(gpt))
    assert torch.equal(models[0], models[2]) and not torch.equal(models[0], models[1])


def tiny_gpt(n_labels=2):
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=256, block_size=64, n_labels=n_labels))


@pytest.mark.parametrize("method", ["full", "lora", "dynlora"])
def test_each_method_overfits_one_batch(method):
    import train
    torch.manual_seed(0)
    gpt = tiny_gpt()
    layers, _ = train.setup_method(gpt, method, rank=4, r_max=8)
    frozen = {n: p.clone() for n, p in gpt.named_parameters() if not p.requires_grad}
    assert (method == "full") == (not frozen)
    alloc = train.RankAllocator(layers, gpt, t_init=5, t_final=30, every=5) if method == "dynlora" else None
    params = [p for p in gpt.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    idx, lengths = torch.randint(0, 256, (8, 16)), torch.randint(4, 17, (8,))
    y = torch.randint(0, 2, (8,))
    for step in range(40):
        loss = F.cross_entropy(gpt(idx, lengths), y)  # through forward: the allocator's hook keeps its inputs
        loss.backward()
        if alloc:
            alloc.step(step, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert loss.item() < 0.05, loss.item()
    for layer in layers.values():  # the head alone can fit 8 rows: the adapters must have learned too (B starts at 0)
        assert layer.B.abs().sum() > 0
    for n, p in gpt.named_parameters():  # frozen weights do not move
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("method", ["full", "lora", "dynlora"])
def test_frozen_weights_stored_in_the_autocast_dtype_change_nothing(preset, method):
    """graphs.store_frozen: under bf16 autocast, frozen weights kept in bf16 give the same training, bit for bit, as
    float32 ones that autocast casts on every step (eager, on CPU here; train.py does it under CUDA autocast,
    where compiled blocks may round a bias differently: see its docstring). Trainable tensors, embeddings and
    norms stay float32."""
    import graphs
    import train

    def run(store):
        torch.manual_seed(0)
        gpt = GPT(GPT.config_from_name(preset, vocab_size=256, n_labels=2))
        layers, _ = train.setup_method(gpt, method, rank=4, r_max=8)
        if store:
            graphs.store_frozen(gpt.transformer.h, torch.bfloat16)
        params = [p for p in gpt.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 for p in params)
        alloc = train.RankAllocator(layers, gpt, t_init=1, t_final=6, every=2) if layers else None
        opt = torch.optim.AdamW(params, lr=3e-3)
        g = torch.Generator().manual_seed(1)
        losses = []
        for step in range(8):
            idx, lengths = torch.randint(0, 256, (4, 16), generator=g), torch.randint(4, 17, (4,), generator=g)
            with torch.autocast("cpu", torch.bfloat16):
                loss = F.cross_entropy(gpt(idx, lengths).float(), torch.randint(0, 2, (4,), generator=g))
            loss.backward()
            if alloc:
                alloc.step(step, opt)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return gpt, losses, [p.detach() for p in params]

    plain, stored = run(False), run(True)
    assert stored[1] == plain[1]  # losses
    for a, b in zip(stored[2], plain[2]):
        assert torch.equal(a, b)
    dtypes = {p.dtype for p in stored[0].parameters() if not p.requires_grad}
    assert dtypes == ({torch.bfloat16, torch.float32} if method != "full" else set())  # frozen blocks; embeddings


def test_store_frozen_leaves_shared_weights_alone():
    """Given the whole model, store_frozen converts the blocks' frozen linear layers but not the lm_head, whose
    weight is the token embedding's (tied): converting it would put the embedding in bf16 too."""
    import graphs
    import train
    gpt = GPT(GPT.config_from_name("tiny", vocab_size=256, n_labels=2))
    train.setup_method(gpt, "lora", rank=4)
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    graphs.store_frozen(gpt, torch.bfloat16)
    assert gpt.transformer.wte.weight.dtype == torch.float32
    assert gpt.transformer.h[0].attn.c_attn.base.weight.dtype == torch.bfloat16


def one_error_line(stderr, needle):
    lines = stderr.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]


@pytest.mark.parametrize("args, needle", [
    (["--task", "nope"], "unknown task"),
    (["--method", "nope"], "invalid choice"),
    (["--batch-size", "0"], "--batch-size: 0 must be at least 1"),
    (["--log-every", "0"], "--log-every"),
    (["--warmup", "1.5"], "--warmup"),
    (["--realloc-ratio", "0.5"], "--realloc-ratio"),
    (["--max-len", "3"], "--max-len"),
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA device"),
    (["--epochs", "nan"], "--epochs: nan is not a finite number"),
    (["--seed", "-1"], "--seed"),
    (["--n-layer", "100000000000"], "at most 1024"),
])
def test_bad_flags_are_one_line(args, needle, capsys):
    """Flags that fail before any data or model is loaded, checked in this process (no torch import per case)."""
    assert fails_in_process(["--task", "rte", *args], capsys, needle)


def fails_in_process(args, capsys, needle):
    """train.main(args) ends in exit status 2 and one error line that contains needle."""
    import train
    try:
        with pytest.raises(SystemExit) as exit_:
            train.main(args)
    finally:
        torch.set_flush_denormal(False)  # main() sets it on CPU; later tests in this process expect the default
    return exit_.value.code == 2 and one_error_line(capsys.readouterr().err, needle)


def test_bad_settings_are_one_line(glue_dir, capsys):
    """Settings that fail once the data and the model are built, before any training: in this process too."""
    for args, needle in [(["--rank", "32"], "r_max"), (["--r-max", "100"], "the smaller side of a 64 -> "),
                         (["--targets", "nothing"], "nothing"), (["--r-min", "9"], "--r-min"),
                         (["--t-init", "0.8", "--t-final", "0.2"], "--t-init 0.8"),
                         (["--holdout", "9999"], "--holdout 9999"), (["--max-len", "2000"], "1024 positions"),
                         (["--n-head", "3"], "multiple of n_head 3")]:
        assert fails_in_process(["--task", "rte", "--data-dir", str(glue_dir), *TINY, *args], capsys, needle), args


def test_bad_files_are_one_line(glue_dir, tmp_path, capsys):
    """Files that are not what they claim, and folders that cannot be written, stop the run in one line that
    names them, before any training (an unwritable --out used to fail at the first checkpoint)."""
    (tmp_path / "a_file").touch()
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(16))  # a header and nothing after it
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    saved = {"task": "rte", "method": "lora", "init": "scratch", "rank": 4, "r_max": 4, "alpha": 8.0,
             "targets": "c_attn", "gate": False, "n_layer": 2, "n_head": 2, "n_embd": 64}
    run = ["--task", "rte", "--data-dir", str(glue_dir), *TINY]
    for args, needle in [(["--out", str(tmp_path / "a_file")], "is a file"),
                         (["--out", str(tmp_path / "a_file" / "sub")], "cannot write there"),
                         (["--targets", "c_attn,"], "empty name"),
                         (["--init", str(tmp_path / "junk.safetensors")], f"--init {tmp_path / 'junk.safetensors'}"),
                         (["--init", str(tmp_path / "cut.gguf")], f"--init {tmp_path / 'cut.gguf'}")]:
        assert fails_in_process(run + args, capsys, needle), args
    for key, bad in [("task", "foo"), ("rank", "4"), ("targets", 5)]:  # a config edited by hand
        (adapter / "config.json").write_text(json.dumps({**saved, key: bad}))
        assert fails_in_process(run + ["--eval-only", "--adapter", str(adapter)], capsys, f"{key} = {bad!r}"), key


def test_unusable_devices_are_one_line(capsys, monkeypatch):
    """A device this machine lacks stops the run in one line before any data is read, under torchrun too,
    where each process takes the GPU of its LOCAL_RANK (one process more than there are GPUs here)."""
    n = torch.cuda.device_count()
    for args, needle in [(["--device", "foo"], "--device foo cannot run here"),
                         (["--device", f"cuda:{n}"], f"{n} CUDA GPUs are visible"),
                         (["--device", "meta"], "meta tensors hold no data")]:
        assert fails_in_process(["--task", "rte", *args], capsys, needle), args
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", str(n))
    assert fails_in_process(["--task", "rte", "--device", "cuda"], capsys, "at most one process per GPU")
    assert fails_in_process(["--task", "rte", "--device", "cuda:0"], capsys, "cuda, cpu or auto")


def test_out_of_gpu_memory_is_one_line(glue_dir):
    oom = "torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')"
    code = (f"import runpy, sys, torch; torch.manual_seed = lambda *a: (_ for _ in ()).throw({oom}); "
            f"sys.argv = ['train.py', '--task', 'rte', '--data-dir', {str(glue_dir)!r}, *{TINY!r}]; "
            f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2 and one_error_line(r.stderr, "out of GPU memory (CUDA out of memory. Tried"), r.stderr


def test_bad_input_is_one_line(glue_dir, tmp_path):
    cases = [
        (["--task", "sst2", "--data-dir", str(tmp_path / "missing")], "SST-2"),
        (["--task", "sst2", "--init", "gpt5", "--data-dir", str(glue_dir)], "gpt5"),
        (["--task", "sst2", "--eval-only", "--adapter", str(tmp_path), "--data-dir", str(glue_dir)], "config.json"),
        (["--task", "sst2", "--resume", "--out", str(tmp_path / "none"), "--data-dir", str(glue_dir), *TINY], "checkpoint"),
        (["--task", "rte", "--method", "full", "--lr", "1e6", "--grad-clip", "0", "--max-steps", "20", "--batch-size",
          "8", "--log-every", "5", "--data-dir", str(glue_dir), *TINY], "non-finite loss at step"),
    ]
    # all at once: each run is mostly the import of torch
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args, _ in cases]
    for (args, needle), proc in zip(cases, procs):
        stderr = proc.communicate(timeout=300)[1]
        assert proc.returncode == 2 and one_error_line(stderr, needle), (args, stderr[-2000:])


def test_bad_input_under_torchrun_is_one_line(glue_dir):
    """Every process meets the same bad input; only rank 0 says it (torchrun then adds its own report)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           "--task", "rte", "--cuda-graphs", "--data-dir", str(glue_dir), *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and ours == ["error: --cuda-graphs needs a CUDA device, not cpu"], proc.stderr[-2000:]


def test_help_on_every_flag():
    import train
    for action in train.p._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help, action.option_strings


def test_holdout_is_scored_beside_dev_and_reloads(small_sst2, tmp_path):
    """--holdout N trains on the rest, reports both splits, and an evaluation of the saved adapter on the same
    held-out examples gives the same numbers."""
    out = tmp_path / "run"
    args = ["--task", "sst2", "--data-dir", str(small_sst2), "--holdout", "50"]
    proc = run(*args, *TINY, "--max-steps", "10", "--batch-size", "8", "--log-every", "5", "--out", str(out))
    assert "250 train, 50 holdout, 40 dev examples" in proc.stdout
    trained = last_json(proc.stdout)
    assert {"holdout_accuracy", "holdout_f1", "dev_accuracy", "dev_f1"} <= set(trained)
    again = last_json(run(*args, "--eval-only", "--adapter", str(out), "--device", "cpu", "--no-compile").stdout)
    for k in ("holdout_accuracy", "holdout_f1", "dev_accuracy", "dev_f1"):
        assert again[k] == pytest.approx(trained[k]), k


def test_lr_schedule():
    """Warm-up reaches the peak once, at step w - 1; then equal steps down, the last step above zero."""
    import train
    lrs = [train.get_lr(s, 10, 1.0, 0.3) for s in range(10)]  # w = 3
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and lrs.count(1.0) == 1
    assert lrs[3:] == pytest.approx([7 / 8 - i / 8 for i in range(7)])  # down by 1/8 a step, to 1/8 at the last


def test_non_finite_weights_are_not_checkpointed(glue_dir, tmp_path, capsys, monkeypatch):
    """A step whose loss is finite but whose gradients are not leaves NaN weights: the run stops without saving
    them, so "the last checkpoint" stays a good one."""
    def nan_clip(params, max_norm):
        for p in params:
            if p.grad is not None:
                p.grad.fill_(float("nan"))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_clip)
    out = tmp_path / "run"
    args = ["--task", "rte", "--data-dir", str(glue_dir), *TINY, "--max-steps", "4", "--ckpt-every", "1", "--out", str(out)]
    assert fails_in_process(args, capsys, "non-finite weights after step 1")
    assert not (out / "ckpt.pt").exists()
