"""
The planted-rank benchmark: does the allocator find where rank is needed? CPU only, about a minute.

A frozen random network of 8 tanh layers, d = 64. A teacher adds low-rank updates to three of its layers
(ranks 12, 4 and 8, singular values 1.0 down to 0.3; none elsewhere), and to every layer a small full-rank change
(entries N(0, 0.07^2 / d)) that no budget of this size fits: without it the planted ranks fit the teacher exactly
and a ratio to their error measures nothing but the optimizer's noise floor. Students adapt every layer of the
frozen network at the same total budget, 3 components a layer (24 = the planted total), and learn to match the
teacher on fresh Gaussian inputs (Adam, lr 3e-3, batch 256, 1500 steps, train.py's schedules):

    lora      rank 3 in every layer
    old       dynlora's first allocator (commit d31f757's dynlora.py, read from git), rank moving from 3 up to 16
    dynlora   this dynlora.py's allocator, the same budget and r_max, r_min 0 (the planted allocation has rank 0
              in five layers)
    planted   the planted ranks, fixed (what a perfect allocator would reach): rank 12, 4 and 8, 0 elsewhere

With --net residual the same layers (and planted changes) sit in a pre-norm residual stream instead, each block
writing 1.6 times as much into it as the one before (ResidualNet): a transformer's shape. With --net scaled the
adapters of the last four layers reach the network through a factor 1/10 (ScaledNet): their gradients are 10
times smaller and what they can gain is not, as behind SmolLM2's massive activation (RESULTS.md).

No gate anywhere: this measures the allocation alone. Per method and seed: held-out MSE, the Spearman correlation
of the final ranks with the planted ones, and the oscillation of the allocation (the correlation of a layer's
successive rank changes, over all layers; and the churn, the units moved in all per unit of budget).

    python results/planted.py                 # 5 seeds, a table and one JSON line per run (--out)
    python results/planted.py --seeds 0 --steps 400 --methods lora,dynlora   # what tests/test_planted.py runs
    python results/planted.py --net residual --out results/planted.jsonl      # the residual stream, 5 seeds
    python results/planted.py --net scaled --out results/planted.jsonl        # small gradients behind layer 4
"""
import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dynlora  # noqa: E402

D, N_LAYERS, PLANTED = 64, 8, {1: 12, 3: 4, 6: 8}  # layer index: planted rank
R0, R_MAX = 3, 16  # every student's budget: R0 x N_LAYERS
DENSE = 0.07  # the full-rank change in every layer, per entry times sqrt(d)
OLD_COMMIT = "d31f757"  # the last commit with the first allocator
METHODS = ["lora", "old", "dynlora", "planted"]


def frozen_net(seed, dense=0.0):
    """The frozen network: N_LAYERS bias-free d x d layers, weights N(0, 1.5^2 / d) (tanh's gain: activations
    neither vanish nor saturate), and the planted updates U diag(sigma) V^T with sigma from 1.0 down to 0.3."""
    g = torch.Generator().manual_seed(seed)
    layers = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(N_LAYERS))
    deltas = {}
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(D, D, generator=g) * 1.5 / math.sqrt(D))
        for i, r in PLANTED.items():
            U, _ = torch.linalg.qr(torch.randn(D, r, generator=g))
            V, _ = torch.linalg.qr(torch.randn(D, r, generator=g))
            deltas[i] = U @ torch.diag(torch.linspace(1.0, 0.3, r)) @ V.T
        for i in range(N_LAYERS):  # a small full-rank change everywhere: what no budget of this size fits
            deltas[i] = deltas.get(i, 0) + torch.randn(D, D, generator=g) * dense / math.sqrt(D)
    return layers, deltas


class Net(nn.Module):
    """The tanh chain: x -> tanh(W_0 x) -> ... -> W_7 (...), every layer's output on one scale."""
    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def rms_norm(x):
    return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


class ResidualNet(Net):
    """A pre-norm residual stream, as in a transformer: x += GROW^i tanh(W_i norm(x)), output norm(x). Every layer
    reads the stream through a norm and block i writes GROW^i as much into it (1.6^7 = 27 for the last), so the
    stream grows with depth and each layer's gradient passes through the norms of a stream of another size: where
    a layer's gradient is large no longer says where a change would help most, unlike in the tanh chain."""
    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = x + GROW ** i * torch.tanh(layer(rms_norm(x)))
        return rms_norm(x)


class ScaledNet(Net):
    """The tanh chain, with the adapters of layers CUT and later reaching the network through a factor 1 / SCALE:
    their output gradient, and so their demand's gradient, is SCALE times smaller, while what adapting them can
    gain is the same (B only has to grow SCALE times larger). What the layers behind SmolLM2's massive
    activation see (RESULTS.md, "Why: a massive activation at block 11"), in a network where the answer is known."""
    def forward(self, x):
        for i, layer in enumerate(self.layers):
            if i >= CUT and hasattr(layer, "base"):  # an adapted layer (of this dynlora.py or the old one)
                y = layer.base(x)
                x = y + (layer(x) - y) / SCALE
            else:
                x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


NETS = {"tanh": Net, "residual": ResidualNet, "scaled": ScaledNet}
GROW = 1.6  # ResidualNet: each block writes this many times more than the one before
CUT, SCALE = 4, 10.0  # ScaledNet: layers 4 to 7 (the rank-8 layer 6 among them) reach the output through 1 / 10


def teacher(layers, deltas, arch="tanh"):
    t = NETS[arch](nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(N_LAYERS))).requires_grad_(False)
    for i, layer in enumerate(t.layers):
        layer.weight.copy_(layers[i].weight + deltas.get(i, 0))
    return t


def load_old():
    """dynlora.py as it was at OLD_COMMIT, as a module of its own (None without git)."""
    try:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:dynlora.py"], capture_output=True,
                             check=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "dynlora_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("dynlora_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def student(method, layers, seed, steps, old=None, kw=None, arch="tanh"):
    """(model, allocator or None) for one method, on a copy of the frozen layers."""
    torch.manual_seed(seed + 1000)
    net = NETS[arch](nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(N_LAYERS))).requires_grad_(False)
    net.load_state_dict({f"layers.{i}.weight": l.weight for i, l in enumerate(layers)})
    t_init, t_final = int(0.1 * steps), int(0.7 * steps)
    every = max(1, (t_final - t_init) // 10)  # train.py's schedule
    if method == "planted":
        for i, r in PLANTED.items():
            net.layers[i] = dynlora.DynLoRALinear(net.layers[i], r_max=r, r=r, alpha=R0, gate=False)
        return net, None
    lib = old if method == "old" else dynlora
    r_max = R0 if method == "lora" else R_MAX
    layers = lib.add_dynlora(net, ["layers"], r_max=r_max, r=R0, alpha=R0, gate=False)
    if method == "lora":
        return net, None
    if method == "old":
        return net, lib.RankAllocator(layers, R0 * N_LAYERS, t_init, t_final, every, r_min=1, seed=seed)
    return net, lib.RankAllocator(layers, net, t_init, t_final, every, r_min=0, seed=seed, output="gaussian",
                                  **(kw or {}))


def ranks_of(net):
    return [getattr(layer, "rank", 0) for layer in net.layers]  # a plain nn.Linear: rank 0


def spearman(a, b):
    """Spearman's rank correlation, ties given their mean rank (0 if either side is constant)."""
    def ranks(v):
        v = np.asarray(v, float)
        return np.array([(v < x).sum() + ((v == x).sum() - 1) / 2 for x in v])
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1]) if ra.std() > 0 and rb.std() > 0 else 0.0


def oscillation(history):
    """(correlation of successive rank changes of a layer, over all layers and reallocations; churn: units moved
    per unit of budget, over the run)."""
    ranks = np.array([h["ranks"] for h in history], float)  # (reallocations, layers)
    if len(ranks) < 3:
        return float("nan"), 0.0
    d = np.diff(ranks, axis=0)
    churn = float(np.abs(d).sum() / 2 / (R0 * N_LAYERS))
    a, b = d[:-1].ravel(), d[1:].ravel()
    if a.std() == 0 or b.std() == 0:
        return 0.0, churn
    return float(np.corrcoef(a, b)[0, 1]), churn


def run(method, seed, steps=1500, batch=256, lr=3e-3, old=None, dense=DENSE, kw=None, arch="tanh"):
    layers, deltas = frozen_net(seed, dense)
    tea = teacher(layers, deltas, arch)
    net, alloc = student(method, layers, seed, steps, old, kw, arch)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed + 2000)
    warm = max(1, steps // 20)
    for step in range(steps):
        for group in opt.param_groups:  # warm-up then linear decay, as train.py
            group["lr"] = lr * min((step + 1) / warm, (steps - step) / (steps - warm + 1))
        x = torch.randn(batch, D, generator=g)
        loss = ((net(x) - tea(x)) ** 2).mean()
        loss.backward()
        if alloc:
            alloc.step(step + 1, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
    x = torch.randn(8192, D, generator=torch.Generator().manual_seed(seed + 3000))
    with torch.no_grad():
        mse = float(((net(x) - tea(x)) ** 2).mean())
    ranks = ranks_of(net)
    planted = [PLANTED.get(i, 0) for i in range(N_LAYERS)]
    corr, churn = oscillation(alloc.history) if alloc else (float("nan"), 0.0)
    return {"method": method, "net": arch, "seed": seed, "steps": steps, "mse": mse, "ranks": ranks,
            "spearman": spearman(ranks, planted) if alloc else float("nan"), "change_corr": corr, "churn": churn}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=1500, help="Adam steps per run")
    p.add_argument("--net", dest="arch", choices=NETS, default="tanh", help="the frozen network: the tanh chain, "
                   "a pre-norm residual stream whose blocks write more and more (ResidualNet), or the chain with the "
                   "last four adapters' outputs scaled by 1/10 (ScaledNet)")
    p.add_argument("--out", default="", help="append one JSON line per run to this file")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    if bad := [m for m in methods if m not in METHODS]:
        p.error(f"unknown method {bad}; choose from {', '.join(METHODS)}")
    old = load_old() if "old" in methods else None
    if "old" in methods and old is None:
        print(f"no git history here: 'old' ({OLD_COMMIT}'s dynlora.py) left out", file=sys.stderr)
        methods.remove("old")
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for m in methods:
            t0 = time.time()
            r = run(m, seed, args.steps, old=old, arch=args.arch)
            r["time_s"] = round(time.time() - t0, 1)
            rows.append(r)
            print(f"seed {seed} {m:8s} mse {r['mse']:.3e} ranks {r['ranks']} spearman {r['spearman']:.2f} "
                  f"change_corr {r['change_corr']:.2f} churn {r['churn']:.2f} ({r['time_s']} s)", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
    print(f"\n{'method':8s} {'mse (mean, min-max)':>28s} {'x lora':>7s} {'spearman':>9s} {'chg corr':>9s} {'churn':>6s}")
    lora = {r["seed"]: r["mse"] for r in rows if r["method"] == "lora"}
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        mse = [r["mse"] for r in rs]
        ratio = np.mean([r["mse"] / lora[r["seed"]] for r in rs]) if lora else float("nan")
        print(f"{m:8s} {np.mean(mse):10.3e} ({min(mse):.2e}-{max(mse):.2e}) {ratio:7.2f} "
              f"{np.nanmean([r['spearman'] for r in rs]) if rs[0]['spearman'] == rs[0]['spearman'] else float('nan'):9.2f} "
              f"{np.nanmean([r['change_corr'] for r in rs]) if rs[0]['change_corr'] == rs[0]['change_corr'] else float('nan'):9.2f} "
              f"{np.mean([r['churn'] for r in rs]):6.2f}")
    return rows


if __name__ == "__main__":
    main()
