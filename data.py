"""GLUE for dynlora: the nine tasks' files, their official metrics, a tokenizer, and batches of a few fixed shapes.

    ensure_glue("sst2", data_dir)                    # downloads the task's zip once if its files are missing
    train = load_split("sst2", data_dir, "train")    # list[Example(text_a, text_b, label)]
    tok = get_tokenizer("gpt2")                      # or a SmolLM2 .gguf / HF folder: its own BPE, in tiktoken
    enc = encode_split(train, tok, max_len=128)      # token ids and labels, truncated the one documented way
    for b in iterate_batches(enc, 32, shuffle=True, seed=0, epoch=0): ...  # b.idx (B, T), T in buckets(128)
    compute_metrics("sst2", preds, labels)           # {"accuracy": ...}

An example becomes enc(text_a) + [eot], or for pairs enc(text_a) + [eot] + enc(text_b) + [eot]: the classifier
reads the hidden state at the final eot, the last real token. Files are parsed strictly: a malformed line raises
DataError naming the file and the line, so a label can never slide onto another example's sentence.
"""
import base64
import csv
import http.client
import json
import math
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tiktoken
import torch

PAD_ID = 0  # any id works: padding sits after the last real token and a causal model never attends forward
GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data/"  # the zips of the official GLUE download script


class Task(NamedTuple):
    folder: str                      # folder under the data dir, as the GLUE download script names it
    text: tuple                      # column names of text_a (and text_b)
    label: str                       # label column name
    classes: tuple | None            # label strings in class-id order; None: regression (STS-B scores 0..5)
    evals: tuple                     # eval splits (file stems)
    metrics: tuple                   # what compute_metrics returns; the first is the task's headline metric
    zip: str | None                  # file under GLUE_URL; None: MRPC is built from MSR's files, supply it locally
    columns: tuple | None = None     # column names of a file without a header line (CoLA)

    @property
    def regression(self) -> bool:
        return self.classes is None

    @property
    def n_labels(self) -> int:  # outputs of the classifier head: 1 for STS-B's score
        return 1 if self.classes is None else len(self.classes)


# The files' columns, as the GLUE download script writes them (found by name where there is a header line):
#   CoLA   source, label, original label (* or empty), sentence: no header line
#   SST-2  sentence, label
#   MRPC   Quality, #1 ID, #2 ID, #1 String, #2 String (the header starts with a byte-order mark)
#   QQP    id, qid1, qid2, question1, question2, is_duplicate
#   STS-B  index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score
#   MNLI   index, promptID, pairID, genre, 4 parse trees, sentence1, sentence2, label1 (dev: label1..5), gold_label
#   QNLI   index, question, sentence, label;   RTE, WNLI: index, sentence1, sentence2, label
NLI2 = ("entailment", "not_entailment")
TASKS = {
    "cola": Task("CoLA", ("sentence",), "label", ("0", "1"), ("dev",), ("mcc", "accuracy"), "CoLA.zip",
                 columns=("source", "label", "original_label", "sentence")),
    "sst2": Task("SST-2", ("sentence",), "label", ("0", "1"), ("dev",), ("accuracy", "f1"), "SST-2.zip"),  # F1 as the paper
    "mrpc": Task("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), ("dev",), ("f1", "accuracy"), None),
    "qqp": Task("QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), ("dev",), ("f1", "accuracy"),
                "QQP-clean.zip"),
    "stsb": Task("STS-B", ("sentence1", "sentence2"), "score", None, ("dev",), ("pearson", "spearman"), "STS-B.zip"),
    "mnli": Task("MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
                 ("dev_matched", "dev_mismatched"), ("accuracy",), "MNLI.zip"),
    "qnli": Task("QNLI", ("question", "sentence"), "label", NLI2, ("dev",), ("accuracy",), "QNLIv2.zip"),
    "rte": Task("RTE", ("sentence1", "sentence2"), "label", NLI2, ("dev",), ("accuracy",), "RTE.zip"),
    "wnli": Task("WNLI", ("sentence1", "sentence2"), "label", ("0", "1"), ("dev",), ("accuracy",), "WNLI.zip"),
}
HOW = "pass --data-dir pointing at a GLUE folder (TASK/train.tsv, TASK/dev.tsv)"


class DataError(Exception):
    """A GLUE file is missing or malformed; the message is one line naming the file (and line)."""


class Example(NamedTuple):
    text_a: str
    text_b: str | None  # None for single-sentence tasks (CoLA, SST-2)
    label: int | float  # class id, or the STS-B score in [0, 5]


def cache_dir():
    """Where downloads go: $DYNLORA_CACHE, default ~/.cache/dynlora (model.py keeps its weights there too)."""
    return Path(os.environ.get("DYNLORA_CACHE", "~/.cache/dynlora")).expanduser()


DEFAULT_DATA_DIR = cache_dir() / "glue"  # read once, at import: it is train.py's --data-dir default


def splits(task: str) -> tuple:
    """Names of the task's eval splits: ("dev",), or ("dev_matched", "dev_mismatched") for MNLI."""
    return TASKS[task].evals


def split_path(task: str, data_dir, split: str) -> Path:
    return Path(data_dir) / TASKS[task].folder / f"{split}.tsv"


def _fields(raw: bytes) -> list[str]:
    """One line of a GLUE file -> its tab-separated fields."""
    try:
        line = raw.decode("utf-8").removesuffix("\r")  # strict: bad bytes are an error, not a silent U+FFFD
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 (byte {e.start} of the line)") from None
    try:  # QUOTE_NONE: GLUE sentences contain bare quotes that are text, not CSV quoting
        return next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE), [])
    except csv.Error as e:
        raise DataError(str(e)) from None


def load_split(task: str, data_dir, split: str, skip_bad: bool = False) -> list[Example]:
    """Parse data_dir/FOLDER/split.tsv. Any malformed line raises DataError("FOLDER/split.tsv line N: ...");
    skip_bad=True drops such lines instead (whole lines, so labels stay with their texts) and prints a count."""
    t = TASKS[task]
    path = split_path(task, data_dir, split)
    where = f"{t.folder}/{path.name}"
    if not path.is_file():
        raise DataError(f"{path} not found: {HOW}, or let train.py download it (ensure_glue)")
    blob = path.read_bytes()
    lines = blob.split(b"\n")
    while lines and not lines[-1].strip():  # the usual final newline, and blank lines after the last row (an
        lines.pop()                         # editor's); a last line without a newline is parsed like any other
    cut = "" if blob.endswith(b"\n") else " (the file ends without a newline: was it cut short?)"
    csv.field_size_limit(2**31 - 1)  # csv's 128 KB default would reject a long but valid sentence
    names, first = t.columns, 1
    if names is None:  # a header line: find our columns by name
        if not lines:
            raise DataError(f"{where}: empty file")
        try:
            names = tuple(c.lstrip("\ufeff") for c in _fields(lines[0]))  # MRPC's header starts with a BOM
        except DataError as e:
            raise DataError(f"{where} line 1: {e}") from None
        if lost := [c for c in (*t.text, t.label) if c not in names]:
            raise DataError(f"{where} line 1: header lacks column {lost[0]!r} (has {', '.join(names)})")
        first = 2
    texts, label = [names.index(c) for c in t.text], names.index(t.label)
    examples, bad = [], []
    for n, raw in enumerate(lines[first - 1:], first):
        try:
            row = _fields(raw)
            if len(row) != len(names):
                raise DataError(f"expected {len(names)} columns, got {len(row)}" + (cut if n == len(lines) else ""))
            y = row[label].strip()
            if not y:
                raise DataError(f"missing label ({t.label})")
            if t.regression:  # STS-B: a similarity score
                try:
                    y = float(y)
                except ValueError:
                    y = math.nan
                if not 0.0 <= y <= 5.0:  # also false for nan
                    raise DataError(f"score {row[label].strip()[:20]!r} is not a number in [0, 5]")
            elif y in t.classes:
                y = t.classes.index(y)
            else:
                raise DataError(f"label {y[:20]!r} is not one of {', '.join(t.classes)}")
            # strip: SST-2's sentences end in a space, which would put a lone whitespace token before the eot
            xs = [row[i].strip() for i in texts]
            for i, x in zip(texts, xs):
                if not x:
                    raise DataError(f"empty {names[i]}")
            examples.append(Example(xs[0], xs[1] if len(xs) > 1 else None, y))
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{where} line {n}: {e}") from None
            bad.append(f"line {n}: {e}")
    if bad:
        print(f"{where}: skipped {len(bad)} malformed lines (first: {bad[0]})")
    if not examples:
        raise DataError(f"{where}: no examples")
    return examples


def ensure_glue(task: str, data_dir=None, split_names=None) -> Path:
    """Make sure data_dir/FOLDER holds the task's train and eval files (or split_names); when some are missing,
    download the task's zip from the official GLUE URLs. Returns the task folder. Files appear atomically."""
    t, data_dir = TASKS[task], Path(data_dir or DEFAULT_DATA_DIR)
    missing = [p for s in (split_names or ("train", *t.evals)) if not (p := split_path(task, data_dir, s)).is_file()]
    if not missing:
        return data_dir / t.folder
    what = f"GLUE {t.folder} is missing {', '.join(str(p) for p in missing)}"
    if t.zip is None:
        raise DataError(f"{what}; MRPC is built from Microsoft's MSR files and is not downloaded here: run the "
                        f"GLUE download script (download_glue_data.py --tasks MRPC) and {HOW}")
    tmp = None
    try:
        from tqdm import tqdm
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=data_dir))  # same filesystem: os.replace is atomic
        with urllib.request.urlopen(GLUE_URL + t.zip, timeout=30) as r, open(tmp / t.zip, "wb") as f:
            with tqdm(total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                      desc=t.zip) as bar:
                while chunk := r.read(1 << 20):
                    bar.update(f.write(chunk))
        zipfile.ZipFile(tmp / t.zip).extractall(tmp)
        # the zip's own folder name varies (QNLIv2.zip holds QNLI/): take the shallowest match
        found = {p: min(tmp.rglob(p.name), key=lambda q: len(q.parts), default=None) for p in missing}
        if lost := [p.name for p, src in found.items() if src is None]:  # all or none: no half-filled folder
            raise ValueError(f"the zip holds no {', '.join(lost)}")
        for p, src in found.items():
            p.parent.mkdir(exist_ok=True)
            os.replace(src, p)
    except (OSError, ValueError, zipfile.BadZipFile, http.client.HTTPException) as e:  # HTTPException: cut short
        raise DataError(f"{what} and downloading {GLUE_URL + t.zip} failed ({e}); {HOW}".replace("\n", " ")) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return data_dir / t.folder


# ----------------------------------------------------------------------------------------------------------- metrics

def _np(x) -> np.ndarray:
    return (x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)).ravel()


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    d = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / d if d > 0 else 0.0  # a constant prediction has no correlation: report 0, not nan


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as scipy.stats.rankdata), for Spearman."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]                 # (N,) True where a run of equal values starts
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(x)]                     # one past each run
    r = np.empty(len(x))
    r[order] = ((starts + ends + 1) / 2)[np.cumsum(new) - 1]  # average of ranks starts+1 .. ends
    return r


def compute_metrics(task: str, preds, labels) -> dict:
    """GLUE's official metrics. preds: class ids (or STS-B scores), labels: the true ones; lists, arrays or
    tensors. Returns the task's metrics (TASKS[task].metrics) as floats, accuracy included for classification."""
    p, y = _np(preds), _np(labels)
    if TASKS[task].regression:
        if not np.isfinite(p).all():  # a diverged model: no correlation to report (ranks would give nan an order)
            return {"pearson": math.nan, "spearman": math.nan}
        return {"pearson": _pearson(p, y), "spearman": _pearson(_ranks(p), _ranks(y))}
    out = {"accuracy": float(np.mean(p == y)) if len(y) else 0.0}
    tp, tn = float(np.sum((p == 1) & (y == 1))), float(np.sum((p == 0) & (y == 0)))
    fp, fn = float(np.sum((p == 1) & (y == 0))), float(np.sum((p == 0) & (y == 1)))
    if "f1" in TASKS[task].metrics:  # F1 of the positive class (1 = paraphrase / duplicate / positive)
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0
    if "mcc" in TASKS[task].metrics:  # Matthews correlation; 0 when a row or column of the confusion matrix is empty
        d = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        out["mcc"] = (tp * tn - fp * fn) / d if d > 0 else 0.0
    return {k: out[k] for k in TASKS[task].metrics}


# --------------------------------------------------------------------------------------------------------- tokenizer

# tiktoken's pattern for GPT-2 (r50k_base). SmolLM2's tokenizer.json first splits every digit off on its own
# (Digits(individual_digits=True)) and then runs this regex on each piece; in one pattern that is: a digit alone
# (instead of " ?\p{N}+"), and a whitespace run before a digit taken whole, as at the end of a piece
# (HF: "a  1" -> "a", "  ", "1", where GPT-2's regex gives "a", " ", " 1").
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
DIGITS_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++|\p{N}| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?=\p{N})|\s+(?!\S)|\s"""
TOKENIZERS = Path(__file__).resolve().parent / "tokenizers"


class Tokenizer:
    """Text -> model token ids through a tiktoken.Encoding. For a checkpoint's own BPE the tiktoken ranks are
    not the model's ids: lut[rank] is the model id (-1 for the few bytes the model has no token for)."""

    def __init__(self, enc: tiktoken.Encoding, eot: int, name: str, lut: np.ndarray | None = None):
        self.enc, self.eot, self.name, self.lut = enc, eot, name, lut
        self._lut_list = None if lut is None else lut.tolist()

    def _ids(self, ranks: list[int]) -> list[int]:
        if self.lut is None:
            return ranks
        lut = self._lut_list  # a Python list indexes faster than numpy, one token at a time
        return [i for i in (lut[r] for r in ranks) if i >= 0]  # a byte with no token is dropped, as in HF

    def encode(self, text: str) -> list[int]:
        return self._ids(self.enc.encode_ordinary(text))  # ordinary: "<|endoftext|>" in data is just text

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]  # a plain loop: faster than tiktoken's thread pool here

    def decode(self, ids: list[int]) -> str:
        if self.lut is not None:
            inv = np.zeros(int(self.lut.max()) + 1, dtype=np.int64)
            inv[self.lut[self.lut >= 0]] = np.flatnonzero(self.lut >= 0)  # model id -> tiktoken rank
            ids = inv[np.asarray(ids, dtype=np.int64)].tolist()
        return self.enc.decode(ids)


def _gpt2() -> Tokenizer:
    # the ranks ship in the repo (tokenizers/README.md). Parsed here rather than with tiktoken's
    # load_tiktoken_bpe, which copies the file into TIKTOKEN_CACHE_DIR and fails when that folder is read-only.
    lines = (TOKENIZERS / "gpt2.tiktoken").read_bytes().splitlines()
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in lines if line)}
    enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    return Tokenizer(enc, eot=50256, name="gpt2")


def _byte_of() -> dict[str, int]:
    """GPT-2's bytes-to-unicode map, inverted: a byte-level BPE token string -> its bytes, char by char."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # the other bytes (controls, space, ...) map to chr(256), chr(257), ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _bpe(name: str, tokens: list[str], merges: list[str], special: list[int], pat: str, eos=None) -> Tokenizer:
    """A byte-level BPE (tokens in id order, "a b" merges in priority order) as a tiktoken.Encoding. tiktoken
    merges by the rank of the merged bytes, so ranks follow merge order: the 256 single bytes, then merge i's
    result at rank 256 + i. Special tokens (<|endoftext|>, <|im_start|>, ...) are never merged from text.
    eot: <|endoftext|> (SmolLM2's document separator, also in its Instruct models), else the model's eos."""
    if (eot := tokens.index("<|endoftext|>") if "<|endoftext|>" in tokens else eos) is None:
        raise ValueError(f"{name}: no <|endoftext|> or end-of-sequence token")
    byte_of, model_id = _byte_of(), {t: i for i, t in enumerate(tokens)}
    char_of = {b: c for c, b in byte_of.items()}
    ranks = {bytes([b]): b for b in range(256)}
    lut = [model_id.get(char_of[b], -1) for b in range(256)]  # SmolLM2 lacks 21: 6 controls, 15 no character uses
    for m in merges:
        a, b = m.split(" ")
        if (merged := bytes(byte_of[c] for c in a + b)) not in ranks:
            ranks[merged] = len(lut)
            lut.append(model_id[a + b])
    specials = {tokens[i]: len(lut) + k for k, i in enumerate(special)}
    enc = tiktoken.Encoding(name=name, pat_str=pat, mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(enc, eot=eot, name=name, lut=np.array(lut + list(special), dtype=np.int64))


def _from_gguf(path: Path) -> Tokenizer:
    from gguf import GGUFReader
    meta = GGUFReader(path).fields
    get = lambda key: meta[key].contents() if key in meta else None  # noqa: E731
    if get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{path}: tokenizer {get('tokenizer.ggml.model')!r} is not a byte-level BPE")
    pats = {"gpt2": GPT2_PAT, "smollm": DIGITS_PAT}  # llama.cpp's pre-tokenizer names
    if (pre := get("tokenizer.ggml.pre")) not in pats:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported (only {', '.join(pats)})")
    tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
    special = [i for i, ty in enumerate(types) if ty in (3, 4)]  # 3: control, 4: user-defined (added tokens)
    return _bpe(path.name, tokens, get("tokenizer.ggml.merges"), special, pats[pre], get("tokenizer.ggml.eos_token_id"))


def _from_tokenizer_json(path: Path) -> Tokenizer:
    tj = json.loads(path.read_text(encoding="utf-8"))
    model, pre = tj["model"], tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    byte_level = steps[-1].get("type") == "ByteLevel" and steps[-1].get("use_regex", True)
    digits = [{"type": "Digits", "individual_digits": True}]
    if model.get("type") != "BPE" or tj.get("normalizer") or not byte_level or steps[:-1] not in ([], digits):
        raise ValueError(f"{path}: only byte-level BPE with ByteLevel or Digits+ByteLevel pre-tokenizers is supported")
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]  # newer files store pairs
    added = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
    for s, i in added.items():  # usually in the vocab already
        tokens += [None] * (i + 1 - len(tokens))
        tokens[i] = s
    return _bpe(path.parent.name, tokens, merges, sorted(added.values()), DIGITS_PAT if steps[:-1] else GPT2_PAT)


def get_tokenizer(init: str) -> Tokenizer:
    """The tokenizer of a backbone. init: a .gguf file or a folder with tokenizer.json (the checkpoint's own BPE);
    a gpt2* name, "scratch" or any other existing path (a GPT-2 checkpoint): GPT-2's encoding, shipped in
    tokenizers/ so it works offline; a hub name ("HuggingFaceTB/SmolLM2-135M") whose tokenizer.json model.py
    downloaded with the weights (into $DYNLORA_CACHE/NAME), or which is in the Hugging Face cache."""
    p = Path(init).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return _from_gguf(p)
    if (p / "tokenizer.json").is_file():
        return _from_tokenizer_json(p / "tokenizer.json")
    if init == "scratch" or init.split("/")[-1].startswith("gpt2"):
        return _gpt2()
    if p.exists():
        cfg = p / "config.json"
        if cfg.is_file() and json.loads(cfg.read_text()).get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"{p} is not a GPT-2 checkpoint and has no tokenizer.json")
        return _gpt2()
    fetched = cache_dir() / init / "tokenizer.json"  # read now, as model.py does: the variable may have changed
    if fetched.is_file():
        return _from_tokenizer_json(fetched)
    try:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(init, "tokenizer.json")
    except Exception:  # not installed, or not a valid repo name
        hit = None
    if isinstance(hit, str):
        return _from_tokenizer_json(Path(hit))
    raise ValueError(f"no tokenizer for {init!r}: give gpt2*, scratch, a .gguf file or a folder with tokenizer.json")


# ---------------------------------------------------------------------------------------------- encoding, batching

@dataclass
class Encoded:
    ids: list[np.ndarray]   # N sequences of model token ids (int64), each ending in eot, at most max_len long
    lengths: np.ndarray     # (N,) int64 real tokens per sequence
    labels: torch.Tensor    # (N,) int64 class ids, or float32 scores (STS-B)
    n_truncated: int        # how many examples lost tokens to max_len (train.py reports it)
    max_len: int

    def __len__(self) -> int:
        return len(self.ids)


def fit_lengths(la: int, lb: int, budget: int) -> tuple[int, int]:
    """Lengths of text_a, text_b after trimming the longer one by one token from its end (text_b on a tie, as
    HF's "longest_first") until la + lb <= budget. Closed form of that loop (tests check it against the loop)."""
    if la + lb <= budget:
        return la, lb
    half = budget // 2
    if lb <= half:  # text_b fits in half the budget: only text_a is trimmed (single sentences: lb = 0)
        return budget - lb, lb
    if la <= half:
        return la, budget - la
    return budget - half, half  # both were longer than half: text_a keeps the odd token


def hold_out(train: list[Example], n: int) -> tuple[list[Example], list[Example]]:
    """Set n training examples aside, to choose settings on without looking at the dev split (GLUE's test labels
    are private, so dev is the report). The draw is fixed (seed 0): every run, whatever its --seed or method,
    holds out the same examples. Returns (the rest, in their file order; the held-out ones)."""
    if not 0 < n < len(train):
        raise DataError(f"--holdout {n}: must lie between 1 and {len(train) - 1}, the training examples less one")
    held = set(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n].tolist())
    return [e for i, e in enumerate(train) if i not in held], [e for i, e in enumerate(train) if i in held]


def load_task(task: str, data_dir, holdout: int = 0, eval_only: bool = False) -> tuple[list[Example], dict]:
    """A run's examples, fetched first when missing: (train, {split: examples} to score), the split being dev and,
    with holdout > 0, "holdout" first. eval_only: no training examples (read only to hold out the same ones)."""
    need_train = not eval_only or holdout
    ensure_glue(task, data_dir, None if need_train else splits(task))
    train = load_split(task, data_dir, "train") if need_train else []
    scored = {s: load_split(task, data_dir, s) for s in splits(task)}
    if holdout:  # scored after training, like dev
        train, held = hold_out(train, holdout)
        scored = {"holdout": held, **scored}
    return ([] if eval_only else train), scored


def encode_split(examples: list[Example], tok: Tokenizer, max_len: int) -> Encoded:
    """Examples -> enc(a) + [eot] (+ enc(b) + [eot]), at most max_len tokens; truncation (fit_lengths) never
    drops an eot, so the classifier always reads the hidden state of the final eot."""
    a = tok.encode_batch([e.text_a for e in examples])
    b = tok.encode_batch([e.text_b or "" for e in examples])  # "" -> [] for single sentences
    ids, n_truncated = [], 0
    for e, x, y in zip(examples, a, b):
        pair = e.text_b is not None
        assert max_len >= 2 + 2 * pair, "max_len must leave room for a token of each text and its eot"
        la, lb = fit_lengths(len(x), len(y), max_len - 1 - pair)
        n_truncated += (la, lb) != (len(x), len(y))
        ids.append(np.array(x[:la] + [tok.eot] + (y[:lb] + [tok.eot] if pair else []), dtype=np.int64))
    float_labels = any(isinstance(e.label, float) for e in examples)
    labels = torch.tensor([e.label for e in examples], dtype=torch.float32 if float_labels else torch.int64)
    return Encoded(ids, np.array([len(s) for s in ids], dtype=np.int64), labels, n_truncated, max_len)


def buckets(max_len: int) -> list[int]:
    """Padded lengths a batch may have: 16, 32, then powers of two and the points half-way up to the next (48,
    64, 96, 128, ...) below max_len, then max_len itself. A batch is padded to the smallest that holds its
    longest row, so a compiled model sees only these few shapes. The half-way points matter on short texts: of
    SST-2's batches of 32, four in five have a longest row of 33 to 64 tokens, most of them at most 48."""
    sizes = [16] + [s for k in range(5, max_len.bit_length()) for s in (1 << k, 3 << (k - 1))]
    return [s for s in sizes if s < max_len] + [max_len]


class Batch(NamedTuple):
    idx: torch.Tensor      # (B, T) int64 token ids, right-padded with PAD_ID; T in buckets(max_len)
    lengths: torch.Tensor  # (B,) int64 real tokens; the classifier reads position lengths - 1 (the final eot)
    labels: torch.Tensor   # (B,) int64 or float32; 0 on dummy rows
    valid: int             # the first `valid` rows are examples, the rest dummy rows: score preds[:valid]


def num_batches(n: int, batch_size: int, drop_last: bool, world_size: int = 1) -> int:
    """Batches per rank per epoch for n examples (see iterate_batches)."""
    g = batch_size * world_size
    return n // g if drop_last else -(-n // g)


def group_by_length(order: torch.Tensor, lengths: np.ndarray, g: int, window: int, gen: torch.Generator):
    """Rows of similar length in one batch, so less padding: sort each run of `window` global batches (window * g
    rows) of a random `order`, longest first, cut it into global batches of g, then shuffle those batches. Which
    rows meet in a batch is no longer random, so check accuracy before relying on it. After Hugging Face's
    group_by_length (megabatches of 50 batches, sorted within), which keeps the megabatches' order instead."""
    full = len(order) // g * g  # the remainder stays last, unsorted: the rows a dropped last batch loses are random
    order, rest = order[:full], order[full:]
    order = torch.cat([c[np.argsort(-lengths[c.numpy()], kind="stable")] for c in order.split(window * g)])
    return torch.cat([order.view(-1, g)[torch.randperm(full // g, generator=gen)].flatten(), rest])


def iterate_batches(enc: Encoded, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                    drop_last: bool | None = None, start: int = 0, rank: int = 0, world_size: int = 1,
                    group: int = 0):
    """Yield Batches of exactly batch_size rows, on the CPU.

    shuffle=True (training): the order is torch.randperm seeded with seed + 1_000_003 * epoch (one order per
    (seed, epoch) pair), the same on every rank and every run, so a resumed run skips `start` batches and
    continues the same order.
    shuffle=False (evaluation): every example once, in file order. group > 0 (training only): windows of that many
    global batches are sorted by length before batching (group_by_length); 0: not sorted.
    A global batch is batch_size * world_size consecutive examples of that order; rank r takes rows
    [r * batch_size, (r + 1) * batch_size), padded to the bucket of the global batch's longest row, so that
    every rank has the same shape (under torchrun each replays the recorded step of that shape, whose
    all-reduce must be the same one on every rank). A last partial global batch is dropped (drop_last, the default when
    shuffling) or filled at its end with dummy rows (the default for evaluation, so every example is scored
    once), so every batch has one fixed size and every rank yields the same number of batches."""
    drop_last = shuffle if drop_last is None else drop_last
    n, g = len(enc), batch_size * world_size
    nb = num_batches(n, batch_size, drop_last, world_size)
    gen = torch.Generator().manual_seed(seed + 1_000_003 * epoch)  # seed + epoch would give seed 1 seed 0's epoch 1
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    if shuffle and group:
        order = group_by_length(order, enc.lengths, g, group, gen)
    order = torch.cat([order, torch.full((max(nb * g - n, 0),), -1)])[: nb * g]  # -1: a dummy row
    sizes = buckets(enc.max_len)
    for i in range(start, nb):
        glob = order[i * g: (i + 1) * g]  # (g,) the global batch
        rows = glob[rank * batch_size: (rank + 1) * batch_size]  # (B,)
        valid = int((rows >= 0).sum())  # dummy rows (-1) only ever follow the real ones
        lengths = torch.ones(batch_size, dtype=torch.int64)  # a dummy row is one pad token
        lengths[:valid] = torch.from_numpy(enc.lengths[rows[:valid].numpy()])
        T = next(s for s in sizes if s >= enc.lengths[glob[glob >= 0].numpy()].max(initial=1))
        idx = torch.full((batch_size, T), PAD_ID, dtype=torch.int64)
        for j, r in enumerate(rows[:valid].tolist()):
            idx[j, : lengths[j]] = torch.from_numpy(enc.ids[r])
        labels = torch.zeros(batch_size, dtype=enc.labels.dtype)  # dummy rows get label 0
        labels[:valid] = enc.labels[rows[:valid]]
        yield Batch(idx, lengths, labels, valid)


def train_batches(enc: Encoded, batch_size: int, seed: int, steps_per_epoch: int, grad_accum: int = 1, step: int = 0,
                  rank: int = 0, world_size: int = 1, group: int = 0):
    """Training micro-batches from optimizer step `step` on, epoch after epoch, without end. Step s starts at
    micro-batch s * grad_accum of the order of (seed, epoch), so a resumed run reads what the uninterrupted one
    would have; each epoch stops after steps_per_epoch * grad_accum of them."""
    per_epoch = steps_per_epoch * grad_accum
    epoch, start = divmod(step * grad_accum, per_epoch)
    while True:
        yield from islice(iterate_batches(enc, batch_size, shuffle=True, seed=seed, epoch=epoch, start=start,
                                          rank=rank, world_size=world_size, group=group), per_epoch - start)
        epoch, start = epoch + 1, 0
