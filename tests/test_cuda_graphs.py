"""train.py --cuda-graphs against the same steps run eagerly: the same losses, weights and masks, step after step,
through optimizer updates and reallocations, and evaluation untouched; the whole step is recorded, on one GPU and
under torchrun. Needs CUDA GPUs (CI has none: skipped), except the bookkeeping of a recording, alone and under
torchrun (test_resume's DDP test), which fake graphs (tests/fake_graphs.py) check on CPU."""
import argparse
import os
import subprocess
import sys
from functools import partial
from types import SimpleNamespace

import pytest
import torch

import data
import graphs
import train
from conftest import ROOT
import fake_graphs
from fake_graphs import FakeGraph
from test_resume import ARGS, losses
from dynlora import RankAllocator, dynlora_layers
from model import GPT

B, T = 4, 16


def plain_step(gpt, opt, params, alloc, autocast):
    """train.train_step on what it reads of train.py's Run: one GPU, SST-2, no clipping."""
    step_run = SimpleNamespace(model=gpt, opt=opt, params=params, allocator=alloc, autocast=autocast, ddp=False,
                               task=data.TASKS["sst2"], args=argparse.Namespace(grad_clip=0.0))
    return partial(train.train_step, step_run)


def run(preset, method, recorded, device="cuda", steps=6, resumed=False, dropout=0.0):
    """A few training steps of a tiny model, each train.train_step (forward, backward, AdamW; the allocator's step
    after), as train.py runs them; returns (losses, trainable tensors, masks, eval logits). recorded: the step
    recorded by graphs.capture_steps and replayed. resumed: one plain step first, so that the optimizer and the
    probes hold state that the recording must put back, as in a resumed run."""
    torch.manual_seed(0)
    gpt = GPT(GPT.config_from_name(preset, vocab_size=256, n_labels=2))
    layers, _ = train.setup_method(gpt, method, dropout=dropout)
    gpt.to(device)
    params = [p for p in gpt.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, capturable=device == "cuda")
    alloc = RankAllocator(layers, gpt, t_init=1, t_final=steps, every=2) if layers else None
    autocast = torch.autocast(device, torch.bfloat16, cache_enabled=False) if device == "cuda" else torch.autocast(
        device, enabled=False)
    train_step = plain_step(gpt, opt, params, alloc, autocast)
    g = torch.Generator().manual_seed(1)
    batch = lambda: [[t.to(device) for t in (torch.randint(0, 256, (B, T), generator=g),
                                             torch.randint(1, T + 1, (B,), generator=g),
                                             torch.randint(0, 2, (B,), generator=g))]]
    if resumed:
        train_step(batch(), 1e-2)
    if recorded:
        step_fn = graphs.capture_steps(train_step, opt, params, batch_size=B, lengths=[T], device=device,
                                       extra=alloc.step_state() if alloc else [])
    else:  # the same step and optimizer settings, launched op by op
        for group in opt.param_groups:
            group.update(capturable=device == "cuda")  # as capture_steps sets it
        step_fn = lambda batches, lr: train_step(batches, torch.tensor(lr, device=device))  # a tensor lr, as there
    losses = []
    for step in range(steps):
        lr = 1e-2 * (1 - step / steps)  # a schedule, as train.py's: the recording must follow it
        losses.append(step_fn(batch(), lr).item())
        if alloc:  # eager, after the step, as train.py
            alloc.step(step, opt)
    gpt.eval()
    idx, lengths, _ = batch()[0]
    with torch.no_grad(), autocast:
        logits = gpt(idx, lengths).float()
    masks = [l.active.clone() for l in dynlora_layers(gpt).values()]
    return losses, [p.detach().clone() for p in params], masks, logits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("method", ["full", "lora", "dynlora"])
def test_graphs_match_eager(preset, method):
    eager, graphed = run(preset, method, recorded=False), run(preset, method, recorded=True)
    torch.testing.assert_close(graphed[0], eager[0], rtol=1e-3, atol=1e-4)  # losses
    for a, b in zip(graphed[1], eager[1]):  # every trainable tensor after the last update
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    for a, b in zip(graphed[2], eager[2]):  # the same reallocations
        assert torch.equal(a, b)
    torch.testing.assert_close(graphed[3], eager[3], rtol=1e-3, atol=1e-3)  # evaluation runs the blocks
    if method == "dynlora":
        assert any(m.sum() != m.numel() // 2 for m in graphed[2]), "no reallocation moved rank: the test saw none"


def test_reference_runs_on_cpu():
    """The eager half of the comparison above, on CPU, so that CI keeps it working where no GPU is."""
    losses, params, masks, logits = run("tiny-llama", "dynlora", recorded=False, device="cpu", steps=4)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))) and logits.shape == (B, 2)
    assert sum(int(m.sum()) for m in masks) == 8 * len(masks)  # the budget holds
    assert any(m.sum() != m.numel() // 2 for m in masks), "no reallocation moved rank"  # 8 of r_max 16 at start


@pytest.mark.parametrize("preset,resumed", [("tiny", False), ("tiny-llama", True)])
@pytest.mark.parametrize("method", ["full", "lora", "dynlora"])
def test_recording_leaves_no_trace(preset, resumed, method, monkeypatch):
    """capture_steps' bookkeeping, on CPU with a fake graph: the untimed warm-up steps and the recording train on
    dummy batches, and the parameters, optimizer state, probes and random state they touch must be put back,
    so that replayed training matches eager training to the last bit; resumed: also the state a resumed run
    loaded before recording. With adapter dropout, so that the warm-up steps draw random numbers."""
    capture_steps = graphs.capture_steps

    def watching_capture(step_fn, opt, params, **kw):  # what the recorded step reads: weights, lr, state
        FakeGraph.watched = staticmethod(lambda: params + kw["extra"] + [g["lr"] for g in opt.param_groups]
                                         + [v for st in opt.state.values() for v in st.values()])
        return capture_steps(step_fn, opt, params, **kw)

    fake_graphs.install(monkeypatch.setattr)
    monkeypatch.setattr(graphs, "capture_steps", watching_capture)
    eager = run(preset, method, recorded=False, device="cpu", resumed=resumed, dropout=0.1)
    replayed = run(preset, method, recorded=True, device="cpu", resumed=resumed, dropout=0.1)
    assert replayed[0] == eager[0]  # losses, exactly
    for a, b in zip(replayed[1] + replayed[2] + [replayed[3]], eager[1] + eager[2] + [eager[3]]):
        assert torch.equal(a, b)  # weights, masks, evaluation


def graphed_and_plain_curves(small_sst2, tmp_path, launcher):
    """train.py's loss curves with --cuda-graphs and without, on CUDA, no dropout (a graph draws other random
    numbers); asserts that they match. Without graphs: backward(), a float lr, AdamW not capturable."""
    args = [a for a in ARGS if a not in ("--dropout", "0.1", "--device", "cpu")] + ["--data-dir", str(small_sst2)]
    curves, outs = [], []
    for flag in ("--cuda-graphs", "--no-cuda-graphs"):
        cmd = [*launcher, str(ROOT / "train.py"), *args, flag, "--out", str(tmp_path / flag)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        curves.append(losses(proc.stdout))
        outs.append(proc.stdout)
    graphed, plain = curves
    assert sorted(graphed) == sorted(plain) == list(range(1, 25))
    for s in plain:
        assert graphed[s] == pytest.approx(plain[s], rel=1e-3, abs=1e-4), (s, graphed[s], plain[s])
    return outs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_whole_step_graphs_follow_the_plain_loop(small_sst2, tmp_path):
    """One GPU: the recorded whole step against train.py's plain loop, through reallocations."""
    graphed, _ = graphed_and_plain_curves(small_sst2, tmp_path, [sys.executable])
    assert "rank per layer" in graphed  # the run reallocated


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_ddp_with_graphs_matches_ddp_without(small_sst2, tmp_path):
    """torchrun on 2 GPUs: --cuda-graphs gives the loss curve of the same run without, and the same weights and
    masks on both processes: the whole step, all-reduce included, recorded on each process."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for out in graphed_and_plain_curves(small_sst2, tmp_path, launcher):
        assert "ddp check: weights and masks identical on all 2 processes" in out


def test_a_replay_tells_the_allocator_its_batch(monkeypatch):
    """A replay runs no Python, so the allocator's forward pre-hook never sees its batch: capture_steps passes the
    recording's input tensors, which hold it, to on_replay, and RankAllocator.replayed keeps them for the
    curvature pass (with the recording's autocast)."""
    fake_graphs.install(monkeypatch.setattr)
    torch.manual_seed(0)
    gpt = GPT(GPT.config_from_name("tiny", vocab_size=256, n_labels=2))
    layers, _ = train.setup_method(gpt, "dynlora")
    params = [p for p in gpt.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    alloc = RankAllocator(layers, gpt, t_init=1, t_final=4, every=1)
    step_fn = graphs.capture_steps(plain_step(gpt, opt, params, alloc, torch.autocast("cpu", enabled=False)),
                                   opt, params, batch_size=4, lengths=[8, 16],
                                   device="cpu", extra=alloc.step_state(), on_replay=alloc.replayed)
    gpt._forward_pre_hooks.clear()  # a fake replay runs the step's Python; a real one runs no hook
    for T in (16, 8, 16, 8):
        idx, lengths = torch.randint(0, 256, (4, T)), torch.randint(1, T + 1, (4,))
        step_fn([(idx, lengths, torch.randint(0, 2, (4,)))], 1e-2)
        (seen_idx, seen_lengths), kwargs, dev, cast = alloc.inputs
        assert torch.equal(seen_idx, idx) and torch.equal(seen_lengths, lengths) and kwargs == {}
        assert (dev, cast) == ("cpu", None)
        alloc.step(T, opt)  # the curvature pass runs on them
