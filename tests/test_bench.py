"""bench.py runs end to end on CPU and its last line is the JSON a script reads; bad input is one line. Nothing about
speed is asserted."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

METHODS = ["full", "lora", "dynlora", "dynlora-nogate", "dynlora-norealloc"]


def test_bench_smoke():
    cmd = [sys.executable, "bench.py", "--device", "cpu", "--model", "tiny", "--steps", "3", "--warmup", "1",
           "--seq-len", "32", "--batch-size", "4", "--compile", "no", "--no-peft", "--realloc-every", "2"]
    # one thread: a tiny model gains nothing from more, and OpenMP threads slow to a crawl on a busy machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rows = {r["method"]: r for r in result["rows"]}
    assert sorted(rows) == sorted(METHODS)
    for r in rows.values():
        assert r["compile"] is False
        assert r["median_ms"] > 0 and r["mean_ms"] > 0 and r["tokens_per_s"] > 0
        assert 0 < r["trainable"] <= r["params"]
    assert rows["lora"]["vs_lora"] == 1.0 and rows["lora"]["vs_lora_median"] == 1.0
    assert rows["lora"]["realloc_ms"] is None and rows["dynlora-norealloc"]["realloc_ms"] is None
    assert rows["full"]["trainable"] == rows["full"]["params"]  # full fine-tuning trains everything
    # the variants are what they say: r_max 16 slots of A and B against LoRA's 8, and a gate's G (16 x 16) and c (16)
    # in each of tiny's 2 x 4 adapted layers (c_attn, attention c_proj, c_fc, MLP c_proj: d_in + d_out = 1024 a block)
    assert rows["dynlora-nogate"]["trainable"] - rows["lora"]["trainable"] == 2 * 8 * 1024
    assert rows["dynlora"]["trainable"] - rows["dynlora-nogate"]["trainable"] == 2 * 4 * (16 * 16 + 16)
    assert rows["dynlora-norealloc"]["trainable"] == rows["dynlora"]["trainable"]
    assert result["config"]["model"] == "tiny" and result["matmul_peak_flops"] > 0
    assert isinstance(rows["dynlora"]["realloc_ms"], float)  # step 2 of 1..3 reallocates (--realloc-every 2)


def test_kernel_kinds():
    """The profile's summary sorts GPU kernels by kind from their names (names as a profile on an H200 gave them)."""
    sys.path.insert(0, str(ROOT))
    from bench import kernel_kind
    assert kernel_kind("nvjet_tst_128x64_64x8_1x2_h_bz_coopA_NTN") == "matmul"
    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kernel_kind("triton_per_fused__to_copy_add_mul_sigmoid_sum_3") == "triton"
    assert kernel_kind("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>") \
        == "attention"
    assert kernel_kind("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>") \
        == "multi-tensor"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") == "other"


def test_datasheet_peaks_by_name():
    sys.path.insert(0, str(ROOT))
    from bench import datasheet_peak
    assert datasheet_peak("NVIDIA H200") == datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert datasheet_peak("NVIDIA H100 PCIe") == 756e12 and datasheet_peak("NVIDIA H100 NVL") == 835e12
    assert datasheet_peak("cpu") is None


def test_bad_input_is_one_line(capsys):
    sys.path.insert(0, str(ROOT))
    from bench import main
    tiny = ["--device", "cpu", "--model", "tiny", "--steps", "1", "--warmup", "0", "--compile", "no", "--no-peft"]
    for args, needle in [(["--device", "foo"], "--device foo cannot run here"),
                         ([*tiny, "--methods", "lora,lora"], "names a method twice"),
                         ([*tiny, "--methods", "lora", "--rank", "100"], "r_max=100 is more than 64"),
                         ([*tiny, "--methods", "dynlora", "--rank", "32"], "need 1 <= r <= r_max"),
                         ([*tiny, "--compile", "yes"], "compiled rows need at least 3 untimed steps"),
                         ([*tiny, "--profile", "peft-lora"], "--profile peft-lora cannot run: --no-peft"),
                         (["--batch-size", "0"], "--batch-size: 0 must be at least 1")]:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        out, err = capsys.readouterr()
        assert exit_.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)
        assert "median" not in out, args  # refused before timing anything
    # a bad rank for a later method is found before the first one is timed
    with pytest.raises(SystemExit):
        main([*tiny, "--methods", "full,lora,dynlora", "--rank", "12", "--r-max", "8"])
    assert "full (eager)" not in capsys.readouterr().out
