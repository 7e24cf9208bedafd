"""Held-out validation tokens: packed like calibration data, from documents calibration did not read.

Calibration (``stream/tokens.py``, ``read_tokens``) reads documents of a corpus in a seeded shuffled order until it has
``samples × seq_len`` tokens. When the plan records a calibration on the same corpus, that reading is
replayed here and its token digest compared with the recorded one: when they match, the exact set of
documents calibration read is known, and validation packs its tokens from the other documents only, so no
validation token comes from a calibration document. When the digest cannot be reproduced (other text,
another tokenizer) the report says disjointness is not verified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moeslim.errors import CalibrationDataError
from moeslim.stream.tokens import STDLIB, Corpus, open_corpus, read_tokens, token_digest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class HeldOut:
    """Validation token ids ``(samples, seq_len)`` and what they are."""

    tokens: torch.Tensor
    source: str
    digest: str
    disjoint: bool | None  # True: calibration documents excluded (verified); None: no calibration to avoid
    note: str

    def to_dict(self) -> dict:
        samples, seq_len = self.tokens.shape
        return {"source": self.source, "sequences": samples, "seq_len": seq_len, "tokens": samples * seq_len,
                "digest": self.digest, "disjoint_from_calibration": self.disjoint, "heldout": self.note}  # fmt: skip


def load_heldout(
    spec: str | None, tokenizer: PreTrainedTokenizerBase, calibration: dict, *, samples: int, seq_len: int, seed: int
) -> HeldOut:
    """``samples × seq_len`` tokens of ``spec`` (default: the stdlib), avoiding ``calibration``'s documents."""
    if samples < 1 or seq_len < 2:
        raise CalibrationDataError(f"validation needs --samples ≥ 1 and --seq-len ≥ 2 (got {samples}, {seq_len})")
    corpus = open_corpus(spec or STDLIB, tokenizer, split="train", column=None)
    used, note = calibration_documents(corpus, tokenizer, calibration)
    ids, docs = read_tokens(corpus, tokenizer, samples * seq_len, seed, seq_len=seq_len, exclude=used or set())
    if len(ids) < samples * seq_len:
        raise CalibrationDataError(
            f"{corpus.name} gives only {len(ids)} tokens outside the calibration documents, fewer than"
            f" --samples {samples} × --seq-len {seq_len}; pass fewer --samples, a smaller --seq-len or other text"
        )
    tokens = torch.tensor(ids, dtype=torch.int64).view(samples, seq_len)
    source = f"{corpus.name}: {len(docs)} of {corpus.count} {corpus.unit} (seed {seed})"
    disjoint = True if used is not None else None if not calibration else False
    return HeldOut(tokens, source, token_digest(tokens), disjoint, note)


def calibration_documents(
    corpus: Corpus, tokenizer: PreTrainedTokenizerBase, calibration: dict
) -> tuple[set[int] | None, str]:
    """The documents calibration read, when replaying it on ``corpus`` reproduces its digest; and a note."""
    if not calibration:
        return None, "no calibration recorded in the pruned folder's plan (data-free criterion, or no plan)"
    if not str(calibration.get("data", "")).startswith(f"{corpus.name}:"):
        return None, f"not verified: calibration read other text ({calibration.get('data')})"
    samples, seq_len, seed = (int(calibration[k]) for k in ("samples", "seq_len", "seed"))
    ids, docs = read_tokens(corpus, tokenizer, samples * seq_len, seed, seq_len=seq_len)
    tokens = torch.tensor(ids, dtype=torch.int64)
    if len(ids) < samples * seq_len or token_digest(tokens.view(samples, seq_len)) != calibration.get("digest"):
        return None, "not verified: replaying calibration on this text does not reproduce its token digest"
    return set(docs), f"disjoint: the {len(docs)} {corpus.unit} calibration read (digest verified) are excluded"
