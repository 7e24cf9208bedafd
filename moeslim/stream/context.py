"""What one command opens once and every pass of it shares: the checkpoint and its layout, the calibration
settings, the processes (ranks) and device, the dtype, the tokenizer and the calibration tokens (both read when
first needed, then kept).

``slim`` builds one ``RunContext`` for the source and hands it to calibration, ``auto``'s trials, the correction
and validation, so the tokenizer is loaded and the calibration text tokenised once, and the device and dtype are
checked once. Its memory plan (``memory.py``: whole layers or chunks of experts, and the hidden states kept in
RAM within ``--max-memory``) is made once, before the first pass reads a weight; hidden states past it spill
beside ``spill_beside``, the target whose lock the command holds (``activations.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moeslim.errors import CheckpointError, DeviceError, MissingFileError, PlanError, UsageError
from moeslim.families.table import text_config
from moeslim.layout import Layout
from moeslim.source import Checkpoint
from moeslim.stream.activations import Activations
from moeslim.stream.memory import MemoryPlan, States, plan_pass
from moeslim.stream.options import CalibrationOptions
from moeslim.stream.ranks import Ranks, current, rank_device
from moeslim.units import parse_size

if TYPE_CHECKING:
    from moeslim.stream.runner import LayerRunner
    from moeslim.stream.tokens import CalibrationData

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "spiece.model")


@dataclass
class RunContext:
    """A checkpoint opened for layer-by-layer passes with the settings ``opts``."""

    ckpt: Checkpoint
    layout: Layout
    opts: CalibrationOptions
    spill_beside: Path | None = None  # the target whose lock the run holds: hidden states spill beside it
    ranks: Ranks = field(init=False)
    dtype: torch.dtype = field(init=False)
    max_bytes: int | None = field(init=False)  # --max-memory: weights and hidden states together
    _data: CalibrationData | None = field(default=None, init=False, repr=False)
    _plan: MemoryPlan | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.dtype, self.max_bytes = parse_dtype(self.opts.dtype), max_memory(self.opts.max_memory)
        self.ranks = current(self.opts.device)  # several under torchrun: each runs a share of the batches

    @property
    def device(self) -> str:
        """This process's device (``cuda:N`` for rank N under torchrun)."""
        return rank_device(self.opts.device)

    @property
    def batch_size(self) -> int:
        """Sequences per batch: at most half the samples, so the statistics have two halves."""
        return min(self.opts.batch_size, max(1, self.opts.samples // 2))

    def data(self) -> CalibrationData:
        """The calibration tokens ``(samples, seq_len)``, read and tokenised on first use."""
        if self._data is None:
            from moeslim.stream.tokens import load_calibration  # imports tokenizers only when calibrating

            opts = self.opts
            self._data = load_calibration(
                opts.calib, load_tokenizer(self.ckpt, opts.trust_remote_code), samples=opts.samples,
                seq_len=opts.seq_len, seed=opts.seed, split=opts.calib_split, column=opts.calib_column,
            )  # fmt: skip
        return self._data

    def activations(self) -> Activations:
        """A new, empty store of hidden states, kept in memory up to what the memory plan leaves them, then spilled
        into a temporary folder beside ``spill_beside`` (named as its temp folders, so the next run there removes
        a killed run's) or, without it, in TMPDIR."""
        return Activations(self.plan().spill_after, self.spill_beside)

    def runner(self) -> LayerRunner:
        """A fresh layer runner of the checkpoint (close it when done), once its largest layer is known to fit."""
        from moeslim.stream.runner import LayerRunner  # transformers' model code: imported when used

        chunk = self.plan().chunk
        opts = self.opts
        return LayerRunner(self.ckpt, self.layout, self.device, self.dtype, opts.trust_remote_code, chunk, self.ranks)

    def plan(self) -> MemoryPlan:
        """The passes' memory plan, made on first use (refused there in one line, before any weight is read, where
        the largest layer cannot fit beside the hidden states: ``memory.py``)."""
        if self._plan is None:
            size = self.dtype.itemsize
            self._plan = plan_pass(self.ckpt, self.layout, size, self.opts.dtype, self.states(), self.max_bytes)
        return self._plan

    def states(self) -> States:
        """The hidden states a pass holds: every calibration sequence's, a batch at a time."""
        row = self.opts.seq_len * int(text_config(self.ckpt.config).get("hidden_size") or 0) * self.dtype.itemsize
        return States(self.opts.samples * row, self.batch_size * row)


def load_tokenizer(ckpt: Checkpoint, trust_remote_code: bool = False) -> Any:
    """The model's own tokenizer. transformers would build an empty one from config.json alone, so the
    vocabulary file must be there. A tokenizer that needs its own code (``auto_map`` in ``tokenizer_config.json``,
    as Kimi's ``tiktoken.model``) is run only with ``trust_remote_code``, and refused without it in a line naming
    the flag."""
    from transformers import AutoTokenizer

    missing = MissingFileError(
        f"no tokenizer in {ckpt.root} (none of {', '.join(TOKENIZER_FILES)}); calibration needs the model's"
        " tokenizer files next to its weights (or use a data-free --criterion such as router-norm)"
    )
    if not any((ckpt.root / name).is_file() for name in TOKENIZER_FILES):
        raise missing
    code = tokenizer_code(ckpt.root)
    if code is not None and not trust_remote_code:
        raise UsageError(
            f"the tokenizer in {ckpt.root} runs its own code ({code}, named by tokenizer_config.json's auto_map);"
            " pass --trust-remote-code to run it, or use a data-free --criterion such as router-norm"
        )
    try:
        return AutoTokenizer.from_pretrained(ckpt.root, trust_remote_code=code is not None)
    except (OSError, ValueError, TypeError, ImportError) as e:
        if code is not None:  # the model's own code failed: say so, not that the files are missing
            raise CheckpointError(f"the tokenizer code in {ckpt.root} ({code}) failed to load: {e}") from e
        raise missing from e


def tokenizer_code(root: Path) -> str | None:
    """The module of the tokenizer class ``tokenizer_config.json`` maps ``AutoTokenizer`` to (``auto_map``), or
    None when the tokenizer is one transformers itself implements."""
    try:
        auto_map = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8")).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return None
    entry = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
    names = [entry] if isinstance(entry, str) else entry if isinstance(entry, list) else []
    modules = [n.split("--")[-1].rsplit(".", 1)[0] + ".py" for n in names if isinstance(n, str) and "." in n]
    return ", ".join(modules) or None


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise DeviceError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def max_memory(text: str | None) -> int | None:
    """``--max-memory`` in bytes (None: what this process may allocate)."""
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as e:
        raise PlanError(f"--max-memory {text!r} is not a size like 8GB or 500MB") from e
