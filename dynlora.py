"""
Dynamic LoRA: LoRA whose rank budget moves between layers while it trains, with an input gate.

A reconstruction of arXiv 2501.14859, which publishes no formulas; every choice is stated here.

The layer. A frozen nn.Linear W (d_in -> d_out) gets r_max rank components, of which `mask` marks the active:

    h = m * (A dropout(x))           A: (r_max, d_in), m in {0,1}^r_max    only active components pass
    g = 2 * sigmoid(G h + c)         G: (r_max, r_max), c: (r_max,)        per token, per component
    y = W x + s * B (g * h)          B: (d_out, r_max), s = alpha / r0     r0 the initial rank, fixed: no
                                                                           jump when rank moves

- B starts at zero, so a new layer computes exactly W x (LoRA's init).
- G and c start at zero, so g == 1 and a new gated layer is exactly plain LoRA; the gate then learns to
  scale each component by what the token looks like (the paper's "input-feature-based" strategy). It
  reuses A x, so it costs r_max^2 multiply-adds a token: far below 1% of the layer's d_in * d_out. (The
  larger extra cost is elsewhere: A x and B h run over all r_max slots, masked ones too, so that shapes never
  change. At r_max = 2r that doubles LoRA's adapter FLOPs: 1.3 to 2% more of a GPT-2 layer's.)
- The gate reads the masked h, so inactive components take part in nothing and get zero gradient.
- With the gate off and reallocation off, the layer *is* standard LoRA (the `lora` method). The same function,
  not the same run seed for seed: A's r_max rows draw more random numbers at init than LoRA's r.

Importance (after AdaLoRA, Zhang et al. 2023). After backward() (in train.py, after gradient clipping, which
scales every layer alike), for each component k of each layer:

    I_k    = |sum_j A_kj dL/dA_kj|                the first-order change of the loss if component k were removed
    Ibar_k <- b1 Ibar_k + (1 - b1) I_k            smooths the noise of one mini-batch (b1 = b2 = 0.85,
                                                  AdaLoRA's: an average over about 1 / 0.15 = 7 steps)
    U_k    <- b2 U_k + (1 - b2) |I_k - Ibar_k|    how uncertain that estimate is
    S_k    = sqrt(Ibar_k * U_k)                   AdaLoRA's score Ibar * U (keep what matters or is still
                                                  moving), square-rooted back into units of loss

Component k enters the layer only through h_k = m_k A_k x, so scaling A_k by (1 + e) scales h_k and changes
the loss by e * <A_k, dL/dA_k> to first order; removing k (e = -1) changes it by minus that. Everything
downstream of h_k counts: the component's own output and, in a gated layer, the gates of the other
components, which read h_k through column k of G. Scoring B_:k instead would count the component's own
output only; without a gate the two are equal. (The first grid's `dynlora-bscore` runs, in
results/glue_first.jsonl, scored B_:k.) AdaLoRA instead sums |theta * grad| over every entry of A_k and B_:k;
that sum grows with d_in + d_out, which made wide layers (the MLP's) look important for being wide. One
product and one reduction over A per step, on gradients that backward() already computed.

Reallocation, every `every` steps for t_init <= step <= t_final, at a fixed total budget R = sum_l r_l:

    importance_l = mean of S_k over layer l's active components   (an average: a layer is not important
                                                                   merely for holding many components)
    r_l = clip(lam * importance_l, r_min, r_max), lam chosen so that sum_l r_l = R, then rounded by
          largest remainder so the sum is exactly R
    r_l <- r_l + rate * (target_l - r_l), rounded the same way    (rate 1: straight to the target)

The proportional rule feeds back on itself: a grown layer's fresh components score near zero until trained
(their B starts at 0), so its mean falls and it shrinks at the next reallocation; a shrunk layer keeps its
best components, so its mean rises and it grows again. In a real run (SmolLM2, SST-2, rate 1) successive rank
changes of a layer correlate at -0.84: a period-2 oscillation. With a slope near -1, moving half way
(rate 0.5) should land near the fixed point; on a small model (tests/test_dynlora.py) it damps the swings
only in part: correlation about -0.5 -> -0.25, churn 0.6x to 0.7x.

A layer that shrinks drops its lowest-scored components. A layer that grows activates dormant ones with a fresh
A row and a zero B column (so the output does not jump), a reset gate row and column, no Adam momentum but the
second moment of the layer's active components (so its first steps have the usual size), and Ibar and U each
the mean of the layer's active ones. That inherited score fades (Ibar by b1 a step, U more slowly, as it is fed
by |I - Ibar|), so it shields the component for a few dozen steps only: after an SST-2 interval (126 steps) it
scores what it has earned itself, which is little while its B is still near zero. Unlike AdaLoRA, which only
prunes from a larger start, rank can move *to* the layers that need it. Shapes never change: reallocation edits
`mask` and slices in place, so a torch.compile'd model never recompiles. Under torch.distributed, process 0's
scores are broadcast before each decision, so every process makes the same moves (the fresh A rows come from one
seeded generator).
"""
import copy
import math

import torch
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
        self.register_buffer("mask", (torch.arange(r_max, device=dev) < r).to(dt))
        self.gate = gate
        if gate:  # zero init: g = 2 * sigmoid(0) = 1
            self.G = nn.Parameter(torch.zeros(r_max, r_max, device=dev, dtype=dt))
            self.c = nn.Parameter(torch.zeros(r_max, device=dev, dtype=dt))
        self.r_max, self.alpha = r_max, alpha
        self.scale = alpha / r  # fixed at the initial rank, so moving rank never rescales the layer
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def rank(self) -> int:
        return int(self.mask.sum().item())

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        h = F.linear(self.dropout(x), self.A) * self.mask  # (..., r_max), inactive components are 0
        if self.gate:
            h = h * (2 * torch.sigmoid(GateLogits.apply(h, self.G, self.c)))  # (..., r_max) input-dependent scale
        return y + F.linear(h, self.B) * self.scale

    def delta_weight(self):
        """s * B diag(mask) A: the (d_out, d_in) update this adapter adds to W when it has no gate."""
        return (self.B * self.mask) @ self.A * self.scale

    def extra_repr(self):
        return f"r_max={self.r_max}, rank={self.rank}, alpha={self.alpha}, gate={self.gate}"


class GateLogits(torch.autograd.Function):
    """z = G h + c for every token: the same as F.linear(h, G, c), in a form that costs less on a GPU.

    With r_max = 16, G h is 256 multiply-adds a token; as a matmul it is three tiny kernels per layer (z, and
    dL/dh and dL/dG in backward) of a few microseconds each. Written as products summed over G's columns,
    torch.compile fuses z and dL/dh into the elementwise kernels around LoRA's matmuls. Only dL/dG sums over
    all tokens, which stays one matmul (compiled as a reduction it was slower still). One H200, GPT-2 shape,
    compiled, no reallocation: 1.13x LoRA's step time, against 1.17x with F.linear; at SmolLM2's shape the
    gain varied between machines (README, Speed). Under bf16 autocast z is summed in float32, not bf16: h is
    float32 there, as the float32 mask promotes A x."""

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
    """Scores rank components every step and moves the rank budget between layers every `every` steps."""

    def __init__(self, layers: dict, budget: int, t_init: int, t_final: int, every: int, r_min: int = 1,
                 beta1: float = 0.85, beta2: float = 0.85, seed: int = 0, rate: float = 1.0):
        self.names, self.layers = list(layers), list(layers.values())
        L, r_max = len(self.layers), self.layers[0].r_max
        if any(layer.r_max != r_max for layer in self.layers):
            raise ValueError("every layer must have the same r_max")
        if r_min < 1:
            raise ValueError("r_min must be at least 1: a layer with no component has no score and could never grow")
        if not L * r_min <= budget <= L * r_max:
            raise ValueError(f"budget {budget} must lie in [{L * r_min}, {L * r_max}] for {L} layers")
        if not 0 < rate <= 1:
            raise ValueError(f"rate must lie in (0, 1], got {rate}")
        if every < 1 or t_init > t_final:
            raise ValueError(f"need every >= 1 and t_init <= t_final, got every={every}, t_init={t_init}, "
                             f"t_final={t_final}")
        self.budget, self.t_init, self.t_final, self.every, self.r_min = budget, t_init, t_final, every, r_min
        self.rate = rate
        self.beta1, self.beta2 = beta1, beta2
        dev = self.layers[0].A.device
        self.ipt = torch.zeros(L, r_max, device=dev)  # Ibar: smoothed sensitivity, (L, r_max)
        self.unc = torch.zeros(L, r_max, device=dev)  # U: smoothed uncertainty, (L, r_max)
        sizes = torch.tensor([l.A.shape[1] for l in self.layers], device=dev)
        self.row_layer = torch.repeat_interleave(torch.arange(L, device=dev), sizes)  # layer of each column of A
        self.gen = torch.Generator().manual_seed(seed)  # CPU generator: the same fresh A on every process
        self.history = []  # one entry per reallocation: step, per-layer ranks and importances

    def step(self, step: int, optimizer=None):
        """Call after backward() and before zero_grad(): update scores, and reallocate when it is time. (train.py
        splits the two: scores inside the recorded CUDA graph of a step, reallocation after its replay.)"""
        self.update_scores()
        if self.due(step):
            self.reallocate(step, optimizer)

    def due(self, step: int):
        return self.t_init <= step <= self.t_final and (step - self.t_init) % self.every == 0

    @torch.no_grad()
    def update_scores(self):
        # a handful of kernels for all layers at once, however many there are: one multi-tensor product,
        # one concatenation, one scatter-add of each column of A into its layer's row of `sens`
        As = [l.A for l in self.layers]
        grads = [l.A.grad if l.A.grad is not None else torch.zeros_like(l.A) for l in self.layers]
        rows = torch.cat([p.t() for p in torch._foreach_mul(As, grads)]).float()  # (sum of d_in, r_max)
        sens = torch.zeros_like(self.ipt).index_add_(0, self.row_layer, rows).abs()  # (L, r_max)
        sens = torch.where(torch.isfinite(sens), sens, 0.0)  # an overflowing step counts 0, not inf or NaN for good
        # inactive components have zero gradient, hence zero sensitivity
        self.ipt.lerp_(sens, 1 - self.beta1)
        self.unc.lerp_((sens - self.ipt).abs(), 1 - self.beta2)

    def scores(self):
        return (self.ipt * self.unc).sqrt()  # (L, r_max); the square root keeps rank proportional to loss, not its square

    def layer_importance(self):
        masks = torch.stack([l.mask for l in self.layers]).float()  # (L, r_max)
        return (self.scores() * masks).sum(1) / masks.sum(1).clamp(min=1)  # (L,)

    def target_ranks(self, importance):
        """r_l proportional to importance, clipped to [r_min, r_max], summing exactly to the budget."""
        imp = torch.nan_to_num(importance.double().cpu(), nan=0.0, posinf=0.0).clamp(min=0)
        lo, hi = float(self.r_min), float(self.layers[0].r_max)
        if imp.max() <= 0:  # nothing known yet: share evenly
            imp = torch.ones_like(imp)
        imp = imp / imp.max()
        imp[imp < 1e-12] = 0  # negligible: r_min (unless the rest are full), and the bisection stays well scaled
        # bisection on the proportionality constant lam: sum(clip(lam * imp)) grows monotonically with lam
        a, b = 0.0, hi * len(imp) / imp[imp > 0].min().item()
        for _ in range(100):
            lam = (a + b) / 2
            a, b = (lam, b) if (lam * imp).clamp(lo, hi).sum() < self.budget else (a, lam)
        return self.round_to_budget((b * imp).clamp(lo, hi))

    def partway(self, ranks, targets):
        """Each layer `rate` of the way from its rank to its target. Both ends lie in [r_min, r_max] and sum to
        the budget, so the rounded result does too. A layer less than half a unit from where it would move
        stays (at rate 0.3, a gap of one never closes). Equal fractional parts are the rule here, not the
        exception (rate 0.5 and an odd gap give .5 rising and .5 falling): the unit goes to the larger gap
        still to go, so every layer moves towards its target, whatever its place in the model."""
        r, t = torch.tensor(ranks, dtype=torch.float64), torch.tensor(targets, dtype=torch.float64)
        return self.round_to_budget(r + self.rate * (t - r), tiebreak=t - r)

    def round_to_budget(self, exact, tiebreak=None):
        """Largest-remainder rounding of real ranks in [r_min, r_max] to integers summing to the budget: units
        missing go to the largest fractional parts, units over come off the smallest (the budget lies in
        [L r_min, L r_max], so both loops end). Equal parts: the larger `tiebreak` first, then the lower index."""
        lo, hi = self.r_min, self.layers[0].r_max
        ranks = exact.floor().long()
        short = self.budget - int(ranks.sum())
        frac = (exact - ranks).tolist()
        tiebreak = [0.0] * len(frac) if tiebreak is None else tiebreak.tolist()
        order = sorted(range(len(frac)), key=lambda i: (-frac[i], -tiebreak[i]))  # sorted() is stable
        while short != 0:
            for i in order if short > 0 else order[::-1]:
                if short > 0 and ranks[i] < hi:
                    ranks[i] += 1
                    short -= 1
                elif short < 0 and ranks[i] > lo:
                    ranks[i] -= 1
                    short += 1
        return ranks.tolist()

    @torch.no_grad()
    def reallocate(self, step: int, optimizer=None):
        if any(layer.merged for layer in self.layers):  # unmerge() would then subtract another update than merge() added
            raise RuntimeError("unmerge() the model before reallocating")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # one process decides: scores summed in another order (the GPU's atomic adds run in varying order)
            # could differ in their last bits and break a near-tie another way; with process 0's scores every
            # process makes the same moves
            torch.distributed.broadcast(self.ipt, 0)
            torch.distributed.broadcast(self.unc, 0)
        # decide on the CPU, from one copy of masks and scores: no wait for the GPU in every layer
        masks = torch.stack([l.mask for l in self.layers]).bool().cpu()  # (L, r_max), as they were
        importance = self.layer_importance()
        targets = self.target_ranks(importance)
        if self.rate < 1:
            targets = self.partway(masks.sum(1).tolist(), targets)
        scores, ipt, unc = self.scores().cpu(), self.ipt.cpu(), self.unc.cpu()
        new = masks.clone()
        for i, (layer, r_new) in enumerate(zip(self.layers, targets)):
            mask, r_old = masks[i], int(masks[i].sum())
            if r_new < r_old:  # drop the lowest-scored active components
                drop = torch.argsort(scores[i].masked_fill(~mask, float("inf")), stable=True)[: r_old - r_new]
                new[i, drop] = False
            elif r_new > r_old:  # wake dormant components, arranged so the output does not move
                grow = torch.nonzero(~mask).flatten()[: r_new - r_old]
                self._reset_components(layer, grow, torch.nonzero(mask).flatten(), optimizer)
                if r_old > 0:
                    ipt[i, grow], unc[i, grow] = ipt[i][mask].mean(), unc[i][mask].mean()
                new[i, grow] = True
        dev = self.ipt.device
        self.ipt.copy_(ipt)
        self.unc.copy_(unc)
        new_masks = new.to(dev, self.layers[0].mask.dtype)
        torch._foreach_copy_([l.mask for l in self.layers], list(new_masks.unbind(0)))  # in place: compiled
        self.history.append({"step": step, "ranks": new.sum(1).tolist(), "importance": importance.tolist()})

    def _reset_components(self, layer, idx, keep, optimizer):
        idx, keep = idx.to(layer.A.device), keep.to(layer.A.device)  # once, not in every indexing below
        fresh = torch.empty(len(idx), layer.A.shape[1])
        bound = 1 / math.sqrt(layer.A.shape[1])  # kaiming_uniform(a=sqrt(5)) bound, as at init
        layer.A[idx] = fresh.uniform_(-bound, bound, generator=self.gen).to(layer.A)
        layer.B[:, idx] = 0  # zero B: the new component adds nothing until it is trained
        if layer.gate:  # the gate of k is 1 again, and no other gate reads component k yet
            layer.G[idx, :] = 0
            layer.G[:, idx] = 0
            layer.c[idx] = 0
        if optimizer is None:
            return
        # Adam moments: no momentum yet, and the second moment of the layer's active components, so that
        # the first updates have the usual size (a zero second moment would make them several times larger)
        # (tensor, the new component's entries, the active entries to average): G's active block only, as its
        # other entries never had a gradient and would pull the mean towards 0
        col, block = lambda i: (slice(None), i), (keep[:, None], keep[None, :])
        slices = [(layer.A, (idx,), (keep,)), (layer.B, col(idx), col(keep))]
        if layer.gate:
            slices += [(layer.G, (idx,), block), (layer.G, col(idx), block), (layer.c, (idx,), (keep,))]
        for p, new, active in slices:
            state = optimizer.state.get(p, {})
            if "exp_avg" in state:
                state["exp_avg"][new] = 0
            if "exp_avg_sq" in state:
                state["exp_avg_sq"][new] = state["exp_avg_sq"][active].mean() if len(keep) else 0

    def state_dict(self):
        """A snapshot (copies, not references: training goes on changing the scores and the history)."""
        return {"ipt": self.ipt.clone(), "unc": self.unc.clone(), "gen": self.gen.get_state(),
                "history": copy.deepcopy(self.history), "masks": torch.stack([l.mask for l in self.layers])}

    def load_state_dict(self, state):
        self.ipt.copy_(state["ipt"])
        self.unc.copy_(state["unc"])
        self.gen.set_state(state["gen"].cpu())  # a CPU generator, whatever map_location said
        self.history = list(state["history"])
        for layer, m in zip(self.layers, state["masks"]):
            layer.mask.copy_(m)


def merge(model: nn.Module):
    """Fold every adapter into its base weight (W += s B diag(m) A); gated layers cannot be folded."""
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


_PACKED = ("A", "B", "G", "c", "mask")  # per-layer tensors that adapter_state_dict packs


def adapter_state_dict(model: nn.Module):
    """The active components only, packed (A rows, B columns, the gate's active block), plus every other
    trainable tensor (e.g. the classification head). Its size follows the budget, not r_max."""
    state = {}
    for name, layer in dynlora_layers(model).items():
        idx = torch.nonzero(layer.mask).flatten()
        state[f"{name}.A"] = layer.A[idx]  # (rank, d_in)
        state[f"{name}.B"] = layer.B[:, idx]  # (d_out, rank)
        if layer.gate:  # the gate of an active component only reads active components
            state[f"{name}.G"] = layer.G[idx][:, idx]  # (rank, rank)
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
        layer.mask.zero_()
        layer.mask[:r] = 1
        layer.A.zero_()
        layer.B.zero_()
        layer.A[:r], layer.B[:, :r] = A, B
        if layer.gate:
            layer.G.zero_()
            layer.c.zero_()
            layer.G[:r, :r], layer.c[:r] = G, c
    for name, t in state.items():
        params[name].copy_(t)
