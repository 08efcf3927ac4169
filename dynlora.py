"""
Dynamic LoRA: LoRA whose rank budget moves between layers while it trains, with an input gate.

A reconstruction of arXiv 2501.14859, which publishes no formulas; every choice is stated here.

The layer. A frozen nn.Linear W (d_in -> d_out) gets r_max rank components, of which `active` marks those that
train (the layer's rank is their count):

    h = A dropout(x)                 A: (r_max, d_in)                  every slot, active or not
    g = 2 * sigmoid(G h + c)         G: (r_max, r_max), c: (r_max,)    per token, per component
    y = W x + s * B (g * h)          B: (d_out, r_max), s = alpha / r0 r0 the initial rank, fixed: no jump
                                                                       when rank moves

- B starts at zero, so a new layer computes exactly W x (LoRA's init).
- G and c start at zero, so g == 1 and a new gated layer is exactly plain LoRA; the gate then learns to
  scale each component by what the token looks like (the paper's "input-feature-based" strategy). It
  reuses A x, so it costs r_max^2 multiply-adds a token: far below 1% of the layer's d_in * d_out.
- An inactive slot's B column and gate column are exactly 0, so it adds nothing to y and no gate reads it.
  Gradients reach active components only: torch.where(active, B, B.detach()) has B's values, and a gradient
  where `active` holds. Shapes never change with rank, so a torch.compile'd model never recompiles. (The cost:
  A x and B h run over all r_max slots. At r_max = 2r that doubles LoRA's adapter FLOPs, 1.3 to 2% of a GPT-2
  layer's.)
- With the gate off and reallocation off, the layer *is* standard LoRA (the `lora` method). The same function,
  not the same run seed for seed: A's r_max rows draw more random numbers at init than LoRA's r.

Demand: what one more component would gain a layer (after GoRA, 2025: the gradient of the frozen weight).
An inactive slot k has B_:k = 0 and g_k = 1, so the gradient its B column would get is the frozen weight's
gradient seen through its A row, dL/dB_:k = s (dL/dW) A_k^T. The allocator adds to each layer's B a zero
tensor, the probe, whose .grad gathers dL/dB for every slot over the steps between two reallocations: on the
inactive slots, a sketch of M = sum over steps of dL/dW, with no hook and no extra matmul. Their A rows are
random and orthonormal (scaled as at init), orthogonal to the rows of the components in use, so the sketch sees
only what those components do not cover: M_perp. With m probe rows Q (orthonormal, m x d_in) drawn in the n
dimensions left free,

    P = M_perp Q^T   (d_out, m)           singular values p_1 >= p_2 >= ...
    demand_l(j) = p_j^2 * n / m           an estimate of sigma_j(M_perp)^2: the gain of the layer's j-th
                                          unit more (E ||M Q^T||^2 = m/n ||M||^2 for random Q)

A gradient that persists over an interval adds up (it grows as the number of steps), noise only as its square
root, so M measures what the layer's adapter could still learn. It does not depend on the layer's rank: a
layer that grows stops demanding only once its new component has learned what was missing. AdaLoRA's score
(the old allocator's: |sum A dL/dA| per component, averaged over a layer) measures the opposite, what removing a
component would cost: 0 for a component just grown, so a grown layer looked unimportant and shrank again.

That gain is first order, and the size of a layer's output gradient differs between layers for reasons that
say nothing of what adapting them would gain: in SmolLM2 one block writes a massive activation into the
residual stream, and every layer behind it gets a gradient 10 to 40 times smaller, so a squared gradient
100 to 1600 times smaller. The curvature along the layer's output shrinks by the same square, and the gain of
a Newton step, p^2 / curvature, does not. So each demand is divided by the layer's curvature c_l, the
Gauss-Newton curvature of the loss along its output (the Fisher information of the model's predictive
distribution) per unit of input power, measured at each reallocation by one more forward and backward pass on
the last training batch, with a cotangent v drawn from the model's own prediction instead of the labels (for a
classifier v = softmax(z) - onehot(y~), y~ drawn from softmax(z); for a regression v ~ N(0, 1)), so that
E[v v^T] is the loss's curvature along the output z:

    c_l = sum_k |dz/dB_:k^T v|^2 / (d_out * sum_k pi_k)    over the probing slots k, pi_k their input power
    demand_l(j) = p_j^2 * n / (m * c_l)                     0 where c_l = 0: the layer cannot reach the output

One extra forward and backward per reallocation, 11 in a run by default: about 0.5% of the run's compute.

Reallocation, every `every` steps for t_init <= step <= t_final, at a fixed budget (the layers' total rank):
rank moves one unit at a time from the layer with the least demand to the one with the most, as long as

    demand_receiver(next unit) > ratio * demand_donor(1)       (ratio 2: a margin against noise)

with at most `moves` units into or out of one layer per reallocation, and no layer both giving and taking in
one. The donor drops its smallest component by value ||B_:k|| ||A_k|| (components grown in the last `protect`
reallocations are kept: their B is still near 0); the receiver grows along the top singular directions of P,
mapped back through Q (a = Q^T v_j), so a grown component starts where the loss wants to move, not at random.
Its B column starts at 0: the output does not jump. A dropped component stops training and fades: its B column
(and the gate's column that reads it) shrinks linearly to exactly 0 over the next `every` steps, in place, so the
output does not jump either, and the layers can take its work over. Adam's first moments of moved components are
zeroed; a grown component takes the second moments of its layer's active ones (so its first updates have the
usual size). Under torch.distributed the probes' gradients are summed over processes and process 0's copy is
broadcast before each decision, so every process makes the same moves (the random probe rows come from one
seeded CPU generator).
"""
import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class DynLoRALinear(nn.Module):
    """A frozen nn.Linear plus r_max LoRA components, of which the first r start active."""

    def __init__(self, base: nn.Linear, r_max: int, r: int, alpha: float, dropout: float = 0.0, gate: bool = True):
        super().__init__()
        d_out, d_in = base.weight.shape
        if not 1 <= r <= r_max:
            raise ValueError(f"need 1 <= r <= r_max, got r={r}, r_max={r_max}")
        if r_max > min(d_in, d_out):  # B A has rank at most min(d_in, d_out): more components add nothing
            raise ValueError(f"r_max={r_max} is more than {min(d_in, d_out)}, the smaller side of a {d_in} -> "
                             f"{d_out} layer")
        self.base = base
        base.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.A = nn.Parameter(torch.empty(r_max, d_in, device=dev, dtype=dt))
        self.B = nn.Parameter(torch.zeros(d_out, r_max, device=dev, dtype=dt))  # zero: a new layer is `base`
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear and loralib
        self.register_buffer("active", torch.arange(r_max, device=dev) < r)
        self.gate = gate
        if gate:  # zero init: g = 2 * sigmoid(0) = 1
            self.G = nn.Parameter(torch.zeros(r_max, r_max, device=dev, dtype=dt))
            self.c = nn.Parameter(torch.zeros(r_max, device=dev, dtype=dt))
        self.r_max, self.alpha = r_max, alpha
        self.scale = alpha / r  # fixed at the initial rank, so moving rank never rescales the layer
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.probe = self.power = None  # RankAllocator's: zeros like B, whose .grad gathers dL/dB of every
        # slot, and (r_max,) sums of h^2 over the tokens trained on, the input's power seen by each A row

    @property
    def rank(self) -> int:
        return int(self.active.sum().item())

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        on = self.active  # only active components train: the values of A, B, G, c, the gradient where `on`
        h = F.linear(self.dropout(x), torch.where(on[:, None], self.A, self.A.detach()))  # (..., r_max)
        if self.power is not None and torch.is_grad_enabled():
            self.power.add_(h.detach().float().pow(2).flatten(0, -2).sum(0))
        if self.gate:
            G = torch.where(on[:, None] & on, self.G, self.G.detach())
            h = h * (2 * torch.sigmoid(GateLogits.apply(h, G, torch.where(on, self.c, self.c.detach()))))
        B = torch.where(on, self.B, self.B.detach())
        if self.probe is not None:
            B = B + self.probe  # + 0: the same output; the probe's gradient is dL/dB of every slot
        return y + F.linear(h, B) * self.scale

    def delta_weight(self):
        """s * B A: the (d_out, d_in) update this adapter adds to W when it has no gate (inactive B columns are 0)."""
        return self.B @ self.A * self.scale

    def extra_repr(self):
        return f"r_max={self.r_max}, rank={self.rank}, alpha={self.alpha}, gate={self.gate}"


class GateLogits(torch.autograd.Function):
    """z = G h + c for every token: the same as F.linear(h, G, c), in a form that costs less on a GPU.

    With r_max = 16, G h is 256 multiply-adds a token; as a matmul it is three tiny kernels per layer (z, and
    dL/dh and dL/dG in backward) of a few microseconds each. Written as products summed over G's columns,
    torch.compile fuses z and dL/dh into the elementwise kernels around LoRA's matmuls. Only dL/dG sums over
    all tokens, which stays one matmul (compiled as a reduction it was slower still). One H200, GPT-2 shape,
    compiled, no reallocation: 1.13x LoRA's step time, against 1.17x with F.linear; at SmolLM2's shape the
    gain varied between machines (README, Speed). Under bf16 autocast z is summed in float32, not bf16: G is
    float32, and h * G promotes."""

    @staticmethod
    def forward(ctx, h, G, c):
        ctx.save_for_backward(h, G)
        return (h.unsqueeze(-2) * G).sum(-1) + c  # z_j = sum_k G_jk h_k + c_j

    @staticmethod
    def backward(ctx, dz):
        h, G = ctx.saved_tensors
        dh = (dz.unsqueeze(-1) * G).sum(-2)  # dL/dh_k = sum_j dz_j G_jk
        dz, h = dz.reshape(-1, G.shape[0]), h.reshape(-1, G.shape[1]).to(dz.dtype)  # every token a row
        return dh, dz.t() @ h, dz.sum(0)  # dL/dG = sum over tokens of dz h^T; dL/dc = sum of dz


def add_dynlora(model: nn.Module, targets, r_max: int, r: int, alpha: float, dropout: float = 0.0, gate: bool = True):
    """Wrap every nn.Linear whose qualified name contains one of `targets`; returns {name: DynLoRALinear}."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(t in n for t in targets)]
    if not names:
        raise ValueError(f"no nn.Linear in the model matches targets {list(targets)}")
    layers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layers[name] = DynLoRALinear(getattr(parent, child), r_max, r, alpha, dropout, gate)
        setattr(parent, child, layers[name])
    return layers


def dynlora_layers(model: nn.Module):
    return {n: m for n, m in model.named_modules() if isinstance(m, DynLoRALinear)}


class RankAllocator:
    """Moves rank components from the layers that need them least to those that need them most, every `every`
    steps for t_init <= step <= t_final, at the layers' total rank when it is built (the budget)."""

    def __init__(self, layers: dict, model: nn.Module, t_init: int, t_final: int, every: int, r_min: int = 1,
                 ratio: float = 2.0, moves: int = 3, protect: int = 2, seed: int = 0, output: str = "softmax"):
        """model: what the training loop calls (the module itself, not a DDP wrapper); its forward's inputs are
        kept for the curvature pass. output: how its output is scored, "softmax" (classification logits,
        cross-entropy) or "gaussian" (a regression, squared error)."""
        self.names, self.layers = list(layers), list(layers.values())
        L, r_max = len(self.layers), self.layers[0].r_max
        if any(layer.r_max != r_max for layer in self.layers):
            raise ValueError("every layer must have the same r_max")
        if not 0 <= r_min <= min(l.rank for l in self.layers):
            raise ValueError(f"r_min={r_min} must lie in [0, the initial rank]")
        if output not in ("softmax", "gaussian"):
            raise ValueError(f"output={output!r}: give 'softmax' (classification) or 'gaussian' (regression)")
        if every < 1 or t_init > t_final or moves < 1 or ratio < 1:
            raise ValueError(f"need every >= 1, t_init <= t_final, moves >= 1 and ratio >= 1, got every={every}, "
                             f"t_init={t_init}, t_final={t_final}, moves={moves}, ratio={ratio}")
        self.t_init, self.t_final, self.every, self.r_min = t_init, t_final, every, r_min
        self.ratio, self.moves, self.protect = ratio, moves, protect
        self.budget = sum(l.rank for l in self.layers)
        dev = self.layers[0].A.device
        for layer in self.layers:  # the demand signal: autograd fills probe.grad, summed over steps in place
            layer.probe = torch.zeros_like(layer.B, requires_grad=True)
            layer.probe.grad = torch.zeros_like(layer.B)
            layer.power = torch.zeros(r_max, device=dev)
        self.left = torch.zeros(L, r_max, device=dev)  # steps of fading left for each slot (0: none)
        self.probing = torch.zeros(L, r_max, dtype=torch.bool)  # slots whose A row is a probe since the last reallocation
        self.free = torch.zeros(L)  # n: the dimensions the probe rows were drawn in
        self.young = torch.zeros(L, r_max, dtype=torch.long)  # reallocations a grown component is still protected
        self.gen = torch.Generator().manual_seed(seed)  # CPU: the same probe rows on every process
        self.history = []  # one entry per reallocation: step, per-layer ranks and demands
        self.fading = 0  # steps until every dropped component is 0: fade() has nothing to do at 0 (no host sync)
        self.model, self.output, self.inputs = model, output, None
        self.draws = torch.Generator().manual_seed(seed + 1)  # the curvature pass's cotangents: a stream of their own
        self.hook = model.register_forward_pre_hook(self._keep_inputs, with_kwargs=True)  # .remove() detaches it
        self._new_probes(self._rows())

    def _keep_inputs(self, module, args, kwargs):
        """A forward pre-hook: the last training forward's inputs (references, not copies: under CUDA graphs,
        the recorded step's input buffers, which hold the latest batch) and its autocast, for curvature()."""
        if module.training and torch.is_grad_enabled():
            dev = next(module.parameters()).device.type
            cast = (torch.get_autocast_dtype(dev), torch.is_autocast_cache_enabled()) \
                if torch.is_autocast_enabled(dev) else None  # the cache flag too: compiled code guards on it
            self.inputs = args, kwargs, dev, cast

    def step(self, step: int, optimizer=None):
        """Call once per optimizer step, after backward() (and clipping), before or after optimizer.step(): fade
        the dropped components a step, and reallocate when it is time. Eager, outside any CUDA-graph recording:
        it edits tensors in place, and decides on the CPU."""
        self.fade()
        if self.due(step):
            self.reallocate(step, optimizer)

    def step_state(self):
        """The tensors a training step itself changes in place: the probes' gradients (backward() adds to them) and
        their input powers (forward() does). A CUDA-graph recording puts them back after its warm-up steps."""
        return [t for l in self.layers for t in (l.probe.grad, l.power)]

    def due(self, step: int):
        return self.t_init <= step <= self.t_final and (step - self.t_init) % self.every == 0

    @torch.no_grad()
    def fade(self):
        """B columns of dropped components (and the gate columns reading them) times (left - 1) / left: a straight
        line to exactly 0 in `every` steps. A few kernels for all layers while anything fades, none otherwise."""
        if self.fading == 0:
            return
        self.fading -= 1
        factor = list(torch.where(self.left > 0, (self.left - 1) / self.left.clamp(min=1), 1.0).unbind(0))
        torch._foreach_mul_([l.B for l in self.layers], factor)  # (d_out, r_max) * (r_max,): columns
        gated = [(l.G, f) for l, f in zip(self.layers, factor) if l.gate]
        if gated:
            torch._foreach_mul_(*map(list, zip(*gated)))
        self.left.sub_(1).clamp_(min=0)

    def _rows(self):
        """Every layer's A, in one copy to the CPU, float64: what decisions and new probe rows are computed from."""
        flat = torch.cat([l.A.detach().flatten() for l in self.layers]).double().cpu()
        return [a.view(l.A.shape) for a, l in zip(flat.split([l.A.numel() for l in self.layers]), self.layers)]

    def replayed(self, *args, **kwargs):
        """Under a CUDA-graph replay the model's forward runs no Python, so the pre-hook does not see the batch:
        the replaying code passes here the inputs the recorded forward reads (graphs.capture_steps' on_replay)."""
        if self.inputs is not None:  # the recording's forward set the device and autocast
            self.inputs = (args, kwargs, *self.inputs[2:])

    def curvature(self):
        """Per layer, dz/dB^T v over every slot (the probe's gradient), and the input power of each slot, (L, r_max):
        the last training batch forward again, and backward from a cotangent v drawn from the model's prediction
        (see the module docstring). Only the probes get gradients; the power this forward adds is taken back.
        Under torch.distributed process r draws the rows r B .. (r + 1) B - 1 of the global batch's v (B rows a
        process), as data.iterate_batches lays them out, so the sums over processes are one process's."""
        if self.inputs is None:
            raise RuntimeError("reallocation replays the model's last training forward, and its hook saw none: call "
                               "the model given to RankAllocator itself, in train mode, with gradients on")
        args, kwargs, dev, cast = self.inputs
        power = [l.power.clone() for l in self.layers]
        dtype, cache = cast or (None, True)
        with torch.enable_grad(), torch.autocast(dev, dtype, enabled=cast is not None, cache_enabled=cache):
            z = self.model(*args, **kwargs)  # (B, classes) logits, or a regression's (B, 1) or (B,)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
            else (0, 1)
        rows = slice(rank * z.shape[0], (rank + 1) * z.shape[0])
        if self.output == "softmax":
            p = torch.softmax(z.detach().float(), -1)
            u = torch.rand(world * z.shape[0], 1, generator=self.draws, dtype=torch.float64)[rows].to(p)
            drawn = (p.cumsum(-1) < u).sum(-1).clamp(max=p.shape[-1] - 1)  # y~ ~ softmax(z), by its inverse CDF
            v = p - F.one_hot(drawn, p.shape[-1]).to(p)
        else:
            v = torch.randn((world * z.shape[0], *z.shape[1:]), generator=self.draws, dtype=torch.float64)[rows]
        grads = torch.autograd.grad(z, [l.probe for l in self.layers], v.to(z), allow_unused=True)
        passes = []
        for layer, before in zip(self.layers, power):
            passes.append(layer.power - before)
            layer.power.copy_(before)
        return [g if g is not None else torch.zeros_like(l.probe) for g, l in zip(grads, self.layers)], passes

    @torch.no_grad()
    def demand(self, A):
        """Per layer: the demands of its next units, largest first (none if it has no probe), and the unit
        directions in input space they would grow along, as rows. A: self._rows()."""
        # four tensors a layer: the probe's gradient and input power, and the curvature pass's (dz/dB^T v, power)
        groups = [[l.probe.grad for l in self.layers], [l.power for l in self.layers], *self.curvature()]
        flat = torch.cat([t.flatten() for g in groups for t in g])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat)  # each process saw its own share of the batch
            dist.broadcast(flat, 0)  # and process 0's sum, bit for bit, decides everywhere
        parts = flat.double().cpu().split([t.numel() for g in groups for t in g])
        L = len(self.layers)
        probes, powers, curv, pass_power = (parts[k * L: (k + 1) * L] for k in range(4))
        out = []
        for i, (layer, g, power) in enumerate(zip(self.layers, probes, powers)):
            cols = torch.nonzero(self.probing[i]).flatten()
            if len(cols) == 0:
                out.append((torch.zeros(0), None))
                continue
            Q = A[i][cols]  # (m, d_in), orthogonal rows
            norms = Q.norm(dim=1)  # as drawn, times AdamW's weight decay since
            P = g.view(layer.B.shape)[:, cols] / power[cols].clamp(min=1e-30).sqrt()  # (d_out, m): M q_k / sqrt pi_k
            S2, V = torch.linalg.eigh(P.T @ P)  # P's right singular vectors and squared values, from (m, m)
            S2, V = S2.flip(0).clamp(min=0), V.flip(1)
            energy = curv[i].view(layer.B.shape)[:, cols].pow(2).sum()
            c = energy / (layer.B.shape[0] * pass_power[i][cols].sum().clamp(min=1e-30))
            gain = S2 * self.free[i] / len(cols) / c if c > 0 else torch.zeros_like(S2)
            out.append((gain, V.T @ (Q / norms[:, None])))  # (m,), (m, d_in) unit rows
        return out

    @torch.no_grad()
    def reallocate(self, step: int, optimizer=None):
        if any(layer.merged for layer in self.layers):  # unmerge() would then subtract another update than merge() added
            raise RuntimeError("unmerge() the model before reallocating")
        A = self._rows()
        demands = self.demand(A)
        active = torch.stack([l.active for l in self.layers]).cpu()
        value = torch.stack([l.B.norm(dim=0) * l.A.norm(dim=1) for l in self.layers]).float().cpu()  # (L, r_max)
        ranks = active.sum(1).tolist()
        gain = [d.tolist() for d, _ in demands]  # per layer, the demand of each next unit
        first = [g[0] if g else float("nan") for g in gain]
        spare = (active & (self.young == 0)).sum(1).tolist()  # components a layer may give
        took, gave, grown = [0] * len(ranks), [0] * len(ranks), []
        while True:  # the most demanding taker against the least demanding giver, one unit at a time
            takers = [i for i, g in enumerate(gain) if not gave[i] and took[i] < min(self.moves, len(g))
                      and ranks[i] < self.layers[i].r_max]
            if not takers:
                break
            i = max(takers, key=lambda i: gain[i][took[i]])
            givers = [j for j in range(len(ranks)) if j != i and not took[j] and gave[j] < self.moves
                      and ranks[j] > self.r_min and spare[j] and gain[j]]
            if not givers:
                break
            j = min(givers, key=lambda j: first[j])
            if not gain[i][took[i]] > self.ratio * first[j]:
                break
            k = int(torch.argmin(value[j].masked_fill(~active[j] | (self.young[j] > 0), float("inf"))))
            self._drop(j, k, optimizer)
            slot = int(torch.nonzero(self.probing[i] & ~active[i]).flatten()[0])
            self._grow(i, slot, demands[i][1][took[i]], active[i], optimizer)
            A[i][slot] = demands[i][1][took[i]] / math.sqrt(3)
            active[j, k], active[i, slot] = False, True
            grown.append((i, slot))
            ranks[i], took[i] = ranks[i] + 1, took[i] + 1
            ranks[j], gave[j], spare[j] = ranks[j] - 1, gave[j] + 1, spare[j] - 1
        self.young = (self.young - 1).clamp(min=0)
        for i, slot in grown:
            self.young[i, slot] = self.protect  # kept through the next `protect` reallocations
        torch._foreach_copy_([l.active for l in self.layers], list(active.to(self.left.device).unbind(0)))
        if any(gave):
            self.fading = self.every
        self._new_probes(A)
        self.history.append({"step": step, "ranks": ranks, "demand": first})

    def _drop(self, j, k, optimizer):
        """Component k of layer j stops training and fades out over the next `every` steps."""
        self.left[j, k] = self.every
        for p, idx, _ in self._slices(self.layers[j], k):  # no momentum nor this step's gradient moves it any more
            if p.grad is not None:
                p.grad[idx] = 0
            if "exp_avg" in (state := optimizer.state.get(p, {}) if optimizer else {}):
                state["exp_avg"][idx] = 0

    def _grow(self, i, k, direction, active, optimizer):
        """Slot k of layer i becomes a component along `direction` (a unit row) with B_:k = 0 and a gate of 1
        that reads no other component: the output does not move. Adam: no momentum, and the second moment of the
        layer's active components, so that the first updates have the usual size (0 if it has none)."""
        layer = self.layers[i]
        layer.A[k] = (direction / math.sqrt(3)).to(layer.A)  # the row norm of kaiming_uniform(a=sqrt(5)) at init
        layer.B[:, k] = 0
        if layer.gate:
            layer.G[k], layer.G[:, k], layer.c[k] = 0, 0, 0
        for p, idx, others in self._slices(layer, k, torch.nonzero(active).flatten().to(layer.A.device)):
            state = optimizer.state.get(p, {}) if optimizer else {}
            if "exp_avg" in state:
                state["exp_avg"][idx] = 0
            if "exp_avg_sq" in state:
                state["exp_avg_sq"][idx] = state["exp_avg_sq"][others].mean() if others[-1].numel() else 0

    @staticmethod
    def _slices(layer, k, keep=None):
        """(tensor, component k's entries, the active components' entries): A's row, B's column, and the gate's
        row, column and bias; for G the active block only, as its other entries never had a gradient."""
        col, block = lambda i: (slice(None), i), (keep[:, None], keep[None, :]) if keep is not None else None
        out = [(layer.A, (k,), (keep,)), (layer.B, col(k), col(keep))]
        if layer.gate:
            out += [(layer.G, (k,), block), (layer.G, col(k), block), (layer.c, (k,), (keep,))]
        return out

    @torch.no_grad()
    def _new_probes(self, A):
        """Every slot neither active nor fading gets a fresh random row, orthogonal to the rows in use and to each
        other, of the init's norm; its gate row restarts at 0 (its B column is 0: the output does not move);
        the probes' gradients restart at 0. A: self._rows(), as the reallocation left them."""
        used = (torch.stack([l.active for l in self.layers]) | (self.left > 0)).cpu()  # (L, r_max)
        self.probing, self.free = ~used, torch.tensor([l.A.shape[1] for l in self.layers]) - used.sum(1)
        new = []
        for i, layer in enumerate(self.layers):
            taken = A[i][used[i]]  # (u, d_in)
            rows = torch.randn(int((~used[i]).sum()), A[i].shape[1], generator=self.gen, dtype=torch.float64)
            basis = torch.linalg.qr(torch.cat([taken, rows]).T)[0]  # (d_in, u + m): the used rows' span first
            new.append(basis[:, len(taken):].T / math.sqrt(3))
        dev = self.left.device
        slots = [torch.nonzero(p).flatten() for p in self.probing]
        flat = torch.cat([r.flatten() for r in new] + [s.double() for s in slots]).to(dev)  # one copy to the device
        parts = flat.split([r.numel() for r in new] + [len(s) for s in slots])
        for layer, rows, idx in zip(self.layers, parts[:len(new)], parts[len(new):]):
            idx = idx.long()
            layer.A[idx] = rows.view(-1, layer.A.shape[1]).to(layer.A.dtype)
            if layer.gate:
                layer.G[idx] = 0
                layer.c[idx] = 0
        torch._foreach_zero_([t for l in self.layers for t in (l.probe.grad, l.power)])

    @torch.no_grad()
    def share(self):
        """Under torch.distributed, called by every process before process 0 saves state_dict(): each process's
        probes become the mean over processes, so process 0's hold the demand of the whole batch. Summed over
        processes again at the next reallocation, the total is the same."""
        if dist.is_available() and dist.is_initialized():
            sums = [t for l in self.layers for t in (l.probe.grad, l.power)]
            flat = torch.cat([t.flatten() for t in sums])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            torch._foreach_copy_(sums, [t.view_as(s) for t, s in zip(flat.split([s.numel() for s in sums]), sums)])

    def state_dict(self):
        """A snapshot (copies, not references: training goes on changing them)."""
        return {"probes": [l.probe.grad.clone() for l in self.layers], "power": [l.power.clone() for l in self.layers],
                "left": self.left.clone(),
                "probing": self.probing.clone(), "free": self.free.clone(), "young": self.young.clone(),
                "gen": self.gen.get_state(), "draws": self.draws.get_state(), "history": copy.deepcopy(self.history),
                "fading": self.fading,
                "active": torch.stack([l.active for l in self.layers])}

    def load_state_dict(self, state):
        for layer, g, w, a in zip(self.layers, state["probes"], state["power"], state["active"]):
            layer.probe.grad.copy_(g)
            layer.power.copy_(w)
            layer.active.copy_(a)
        self.left.copy_(state["left"])
        self.probing, self.free, self.young = (state[k].cpu().clone() for k in ("probing", "free", "young"))
        self.fading = state["fading"]
        self.gen.set_state(state["gen"].cpu())  # CPU generators, whatever map_location said
        if "draws" in state:  # checkpoints from before the curvature pass have none: a fresh stream then
            self.draws.set_state(state["draws"].cpu())
        self.history = list(state["history"])


def merge(model: nn.Module):
    """Fold every adapter into its base weight (W += s B A); gated layers cannot be folded."""
    for name, layer in dynlora_layers(model).items():
        if layer.gate:
            raise ValueError(f"{name}: a gated adapter depends on each input, so it cannot be folded into W")
    for layer in dynlora_layers(model).values():
        if not layer.merged:
            layer.base.weight.data += layer.delta_weight().to(layer.base.weight.dtype)
            layer.merged = True


def unmerge(model: nn.Module):
    """Undo merge(): subtract the same update again."""
    for layer in dynlora_layers(model).values():
        if layer.merged:
            layer.base.weight.data -= layer.delta_weight().to(layer.base.weight.dtype)
            layer.merged = False


_PACKED = ("A", "B", "G", "c", "active")  # per-layer tensors that adapter_state_dict packs


def adapter_state_dict(model: nn.Module):
    """The components in use only, packed (A rows, B columns, the gate's block): the active ones and any still
    fading out (B_:k != 0), plus every other trainable tensor (e.g. the classification head). Its size follows
    the budget, not r_max."""
    state = {}
    for name, layer in dynlora_layers(model).items():
        idx = torch.nonzero(layer.active | (layer.B != 0).any(0)).flatten()
        state[f"{name}.A"] = layer.A[idx]  # (rank, d_in)
        state[f"{name}.B"] = layer.B[:, idx]  # (d_out, rank)
        if layer.gate:  # a component in use reads only components in use
            state[f"{name}.G"] = layer.G[idx][:, idx]  # (rank, rank): the other columns are 0
            state[f"{name}.c"] = layer.c[idx]  # (rank,)
    adapter_names = {f"{n}.{p}" for n in dynlora_layers(model) for p in _PACKED}
    for name, p in model.named_parameters():
        if p.requires_grad and name not in adapter_names:
            state[name] = p
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


@torch.no_grad()
def load_adapter(model: nn.Module, state: dict):
    """Inverse of adapter_state_dict, into a model built with the same add_dynlora arguments: layer l's
    packed components fill its first rank_l slots, whatever its ranks were before. Every entry is checked
    before any is written: a refused adapter leaves the model as it was."""
    if any(layer.merged for layer in dynlora_layers(model).values()):  # unmerge() would subtract the new update
        raise RuntimeError("unmerge() the model before loading an adapter")
    state, fills = dict(state), []
    for name, layer in dynlora_layers(model).items():
        if f"{name}.A" not in state:
            raise ValueError(f"adapter has no entry for layer {name}")
        A, B = state.pop(f"{name}.A"), state.pop(f"{name}.B", None)
        r, (d_out, d_in) = A.shape[0], layer.base.weight.shape
        want = {"A": (r, d_in), "B": (d_out, r)}
        got = {"A": tuple(A.shape), "B": None if B is None else tuple(B.shape)}
        G = c = None
        if layer.gate:
            G, c = state.pop(f"{name}.G", None), state.pop(f"{name}.c", None)
            want |= {"G": (r, r), "c": (r,)}
            got |= {"G": None if G is None else tuple(G.shape), "c": None if c is None else tuple(c.shape)}
        elif f"{name}.G" in state:
            raise ValueError(f"{name}: adapter has a gate but the model's layer has none (gate=False)")
        if r > layer.r_max or any(got[k] != want[k] for k in want):
            raise ValueError(f"{name}: adapter shapes {got} do not fit this layer (r_max {layer.r_max}): "
                             f"expected {want}")
        fills.append((layer, r, A, B, G, c))
    params = dict(model.named_parameters())
    for name, t in state.items():  # the rest: trained tensors outside the adapters (the classification head)
        if name not in params:
            raise ValueError(f"adapter entry {name} has no place in this model")
        if params[name].shape != t.shape:
            raise ValueError(f"{name}: adapter shape {tuple(t.shape)} != model shape {tuple(params[name].shape)}")
    for layer, r, A, B, G, c in fills:
        layer.active.zero_()
        layer.active[:r] = True
        layer.A.zero_()
        layer.B.zero_()
        layer.A[:r], layer.B[:, :r] = A, B
        if layer.gate:
            layer.G.zero_()
            layer.c.zero_()
            layer.G[:r, :r], layer.c[:r] = G, c
    for name, t in state.items():
        params[name].copy_(t)
