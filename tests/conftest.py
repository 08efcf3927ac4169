import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project is flat files, not a package
SHARED = ROOT.parent / "shared"
GLUE_DIR = SHARED / "glue"
GGUF_PATH = Path(os.environ.get("DYNLORA_GGUF") or Path.home() / ".cache/dynlora/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture
def glue_dir():
    if not (GLUE_DIR / "SST-2" / "dev.tsv").exists():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    return GLUE_DIR


@pytest.fixture
def gguf_path():
    if not GGUF_PATH.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {GGUF_PATH} (run ../shared/tools/get-smollm2.sh)")
    return GGUF_PATH


@pytest.fixture
def small_sst2(tmp_path):
    """A 300-example SST-2 so that each run spends its time training, not tokenizing 67k sentences."""
    d = tmp_path / "glue" / "SST-2"
    d.mkdir(parents=True)
    words = ["good", "bad", "fine", "awful", "great", "dull", "fun", "slow"]
    rows = [f"{words[i % 8]} film number {i} \t{int(i % 8 in (0, 2, 4, 6))}" for i in range(300)]
    (d / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    (d / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:40]) + "\n")
    return tmp_path / "glue"
