"""dynlora.py against references: the base layer, hand-written LoRA, and the allocator's invariants."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynlora import (DynLoRALinear, GateLogits, RankAllocator, add_dynlora, adapter_state_dict, load_adapter, merge,
                     unmerge)


def randomise(layer: DynLoRALinear):
    """Give B and the gate non-zero values, as training would; slots not active keep B_:k = 0 and G_:k = 0, the
    layer's invariant (only a component fading out has B_:k != 0 there)."""
    with torch.no_grad():
        layer.B.normal_()
        layer.B[:, ~layer.active] = 0
        if layer.gate:
            layer.G.normal_(std=0.5)
            layer.G[:, ~layer.active] = 0
            layer.c.normal_(std=0.5)


class Branches(nn.Module):
    """n parallel linear branches; only the first `used` reach the loss, the rest are multiplied by 0. scales:
    the factor each branch reaches the head through, instead (1 or 0 by `used`)."""

    def __init__(self, n=6, used=2, d=32, scales=None):
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.head = nn.Linear(d, 1)
        self.scales = scales or [1.0 if i < used else 0.0 for i in range(n)]

    def forward(self, x):
        outs = [torch.tanh(b(x)) * f for b, f in zip(self.branches, self.scales)]
        return self.head(sum(outs)).squeeze(-1)


def test_new_layer_is_base_and_base_is_frozen():
    base = nn.Linear(24, 40)
    layer = DynLoRALinear(base, r_max=8, r=4, alpha=8)
    assert layer.base is base and not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.rank == 4 and layer.active.tolist() == [True] * 4 + [False] * 4
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
    h = F.linear(x, layer.A)  # inactive slots too: their B and G columns are 0
    g = 2 * torch.sigmoid(h @ layer.G.T + layer.c)
    ref = base(x) + (4 / 4) * (g * h) @ layer.B.T
    out = layer(x)
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    params = [layer.A, layer.B, layer.G, layer.c]
    on = layer.active.double()  # gradients reach active components only
    masks = [on[:, None], on, on[:, None] * on, on]
    for a, b, m in zip(torch.autograd.grad((out * w).sum(), params), torch.autograd.grad((ref * w).sum(), params), masks):
        torch.testing.assert_close(a, b * m, rtol=1e-7, atol=1e-12)


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
    """Four of six branches never reach the loss: their demand is 0, and rank moves to the two that do."""
    torch.manual_seed(0)
    model = Branches(n=6, used=2)
    layers = add_dynlora(model, ["branches"], r_max=8, r=4, alpha=8)
    alloc = RankAllocator(layers, model, t_init=10, t_final=60, every=10, r_min=1, output="gaussian")
    for step, _ in train_steps(model, alloc, 80):
        ranks = [l.rank for l in layers.values()]
        assert sum(ranks) == 24 and all(1 <= r <= 8 for r in ranks)  # the budget holds at every step
        if step == 30:
            snap = alloc.state_dict()
            kept = {k: v.clone() for k, v in snap.items() if torch.is_tensor(v)}, len(snap["history"])
    assert all(torch.equal(snap[k], v) for k, v in kept[0].items()) and len(snap["history"]) == kept[1]  # a copy
    assert ranks[:2] == [8, 8] and sum(ranks[2:]) == 8, ranks  # the unused branches gave until the used were full
    assert len(alloc.history) == 6 and alloc.history[-1]["ranks"] == ranks
    assert all(d == 0 for d in alloc.history[0]["demand"][2:]) and min(alloc.history[0]["demand"][:2]) > 0


def test_probe_sees_the_frozen_weights_gradient_and_changes_nothing():
    """probe.grad[:, k] of an inactive slot k is s (dL/dW) A_k^T, summed over steps; power[k] is sum (A_k x)^2. The
    probe adds 0: output and gradients are those of the layer without it. Probe rows are orthogonal to the
    active rows and each other, of norm 1/sqrt(3)."""
    torch.manual_seed(0)
    for gate in (False, True):
        layer = DynLoRALinear(nn.Linear(12, 10), r_max=8, r=3, alpha=6, gate=gate).double()
        randomise(layer)
        plain = copy.deepcopy(layer)
        alloc = RankAllocator({"l": layer}, layer, t_init=0, t_final=0, every=1)
        plain.A.data.copy_(layer.A)  # the same probe rows, without the probe
        A = layer.A.detach()
        torch.testing.assert_close(A[3:] @ A.T, torch.cat([torch.zeros(5, 3), torch.eye(5)], 1).double() / 3)
        W = plain.base.weight
        W.requires_grad_(True)  # the reference: the frozen weight's own gradient
        dW, power = torch.zeros_like(W), torch.zeros(8, dtype=torch.float64)
        for _ in range(2):
            x, t = torch.randn(5, 7, 12, dtype=torch.float64), torch.randn(5, 7, 10, dtype=torch.float64)
            out, ref = layer(x), plain(x)
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
            F.mse_loss(out, t).backward()
            F.mse_loss(ref, t).backward()
            power += (x @ A.T).pow(2).sum((0, 1))
        for p, q in [(layer.A, plain.A), (layer.B, plain.B)] + ([(layer.G, plain.G)] if gate else []):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
        torch.testing.assert_close(layer.probe.grad[:, 3:], layer.scale * W.grad @ A[3:].T)
        torch.testing.assert_close(layer.power, power.float())


def test_reallocation_moves_rank_without_a_jump():
    """Layer 1's probes see a rank-one gradient u v^T, layer 0's almost nothing: one unit moves from 0 to 1 and
    neither output moves. Layer 0 drops its smallest component by ||B_:k|| ||A_k||, which fades to exactly 0 in
    `every` steps; layer 1 grows along v as its probes saw it, with B_:k = 0, no momentum and its active
    components' second moment."""
    torch.manual_seed(0)
    model = Branches(n=2, used=2)
    layers = add_dynlora(model, ["branches"], r_max=8, r=4, alpha=8)
    small, big = layers["branches.0"], layers["branches.1"]
    for l in layers.values():
        randomise(l)
    with torch.no_grad():
        small.B[:, 2] *= 1e-3  # its smallest component
    alloc = RankAllocator(layers, model, t_init=0, t_final=100, every=4, output="gaussian")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(torch.randn(8, 32)).sum().backward()
    opt.step()  # so that the optimizer holds moments to reset
    for st in opt.state.values():
        for v in st.values():
            if v.dim():
                v.fill_(1.0)
    u, v = torch.randn(32), torch.randn(32)
    probes = big.A.detach()[4:].clone()  # (4, 32), the probe rows
    with torch.no_grad():
        big.probe.grad[:, 4:] = u[:, None] * (probes @ v)  # (u v^T) A_k^T
        small.probe.grad[:, 4:] = 1e-6 * torch.randn(32, 4)
        big.power.fill_(1.0)
        small.power.fill_(1.0)
    x = torch.randn(5, 32)
    with torch.no_grad():  # a forward with gradients would add to the probes' input power
        before = [small(x), big(x)]
    B0 = small.B[:, 2].clone()
    alloc.reallocate(step=0, optimizer=opt)
    assert (small.rank, big.rank) == (3, 5) and not small.active[2] and big.active[4]
    with torch.no_grad():
        for layer, y in zip((small, big), before):
            torch.testing.assert_close(layer(x), y, rtol=0, atol=0)  # no jump, to the last bit
    seen = probes.T @ torch.linalg.lstsq(probes.T, v).solution  # v projected on the probes' span
    torch.testing.assert_close(big.A[4].abs(), (seen / seen.norm() / 3 ** 0.5).abs())
    assert big.B[:, 4].abs().sum() == 0 and big.G[:, 4].abs().sum() == 0 and alloc.young[1, 4] == alloc.protect
    for p, where in [(big.A, (4,)), (big.B, (slice(None), 4)), (big.c, (4,)), (big.G, (4,)), (big.G, (slice(None), 4)),
                     (small.A, (2,)), (small.B, (slice(None), 2))]:
        assert opt.state[p]["exp_avg"][where].abs().sum() == 0  # no momentum carried over, in nor out
    assert opt.state[big.A]["exp_avg_sq"][4].eq(1).all()  # the active components' second moment (all 1 here)
    assert opt.state[big.A]["exp_avg"][:4].eq(1).all()  # moments of the surviving components untouched
    for i in range(4):
        torch.testing.assert_close(small.B[:, 2], B0 * (4 - i) / 4, rtol=1e-6, atol=0)  # a straight line down
        alloc.fade()
    assert small.B[:, 2].abs().sum() == 0 and small.G[:, 2].abs().sum() == 0  # exactly 0: a free slot again
    assert big.probe.grad.abs().sum() == 0 and not alloc.probing[0, 2]  # probes restart; 2 joins at the next


def test_allocator_refuses_bad_settings():
    model = Branches(n=3)
    layers = add_dynlora(model, ["branches"], r_max=8, r=4, alpha=8)
    with pytest.raises(ValueError, match="r_min"):
        RankAllocator(layers, model, t_init=0, t_final=1, every=1, r_min=5)
    for every, t_init, ratio in [(0, 0, 2), (1, 2, 2), (1, 0, 0.5)]:  # never due, ends before it starts, ratio < 1
        with pytest.raises(ValueError, match="every >= 1, t_init <= t_final"):
            RankAllocator(layers, model, t_init=t_init, t_final=1, every=every, ratio=ratio)


def test_compiled_model_never_recompiles():
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Branches(n=4, used=2)
    layers = add_dynlora(model, ["branches"], r_max=8, r=4, alpha=8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # fullgraph: a graph break is an error
    alloc = RankAllocator(layers, compiled, t_init=2, t_final=20, every=2, output="gaussian")
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
        with torch.no_grad():
            l.active[1] = False
        randomise(l)  # with B_:1 = 0
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
        RankAllocator(layers, model, t_init=0, t_final=1, every=1).reallocate(0)
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
        keep = torch.randperm(8)[:rank]  # active components scattered over the slots, as reallocation leaves them
        l.active.zero_()
        l.active[keep] = True
        randomise(l)
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




def test_demand_does_not_depend_on_the_output_scale():
    """A layer whose output reaches the loss through a factor f gets f times the gradient, so f^2 times the
    first-order demand; its curvature is f^2 times as large too, so the demand (their ratio) is the same."""
    demands, grads = {}, {}
    for f in (1.0, 0.1):
        torch.manual_seed(0)
        model = Branches(n=2, scales=[1.0, f]).double()  # the second branch reaches the output through f
        layers = add_dynlora(model, ["branches"], r_max=8, r=4, alpha=8)
        alloc = RankAllocator(layers, model, t_init=0, t_final=10, every=1, output="gaussian")
        model(torch.randn(16, 32, dtype=torch.float64)).sum().backward()
        grads[f] = [l.probe.grad.clone() for l in layers.values()]
        demands[f] = [d for d, _ in alloc.demand(alloc._rows())]
    torch.testing.assert_close(grads[0.1][1], 0.1 * grads[1.0][1])  # the gradient scales with f
    torch.testing.assert_close(grads[0.1][0], grads[1.0][0])
    for a, b in zip(demands[0.1], demands[1.0]):
        assert b.min() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=0)  # the demand does not


@pytest.mark.parametrize("output", ["gaussian", "softmax"])
def test_curvature_is_the_gauss_newton_curvature(output):
    """The model is one layer, z = its output: dz/dB_:k^T v = s sum_n v_n h_nk, so over the draws of v the curvature
    is s^2 E|v_n|^2 / d_out. A regression draws v ~ N(0, 1): s^2. A classifier whose logits are all 0 (p = 1/C)
    draws v = p - onehot(y~): E|v_n|^2 = 1 - 1/C, so s^2 (C - 1) / C^2."""
    torch.manual_seed(0)
    C = 8
    base = nn.Linear(12, C)
    nn.init.zeros_(base.weight), nn.init.zeros_(base.bias)  # B = 0 too: every logit is 0
    layer = DynLoRALinear(base, r_max=8, r=2, alpha=4, gate=False).double()
    alloc = RankAllocator({"l": layer}, layer, t_init=0, t_final=0, every=1, output=output)
    layer(torch.randn(64, 12, dtype=torch.float64))  # a training forward: the hook keeps its input
    power = layer.power.clone()
    cols = alloc.probing[0]
    c = []
    for _ in range(400):
        (g,), (pw,) = alloc.curvature()
        c.append(float(g[:, cols].pow(2).sum() / (C * pw[cols].sum())))
    want = layer.scale ** 2 * (1 if output == "gaussian" else (C - 1) / C ** 2)
    assert abs(sum(c) / len(c) / want - 1) < 0.05, (sum(c) / len(c), want)  # about 1% standard error
    assert torch.equal(layer.power, power)  # the pass's input power is taken back
