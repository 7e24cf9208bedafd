"""Calibration data: exact ids, seeded order, chat rendering, folder order, stdlib default, and every error.

The tokenizer is the fixture's: a WordLevel vocabulary of 128 entries (special tokens, single letters and digits,
punctuation, common English words) behind a Whitespace pre-tokenizer, which splits ``\\w+`` runs from
punctuation; a word not in the vocabulary becomes ``<unk>``. Expected ids are looked up in that vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from moeslim.errors import MoeslimError
from moeslim.stream import tokens as data
from moeslim.stream.tokens import CalibrationData, CalibrationDataError, load_calibration, stdlib_files

TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-qwen3-moe"
LETTERS = "abcdefgh"  # single letters are vocabulary entries, one id each


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(TOKENIZER)


def ids_of(tok: PreTrainedTokenizerBase, words: str) -> list[int]:
    """Vocabulary ids of space-separated tokens, looked up one by one (no tokenizer call)."""
    vocab = tok.get_vocab()
    return [vocab[w] for w in words.split()]


def letter_folder(root: Path, letters: str = LETTERS) -> Path:
    """One file per letter, ``a.txt`` holding ``a a a``: each document is 3 tokens plus EOS."""
    root.mkdir()
    for c in letters:
        (root / f"{c}.txt").write_text(f"{c} {c} {c}\n")
    return root


def test_exact_ids_for_a_text_file(tok, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("this is the one, zebra.\n")
    got = load_calibration(str(path), tok, samples=2, seq_len=4, seed=0)
    # Whitespace pre-tokenizer: "one," → "one" ","; "zebra." → <unk> "." ("zebra" is not in the vocabulary);
    # then EOS (</s>) closes the document. 8 ids, packed as 2 rows of 4.
    expected = ids_of(tok, "this is the one , <unk> . </s>")
    assert expected == [72, 60, 55, 83, 45, 3, 44, 2]  # the fixture vocabulary, pinned
    assert got.tokens.tolist() == [expected[:4], expected[4:]]
    assert got.tokens.dtype == torch.int64
    assert got.source == "tiny.txt: 1 of 1 files"
    seq_len_bytes = (4).to_bytes(8, "little")
    assert got.digest == hashlib.sha256(np.array(expected, dtype="<i8").tobytes() + seq_len_bytes).hexdigest()


def test_no_special_tokens_and_no_separator_without_eos(tmp_path):
    bos_no_eos = AutoTokenizer.from_pretrained(TOKENIZER)
    bos_no_eos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    bos_no_eos.eos_token = None
    assert bos_no_eos("the one")["input_ids"] == [1, 55, 83]  # by default this tokenizer would add BOS
    root = tmp_path / "docs"
    write(root / "a.txt", "the one")
    write(root / "b.txt", "of it")
    got = load_calibration(str(root), bos_no_eos, samples=1, seq_len=4, seed=0)
    assert sorted(got.tokens.flatten().tolist()) == sorted(ids_of(bos_no_eos, "the one of it"))  # no <s>, no </s>


def test_documents_follow_the_seeded_permutation_of_sorted_files(tok, tmp_path):
    root = letter_folder(tmp_path / "docs")
    got = load_calibration(str(root), tok, samples=4, seq_len=8, seed=0)  # 8 docs × 4 ids = all 32 ids
    order = np.random.default_rng(0).permutation(len(LETTERS))  # files sorted a.txt … h.txt, then shuffled
    expected = [i for k in order for i in ids_of(tok, f"{LETTERS[k]} {LETTERS[k]} {LETTERS[k]} </s>")]
    assert got.tokens.flatten().tolist() == expected
    assert got.source == "folder docs/: 8 of 8 files"


def test_same_seed_same_digest_other_seed_other_order(tok, tmp_path):
    root = letter_folder(tmp_path / "docs")
    first, again = (load_calibration(str(root), tok, samples=4, seq_len=8, seed=0) for _ in range(2))
    other = load_calibration(str(root), tok, samples=4, seq_len=8, seed=1)
    assert torch.equal(first.tokens, again.tokens) and first.digest == again.digest
    assert other.digest != first.digest
    assert sorted(other.tokens.flatten().tolist()) == sorted(first.tokens.flatten().tolist())  # same ids, reordered


def test_reads_only_the_documents_it_needs(tok, tmp_path, monkeypatch):
    root = letter_folder(tmp_path / "docs")
    got = load_calibration(str(root), tok, samples=1, seq_len=4, seed=0)  # one document gives 4 ids
    assert got.source == "folder docs/: 1 of 8 files"
    # A long document is tokenized in newline-aligned pieces, and only until enough ids are read.
    long = tmp_path / "long.txt"
    long.write_text("the of and\n" * 1000)
    whole = load_calibration(str(long), tok, samples=2, seq_len=8, seed=0)
    seen: list[str] = []
    monkeypatch.setattr(data, "CHUNK_CHARS", 30)
    monkeypatch.setattr(
        data, "encode", lambda t, text: seen.append(text) or list(t(text, add_special_tokens=False)["input_ids"])
    )
    pieced = load_calibration(str(long), tok, samples=2, seq_len=8, seed=0)
    assert torch.equal(pieced.tokens, whole.tokens)
    assert seen == ["the of and\n" * 2] * 3  # 6 ids per 22-character piece; 3 pieces reach the 16 needed


def test_chat_lines_render_through_the_template(tok, tmp_path):
    path = tmp_path / "chats.jsonl"
    chat = [{"role": "user", "content": "is it one"}, {"role": "assistant", "content": "no"}]
    path.write_text(json.dumps({"messages": chat}) + "\n")
    got = load_calibration(str(path), tok, samples=1, seq_len=9, seed=0)
    # chat_template.jinja renders "<|role|> content <|end|>\n" per message; EOS closes the document.
    expected = ids_of(tok, "<|user|> is it one <|end|> <|assistant|> no <|end|> </s>")
    assert got.tokens.tolist() == [expected]
    assert {5, 6, 7} <= set(got.tokens.flatten().tolist())  # <|user|>, <|assistant|>, <|end|>
    assert got.source.startswith("chats.jsonl (messages, chat template): 1 of 1 lines")


def test_jsonl_text_lines_and_column(tok, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "the one", "body": "a b"}\n\n{"text": "of it", "body": "c d"}\n')
    got = load_calibration(str(path), tok, samples=1, seq_len=6, seed=0)
    assert sorted(got.tokens.flatten().tolist()) == sorted(ids_of(tok, "the one </s> of it </s>"))
    assert got.source == "rows.jsonl (text): 2 of 2 lines"
    body = load_calibration(str(path), tok, samples=1, seq_len=6, seed=0, column="body")
    assert sorted(body.tokens.flatten().tolist()) == sorted(ids_of(tok, "a b </s> c d </s>"))


def test_folder_order_does_not_depend_on_the_filesystem(tok, tmp_path, monkeypatch):
    root = letter_folder(tmp_path / "docs", "abcd")
    letter_folder(root / "sub", "efgh")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02")  # binary: skipped
    (root / "latin.txt").write_bytes(b"caf\xe9 the")  # not UTF-8: skipped
    letter_folder(root / ".git", "xyz")  # hidden: not even listed
    plain = load_calibration(str(root), tok, samples=4, seq_len=8, seed=3)
    real_walk = os.walk

    def reversed_walk(top, **kwargs):
        for folder, dirs, files in real_walk(top, **kwargs):
            dirs.reverse()  # in place, so pruning still works
            yield folder, dirs, files[::-1]

    monkeypatch.setattr(os, "walk", reversed_walk)
    flipped = load_calibration(str(root), tok, samples=4, seq_len=8, seed=3)
    assert flipped.digest == plain.digest
    assert set(plain.tokens.flatten().tolist()) == set(ids_of(tok, "a b c d e f g h </s>"))
    assert plain.source == "folder docs/: 8 of 10 files"


def test_stdlib_is_the_offline_default(tok):
    got = load_calibration(None, tok, samples=2, seq_len=16, seed=0)
    assert got.tokens.shape == (2, 16) and got.tokens.dtype == torch.int64
    assert got.source.startswith(f"Python {sys.version_info.major}.{sys.version_info.minor} stdlib: ")
    files = stdlib_files()
    names = {f.name for f in files}
    assert {"json", "__init__.py"} & names and "os.py" in names
    assert not any({"site-packages", "test", "tests", "idlelib"} & set(f.parts) for f in files)
    assert load_calibration("stdlib", tok, samples=2, seq_len=16, seed=0).digest == got.digest


def test_hub_dataset_through_datasets(tok, monkeypatch):
    rows = [{"text": "the one"}, {"text": "of it"}]
    fake = types.ModuleType("datasets")

    class Rows(list):
        column_names = ["text"]

    calls: list[tuple[str, str]] = []
    fake.load_dataset = lambda spec, split: calls.append((spec, split)) or Rows(rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    got = load_calibration("org/corpus", tok, samples=1, seq_len=6, seed=0, split="validation")
    assert calls == [("org/corpus", "validation")]
    assert sorted(got.tokens.flatten().tolist()) == sorted(ids_of(tok, "the one </s> of it </s>"))
    assert got.source == "org/corpus (validation, column text): 2 of 2 rows"
    with pytest.raises(CalibrationDataError, match=r"has no column 'body' \(it has \['text'\]\); pass --column"):
        load_calibration("org/corpus", tok, samples=1, seq_len=6, seed=0, column="body")


def test_split_gives_disjoint_seeded_parts():
    whole = CalibrationData.of(torch.arange(40, dtype=torch.int64).view(10, 4), "src")
    a, b = whole.split(0.5, seed=0)
    rows_a, rows_b = ({int(r[0]) // 4 for r in part.tokens} for part in (a, b))
    assert len(rows_a) == len(rows_b) == 5 and rows_a.isdisjoint(rows_b) and rows_a | rows_b == set(range(10))
    expected_a = sorted(np.random.default_rng(0).permutation(10)[:5].tolist())
    assert sorted(rows_a) == expected_a
    assert a.digest == data.token_digest(a.tokens) and len({a.digest, b.digest, whole.digest}) == 3
    assert a.source == "src; part 1 of split(fraction=0.5, seed=0)"
    assert b.source == "src; part 2 of split(fraction=0.5, seed=0)"
    assert whole.split(0.5, seed=0)[0].digest == a.digest and whole.split(0.5, seed=1)[0].digest != a.digest
    assert whole.split(0.3, seed=0)[0].tokens.shape == (3, 4)


def no_template() -> PreTrainedTokenizerBase:
    """A fresh copy of the fixture tokenizer with its chat template removed."""
    plain = AutoTokenizer.from_pretrained(TOKENIZER)
    plain.chat_template = None
    return plain


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


CHAT_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize(
    ("files", "spec", "kwargs", "message"),
    [
        (
            {},
            "missing.txt",
            {},
            r"calibration data '.*missing.txt' not found: pass an existing file or folder, 'stdlib', or a Hub dataset id org/name",
        ),
        ({"empty/.keep": ""}, "empty", {}, r"folder empty/ holds no files; pass data with text in it"),
        (
            {"blank.txt": "  \n"},
            "blank.txt",
            {},
            r"blank.txt holds no text \(every one of its files is empty or binary\); pass UTF-8 text",
        ),
        (
            {"bin.dat": b"\x00\xff"},
            "bin.dat",
            {},
            r"bin.dat is not UTF-8 text; pass a text file, a folder or a .jsonl file",
        ),
        (
            {"short.txt": "the one of it and"},
            "short.txt",
            {"samples": 2, "seq_len": 4},
            r"short.txt gives only 6 tokens, fewer than --samples 2 × --seq-len 4 = 8 \(enough for 1 samples\); pass fewer --samples, a smaller --seq-len, or more data",
        ),
        (
            {"d.jsonl": '{"text": "a"}\n{"text": \n'},
            "d.jsonl",
            {},
            r"d.jsonl line 2 is not valid JSON \(Expecting value\); fix or remove that line",
        ),
        (
            {"d.jsonl": "[1, 2]\n"},
            "d.jsonl",
            {},
            r"d.jsonl line 1 is not a JSON object; each line needs a text or messages field",
        ),
        (
            {"d.jsonl": '{"prompt": "a"}\n'},
            "d.jsonl",
            {},
            r"d.jsonl line 1 has neither a 'text' nor a 'messages' field; fix the line or pass --column NAME",
        ),
        (
            {"d.jsonl": '{"text": "a"}\n'},
            "d.jsonl",
            {"column": "body"},
            r"d.jsonl line 1 has no 'body' field \(--column\); fix the line or pass --column NAME",
        ),
        (
            {"d.jsonl": '{"text": 3}\n'},
            "d.jsonl",
            {},
            r"d.jsonl line 1 holds int, neither text nor a list of \{role, content\} messages",
        ),
        ({"d.jsonl": "\n"}, "d.jsonl", {}, r"d.jsonl holds no lines; pass data with text in it"),
        (
            {"a.txt": "the"},
            "a.txt",
            {"column": "text"},
            r"--column applies to .jsonl files and Hub datasets, not to '.*a.txt'",
        ),
        ({}, "x.txt", {"samples": 0}, r"--samples must be at least 1 \(got 0\)"),
        ({}, "x.txt", {"seq_len": 1}, r"--seq-len must be at least 2 \(got 1\)"),
    ],
    ids=[
        "missing",
        "empty-folder",
        "empty-text",
        "binary",
        "too-few",
        "bad-json",
        "not-object",
        "no-field",
        "no-column",
        "bad-value",
        "no-lines",
        "column-on-text",
        "samples",
        "seq-len",
    ],
)
def test_errors(tok, tmp_path, files, spec, kwargs, message):
    for name, content in files.items():
        write(tmp_path / name, content)
    args = {"samples": 1, "seq_len": 2, "seed": 0} | kwargs
    with pytest.raises(CalibrationDataError, match=f"^{message}$") as e:
        load_calibration(str(tmp_path / spec), tok, **args)
    assert isinstance(e.value, MoeslimError) and isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_chat_without_template_fails_before_reading(tok, tmp_path):
    path = write(tmp_path / "c.jsonl", CHAT_LINE + "\n")
    with pytest.raises(
        CalibrationDataError,
        match=r"^c.jsonl holds chat messages but the tokenizer has no chat template; use plain text \(a 'text' field\)$",
    ):
        load_calibration(str(path), no_template(), samples=1, seq_len=2, seed=0)


def test_hub_id_without_datasets(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → ImportError
    with pytest.raises(
        CalibrationDataError,
        match=r"^'org/name' is not a local file or folder, and reading it as a Hub dataset needs the datasets library: pip install moeslim\[datasets\], or pass a local file$",
    ):
        load_calibration("org/name", tok, samples=1, seq_len=2, seed=0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.01, float("nan")])
def test_split_errors(fraction):
    whole = CalibrationData.of(torch.zeros(4, 3, dtype=torch.int64), "src")
    with pytest.raises(
        CalibrationDataError, match=r"^cannot split 4 samples with fraction .*: each part needs at least one sample"
    ):
        whole.split(fraction, seed=0)


def test_samples_span_many_documents_and_one_long_file_still_fills(tok, tmp_path):
    root = tmp_path / "long"
    root.mkdir()
    for c in LETTERS:  # 8 documents of 40 tokens each
        (root / f"{c}.txt").write_text(f"{c} " * 40 + "\n")
    got = load_calibration(str(root), tok, samples=4, seq_len=6, seed=0)
    # need 24 tokens, at most max(seq_len 6, ceil(24 / 8) = 3) = 6 per document, then EOS: 7 ids per document,
    # so 4 documents are read (21 ids after 3, 28 after 4), not one document's first 24 tokens
    assert got.source == "folder long/: 4 of 8 files"
    rows = got.tokens.flatten().tolist()
    eos = tok.eos_token_id
    assert [i for i, t in enumerate(rows) if t == eos] == [6, 13, 20]  # a document ends every 7 ids
    single = tmp_path / "one.txt"
    single.write_text("a " * 40 + "\n")
    # one document: its cap is max(6, 24) = 24 tokens, enough on its own
    assert load_calibration(str(single), tok, samples=4, seq_len=6, seed=0).tokens.flatten().tolist() == ids_of(
        tok, " ".join(["a"] * 24)
    )
