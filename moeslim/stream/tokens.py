"""Calibration data → packed token ids ``(samples, seq_len)``, deterministic for a given seed.

A source is a text file, a folder of text files, a ``.jsonl`` file (``text`` or chat ``messages`` per line), the
running Python's standard library (``stdlib``, the offline default) or a Hub dataset (needs ``datasets``). Its
documents are visited in a seeded shuffled order and tokenized one at a time, each followed by EOS, until
``samples × seq_len`` tokens are read; the stream is then cut into rows, with no padding.

Files are read as they are tokenized and no further than the tokens needed (``textfiles.py``); a binary one is
skipped in a folder and refused alone, and only regular files are read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
from collections.abc import Callable, Generator, Set
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch

from moeslim.errors import CalibrationDataError
from moeslim.stream.textfiles import (
    NotText,
    file_pieces,
    folder_files,
    not_regular,
    pieces,
    read_text,
    stdlib_files,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


STDLIB = "stdlib"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
CHUNK_CHARS = 1 << 20  # longer documents are tokenized in newline-aligned pieces, so a huge file is read only as needed


@dataclass(frozen=True)
class CalibrationData:
    """Token ids ``(samples, seq_len)`` int64 packed without padding, where they came from, and their sha256."""

    tokens: torch.Tensor
    source: str
    digest: str

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.tokens.dtype != torch.int64:
            raise ValueError(
                f"tokens must be (samples, seq_len) int64, got {tuple(self.tokens.shape)} {self.tokens.dtype}"
            )

    @classmethod
    def of(cls, tokens: torch.Tensor, source: str) -> CalibrationData:
        """Wrap ``tokens`` ``(samples, seq_len)``, computing the digest."""
        return cls(tokens, source, token_digest(tokens))

    def split(self, fraction: float, seed: int) -> tuple[CalibrationData, CalibrationData]:
        """Two parts with disjoint rows: a seeded permutation, ``round(fraction × samples)`` rows to the first.

        Rows keep their original order inside each part; each part has its own digest and a source suffix.
        """
        n = self.tokens.shape[0]
        k = round(fraction * n) if 0 < fraction < 1 else 0
        if not 0 < k < n:
            raise CalibrationDataError(
                f"cannot split {n} samples with fraction {fraction}: each part needs at least one sample;"
                " use more --samples or a fraction nearer 0.5"
            )
        perm = np.random.default_rng(seed).permutation(n)
        parts = (np.sort(perm[:k]), np.sort(perm[k:]))
        label = f"split(fraction={fraction:g}, seed={seed})"
        return (
            CalibrationData.of(self.tokens[torch.from_numpy(parts[0])], f"{self.source}; part 1 of {label}"),
            CalibrationData.of(self.tokens[torch.from_numpy(parts[1])], f"{self.source}; part 2 of {label}"),
        )


def token_digest(tokens: torch.Tensor) -> str:
    """sha256 hex of ``tokens`` ``(samples, seq_len)`` as little-endian int64 bytes, then seq_len as 8 such bytes."""
    ids = tokens.detach().cpu().contiguous().numpy().astype("<i8", copy=False)
    return hashlib.sha256(ids.tobytes() + int(tokens.shape[1]).to_bytes(8, "little")).hexdigest()


Document: TypeAlias = "str | Generator[str, None, None]"  # a text, or a file's pieces read as consumed


@dataclass(frozen=True)
class Corpus:
    """``count`` documents, loaded one at a time by index: ``load(i)`` is the text, or None to skip (binary)."""

    name: str  # e.g. "data.jsonl (messages, chat template)"
    unit: str  # what a document is: "files", "lines", "rows"
    count: int
    load: Callable[[int], Document | None]


def load_calibration(
    spec: str | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    samples: int,
    seq_len: int,
    seed: int,
    split: str = "train",
    column: str | None = None,
) -> CalibrationData:
    """Token ids ``(samples, seq_len)`` from ``spec`` (file, folder, ``.jsonl``, ``stdlib`` or Hub dataset id).

    ``split`` and ``column`` select a Hub dataset's rows and field; ``column`` also picks a ``.jsonl`` field
    (default: ``text``, else ``messages``). Same arguments → same tokens and digest.
    """
    if samples < 1:
        raise CalibrationDataError(f"--samples must be at least 1 (got {samples})")
    if seq_len < 2:
        raise CalibrationDataError(f"--seq-len must be at least 2 (got {seq_len})")
    corpus = open_corpus(spec or STDLIB, tokenizer, split=split, column=column)
    need = samples * seq_len
    if corpus.count == 0:
        raise CalibrationDataError(f"{corpus.name} holds no {corpus.unit}; pass data with text in it")
    ids, docs = read_tokens(corpus, tokenizer, need, seed, seq_len=seq_len)
    if not ids:
        raise CalibrationDataError(
            f"{corpus.name} holds no text (every one of its {corpus.unit} is empty or binary); pass UTF-8 text"
        )
    if len(ids) < need:
        raise CalibrationDataError(
            f"{corpus.name} gives only {len(ids)} tokens, fewer than --samples {samples} × --seq-len {seq_len} = {need}"
            f" (enough for {len(ids) // seq_len} samples); pass fewer --samples, a smaller --seq-len, or more data"
        )
    tokens = torch.tensor(ids, dtype=torch.int64).view(samples, seq_len)
    return CalibrationData.of(tokens, f"{corpus.name}: {len(docs)} of {corpus.count} {corpus.unit}")


def open_corpus(spec: str, tokenizer: PreTrainedTokenizerBase, *, split: str, column: str | None) -> Corpus:
    """The corpus ``spec`` names; ``stdlib`` and local paths win over a Hub id of the same spelling."""
    path = Path(spec).expanduser()
    if spec == STDLIB or path.exists():
        return local_corpus(spec, path, tokenizer, column)
    if HUB_ID.fullmatch(spec) and not spec.startswith("."):
        return hub_corpus(spec, tokenizer, split, column)
    raise CalibrationDataError(
        f"calibration data {spec!r} not found: pass an existing file or folder, 'stdlib', or a Hub dataset id org/name"
    )


def local_corpus(spec: str, path: Path, tokenizer: PreTrainedTokenizerBase, column: str | None) -> Corpus:
    """The stdlib, a folder, a ``.jsonl`` file or a text file; ``column`` only applies to ``.jsonl``."""
    if path.suffix == ".jsonl" and path.is_file():
        return jsonl_corpus(path, tokenizer, column)
    if column is not None:
        raise CalibrationDataError(f"--column applies to .jsonl files and Hub datasets, not to {spec!r}")
    if spec == STDLIB:
        return files_corpus(stdlib_files(), f"Python {sys.version_info.major}.{sys.version_info.minor} stdlib")
    if path.is_dir():
        return files_corpus(folder_files(path), f"folder {path.resolve().name}/")  # "." → its real name
    if (kind := not_regular(path)) is not None:
        raise CalibrationDataError(
            f"calibration data {spec!r} is {kind}, not a regular file; save the text to a file and pass that"
        )
    return text_file_corpus(path)


def files_corpus(files: list[Path], name: str) -> Corpus:
    """One document per file; binary and undecodable files are skipped when their turn comes."""
    return Corpus(name, "files", len(files), lambda i: file_pieces(files[i], CHUNK_CHARS))


def text_file_corpus(path: Path) -> Corpus:
    """A single text file as one document."""

    def load(_: int) -> Generator[str, None, None]:
        try:
            yield from file_pieces(path, CHUNK_CHARS)
        except NotText as e:
            raise CalibrationDataError(
                f"{path.name} is not UTF-8 text; pass a text file, a folder or a .jsonl file"
            ) from e

    return Corpus(path.name, "files", 1, load)


def jsonl_corpus(path: Path, tokenizer: PreTrainedTokenizerBase, column: str | None) -> Corpus:
    """One document per non-blank line: a string field as is, a ``messages`` list through the chat template."""
    values = [jsonl_value(line, n, path.name, column) for n, line in enumerate(read_lines(path), 1) if line.strip()]
    kinds = sorted({"messages" if isinstance(v, list) else "text" for v in values})
    if "messages" in kinds:
        require_chat_template(tokenizer, path.name)
    name = f"{path.name} ({' and '.join(kinds)}{', chat template' if 'messages' in kinds else ''})"

    def load(i: int) -> str:
        value = values[i]
        return value if isinstance(value, str) else render_chat(tokenizer, value, f"{path.name}, line {i + 1}")

    return Corpus(name if values else path.name, "lines", len(values), load)


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file."""
    text = read_text(path)
    if text is None:
        raise CalibrationDataError(f"{path.name} is not UTF-8 text; a .jsonl file holds one JSON object per line")
    return text.splitlines()


def jsonl_value(line: str, n: int, name: str, column: str | None) -> str | list[Any]:
    """The document in JSONL line ``n``: ``column`` if given, else ``text``, else ``messages``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise CalibrationDataError(f"{name} line {n} is not valid JSON ({e.msg}); fix or remove that line") from e
    if not isinstance(record, dict):
        raise CalibrationDataError(f"{name} line {n} is not a JSON object; each line needs a text or messages field")
    key = column or next((k for k in ("text", "messages") if k in record), None)
    if key is None or key not in record:
        wanted = f"no {column!r} field (--column)" if column else "neither a 'text' nor a 'messages' field"
        raise CalibrationDataError(f"{name} line {n} has {wanted}; fix the line or pass --column NAME")
    return document_value(record[key], f"{name} line {n}")


def document_value(value: object, where: str) -> str | list[Any]:
    """``value`` if it is text or a chat (a list of ``{role, content}`` objects), and all of it Unicode text."""
    if isinstance(value, str):
        return unicode_text(value, where)
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        for m in value:
            unicode_text(json.dumps(m, ensure_ascii=False), where)
        return value
    raise CalibrationDataError(
        f"{where} holds {type(value).__name__}, neither text nor a list of {{role, content}} messages"
    )


def unicode_text(text: str, where: str) -> str:
    """``text``, refused when it holds a lone surrogate: JSON's ``\\ud83d`` escape alone is half of a character (an
    emoji cut in two), which no tokenizer can read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CalibrationDataError(
            f"{where} holds {text[e.start]!r}, half of a character (a surrogate without its pair, e.g. an emoji cut in"
            " two); fix or remove that text"
        ) from None
    return text


def require_chat_template(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Fail when chats must be rendered but the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise CalibrationDataError(
            f"{where} holds chat messages but the tokenizer has no chat template; use plain text (a 'text' field)"
        )


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[Any], where: str) -> str:
    """``messages`` rendered as text by the tokenizer's chat template."""
    require_chat_template(tokenizer, where)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja2's TemplateError (raise_exception in templates), or jinja2 itself missing
        raise CalibrationDataError(f"{where}: the chat template rejects these messages ({first_line(e)})") from e
    return str(text)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def hub_corpus(spec: str, tokenizer: PreTrainedTokenizerBase, split: str, column: str | None) -> Corpus:
    """Rows of Hub dataset ``spec``, ``split``; ``column`` (default ``text``, else ``messages``) per row."""
    try:
        import datasets
    except ImportError as e:
        raise CalibrationDataError(
            f"{spec!r} is not a local file or folder, and reading it as a Hub dataset needs the datasets library:"
            " pip install moeslim[datasets], or pass a local file"
        ) from e
    try:
        rows = datasets.load_dataset(spec, split=split)
    except (OSError, ValueError) as e:
        raise CalibrationDataError(
            f"cannot load Hub dataset {spec!r}, split {split!r} ({first_line(e)}); pass a local file"
        ) from e
    key = column or next((k for k in ("text", "messages") if k in rows.column_names), "text")
    if key not in rows.column_names:
        raise CalibrationDataError(f"{spec} has no column {key!r} (it has {rows.column_names}); pass --column")
    name = f"{spec} ({split}, column {key})"

    def load(i: int) -> str:
        value = document_value(rows[i][key], f"{spec} row {i}")
        return value if isinstance(value, str) else render_chat(tokenizer, value, f"{spec} row {i}")

    return Corpus(name, "rows", len(rows), load)


def read_tokens(
    corpus: Corpus,
    tokenizer: PreTrainedTokenizerBase,
    need: int,
    seed: int,
    *,
    seq_len: int,
    exclude: Set[int] = frozenset(),
) -> tuple[list[int], list[int]]:
    """Up to ``need`` token ids from documents in seeded shuffled order, EOS after each; and which were read.

    Each document gives at most ``max(seq_len, need / documents)`` tokens, so that the samples span many
    documents rather than the first few long ones (a large source file alone holds thousands of tokens);
    when that falls short, a second pass takes documents whole. Documents in ``exclude`` are skipped.
    """
    order = [int(i) for i in np.random.default_rng(seed).permutation(corpus.count) if int(i) not in exclude]
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    ids: list[int] = []
    docs: list[int] = []
    for cap in (max(seq_len, -(-need // max(corpus.count, 1))), None):
        ids, docs = [], []
        for i in order:
            text = corpus.load(i)
            budget = need - len(ids) if cap is None else min(cap, need - len(ids))
            try:
                doc = encode_document(tokenizer, text, budget) if text else []
            except NotText:  # binary after all: skipped, as a file found binary at once
                doc = []
            if doc:
                ids += (doc if cap is None else doc[:budget]) + eos
                docs.append(i)
            if len(ids) >= need:
                return ids[:need], docs
    return ids[:need], docs


def encode_document(tokenizer: PreTrainedTokenizerBase, text: Document, budget: int) -> list[int]:
    """Token ids of ``text``, no special tokens, stopping after the piece that reaches ``budget`` ids (a file is read
    no further)."""
    ids: list[int] = []
    with contextlib.closing(pieces(text, CHUNK_CHARS) if isinstance(text, str) else text) as parts:
        for piece in parts:
            ids += encode(tokenizer, piece)
            if len(ids) >= budget:
                break
    return ids


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (and without the too-long-for-the-model warning)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
