"""``validate()``: structural check of the pruned folder, then both models side by side on held-out text."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeslim import __version__
from moeslim.errors import CalibrationDataError, UsageError
from moeslim.families.table import family_of, text_config
from moeslim.layout import Layout, resolve_layout, unread_experts
from moeslim.names import PLAN_NAME
from moeslim.quant import READABLE, unreadable
from moeslim.source import Checkpoint, open_checkpoint
from moeslim.stream.options import at_least
from moeslim.validate.report import kl_gate
from moeslim.validate.structure import Structure, check_structure

if TYPE_CHECKING:
    from moeslim.validate.reference import Reference

REPORT_FORMAT = "moeslim.validation/1"
METRICS = ("kl_mean", "kl_p95", "top1_agreement", "perplexity_original", "perplexity_pruned", "scored_tokens")


@dataclass(frozen=True)
class ValidateOptions:
    """How to validate; recorded in the report."""

    calib: str | None = None  # held-out text: file, folder, .jsonl, Hub dataset id; None: Python's stdlib sources
    samples: int = 16
    seq_len: int = 256
    seed: int = 1
    batch_size: int = 4
    device: str = "cpu"
    dtype: str = "float32"
    generations: int = 3  # greedy generations side by side (0: none)
    trust_remote_code: bool = False
    require_data: bool = True  # False (slim): too little held-out text skips the numbers instead of failing

    def __post_init__(self) -> None:
        """Refuse, before any work, values validation cannot use."""
        at_least("--samples", self.samples, 1, "validation needs a held-out sequence")
        at_least("--seq-len", self.seq_len, 2, "a sequence needs 2 tokens or more")
        at_least("--batch-size", self.batch_size, 1, "a batch holds 1 sequence or more")
        at_least("--seed", self.seed, 0, "seeds are 0 or more")
        at_least("--generations", self.generations, 0, "0 shows none")


def validate(
    original: Path, pruned: Path, opts: ValidateOptions, opened: Checkpoint | None = None,
    reference: Reference | None = None,
) -> dict:  # fmt: skip
    """The validation report of ``pruned`` against ``original`` (both local folders; ``opened``: the original
    already opened by the caller, as ``slim`` has it; ``reference``: the original's side computed in ``slim``'s
    calibration pass, used where it matches this validation, ``reference.py``)."""
    ckpt_p = open_checkpoint(pruned)
    structure = check_structure(ckpt_p, trust_remote_code=opts.trust_remote_code)
    ckpt_o = opened or open_checkpoint(original)
    layout_o = resolve_layout(ckpt_o)
    check_pair(ckpt_o, layout_o, ckpt_p, structure.layout)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "original": str(original),
        "pruned": str(pruned),
        "experts": f"{structure.layout.num_experts} of {layout_o.num_experts}",
        "structure": structure.to_dict(),
        "settings": {k: v for k, v in asdict(opts).items() if k not in ("trust_remote_code", "require_data")},
        "moeslim_version": __version__,
    }
    reason = numeric_skip_reason(ckpt_o, ckpt_p)
    if reason is None and (why := unread_experts(layout_o, ckpt_o.config)):
        reason = f"skipped: {why}"
    if reason is None:
        try:
            report.update(numeric(ckpt_o, layout_o, ckpt_p, structure, opts, reference))
        except CalibrationDataError as e:
            if opts.require_data:
                raise
            reason = f"skipped: {e}; run `moeslim validate` with other --calib text"
    if reason is not None:
        report["summary"] = f"structure checked; numeric comparison {reason}"
    return report


def check_pair(ckpt_o: Checkpoint, layout_o: Layout, ckpt_p: Checkpoint, layout_p: Layout) -> None:
    """The pruned checkpoint must be the same architecture as the original, with at most its experts."""
    a, b = text_config(ckpt_o.config), text_config(ckpt_p.config)
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        if a.get(key) != b.get(key):
            raise UsageError(
                f"the pruned checkpoint's {key} is {b.get(key)!r} but the original's is {a.get(key)!r};"
                " pass the model it was pruned from"
            )
    if layout_p.num_experts > layout_o.num_experts or layout_p.moe_indices != layout_o.moe_indices:
        raise UsageError(
            f"the pruned checkpoint (MoE layers {layout_p.moe_indices}, {layout_p.num_experts} experts) is not a"
            f" pruning of the original (MoE layers {layout_o.moe_indices}, {layout_o.num_experts} experts)"
        )


def numeric_skip_reason(ckpt_o: Checkpoint, ckpt_p: Checkpoint) -> str | None:
    """Why the numeric comparison cannot run (no tokenizer, quantised weights), or None."""
    from moeslim.stream.context import TOKENIZER_FILES

    calibration = family_of(ckpt_o.config).calibration
    if calibration:
        return f"skipped: the decoder cannot run one layer at a time ({calibration})"
    method = unreadable(ckpt_o.config) or unreadable(ckpt_p.config)
    if method:
        return f"skipped: {method} checkpoints are not dequantised yet (moeslim reads {READABLE})"
    if not any((c.root / n).is_file() for c in (ckpt_p, ckpt_o) for n in TOKENIZER_FILES):
        return "skipped: no tokenizer next to either model's weights"
    return None


def tokenizer_of(ckpt_o: Checkpoint, ckpt_p: Checkpoint, trust_remote_code: bool = False) -> Any:
    """The pruned folder's tokenizer (copied from the original), else the original's."""
    from moeslim.stream.context import TOKENIZER_FILES, load_tokenizer

    has = any((ckpt_p.root / n).is_file() for n in TOKENIZER_FILES)
    return load_tokenizer(ckpt_p if has else ckpt_o, trust_remote_code)


def numeric(
    ckpt_o: Checkpoint,
    layout_o: Layout,
    ckpt_p: Checkpoint,
    structure: Structure,
    opts: ValidateOptions,
    reference: Reference | None = None,
) -> dict:
    """Metrics, per-layer errors and generations on held-out tokens (the original's side from ``reference`` where
    it ran these tokens in this dtype on this device)."""
    from moeslim.stream.context import parse_dtype
    from moeslim.stream.memory import States, plan_pass
    from moeslim.stream.ranks import current, rank_device
    from moeslim.stream.runner import LayerRunner, resolve_device
    from moeslim.validate.generate import generations, skip_reason
    from moeslim.validate.heldout import load_heldout
    from moeslim.validate.stream import compare, compare_with

    dtype = parse_dtype(opts.dtype)
    tokenizer = tokenizer_of(ckpt_o, ckpt_p, opts.trust_remote_code)
    held = load_heldout(opts.calib, tokenizer, plan_calibration(ckpt_p.root), samples=opts.samples,
                        seq_len=opts.seq_len, seed=opts.seed)  # fmt: skip
    hidden = int(text_config(ckpt_o.config).get("hidden_size") or 0)
    row = opts.seq_len * hidden * dtype.itemsize  # one sequence's hidden states; both models' streams stay in RAM
    states = States(opts.samples * row, opts.batch_size * row, streams=2, spill=False)
    chunk = plan_pass(ckpt_o, layout_o, dtype.itemsize, opts.dtype, states).chunk  # one layer resident at a time
    ranks = current(opts.device)  # under torchrun each process validates a share of the batches
    device = rank_device(opts.device)
    pairs: tuple[tuple[Checkpoint, Layout], ...] = ((ckpt_o, layout_o), (ckpt_p, structure.layout))
    if reference is not None and ranks.world == 1 and reference.matches(held.tokens, opts.batch_size, dtype,
                                                                        resolve_device(device)):  # fmt: skip
        pairs = pairs[1:]  # the original's side was computed in slim's calibration pass
    runners = [LayerRunner(c, lay, device, dtype, opts.trust_remote_code, chunk, ranks) for c, lay in pairs]
    try:
        if len(runners) == 1:
            assert reference is not None
            result = compare_with(reference, runners[0])
        else:
            result = compare(runners[0], runners[1], held.tokens, opts.batch_size, ranks)
    finally:
        for runner in runners:
            runner.close()
    del runners
    skip = skip_reason(ckpt_o, ckpt_p, dtype, opts.generations)
    if skip or not ranks.leader:  # the report is rank 0's
        gens = []
    else:
        ckpt_o.fetch(ckpt_o.tensors)  # a Hub source read in place: whole, as skip_reason found it fits the window
        gens = generations(ckpt_o.root, ckpt_p.root, tokenizer, dtype, device, opts.generations)
    return {
        **result.metrics,
        "summary": summary(held.to_dict()),
        "data": held.to_dict(),
        "layers": [{"layer": i, "relative_error": e} for i, e in sorted(result.layer_errors.items())],
        "layer_error_note": "relative error ‖h_pruned − h_original‖ / ‖h_original‖ of each MoE layer's output,"
        " each model on its own hidden states (cumulative over the layers before it)",
        "generations": gens,
        "generations_note": skip or f"greedy, {len(gens)} prompt(s), up to 20 new tokens",
        "per_sequence": result.per_sequence,
        "per_sequence_note": "each held-out sequence's mean KL and mean negative log-likelihood (natural log) of"
        " both models, in the order of the held-out data: paired values for comparing plans on the same text",
    }


def summary(data: dict) -> str:
    return (
        f"measured on {data['tokens']} held-out tokens ({data['sequences']} × {data['seq_len']}) of {data['source']};"
        f" {data['heldout']}"
    )


def plan_calibration(folder: Path) -> dict:
    """The calibration provenance recorded in the pruned folder's plan, or {} (data-free, or no plan)."""
    try:
        doc = json.loads((folder / PLAN_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    calibration = doc.get("calibration") if isinstance(doc, dict) else None
    return calibration if isinstance(calibration, dict) else {}


def kl_exceeds(report: dict, max_kl: float | None) -> bool:
    """Whether ``--max-kl`` refuses the pruned model: its mean KL is above ``max_kl``, or no KL was measured (a
    skipped numeric comparison, a NaN): a gate that measured nothing does not open. ``kl_gate`` says why."""
    return kl_gate(report, max_kl) is not None
