"""data.py: GLUE parsing (real files and hostile ones), download, metrics, tokenizers against references, batches."""
import functools
import io
import math
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared"
HARD = [  # strings where tokenizers disagree when a detail is wrong
    "12345", "3.14159", "in 2024,", "1,000,000 and 7th", "a  b", "a   1", "a 1", "a \n 1", "   1", "\n\n\t x",
    "trailing spaces   ", " leading", "tab\tand\r\nnewline", "I ❤️ 🤖 🇫🇷", "你好，世界！这是一个测试。",
    "مرحبا بالعالم ٣٤٥", "Привет, мир! Россия", "नमस्ते दुनिया", "日本語のテキスト、カタカナ ー",
    "don't, I'll, she's, we've, they're, I'd, I'm", "DON'T I'LL 'S", "MiXeD CaSe wOrDs",
    "https://example.com/a/b?q=1&x=2#frag", "nbsp\u00a01 ideographic\u3000space", "² ½ Ⅻ", "a\x04b !\x04!",
]


# ------------------------------------------------------------------------------------------------ real GLUE files

COUNTS = {("sst2", "train"): 67_349, ("sst2", "dev"): 872, ("cola", "dev"): 1_043, ("mrpc", "dev"): 408,
          ("stsb", "dev"): 1_500, ("rte", "dev"): 277, ("wnli", "dev"): 71, ("qnli", "dev"): 5_463}


def raw_rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8-sig").split("\n") if line]


@pytest.mark.parametrize("task,split", sorted(COUNTS))
def test_real_glue_counts_and_ends(glue_dir, task, split):
    ex = data.load_split(task, glue_dir, split)
    assert len(ex) == COUNTS[task, split]
    rows = raw_rows(data.split_path(task, glue_dir, split))
    t = data.TASKS[task]
    names = t.columns or rows.pop(0)
    for e, row in ((ex[0], rows[0]), (ex[-1], rows[-1])):  # first and last example against the raw file
        assert e.text_a == row[names.index(t.text[0])].strip()
        assert e.text_b == (row[names.index(t.text[1])].strip() if len(t.text) > 1 else None)
        y = row[names.index(t.label)]
        assert e.label == (float(y) if t.classes is None else t.classes.index(y))


def test_real_glue_all_available_splits_parse(glue_dir):
    for task in data.TASKS:
        for split in ("train", *data.splits(task)):
            if data.split_path(task, glue_dir, split).exists():
                ex = data.load_split(task, glue_dir, split)
                assert all(e.text_a and (e.text_b is None) == (len(data.TASKS[task].text) == 1) for e in ex)
    assert data.splits("mnli") == ("dev_matched", "dev_mismatched") and data.splits("rte") == ("dev",)
    assert data.load_split("stsb", glue_dir, "dev")[1] == data.Example(
        "A young child is riding a horse.", "A child is riding a horse.", 4.75)
    assert data.load_split("cola", glue_dir, "dev")[0].label == 1  # CoLA: no header, label in column 2


# ------------------------------------------------------------------------------- synthetic files, real layouts

def write(root: Path, folder: str, name: str, text, encoding="utf-8") -> Path:
    (root / folder).mkdir(parents=True, exist_ok=True)
    p = root / folder / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode(encoding))
    return p


def test_qqp_mnli_qnli_layouts(tmp_path):
    write(tmp_path, "QQP", "train.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
          "1\t11\t12\tHow do I learn \"Python\"?\tWhat is the best way to learn Python?\t1\n"
          "2\t13\t14\tWhy is the sky blue?\tWhat's 2+2?\t0\n")
    assert data.load_split("qqp", tmp_path, "train") == [
        data.Example('How do I learn "Python"?', "What is the best way to learn Python?", 1),
        data.Example("Why is the sky blue?", "What's 2+2?", 0)]
    parse = ["( ( The cat ) sat )", "( ( A cat ) ( is sitting ) )", "(ROOT (S ...))", "(ROOT (S ...))"]
    head = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t" \
           "sentence2_parse\tsentence1\tsentence2\tlabel1"
    write(tmp_path, "MNLI", "train.tsv", head + "\tgold_label\n" + "\t".join(
        ["0", "31193", "31193n", "government", *parse, "The cat sat.", "A cat is sitting.", "entailment",
         "entailment"]) + "\n")
    for name, gold in (("dev_matched.tsv", "contradiction"), ("dev_mismatched.tsv", "neutral")):
        write(tmp_path, "MNLI", name, head + "\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n" + "\t".join(
            ["0", "63735", "63735n", "slate", *parse, "The cat sat.", "No cat sat.", *[gold] * 5, gold]) + "\n")
    assert data.load_split("mnli", tmp_path, "train") == [data.Example("The cat sat.", "A cat is sitting.", 0)]
    assert data.load_split("mnli", tmp_path, "dev_matched")[0].label == 2
    assert data.load_split("mnli", tmp_path, "dev_mismatched")[0] == data.Example("The cat sat.", "No cat sat.", 1)
    write(tmp_path, "QNLI", "train.tsv", "index\tquestion\tsentence\tlabel\n"
          "0\tWhen did it rain?\tIt rained in 1999.\tentailment\n1\tWho?\tNobody knows.\tnot_entailment\n")
    assert [e.label for e in data.load_split("qnli", tmp_path, "train")] == [0, 1]


# ---------------------------------------------------------------------------------------------- hostile files

SST = "sentence\tlabel\n"


@pytest.mark.parametrize("task,folder,body,line,says", [
    ("sst2", "SST-2", SST + "good film\t1\nbad\tfilm\t0\n", 3, "expected 2 columns, got 3"),
    ("sst2", "SST-2", SST + "good film\t1\nbad film\t\n", 3, "missing label"),
    ("sst2", "SST-2", SST + "good film\t1\nok film\t1\nbad film\t2\n", 4, "label '2' is not one of 0, 1"),
    ("sst2", "SST-2", SST + "good film\t1\n  \t0\n", 3, "empty sentence"),
    ("sst2", "SST-2", SST + "good film\t1\nbad fi", 3, "expected 2 columns, got 1 (the file ends without a newline"),
    ("sst2", "SST-2", SST + "good film\t1\n\nbad film\t0\n", 3, "expected 2 columns, got 0"),
    ("sst2", "SST-2", SST + "a\rb\t1\n", 2, "new-line character"),
    ("sst2", "SST-2", "text\tlabel\ngood\t1\n", 1, "header lacks column 'sentence'"),
    ("cola", "CoLA", "gj04\t1\t\tGood.\ngj04\t1\tBad.\n", 2, "expected 4 columns, got 3"),
    ("cola", "CoLA", "gj04\t1\t\tGood.\ngj04\tx\t*\tBad.\n", 2, "label 'x' is not one of 0, 1"),
    ("rte", "RTE", "index\tsentence1\tsentence2\tlabel\n0\tA.\t\tentailment\n", 2, "empty sentence2"),
    ("rte", "RTE", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tneutral\n", 2, "is not one of entailment"),
])
def test_malformed_line_names_file_and_line(tmp_path, task, folder, body, line, says):
    path = write(tmp_path, folder, "train.tsv", body)
    with pytest.raises(DataError) as e:
        data.load_split(task, tmp_path, "train")
    assert f"{folder}/train.tsv line {line}: " in str(e.value) and says in str(e.value), str(e.value)
    assert "\n" not in str(e.value) and path.exists()


@pytest.mark.parametrize("score", ["abc", "nan", "7.5", "-1", ""])
def test_bad_stsb_score(tmp_path, score):
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    ok = "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane.\tAn air plane.\t5.000\n"
    write(tmp_path, "STS-B", "dev.tsv", head + ok + ok.replace("5.000", score))
    with pytest.raises(DataError, match=r"STS-B/dev.tsv line 3: (score|missing label)"):
        data.load_split("stsb", tmp_path, "dev")


def test_non_utf8_and_bom_and_crlf(tmp_path):
    write(tmp_path, "SST-2", "train.tsv", (SST + "good\t1\nbad\t0\n").encode() + b"caf\xe9\t1\n")
    with pytest.raises(DataError, match=r"SST-2/train.tsv line 4: not valid UTF-8"):
        data.load_split("sst2", tmp_path, "train")
    # a BOM, CRLF, a bare quote, and blank lines after the last row (an editor's)
    write(tmp_path, "SST-2", "train.tsv", "\ufeffsentence\tlabel\r\ngood \" film\t1\r\n\r\n\n")
    assert data.load_split("sst2", tmp_path, "train") == [data.Example('good " film', None, 1)]


def test_missing_file_says_how_to_supply(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_split("rte", tmp_path, "dev")
    assert str(tmp_path / "RTE" / "dev.tsv") in str(e.value) and "--data-dir" in str(e.value)


def test_skip_bad_keeps_labels_with_their_sentences(tmp_path, capsys):
    write(tmp_path, "SST-2", "train.tsv", SST + "one\t1\ntwo\t0\textra\nthree\t0\nfour\t\nfive\t1\n")
    ex = data.load_split("sst2", tmp_path, "train", skip_bad=True)
    assert ex == [data.Example("one", None, 1), data.Example("three", None, 0), data.Example("five", None, 1)]
    assert "skipped 2 malformed lines (first: line 3" in capsys.readouterr().out


def test_megabyte_line_is_long_text_truncated(tmp_path):
    big = " ".join(f"word{i % 97}" for i in range(150_000))  # ~1 MB on one line
    assert len(big) > 1_000_000
    write(tmp_path, "RTE", "train.tsv", f"index\tsentence1\tsentence2\tlabel\n0\t{big}\tshort one.\tentailment\n"
                                        "1\tA.\tB.\tnot_entailment\n")
    ex = data.load_split("rte", tmp_path, "train")
    assert ex[0].text_a == big and [e.label for e in ex] == [0, 1]
    tok = data.get_tokenizer("gpt2")
    enc = data.encode_split(ex, tok, max_len=64)
    assert enc.n_truncated == 1 and enc.lengths.tolist() == [64, 6]  # "A." + eot + "B." + eot
    b = tok.encode("short one.")
    assert enc.ids[0].tolist() == tok.encode(big)[: 64 - 2 - len(b)] + [tok.eot] + b + [tok.eot]


# ------------------------------------------------------------------------------------------------------ download

class FakeResponse(io.BytesIO):
    headers = {}


def fake_zip(folder: str, files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(f"{folder}/{name}", text)
    return buf.getvalue()


def test_ensure_glue_offline_error_and_no_network_when_present(tmp_path, monkeypatch, glue_dir):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    assert data.ensure_glue("sst2", glue_dir) == glue_dir / "SST-2"  # present: never touches the network
    with pytest.raises(DataError) as e:
        data.ensure_glue("rte", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "RTE" / "train.tsv") in msg and "--data-dir" in msg
    assert "RTE.zip" in msg and not list(tmp_path.rglob("*.tsv")) and not list(tmp_path.glob(".download-*"))
    with pytest.raises(DataError, match="MRPC"):
        data.ensure_glue("mrpc", tmp_path)


def test_ensure_glue_downloads_missing_files(tmp_path, monkeypatch):
    write(tmp_path, "QNLI", "dev.tsv", "kept")  # present files are left alone
    body = fake_zip("QNLIv2", {"train.tsv": "downloaded", "dev.tsv": "other", "test.tsv": "t"})
    urls = []
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, **k: urls.append(url) or FakeResponse(body))
    assert data.ensure_glue("qnli", tmp_path) == tmp_path / "QNLI"
    assert urls == ["https://dl.fbaipublicfiles.com/glue/data/QNLIv2.zip"]
    assert (tmp_path / "QNLI/train.tsv").read_text() == "downloaded"
    assert (tmp_path / "QNLI/dev.tsv").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["QNLI"]  # the temporary folder is gone
    body = fake_zip("RTE", {"train.tsv": "downloaded"})  # a zip without dev.tsv: nothing is moved in
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, **k: FakeResponse(body))
    with pytest.raises(DataError, match="the zip holds no dev.tsv"):
        data.ensure_glue("rte", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["QNLI"]


# ------------------------------------------------------------------------------------------------------- metrics

def test_metrics_hand_computed():
    p, y = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # tp 2, fp 1, fn 1, tn 1
    assert data.compute_metrics("sst2", p, y) == {"accuracy": 0.6, "f1": 2 / 3}  # 2tp / (2tp + fp + fn) = 4 / 6
    assert data.compute_metrics("mrpc", p, y) == pytest.approx({"f1": 2 / 3, "accuracy": 0.6})
    assert data.compute_metrics("cola", torch.tensor(p), np.array(y)) == pytest.approx(
        {"mcc": (2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2), "accuracy": 0.6})
    assert data.compute_metrics("cola", [1, 1, 1], [1, 0, 1])["mcc"] == 0.0  # a constant prediction
    assert data.compute_metrics("mnli", [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": 0.75}
    # STS-B; Spearman with ties: ranks x = 1, 2.5, 2.5, 4 and y = 1, 3, 2, 4 -> 4.5 / sqrt(4.5 * 5)
    m = data.compute_metrics("stsb", [1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0])
    assert m["spearman"] == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert m["pearson"] == pytest.approx(np.corrcoef([1, 2, 2, 3], [1, 3, 2, 4])[0, 1])
    assert data.compute_metrics("stsb", [1, 2, 3], [2, 4, 6]) == pytest.approx({"pearson": 1.0, "spearman": 1.0})
    diverged = data.compute_metrics("stsb", [math.nan] * 3, [2, 4, 6])  # ranks would order nan: Spearman 1.0
    assert math.isnan(diverged["pearson"]) and math.isnan(diverged["spearman"])


def test_metrics_against_scipy_sklearn():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, 500).astype(float), rng.normal(size=500)
    y = np.round(x + y, 1)  # plenty of ties in both
    stats = pytest.importorskip("scipy.stats")
    m = data.compute_metrics("stsb", x, y)
    assert m["pearson"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert m["spearman"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert np.array_equal(data._ranks(y), stats.rankdata(y))
    p, t = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    metrics = pytest.importorskip("sklearn.metrics")
    assert data.compute_metrics("cola", p, t)["mcc"] == pytest.approx(metrics.matthews_corrcoef(t, p))
    assert data.compute_metrics("qqp", p, t)["f1"] == pytest.approx(metrics.f1_score(t, p))


# ---------------------------------------------------------------------------------------------------- tokenizers

def sentences(glue_dir) -> list[str]:
    ex = data.load_split("sst2", glue_dir, "dev") + data.load_split("cola", glue_dir, "dev")
    return [e.text_a for e in ex]


def test_gpt2_matches_tiktoken(glue_dir, monkeypatch):
    if not (SHARED / "tiktoken-cache").is_dir():
        pytest.skip("no offline tiktoken cache")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))
    import tiktoken
    ref, tok = tiktoken.get_encoding("gpt2"), data.get_tokenizer("gpt2")
    assert (tok.eot, tok.name, tok.enc.n_vocab) == (50256, "gpt2", 50257)
    texts = sentences(glue_dir) + HARD + ["<|endoftext|> is plain text here"]
    assert tok.encode_batch(texts) == [ref.encode_ordinary(s) for s in texts]
    assert tok.decode(tok.encode(HARD[14])) == HARD[14]
    for init in ("scratch", "gpt2-medium", "openai-community/gpt2"):
        assert data.get_tokenizer(init).name == "gpt2"


@functools.lru_cache
def smollm2(path: Path):
    """Ours from the GGUF, and the reference: a Hugging Face `tokenizers` BPE from the same vocab and merges with
    SmolLM2's tokenizer.json pre-tokenizer. (transformers' GGUF loader drops the Digits step: "a  1" differs.)"""
    import gguf
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    reader = gguf.GGUFReader(path)
    with pytest.MonkeyPatch.context() as mp:  # parsing the GGUF takes seconds: once, for both sides
        mp.setattr(gguf, "GGUFReader", lambda p: reader)
        ours = data.get_tokenizer(str(path))
    meta = reader.fields
    tokens, merges = meta["tokenizer.ggml.tokens"].contents(), meta["tokenizer.ggml.merges"].contents()
    ref = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ref.add_special_tokens([AddedToken(t, special=True) for t, ty in
                            zip(tokens, meta["tokenizer.ggml.token_type"].contents()) if ty == 3])
    return ours, ref, tokens


def test_smollm2_gguf_matches_hf(gguf_path, glue_dir):
    tok, ref, tokens = smollm2(gguf_path)
    texts = sentences(glue_dir) + HARD
    ours, theirs = tok.encode_batch(texts), [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]
    bad = [(s, a, b) for s, a, b in zip(texts, ours, theirs) if a != b]
    assert not bad, bad[:3]
    assert tok.eot == 0 and tokens[0] == "<|endoftext|>"
    assert tok.encode("hello world") == [28120, 905]  # as transformers' AutoTokenizer(gguf_file=...) gives
    assert [tokens[i] for i in tok.encode("a  1 in 2024")] == ["a", "ĠĠ", "1", "Ġin", "Ġ", "2", "0", "2", "4"]
    assert tokens[1] == "<|im_start|>" and 1 not in tok.encode("<|im_start|>user")  # data text is never special
    assert tok.decode(tok.encode(HARD[15])) == HARD[15]


def test_smollm2_tokenizer_json_matches(gguf_path, glue_dir, tmp_path, monkeypatch):
    tok, ref, tokens = smollm2(gguf_path)
    ref.save(str(tmp_path / "tokenizer.json"))  # a SmolLM2-style HF folder
    from_json = data.get_tokenizer(str(tmp_path))
    texts = sentences(glue_dir)[:300] + HARD
    assert from_json.encode_batch(texts) == tok.encode_batch(texts) and from_json.eot == 0
    # a hub name: model.py downloads tokenizer.json beside the weights, into $DYNLORA_CACHE/NAME
    monkeypatch.setenv("DYNLORA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "HuggingFaceTB" / "SmolLM2-135M").mkdir(parents=True)
    ref.save(str(tmp_path / "cache" / "HuggingFaceTB" / "SmolLM2-135M" / "tokenizer.json"))
    assert data.get_tokenizer("HuggingFaceTB/SmolLM2-135M").encode_batch(texts) == tok.encode_batch(texts)


# ------------------------------------------------------------------------------------------- encoding, batches

def test_fit_lengths_is_the_one_token_at_a_time_loop():
    for budget in range(2, 14):
        for la in range(0, 16):
            for lb in range(0, 16):
                a, b = la, lb
                while a + b > budget:  # trim the longer text by one token; text_b on a tie
                    a, b = (a - 1, b) if a > b else (a, b - 1)
                assert data.fit_lengths(la, lb, budget) == (a, b)


def toy(n: int, task="rte", seed=0) -> list[data.Example]:
    rng = np.random.default_rng(seed)
    words = lambda k: " ".join(f"w{i}" for i in rng.integers(0, 50, k))  # noqa: E731
    if task == "stsb":
        return [data.Example(words(3), words(2), float(i % 6)) for i in range(n)]
    return [data.Example(words(int(rng.integers(1, 60))), words(int(rng.integers(1, 30))), i % 2) for i in range(n)]


def test_encode_split_joins_and_truncates():
    tok = data.get_tokenizer("gpt2")
    ex = toy(50)
    enc = data.encode_split(ex, tok, max_len=32)
    for e, ids in zip(ex, enc.ids):
        a, b = tok.encode(e.text_a), tok.encode(e.text_b)
        la, lb = data.fit_lengths(len(a), len(b), 30)
        assert ids.tolist() == a[:la] + [tok.eot] + b[:lb] + [tok.eot] and len(ids) <= 32
    assert enc.n_truncated == sum(len(tok.encode(e.text_a)) + len(tok.encode(e.text_b)) > 30 for e in ex) > 0
    assert enc.labels.dtype == torch.int64 and enc.lengths.tolist() == [len(s) for s in enc.ids]
    single = data.encode_split([data.Example("hello there", None, 1)], tok, max_len=32)
    assert single.ids[0].tolist() == tok.encode("hello there") + [tok.eot] and single.n_truncated == 0
    assert data.encode_split(toy(4, "stsb"), tok, 32).labels.dtype == torch.float32


def test_buckets():
    assert data.buckets(128) == [16, 32, 48, 64, 96, 128]
    assert data.buckets(100) == [16, 32, 48, 64, 96, 100]
    assert data.buckets(256) == [16, 32, 48, 64, 96, 128, 192, 256]
    assert data.buckets(16) == [16] and data.buckets(8) == [8]


def expected_rows(n, batch_size, shuffle, seed=0, epoch=0, rank=0, world_size=1, drop_last=None):
    """The documented order: randperm(seed + 1_000_003 epoch) or file order, rank r's slice of each global batch."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1_000_003 * epoch)) if shuffle else torch.arange(n)
    g, nb = batch_size * world_size, data.num_batches(n, batch_size, shuffle if drop_last is None else drop_last,
                                                      world_size)
    return [[r for r in order[i * g:(i + 1) * g].tolist()[rank * batch_size:(rank + 1) * batch_size]]
            for i in range(nb)]


def check(batches, enc, rows_per_batch, global_rows=None):
    """Each batch holds exactly its expected examples first, padded, then dummy rows; T is the smallest bucket
    that holds the longest row of the global batch (global_rows; by default the batch itself)."""
    assert len(batches) == len(rows_per_batch)
    for b, rows, every in zip(batches, rows_per_batch, global_rows or rows_per_batch):
        B, T = b.idx.shape
        longest = max([1] + [len(enc.ids[r]) for r in every])
        assert b.valid == len(rows) and T in data.buckets(enc.max_len) and b.lengths.max() <= T
        assert T == min(s for s in data.buckets(enc.max_len) if s >= longest)
        assert b.idx.dtype == b.lengths.dtype == torch.int64 and b.labels.dtype == enc.labels.dtype
        for j, r in enumerate(rows):
            n = int(b.lengths[j])
            assert b.idx[j, :n].tolist() == enc.ids[r].tolist() and (b.idx[j, n:] == data.PAD_ID).all()
            assert b.labels[j] == enc.labels[r]
        assert (b.lengths[len(rows):] == 1).all() and (b.labels[len(rows):] == 0).all()  # dummy rows
        assert (b.idx[len(rows):] == data.PAD_ID).all()


def test_eval_batches_cover_every_example_once_with_dummies_flagged():
    enc = data.encode_split(toy(103), data.get_tokenizer("gpt2"), max_len=64)
    batches = list(data.iterate_batches(enc, 16, shuffle=False))
    assert len(batches) == 7 == data.num_batches(103, 16, drop_last=False)
    assert all(b.idx.shape[0] == 16 for b in batches) and [b.valid for b in batches] == [16] * 6 + [7]
    check(batches, enc, [list(range(i, min(i + 16, 103))) for i in range(0, 103, 16)])  # in order, each once
    assert {b.idx.shape[1] for b in batches} <= set(data.buckets(64))


def test_train_order_is_seeded_resumable_and_sharded():
    enc = data.encode_split(toy(100), data.get_tokenizer("gpt2"), max_len=64)
    run = lambda **k: list(data.iterate_batches(enc, 8, shuffle=True, seed=1, **k))  # noqa: E731
    a = run(epoch=0)
    check(a, enc, expected_rows(100, 8, True, seed=1))
    assert len(a) == 12 == data.num_batches(100, 8, drop_last=True) and all(b.valid == 8 for b in a)
    same = lambda x, y: all(torch.equal(p.idx, q.idx) for p, q in zip(x, y)) and len(x) == len(y)  # noqa: E731
    assert same(a, run(epoch=0)) and not same(a, run(epoch=1))
    other = list(data.iterate_batches(enc, 8, shuffle=True, seed=2, epoch=0))
    assert not same(run(epoch=1), other)  # seeds share no epoch's order (seed + epoch gave seed 2 seed 1's epoch 1)
    assert same(run(epoch=0, start=5), a[5:])  # a resumed run continues the same order exactly
    rows = sum(expected_rows(100, 8, True, seed=1), [])
    assert len(set(rows)) == 96 and rows != sorted(rows)  # a random order, no repeats, the remainder dropped
    every = expected_rows(100, 16, True, seed=1)  # the global batches of 2 x 8
    for r in (0, 1):  # each rank its slice of every global batch, padded alike
        check(run(rank=r, world_size=2), enc, expected_rows(100, 8, True, seed=1, rank=r, world_size=2), every)
    ids = [np.arange(n) for n in (5, 6, 50, 7)]  # rank 0 gets the two short rows, rank 1 a long one
    uneven = data.Encoded(ids, np.array([len(i) for i in ids]), torch.zeros(4, dtype=torch.long), 0, 64)
    assert [b.idx.shape for r in (0, 1) for b in data.iterate_batches(uneven, 2, False, rank=r, world_size=2)] == [
        (2, 64), (2, 64)]  # rank 0 alone would pad to 16
    for r in (0, 1):  # evaluation on 2 ranks: 100 = 3 x 32 + 4, the last global batch padded on both ranks
        ev = list(data.iterate_batches(enc, 16, shuffle=False, rank=r, world_size=2))
        check(ev, enc, expected_rows(100, 16, False, rank=r, world_size=2), expected_rows(100, 32, False))
        assert [b.valid for b in ev] == [16, 16, 16, 4 if r == 0 else 0]
    stsb = data.encode_split(toy(5, "stsb"), data.get_tokenizer("gpt2"), max_len=32)
    check(list(data.iterate_batches(stsb, 4, shuffle=False)), stsb, [[0, 1, 2, 3], [4]])


def test_group_by_length_batches_neighbours_in_length_and_stays_seeded():
    enc = data.encode_split(toy(203), data.get_tokenizer("gpt2"), max_len=128)
    run = lambda b=8, group=4, **k: list(data.iterate_batches(enc, b, True, seed=1, group=group, **k))  # noqa: E731
    a = run()
    plain = torch.randperm(203, generator=torch.Generator().manual_seed(1))  # the order before grouping
    windows = [sorted(w.tolist(), key=lambda r: -enc.lengths[r]) for w in plain[:200].split(4 * 8)]  # longest first
    cut = [w[i:i + 8] for w in windows for i in range(0, len(w), 8)]  # 4 batches a window (the last: 1)
    assert rows_of(a, enc) != cut and sorted(rows_of(a, enc)) == sorted(cut)  # those batches, shuffled
    assert len(a) == 25 == data.num_batches(203, 8, drop_last=True)  # the last 3 rows of the random order dropped
    kept = rows_of(run(group=50, drop_last=False), enc)  # all in one window: the same 3 rows, now in a last batch
    assert kept[-1] == plain[200:].tolist() and sorted(sum(kept, [])) == list(range(203))
    same = lambda x, y: all(torch.equal(p.idx, q.idx) for p, q in zip(x, y)) and len(x) == len(y)  # noqa: E731
    assert same(a, run()) and same(run(start=7), a[7:]) and not same(a, run(epoch=1))
    pad = lambda bs: sum(b.idx.shape[1] for b in bs)  # noqa: E731
    assert pad(a) < pad(list(data.iterate_batches(enc, 8, shuffle=True, seed=1)))
    every = rows_of(run(16), enc)  # 2 ranks: each its slice of the grouped global batches of 16, padded alike
    for r in (0, 1):
        check(run(rank=r, world_size=2), enc, [e[r * 8:(r + 1) * 8] for e in every], every)


def rows_of(batches, enc):
    """The example numbers in each batch, found by their ids (toy rows are distinct)."""
    where = {tuple(ids.tolist()): i for i, ids in enumerate(enc.ids)}
    return [[where[tuple(b.idx[j, :b.lengths[j]].tolist())] for j in range(b.valid)] for b in batches]


def test_hold_out_is_a_fixed_disjoint_draw():
    train = [data.Example(f"sentence {i}", None, i % 2) for i in range(100)]
    rest, held = data.hold_out(train, 10)
    assert len(rest) == 90 and len(held) == 10
    assert sorted(e.text_a for e in rest + held) == sorted(e.text_a for e in train)  # a split: nothing lost or doubled
    assert rest == [e for e in train if e not in held]  # the rest keeps the file order
    assert data.hold_out(train, 10) == (rest, held)  # the same draw every time, whatever the global seed
    torch.manual_seed(123)
    assert data.hold_out(train, 10)[1] == held
    for n in (0, 100, -1):
        with pytest.raises(data.DataError, match="--holdout"):
            data.hold_out(train, n)
