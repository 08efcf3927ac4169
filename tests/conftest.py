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
