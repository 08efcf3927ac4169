"""The results grid: results/peers.py (PEFT LoRA and AdaLoRA on our weights) against our model and against its own
eager run, and results/sweep.py's bookkeeping (finished runs skipped, the learning rate chosen on held-out data)."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "results"))
pytest.importorskip("peft")
import peers  # noqa: E402
import sweep  # noqa: E402
from model import GPT, GPTConfig, PRESETS  # noqa: E402


def tiny_llama(n_labels):
    """Our GPT with Llama's parts (GQA 4/2 heads, RoPE, SwiGLU), every tensor random: norms around 1, not 1."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**{**PRESETS["tiny-llama"], "vocab_size": 300}, n_labels=n_labels))
    with torch.no_grad():
        for name, q in gpt.named_parameters():
            q.copy_(torch.randn_like(q) * (0.2 if q.ndim == 1 else 0.05) + (1.0 if q.ndim == 1 else 0.0))
    return gpt.eval()


@pytest.mark.parametrize("n_labels", [3, 1])  # classification, and STS-B's regression head
def test_hf_conversion_matches_our_logits(n_labels):
    """peers.to_hf(our GPT) classifies as our GPT does, padding rewritten to an unused id, and so does the PEFT
    model built on it before training (LoRA's B = 0, AdaLoRA's E = 0; the score head carried over)."""
    gpt = tiny_llama(n_labels)
    lengths = torch.tensor([17, 5, 1, 32])
    idx = torch.randint(1, 300, (4, 32))
    idx[torch.arange(32)[None, :] >= lengths[:, None]] = 0  # data.py's padding, the id peers rewrites
    pad = 0  # no row holds 0 before its length
    hf = peers.to_hf(gpt, pad).eval()
    args = peers.p.parse_args(["--init", "scratch"])
    with torch.no_grad():
        ours = gpt.classify(idx, lengths)
        for name, model in [("hf", hf)] + [(m, peers.add_peft(peers.to_hf(gpt, pad), m, args, total=10).eval())
                                           for m in peers.METHODS]:
            theirs = model(input_ids=peers.repad(idx, lengths, pad)).logits
            assert theirs.shape == ours.shape == (4, n_labels)
            assert (theirs - ours).abs().max() < 1e-4, name


def test_unused_id_and_repad():
    enc = [type("E", (), {"ids": [torch.tensor([0, 1, 3]).numpy(), torch.tensor([2]).numpy()]})()]
    assert peers.unused_id(enc, vocab_size=10, eot=4) == 5
    idx, lengths = torch.tensor([[7, 7, 0, 0], [7, 0, 0, 0]]), torch.tensor([2, 1])
    assert peers.repad(idx, lengths, 9).tolist() == [[7, 7, 9, 9], [7, 9, 9, 9]]


def test_adalora_schedule_follows_dynloras():
    # dynlora at T = 2104: first decision at 210, last at 1472, every 126 steps; PEFT: tfinal counts from the end
    assert peers.adalora_schedule(2104) == (210, 2104 - 1472, 126)
    assert peers.adalora_schedule(2) == (0, 0, 1)  # one step scored before the final mask at step 2


def run_peers(method, data_dir, *extra):
    argv = ["--task", "sst2", "--method", method, "--init", "scratch", "--data-dir", str(data_dir), "--device", "cpu",
            "--max-steps", "8", "--holdout", "40", "--log-every", "1", *extra]
    return peers.main(argv)


@pytest.mark.parametrize("method", peers.METHODS)
def test_peers_train_a_tiny_llama(method, small_sst2, capsys):
    """A few steps on a tiny random Llama: the loss is logged every step and the last line is a result with
    train.py's keys, holdout and dev metrics included."""
    r = run_peers(method, small_sst2)
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == r
    assert len([line for line in out if line.startswith("step ")]) == 8
    assert r["task"] == "sst2" and r["method"] == method and r["steps"] == 8 and r["lr"] == 5e-4
    assert 0 <= r["holdout_accuracy"] <= 1 and 0 <= r["dev_accuracy"] <= 1 and r["train_time_s"] >= 0
    assert r["init_r"] == (12 if method == "peft-adalora" else None)


@pytest.mark.parametrize("method", peers.METHODS)
def test_recorded_steps_follow_the_eager_run(method, small_sst2, monkeypatch):
    """--cuda-graphs with the graphs faked on CPU (a replay reruns the recorded step on its fixed inputs): the
    warm-up steps leave no trace, gradients stay in the tensors AdaLoRA reads, and the batched update_ipt and
    mask_using_rank_pattern (AdaLoRA's budget is final from step 6 of 8 here) do PEFT's arithmetic: the trained
    weights equal the eager run's."""
    trained = []

    def spy(model, *args):  # the weights as evaluation finds them
        if not trained or trained[-1][0] != id(model):
            trained.append((id(model), {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}))
        return evaluate(model, *args)

    evaluate = peers.evaluate
    monkeypatch.setattr(peers, "evaluate", spy)
    eager = run_peers(method, small_sst2, "--no-cuda-graphs")
    monkeypatch.setattr(peers, "can_record", lambda device: True)
    monkeypatch.setattr(peers, "record", lambda step_fn, static, stream: (lambda: step_fn(*static)))
    faked = run_peers(method, small_sst2, "--cuda-graphs")
    assert faked["cuda_graphs"] and not eager["cuda_graphs"]
    (_, want), (_, got) = trained
    # equal to float32 rounding: a recorded AdamW step reads its lr from a tensor, the eager one from a float
    assert want.keys() == got.keys() and all(torch.allclose(want[n], got[n], rtol=0, atol=1e-6) for n in want)
    same = lambda r: {k: v for k, v in r.items() if not k.endswith(("_time_s", "tokens_per_s", "cuda_graphs"))}  # noqa
    assert same(faked) == same(eager)

def test_adalora_bookkeeping_in_fewer_kernels_is_pefts():
    """peers.fast_update_ipt and fast_mask_using_rank_pattern against PEFT's own loops, on the same gradients and
    pattern: the same numbers exactly (the fake-graph run above is too short to tell a wrong score from a right
    one)."""
    args = peers.p.parse_args(["--init", "scratch"])
    model = peers.add_peft(peers.to_hf(tiny_llama(2), 0), "peft-adalora", args, total=10)
    alloc = model.base_model.rankallocator
    lora = [(n, q) for n, q in model.named_parameters() if "lora_" in n]
    grads = [[torch.randn_like(q) for _, q in lora] for _ in range(3)]
    states = []
    for update in (alloc.update_ipt, lambda m: peers.fast_update_ipt(alloc, m)):
        alloc.reset_ipt()
        for gs in grads:
            for (_, q), g in zip(lora, gs):
                q.grad = g
            update(model)
        states.append([{n: v.clone() for n, v in d.items()} for d in (alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc)])
    assert states[0][0].keys() == {n for n, _ in lora}
    assert all(a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a) for a, b in zip(*states))

    torch.manual_seed(1)
    es = [(n, q) for n, q in lora if "lora_E" in n]
    pattern = {n: (torch.rand(q.shape[0]) < 0.5).tolist() for n, q in es}
    values = [torch.randn_like(q) for _, q in es]
    masked = []
    for mask in (alloc.mask_using_rank_pattern, lambda m, rp: peers.fast_mask_using_rank_pattern(alloc, m, rp)):
        with torch.no_grad():
            for (_, q), v in zip(es, values):
                q.copy_(v)
        mask(model, pattern)
        mask(model, pattern)  # the second call reuses the masks it built
        masked.append([q.detach().clone() for _, q in es])
    assert all(torch.equal(a, b) for a, b in zip(*masked))
    assert any((a == 0).any() and (a != 0).any() for a in masked[0])  # the pattern kept some entries, dropped some


def fake_run(task, config, lr, seed, holdout=500, **metrics):
    return {"task": task, "config": config, "lr": lr, "seed": seed, "holdout": holdout, **metrics}


def test_sweep_skips_finished_runs():
    """A run is finished when a line of its (task, config, lr, seed, holdout) is in the file: only the others are
    planned, task by task and seed by seed, every config of a seed before the next seed."""
    lr = sweep.default_lr("lora")
    runs = [fake_run("rte", "lora", lr, 0), fake_run("rte", "lora", lr, 1, holdout=0),  # another holdout: not done
            fake_run("rte", "peft-lora", 1e-3, 1)]  # another lr: not done
    todo = sweep.plan(runs, ["rte", "sst2"], ["lora", "peft-lora"], [0, 1], holdout=500, select=False)
    assert todo == [("rte", "peft-lora", lr, 0), ("rte", "lora", lr, 1), ("rte", "peft-lora", lr, 1),
                    ("sst2", "lora", lr, 0), ("sst2", "peft-lora", lr, 0), ("sst2", "lora", lr, 1),
                    ("sst2", "peft-lora", lr, 1)]
    assert sweep.plan([fake_run("rte", "lora", lr, 0)], ["rte"], ["lora"], [0], 500, False, tiny=True) == \
        [("rte", "lora", lr, 0)]  # a tiny run never stands in for a real one


def test_lr_is_chosen_on_holdout_not_dev():
    """The first seed runs at every rate; the other seeds wait, then run at the rate best on holdout (here the
    worst on dev). A tie goes to the default rate."""
    lrs = sweep.LRS["lora"]
    assert len(lrs) == 3 and sweep.default_lr("lora") == lrs[1] == 5e-4
    runs = [fake_run("rte", "lora", lr, 0, holdout_accuracy=h, dev_accuracy=d)
            for lr, h, d in zip(lrs, [0.70, 0.60, 0.65], [0.50, 0.80, 0.90])]
    assert sweep.plan(runs[:2], ["rte"], ["lora"], [0, 1, 2], 500, select=True) == [("rte", "lora", lrs[2], 0)]
    assert sweep.choose_lr(runs[:2], "rte", "lora", 0, 500) is None
    assert sweep.choose_lr(runs, "rte", "lora", 0, 500) == lrs[0]
    assert sweep.plan(runs, ["rte"], ["lora"], [0, 1, 2], 500, select=True) == [("rte", "lora", lrs[0], 1),
                                                                                 ("rte", "lora", lrs[0], 2)]
    tie = [dict(r, holdout_accuracy=0.7) for r in runs]
    assert sweep.choose_lr(tie, "rte", "lora", 0, 500) == lrs[1]
    assert sweep.choose_lr(runs, "rte", "lora", 0, holdout=100) is None  # the lines of another holdout size


def test_table_pairs_by_seed_at_the_chosen_rate(tmp_path):
    """table.py reports dev at the rate chosen on holdout, and dynlora - lora paired by seed."""
    lrs = sweep.LRS["lora"]
    runs = [fake_run("rte", "lora", lr, 0, holdout_accuracy=h, dev_accuracy=d)
            for lr, h, d in zip(lrs, [0.7, 0.6, 0.6], [0.5, 0.9, 0.9])]  # lr 2e-4 chosen: dev 50 for seed 0
    runs += [fake_run("rte", "lora", lrs[0], 1, holdout_accuracy=0.7, dev_accuracy=0.6)]
    runs += [fake_run("rte", "dynlora", 5e-4, s, holdout_accuracy=0.7, dev_accuracy=d) for s, d in [(0, .53), (1, .62)]]
    f = tmp_path / "grid.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in runs) + "\n")
    out = subprocess.run([sys.executable, str(ROOT / "results" / "table.py"), str(f), "--split", "dev"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {line.split(" | ")[0]: line for line in out.stdout.splitlines() if line.startswith("| ")}
    assert rows["| lora"] == "| lora | 55.0 ± 7.1 (2) | 55.0 |"
    assert rows["| dynlora - lora"] == "| dynlora - lora | 2.5 ± 0.7 (2), ahead on 2 | 2.5 ± 0.7 (2), ahead on 2 |"
    assert rows["| lora lr"] == "| lora lr | 0.0002 |" and rows["| dynlora lr"] == "| dynlora lr | 0.0005* |"


def test_tiny_sweep_runs_and_resumes(tmp_path):
    """sweep.py --tiny end to end on CPU, ours and a peer: the second call finds both runs done."""
    glue = tmp_path / "glue" / "RTE"
    glue.mkdir(parents=True)
    rows = [f"{i}\tthe cat sat number {i}\tthe cat {'sat' if i % 2 else 'ran'}\t{NLI[i % 2]}" for i in range(120)]
    for split in ("train", "dev"):
        (glue / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(rows) + "\n")
    cmd = [sys.executable, str(ROOT / "results" / "sweep.py"), "--tiny", "--tasks", "rte", "--configs",
           "lora,peft-adalora", "--seeds", "0", "--no-lr-select", "--data-dir", str(tmp_path / "glue"),
           "--out", str(tmp_path / "runs.jsonl"), "--logs", str(tmp_path / "logs")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    lines = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [(r["config"], r["tiny"], r["holdout"]) for r in lines] == [("lora", True, 40), ("peft-adalora", True, 40)]
    assert all("holdout_accuracy" in r and "dev_accuracy" in r and r["steps"] == 4 for r in lines)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.startswith("0 runs can start now"), again.stdout + again.stderr


def test_sweep_starts_each_run_once(tmp_path):
    """Four runs on two slots: when the first ends, the one still running is not started again (it was, once:
    two processes wrote one log, and the grid's second copy of a run shared the GPU with the first)."""
    glue = tmp_path / "glue" / "RTE"
    glue.mkdir(parents=True)
    rows = [f"{i}\tthe cat sat number {i}\tthe cat {'sat' if i % 2 else 'ran'}\t{NLI[i % 2]}" for i in range(120)]
    for split in ("train", "dev"):
        (glue / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(rows) + "\n")
    cmd = [sys.executable, str(ROOT / "results" / "sweep.py"), "--tiny", "--per-gpu", "2", "--tasks", "rte",
           "--configs", "lora,peft-adalora", "--seeds", "0,1", "--no-lr-select", "--data-dir", str(tmp_path / "glue"),
           "--out", str(tmp_path / "runs.jsonl"), "--logs", str(tmp_path / "logs")]  # lora ends first
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("done rte") == 4, out.stdout
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["config"], r["seed"]) for r in runs) == [("lora", 0), ("lora", 1), ("peft-adalora", 0),
                                                               ("peft-adalora", 1)]


NLI = ("entailment", "not_entailment")
