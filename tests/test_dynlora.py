"""dynlora.py against references: the base layer, hand-written LoRA, and the allocator's invariants."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynlora import (DynLoRALinear, GateLogits, RankAllocator, add_dynlora, adapter_state_dict, load_adapter, merge,
                     unmerge)


def randomise(layer: DynLoRALinear):
    """Give B and the gate non-zero values, as training would."""
    with torch.no_grad():
        layer.B.normal_()
        if layer.gate:
            layer.G.normal_(std=0.5)
            layer.c.normal_(std=0.5)


class Branches(nn.Module):
    """n parallel linear branches; only the first `used` reach the loss, the rest are multiplied by 0."""

    def __init__(self, n=6, used=2, d=32):
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.head = nn.Linear(d, 1)
        self.used = used

    def forward(self, x):
        outs = [torch.tanh(b(x)) * (1.0 if i < self.used else 0.0) for i, b in enumerate(self.branches)]
        return self.head(sum(outs)).squeeze(-1)


def test_new_layer_is_base_and_base_is_frozen():
    base = nn.Linear(24, 40)
    layer = DynLoRALinear(base, r_max=8, r=4, alpha=8)
    assert layer.base is base and not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.rank == 4 and layer.mask.tolist() == [1] * 4 + [0] * 4
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_new_gate_is_identity():
    base = nn.Linear(24, 40)
    gated = DynLoRALinear(base, r_max=8, r=6, alpha=12, gate=True)
    plain = DynLoRALinear(base, r_max=8, r=6, alpha=12, gate=False)
    with torch.no_grad():
        plain.A.copy_(gated.A)
        gated.B.normal_()
        plain.B.copy_(gated.B)
    x = torch.randn(4, 7, 24)
    torch.testing.assert_close(gated(x), plain(x), rtol=0, atol=0)


def test_ungated_layer_is_standard_lora():
    """y = W x + b + (alpha / r) B_r A_r x, with A_r, B_r the first r components: LoRA, forward and backward."""
    base = nn.Linear(24, 40)
    layer = DynLoRALinear(base, r_max=16, r=8, alpha=16, gate=False)
    randomise(layer)
    A = layer.A[:8].detach().clone().requires_grad_()
    B = layer.B[:, :8].detach().clone().requires_grad_()
    x = torch.randn(4, 7, 24)
    ref = base(x) + (16 / 8) * F.linear(F.linear(x, A), B)
    out = layer(x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(layer.A.grad[:8], A.grad, rtol=1e-5, atol=1e-4)  # float32 rounding: sums run in another order
    torch.testing.assert_close(layer.B.grad[:, :8], B.grad)
    assert layer.A.grad[8:].abs().sum() == 0 and layer.B.grad[:, 8:].abs().sum() == 0  # dormant: no gradient


def test_gate_formula():
    """The layer's output and every gradient against the formula written with plain matrix products."""
    base = nn.Linear(10, 12).double()
    layer = DynLoRALinear(base, r_max=6, r=4, alpha=4).double()
    randomise(layer)
    x = torch.randn(3, 5, 10, dtype=torch.float64)  # (batch, time, d_in): GateLogits' backward sums over both
    h = F.linear(x, layer.A) * layer.mask
    g = 2 * torch.sigmoid(h @ layer.G.T + layer.c)
    ref = base(x) + (4 / 4) * (g * h) @ layer.B.T
    out = layer(x)
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    params = [layer.A, layer.B, layer.G, layer.c]
    for a, b in zip(torch.autograd.grad((out * w).sum(), params), torch.autograd.grad((ref * w).sum(), params)):
        torch.testing.assert_close(a, b)


def test_gate_logits_gradients():
    """GateLogits' hand-written backward against finite differences, with batch and time axes and without."""
    G = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    c = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for shape in [(2, 3, 6), (6,)]:
        h = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(GateLogits.apply, (h, G, c))


def test_add_dynlora_replaces_targets_and_keeps_requires_grad():
    model = Branches(n=3)
    model.head.weight.requires_grad_(False)  # a user's choice that injection must not undo
    layers = add_dynlora(model, ["branches"], r_max=4, r=2, alpha=4)
    assert list(layers) == ["branches.0", "branches.1", "branches.2"]
    assert all(model.branches[i] is layers[f"branches.{i}"] for i in range(3))
    assert not model.head.weight.requires_grad and model.head.bias.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.bias"} | {f"branches.{i}.{p}" for i in range(3) for p in "ABGc"}
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_dynlora(Branches(), ["nothing"], r_max=4, r=2, alpha=4)
    with pytest.raises(ValueError, match="need 1 <= r <= r_max"):
        DynLoRALinear(nn.Linear(24, 40), r_max=4, r=5, alpha=4)
    with pytest.raises(ValueError, match="r_max=25 is more than 24"):  # rank beyond a side of W adds nothing
        DynLoRALinear(nn.Linear(24, 40), r_max=25, r=4, alpha=4)


def train_steps(model, allocator, steps, lr=1e-2, d=32):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    w = torch.randn(d)
    for step in range(steps):
        x = torch.randn(64, d)
        loss = F.mse_loss(model(x), torch.sin(x @ w))
        loss.backward()
        allocator.step(step, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield step, opt


def test_rank_moves_to_layers_that_matter():
    torch.manual_seed(0)
    model = Branches(n=6, used=2)
    layers = add_dynlora(model, ["branches"], r_max=8, r=4, alpha=8)
    alloc = RankAllocator(layers, budget=24, t_init=10, t_final=60, every=10, r_min=1)
    for step, _ in train_steps(model, alloc, 80):
        if alloc.t_init <= step <= alloc.t_final and (step - alloc.t_init) % alloc.every == 0:
            ranks = [l.rank for l in layers.values()]
            assert sum(ranks) == 24 and all(1 <= r <= 8 for r in ranks)
        if step == 30:
            snap = alloc.state_dict()
            kept = {k: v.clone() for k, v in snap.items() if torch.is_tensor(v)}, len(snap["history"])
    assert all(torch.equal(snap[k], v) for k, v in kept[0].items()) and len(snap["history"]) == kept[1]  # a copy
    ranks = [l.rank for l in layers.values()]
    assert ranks[:2] == [8, 8] and ranks[2:] == [2, 2, 2, 2], ranks  # 24 = 8 + 8 + 4 * 2: budget kept
    assert len(alloc.history) == 6 and alloc.history[-1]["ranks"] == ranks
    imp = alloc.history[-1]["importance"]
    assert min(imp[:2]) > 0 and max(imp[2:]) == 0


def test_reallocation_drops_lowest_and_grows_without_jump():
    torch.manual_seed(0)
    model = Branches(n=2, used=2)
    layers = add_dynlora(model, ["branches"], r_max=8, r=4, alpha=8)
    small, big = layers["branches.0"], layers["branches.1"]
    for l in layers.values():
        randomise(l)
    alloc = RankAllocator(layers, budget=8, t_init=0, t_final=100, every=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(torch.randn(8, 32)).sum().backward()
    opt.step()  # so that the optimizer holds moments to reset
    for p in opt.state:
        for v in opt.state[p].values():
            if v.dim():
                v.fill_(1.0)
    sq = opt.state[big.G]["exp_avg_sq"]
    sq[4:], sq[:, 4:] = 0, 0  # gate entries of dormant components never had a gradient, as in a real run
    # hand-set scores: layer 0 unimportant, with component 2 its best; layer 1 important
    alloc.ipt.fill_(1.0)
    alloc.unc.fill_(1.0)
    alloc.ipt[0] = torch.tensor([0.1, 0.3, 0.5, 0.2, 0, 0, 0, 0])
    alloc.ipt[1, :4] = 3.0
    alloc.unc[1, :4] = 2.0
    x = torch.randn(5, 32)
    before = big(x)
    alloc.reallocate(step=0, optimizer=opt)
    assert small.rank + big.rank == 8 and small.rank < 4 < big.rank
    kept = torch.nonzero(small.mask).flatten().tolist()
    assert kept == sorted(torch.tensor([0.1, 0.3, 0.5, 0.2]).argsort(descending=True)[: small.rank].tolist())
    grown = torch.nonzero(big.mask).flatten()[4:]
    torch.testing.assert_close(big(x), before, rtol=0, atol=1e-6)  # no jump in the grown layer's output
    assert big.B[:, grown].abs().sum() == 0 and big.G[:, grown].abs().sum() == 0
    assert alloc.ipt[1, grown].eq(3).all() and alloc.unc[1, grown].eq(2).all()  # the active ones' mean scores
    for p, where in [(big.A, (grown,)), (big.B, (slice(None), grown)), (big.c, (grown,)), (big.G, (grown,)),
                     (big.G, (slice(None), grown))]:
        assert opt.state[p]["exp_avg"][where].abs().sum() == 0  # no momentum carried over
        assert opt.state[p]["exp_avg_sq"][where].eq(1).all()  # the active components' second moment (all 1 here)
    assert opt.state[big.A]["exp_avg"][:4].eq(1).all()  # moments of the surviving components untouched


def test_target_ranks_sum_and_bounds():
    layers = add_dynlora(Branches(n=7), ["branches"], r_max=16, r=8, alpha=16)
    for budget in [7, 20, 56, 111, 112]:
        alloc = RankAllocator(layers, budget=budget, t_init=0, t_final=1, every=1, r_min=1)
        for _ in range(20):
            imp = torch.rand(7) ** 4 * (torch.rand(7) > 0.3)
            ranks = alloc.target_ranks(imp)
            assert sum(ranks) == budget and all(1 <= r <= 16 for r in ranks), (budget, ranks)
    with pytest.raises(ValueError, match="budget"):
        RankAllocator(layers, budget=200, t_init=0, t_final=1, every=1)
    with pytest.raises(ValueError, match="r_min"):
        RankAllocator(layers, budget=20, t_init=0, t_final=1, every=1, r_min=0)
    for every, t_init in [(0, 0), (1, 2)]:  # never due (a modulo by zero), or a schedule that ends before it starts
        with pytest.raises(ValueError, match="every >= 1 and t_init <= t_final"):
            RankAllocator(layers, budget=20, t_init=t_init, t_final=1, every=every)
    alloc = RankAllocator(layers, budget=40, t_init=0, t_final=1, every=1)
    for imp in [torch.tensor([1e-40, 1, 1e30, 0, 5, 1e-300, 2.0]), torch.tensor([float("nan"), 1, 2, 3, float("inf"), 0, 0])]:
        ranks = alloc.target_ranks(imp)  # extreme spreads and non-finite scores still give a valid allocation
        assert sum(ranks) == 40 and all(1 <= r <= 16 for r in ranks), ranks
    for _ in range(300):
        imp = 10 ** (torch.rand(7, dtype=torch.float64) * 120 - 60)  # importances spread over 120 decades
        ranks = alloc.target_ranks(imp)
        assert sum(ranks) == 40 and all(1 <= r <= 16 for r in ranks), (imp, ranks)


def test_compiled_model_never_recompiles():
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Branches(n=4, used=2)
    layers = add_dynlora(model, ["branches"], r_max=8, r=4, alpha=8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # fullgraph: a graph break is an error
    alloc = RankAllocator(layers, budget=16, t_init=2, t_final=20, every=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(20):
        compiled(torch.randn(16, 32)).pow(2).mean().backward()
        alloc.step(step, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 1:
            graphs = counter.frame_count
    assert graphs == 1 and counter.frame_count == 1, counter.frame_count
    assert len(alloc.history) == 9 and [l.rank for l in layers.values()] != [4, 4, 4, 4]


def test_merge_unmerge_round_trip():
    model = Branches(n=3)
    layers = add_dynlora(model, ["branches"], r_max=8, r=4, alpha=8, gate=False)
    for l in layers.values():
        randomise(l)
        l.mask[1] = 0  # merge must respect the mask
    W = [l.base.weight.clone() for l in layers.values()]
    x = torch.randn(6, 32)
    y = model(x)
    merge(model)
    assert all(l.merged for l in layers.values())
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    unmerge(model)
    for l, w in zip(layers.values(), W):
        torch.testing.assert_close(l.base.weight, w, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), y, rtol=1e-6, atol=1e-6)
    merge(model)  # edits while merged would make unmerge() subtract another update than merge() added
    with pytest.raises(RuntimeError, match="unmerge"):
        RankAllocator(layers, budget=4 * len(layers), t_init=0, t_final=1, every=1).reallocate(0)
    with pytest.raises(RuntimeError, match="unmerge"):
        load_adapter(model, adapter_state_dict(model))
    gated = Branches(n=2)
    add_dynlora(gated, ["branches"], r_max=4, r=2, alpha=4, gate=True)
    with pytest.raises(ValueError, match="gate"):
        merge(gated)


@pytest.mark.parametrize("gate", [True, False])
def test_adapter_round_trip_is_packed(gate):
    torch.manual_seed(1)
    model = Branches(n=4)
    fresh = copy.deepcopy(model)  # same frozen weights, as a model rebuilt from the same checkpoint
    layers = add_dynlora(model, ["branches"], r_max=8, r=4, alpha=8, gate=gate)
    add_dynlora(fresh, ["branches"], r_max=8, r=4, alpha=8, gate=gate)
    for l, rank in zip(layers.values(), [1, 7, 3, 5]):
        randomise(l)
        keep = torch.randperm(8)[:rank]  # active components scattered over the slots, as reallocation leaves them
        l.mask.zero_()
        l.mask[keep] = 1
    with torch.no_grad():
        model.head.weight.normal_()
    state = adapter_state_dict(model)
    assert state["branches.1.A"].shape == (7, 32) and state["branches.2.B"].shape == (32, 3)
    if gate:
        assert state["branches.0.G"].shape == (1, 1) and state["branches.3.c"].shape == (5,)
    assert "head.weight" in state and not any("base" in k for k in state)
    n_adapter = sum(v.numel() for k, v in state.items() if k.startswith("branches"))
    assert n_adapter == 16 * (32 + 32) + sum(r * r + r for r in [1, 7, 3, 5]) * gate  # 16 active of 32 slots
    load_adapter(fresh, state)
    assert [l.rank for n, l in fresh.named_modules() if isinstance(l, DynLoRALinear)] == [1, 7, 3, 5]
    x = torch.randn(9, 32)
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-6, atol=1e-6)


def test_load_adapter_errors_name_the_layer():
    model = Branches(n=2)
    add_dynlora(model, ["branches"], r_max=4, r=2, alpha=4)
    state = adapter_state_dict(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(state, **{"branches.0.A": torch.ones(2, 32), "branches.1.A": torch.zeros(2, 31)})
    with pytest.raises(ValueError, match="branches.1"):
        load_adapter(model, bad)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # layer 0 was not written
    too_big = dict(state, **{"branches.0.A": torch.zeros(5, 32), "branches.0.B": torch.zeros(32, 5)})
    with pytest.raises(ValueError, match="branches.0"):
        load_adapter(model, too_big)
    missing = {k: v for k, v in state.items() if k != "branches.0.A"}
    with pytest.raises(ValueError, match="branches.0"):
        load_adapter(model, missing)
    with pytest.raises(ValueError, match="extra"):
        load_adapter(model, dict(state, extra=torch.zeros(1)))


def test_partway_keeps_budget_and_bounds():
    layers = add_dynlora(Branches(n=5), ["branches"], r_max=8, r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    for rate in (0.1, 0.3, 0.5, 0.77, 1.0):
        alloc = RankAllocator(layers, budget=20, t_init=0, t_final=10, every=1, r_min=1, rate=rate)
        for _ in range(50):
            ranks = alloc.target_ranks(torch.rand(5, generator=g))
            targets = alloc.target_ranks(torch.rand(5, generator=g) ** 4)
            out = alloc.partway(ranks, targets)
            assert sum(out) == 20 and all(1 <= r <= 8 for r in out), (rate, ranks, targets, out)
            assert all(min(a, b) <= o <= max(a, b) for a, b, o in zip(ranks, targets, out))
            assert all(abs(o - (a + rate * (b - a))) < 1 for a, b, o in zip(ranks, targets, out))  # rounded only
        assert alloc.partway(ranks, targets) == targets or rate < 1
    with pytest.raises(ValueError, match="rate"):
        RankAllocator(layers, budget=20, t_init=0, t_final=10, every=1, rate=0)
    # at rate 0.5 odd gaps leave equal halves: each layer still moves towards its target, whatever its index
    # (the units used to go to the lower index: layer 0 grew but never shrank, and early blocks gained rank)
    alloc = RankAllocator(layers, budget=20, t_init=0, t_final=10, every=1, r_min=1, rate=0.5)
    for ranks, targets in [([4, 4, 4, 4, 4], [3, 5, 4, 4, 4]), ([4, 4, 4, 4, 4], [5, 3, 4, 4, 4]),
                           ([4, 4, 4, 4, 4], [3, 3, 5, 4, 5]), ([2, 2, 8, 4, 4], [3, 3, 5, 4, 5])]:
        out = alloc.partway(ranks, targets)
        moved = [o - r for o, r in zip(out, ranks)]
        gaps = [t - r for t, r in zip(targets, ranks)]
        assert all(m * g > 0 or (m == 0 and abs(g) <= 1) for m, g in zip(moved, gaps)), (ranks, targets, out)
        assert sum(abs(m) for m in moved) >= sum(abs(g) for g in gaps) // 2, (ranks, targets, out)


class Weighted(nn.Module):
    """Branches that all matter, some more than others: the allocation has an interior optimum to settle on."""

    def __init__(self, weights=(1.0, 0.8, 0.6, 0.45, 0.3, 0.2), d=32):
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(d, d) for _ in weights)
        self.head = nn.Linear(d, 1)
        self.weights = weights

    def forward(self, x):
        return self.head(sum(torch.tanh(b(x)) * w for b, w in zip(self.branches, self.weights))).squeeze(-1)


def test_half_way_moves_damp_the_swings():
    """Straight to the target, a layer's successive rank changes alternate in sign (the mean-score feedback in
    dynlora.py's docstring); half way, they alternate less and the churn shrinks. Seed 0: correlation -0.49 ->
    -0.13, churn 0.95 -> 0.57 ranks per reallocation (seeds 0 to 3: +0.18 to +0.35, 0.60x to 0.72x). Before
    partway() broke its rounding ties by gap rather than by index, rate 0.5 looked calmer (-0.03, 0.34):
    stalled moves, not damping; the churn bound here was 0.6x then."""
    def swings(rate):
        torch.manual_seed(0)
        model = Weighted()
        layers = add_dynlora(model, ["branches"], r_max=8, r=4, alpha=8)
        alloc = RankAllocator(layers, budget=24, t_init=20, t_final=400, every=10, rate=rate)
        for _ in train_steps(model, alloc, 400):
            pass
        d = torch.diff(torch.tensor([h["ranks"] for h in alloc.history], dtype=torch.float64), dim=0)  # (T - 1, L)
        corr = torch.corrcoef(torch.stack([d[:-1].flatten(), d[1:].flatten()]))[0, 1]
        return corr.item(), d.abs().mean().item()
    (corr_full, churn_full), (corr_half, churn_half) = swings(1.0), swings(0.5)
    assert corr_full < -0.3, corr_full  # the oscillation is there to damp
    assert corr_half > corr_full + 0.2 and churn_half < 0.7 * churn_full, (corr_full, corr_half, churn_full, churn_half)


@pytest.mark.parametrize("gate", [False, True])
def test_sensitivity_is_the_loss_change_of_scaling_a_component(gate):
    """I_k = |d L / d e| where component k's h_k becomes (1 + e) h_k: its own output and, with a gate, the
    other components' gates that read it. Checked against finite differences in float64."""
    torch.manual_seed(0)
    layer = DynLoRALinear(nn.Linear(12, 10), r_max=6, r=4, alpha=4, gate=gate).double()
    randomise(layer)
    x, target = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, 10, dtype=torch.float64)
    loss = lambda: F.mse_loss(layer(x), target)
    loss().backward()
    alloc = RankAllocator({"l": layer}, budget=4, t_init=0, t_final=0, every=1, beta1=0.0, beta2=0.0)
    alloc.update_scores()  # with beta1 = 0, ipt holds this step's sensitivity
    eps, fd = 1e-6, []
    with torch.no_grad():
        for k in range(4):
            layer.A[k] *= 1 + eps
            up = loss()
            layer.A[k] /= 1 + eps
            fd.append(abs((up - loss()).item()) / eps)
    torch.testing.assert_close(alloc.ipt[0, :4].double(), torch.tensor(fd, dtype=torch.float64), rtol=1e-4, atol=1e-7)
    assert alloc.ipt[0, 4:].abs().max() == 0  # inactive components have no gradient, hence no score
    own = (layer.B * layer.B.grad).sum(0).abs()[:4]  # the component's own output only: scaling B_:k
    if gate:  # the gates that read h_k make the difference
        assert (own - alloc.ipt[0, :4].double()).abs().max() > 1e-3 * own.max()
    else:
        torch.testing.assert_close(own, alloc.ipt[0, :4].double(), rtol=1e-5, atol=1e-8)
