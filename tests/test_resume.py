"""Crash safety: a run killed with SIGKILL resumes on the same loss curve; Ctrl-C saves; hostile files are refused."""
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from test_train import TINY, last_json, run

ARGS = [*TINY, "--task", "sst2", "--max-steps", "24", "--batch-size", "8", "--log-every", "1", "--ckpt-every", "4",
        "--dropout", "0.1", "--t-init", "0.2", "--t-final", "0.8", "--realloc-every", "3"]


def losses(stdout):
    return {int(m[1]): float(m[2]) for m in re.finditer(r"step\s+(\d+) \| loss ([\d.]+)", stdout)}


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])  # on a GPU each step is a replayed CUDA graph, recorded anew
def test_sigkill_then_resume_continues_the_same_run(small_sst2, tmp_path, device):
    args = [device if a == "cpu" else a for a in ARGS] + ["--data-dir", str(small_sst2)]
    ref = run(*args, "--out", str(tmp_path / "ref"))
    ref_losses, ref_result = losses(ref.stdout), last_json(ref.stdout)
    out = tmp_path / "crash"
    cmd = [sys.executable, str(ROOT / "train.py"), *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # kill it mid-run, between two checkpoints
        if re.match(r"step\s+14 \|", line):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and (out / "ckpt.pt").exists()
    resumed = run(*args, "--out", str(out), "--resume")
    assert "resumed from" in resumed.stdout and "at step 12" in resumed.stdout
    got = losses(resumed.stdout)
    assert sorted(got) == list(range(13, 25))
    for s in got:
        assert got[s] == pytest.approx(ref_losses[s], abs=2e-4), (s, got[s], ref_losses[s])
    result = last_json(resumed.stdout)
    assert result["accuracy"] == pytest.approx(ref_result["accuracy"]) and result["f1"] == pytest.approx(ref_result["f1"])
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    ck["rng"] = ck["rng"][0]  # as checkpoints were before each process's random state was kept: one state
    torch.save(ck, out / "ckpt.pt")
    again = run(*args, "--out", str(out), "--resume")  # a finished run: nothing to train, nothing recorded
    assert "nothing left to train" in again.stdout and last_json(again.stdout)["steps"] == 24
    assert last_json(again.stdout)["accuracy"] == pytest.approx(result["accuracy"])


def test_ctrl_c_saves_a_checkpoint(small_sst2, tmp_path):
    out = tmp_path / "int"
    args = [a if a != "24" else "60" for a in ARGS] + ["--data-dir", str(small_sst2), "--out", str(out)]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if re.match(r"step\s+6 \|", line):
            proc.send_signal(signal.SIGINT)  # the step under way finishes, then the run saves and exits
            break
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout
    saved_at = int(re.search(r"interrupted after step (\d+): checkpoint saved", stdout)[1])
    assert 6 <= saved_at < 60
    resumed = run(*args, "--resume")
    assert f"at step {saved_at}" in resumed.stdout and last_json(resumed.stdout)["steps"] == 60
    changed = run(*[a if a != "60" else "80" for a in args], "--resume", check=False)  # another schedule
    assert changed.returncode == 2 and "--max-steps 60 -> 80" in changed.stderr
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    del ck["args"]["group_by_length"]  # a checkpoint written before the flag existed: read as its default, 0
    torch.save(ck, out / "ckpt.pt")
    older = run(*args, "--group-by-length", "5", "--resume", check=False)
    assert older.returncode == 2 and "--group-by-length 0 -> 5" in older.stderr


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1"}


def test_ctrl_c_under_torchrun_saves_once_every_process_stops(small_sst2, tmp_path):
    """A terminal's Ctrl-C reaches torchrun and every process, and torchrun passes its own on: each process gets
    two. They stop together after the same step, the next that synchronises them (a log line), rank 0 saves,
    and none dies with a traceback, which it would if rank 0 left alone. With dropout, each process draws its
    own masks; the checkpoint holds each one's random state, so the resumed run is on the same loss curve."""
    out = tmp_path / "ddp"
    args = [*TINY, "--task", "sst2", "--max-steps", "60", "--batch-size", "8", "--log-every", "5", "--t-init", "0.2",
            "--realloc-every", "3", "--dropout", "0.1", "--data-dir", small_sst2]  # syncs at log lines only
    cmd, env = torchrun(ROOT / "train.py", *args)
    ref = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    args += ["--out", out]
    cmd, env = torchrun(ROOT / "train.py", *args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # its own process group, as a terminal's job
    for line in proc.stdout:
        if re.match(r"step\s+5 \|", line):
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: SIGINT to torchrun and both processes
            break
    output, _ = proc.communicate(timeout=120)
    saved_at = int(re.search(r"interrupted after step (\d+): checkpoint saved", output)[1])
    assert saved_at % 5 == 0 and 5 < saved_at < 60, output[-3000:]
    assert "[rank1]" not in output and "[rank0]" not in output, output[-3000:]  # no process crashed
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == saved_at and len(ck["rng"]) == 2 and not torch.equal(ck["rng"][0][0], ck["rng"][1][0])
    cmd, env = torchrun(ROOT / "train.py", *args, "--resume")
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {saved_at}" in resumed.stdout and last_json(resumed.stdout)["steps"] == 60
    a, b = losses(ref.stdout), losses(resumed.stdout)
    assert sorted(b) == list(range(saved_at + 5, 61, 5))
    for s in b:
        assert b[s] == pytest.approx(a[s], abs=2e-4), (s, a[s], b[s])


def test_ctrl_c_in_the_last_step_still_finishes(small_sst2, tmp_path, monkeypatch, capsys):
    """Training is done after the last step: a Ctrl-C during it lets the run evaluate and save (it used to save a
    checkpoint and exit 130, with no adapter and no JSON line)."""
    import train
    get_lr, sent = train.get_lr, []

    def interrupting(step, total, peak, warmup):  # SIGINT at the start of the last step, once
        if step == total - 1 and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGINT))
        return get_lr(step, total, peak, warmup)
    monkeypatch.setattr(train, "get_lr", interrupting)
    out = tmp_path / "last"
    result = train.main([*TINY, "--task", "sst2", "--max-steps", "8", "--batch-size", "8", "--log-every", "4",
                         "--data-dir", str(small_sst2), "--out", str(out)])
    assert sent and result["steps"] == 8 and (out / "adapter.safetensors").exists()
    assert "training had finished, so the run evaluates and saves" in capsys.readouterr().out


def test_resume_refuses_changed_training_data(small_sst2, tmp_path, capsys):
    """With --epochs, the step count comes from the data: other data with the same flags would move the schedule
    and the data order under the resumed run."""
    import train
    args = [*TINY, "--task", "sst2", "--epochs", "1", "--batch-size", "32", "--data-dir", str(small_sst2),
            "--out", str(tmp_path / "e")]
    train.main(args)  # 300 rows: 9 steps
    train_tsv = small_sst2 / "SST-2" / "train.tsv"
    train_tsv.write_text("".join(train_tsv.read_text().splitlines(keepends=True)[:201]))  # 200 rows: 6 steps
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--resume"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the run had 9 steps and would now have 6" in err, err


def test_a_checkpoint_that_cannot_be_written_is_one_line(small_sst2, tmp_path, monkeypatch, capsys):
    import checkpoint
    import train

    def disk_full(obj, path, save=None):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "save_atomic", disk_full)
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--task", "sst2", "--max-steps", "2", "--batch-size", "8", "--data-dir", str(small_sst2),
                    "--out", str(tmp_path / "full")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot write the checkpoint" in err and "after step 2 (No space left on device)" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's Ctrl-C handler is gone


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_hostile_and_broken_checkpoints_are_refused(small_sst2, tmp_path, capsys, monkeypatch):
    import train
    monkeypatch.chdir(tmp_path)  # where the payload would touch its file
    out = tmp_path / "h"
    out.mkdir()
    ck = out / "ckpt.pt"
    args = [*ARGS, "--data-dir", str(small_sst2), "--out", str(out)]

    def refused(*extra):  # the run stops in one error line; returns it
        with pytest.raises(SystemExit) as e:
            train.main([*args, *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
        return err
    ck.write_bytes(pickle.dumps({"step": Payload()}))
    assert "cannot resume" in refused("--resume")
    assert not (tmp_path / "PWNED").exists()
    assert train.main([*args, "--max-steps", "4"])["steps"] == 4
    assert "--method" in refused("--resume", "--method", "lora")
    assert refused("--resume", "--seed", "1").count("--seed 0 -> 1") == 1  # named once
    blob = ck.read_bytes()
    ck.write_bytes(blob[: len(blob) // 2])  # truncated, as a crash in a non-atomic writer would leave it
    assert "cannot resume" in refused("--resume")


def test_ddp_two_processes_match_one(small_sst2, tmp_path):
    """torchrun with 2 CPU processes (gloo): the same allocation on both, and the loss curve of one process
    that sees the same global batch. No dropout: the two layouts draw different random numbers. Then again with
    every step a replay of a fake CUDA graph (tests/fake_graphs.py): DDP built before recording, 11 warm-up
    steps put back, every process padded to the global batch's bucket."""
    sst = small_sst2 / "SST-2"  # rows of 3 to 14 words, so that grouping by length sorts something
    rows = [line.split("\t") for line in (sst / "train.tsv").read_text().splitlines()[1:]]
    (sst / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{'very ' * (i % 12)}{t}\t{y}\n"
                                                                 for i, (t, y) in enumerate(rows)))
    args = [a for a in ARGS if a not in ("--dropout", "0.1")] + ["--data-dir", str(small_sst2), "--group-by-length", "3"]
    one = run(*args)
    a, r1 = losses(one.stdout), last_json(one.stdout)
    for script, extra in [("train.py", []), ("tests/fake_graphs.py", ["--cuda-graphs"])]:
        cmd, env = torchrun(ROOT / script, *args, *extra, "--out", tmp_path / Path(script).stem)
        two = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert two.returncode == 0, (script, two.stderr[-3000:])
        assert "ddp check: weights and masks identical on all 2 processes" in two.stdout, script
        assert sum(line.startswith('{"task"') for line in two.stdout.splitlines()) == 1  # only rank 0 prints
        if extra:
            assert "fake graphs replayed: 24" in two.stderr  # every one of the 24 steps was a replay
        b = losses(two.stdout)
        assert sorted(a) == sorted(b) == list(range(1, 25)), script
        for s in a:
            assert b[s] == pytest.approx(a[s], abs=1e-4), (script, s, a[s], b[s])
        r2 = last_json(two.stdout)
        assert r2["accuracy"] == pytest.approx(r1["accuracy"], abs=1 / 40)  # 40 dev examples: at most one flips
        # the same tokens trained (rows grouped by length: process 0's share is the longest; it must not stand for all)
        assert r2["train_tokens"] == r1["train_tokens"]


def test_resume_checks_every_flag_but_the_free_ones():
    """A changed flag is named on --resume unless checkpoint.FREE_ON_RESUME lists it: no list of the checked
    ones to keep, so a flag added later is checked too."""
    import checkpoint
    import train
    saved = vars(train.p.parse_args([]))
    assert checkpoint.FREE_ON_RESUME <= set(saved)
    for k, v in saved.items():
        now = train.p.parse_args([])
        setattr(now, k, "changed")
        changed = checkpoint.changed_flags(saved, now, train.p.get_default)
        assert changed == ([] if k in checkpoint.FREE_ON_RESUME else [f"--{k.replace('_', '-')} {v} -> changed"]), k

