"""results/table.py: the README's table from sweep.py's JSON lines, and one error line for a file it cannot read."""
import json
import subprocess
import sys

from conftest import ROOT


def table(path, *args):
    return subprocess.run([sys.executable, str(ROOT / "results" / "table.py"), str(path), *args],
                          capture_output=True, text=True, timeout=60)


def test_table_means_and_spread(tmp_path):
    runs = [{"config": "lora", "task": "rte", "seed": s, "accuracy": a} for s, a in enumerate([0.60, 0.64])]
    runs.append({"config": "full", "task": "rte", "seed": 0, "accuracy": 0.5})
    f = tmp_path / "runs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in runs) + "\n\n")  # a trailing blank line is not a run
    out = table(f)
    assert out.returncode == 0, out.stderr
    rows = {line.split(" | ")[0]: line for line in out.stdout.splitlines() if line.startswith("| ")}
    assert rows["| lora"] == "| lora | 62.0 ± 2.8 (2) | 62.0 |"  # mean, sample std (ddof 1), seeds
    assert rows["| full"] == "| full | 50.0 ± 0.0 (1) | 50.0 |"


def test_table_bad_files_are_one_line(tmp_path):
    good = json.dumps({"config": "lora", "task": "rte", "accuracy": 0.6})
    for text, needle in [("", "has no runs"), (good + "\nnot json\n", "line 2"),
                         ('{"config": "lora", "task": "rte"}\n', "no number for accuracy"),
                         (json.dumps({"config": "lora", "task": "rte", "accuracy": 0.6, "holdout_accuracy": 0.7}),
                          "add --split holdout or dev")]:
        f = tmp_path / "runs.jsonl"
        f.write_text(text)
        out = table(f)
        errors = [line for line in out.stderr.splitlines() if "error" in line]
        assert out.returncode == 2 and len(errors) == 1 and needle in errors[0] and "Traceback" not in out.stderr, text
