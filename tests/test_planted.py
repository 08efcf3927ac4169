"""The planted-rank benchmark (results/planted.py), small: one seed, 400 steps, a few seconds. The allocator must find
the layers a teacher changed and beat uniform LoRA at the same budget; the full run's figures are in the README."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "results"))
import planted  # noqa: E402


def test_dynlora_finds_the_planted_ranks_and_beats_lora():
    lora, dyn = (planted.run(m, seed=0, steps=400) for m in ("lora", "dynlora"))
    assert sum(dyn["ranks"]) == sum(lora["ranks"]) == planted.R0 * planted.N_LAYERS  # the same budget
    assert dyn["mse"] < 0.85 * lora["mse"], (dyn["mse"], lora["mse"])  # 0.75x measured
    assert dyn["ranks"].index(max(dyn["ranks"])) == 1, dyn["ranks"]  # the rank-12 layer holds the most
    assert dyn["spearman"] >= 0.6 and dyn["change_corr"] > -0.2, dyn  # 0.90 and +0.24 measured


def test_dynlora_beats_lora_on_a_residual_stream():
    lora, dyn = (planted.run(m, seed=0, steps=400, arch="residual") for m in ("lora", "dynlora"))
    assert dyn["mse"] < 0.8 * lora["mse"], (dyn["mse"], lora["mse"])  # 0.62x measured
    assert dyn["ranks"].index(max(dyn["ranks"])) == 1 and dyn["spearman"] >= 0.6, dyn  # 0.92 measured


def test_spearman_and_oscillation():
    assert planted.spearman([1, 2, 3], [10, 20, 30]) == 1.0 and planted.spearman([1, 1, 2], [3, 2, 1]) < 0
    assert planted.spearman([2, 2, 2], [1, 2, 3]) == 0.0  # a constant side: no correlation
    corr, churn = planted.oscillation([{"ranks": r} for r in ([3] * 8, [4, 2] + [3] * 6, [3] * 8, [4, 2] + [3] * 6)])
    assert corr == -1.0 and churn == 3 / 24  # a unit back and forth, three times, of a budget of 24
