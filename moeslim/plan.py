"""The plan: which original experts each MoE layer keeps. Plain data, saved as versioned JSON.

The plan is the boundary between scoring (which may use torch) and surgery (which needs none): surgery
from a saved plan reproduces the same output byte for byte.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from moeslim import jsonio
from moeslim.errors import MissingFileError, PlanError
from moeslim.layout import Layout, Routing

T = TypeVar("T")

PLAN_FORMAT = "moeslim.plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class Correction:
    """How a plan's kept experts were refit (``method`` set), or why they were not (``skipped`` set); neither: no
    correction was asked for. JSON only at the edges: ``to_dict`` / ``of``."""

    method: str | None = None
    ridge: float | None = None  # λ, relative to the mean diagonal of G_k
    data: str | None = None  # the calibration tokens it was fitted on: their source,
    digest: str | None = None  # their sha256
    tokens: int | None = None  # and their count
    experts: dict[str, int] = field(default_factory=dict)  # MoE layer → kept experts refit
    sha256: str | None = None  # of the patch files written
    skipped: str | None = None  # why the experts were not corrected

    @property
    def fitted(self) -> bool:
        return self.method is not None

    def __bool__(self) -> bool:
        return self.fitted or self.skipped is not None

    def to_dict(self) -> dict:
        if self.skipped is not None:
            return {"skipped": self.skipped}
        if not self.fitted:
            return {}
        return {"method": self.method, "ridge": self.ridge, "data": self.data, "digest": self.digest,
                "tokens": self.tokens, "experts": self.experts, "sha256": self.sha256}  # fmt: skip

    @classmethod
    def of(cls, doc: dict) -> Correction:
        """The record of a plan's ``correction`` object (checked field by field)."""
        if "skipped" in doc:
            return cls(skipped=_field(doc, "skipped", str, "a string", "correction: "))
        if "method" not in doc:
            return cls()
        experts = _field(doc, "experts", dict, "an object", "correction: ")
        if not all(isinstance(k, str) and jsonio.is_whole(v) for k, v in experts.items()):
            raise _Invalid("correction: experts must map layer numbers to whole numbers")
        return cls(
            method=_field(doc, "method", str, "a string", "correction: "),
            ridge=_optional(doc, "ridge", (int, float)), data=_optional(doc, "data", str),
            digest=_optional(doc, "digest", str), tokens=_optional(doc, "tokens", int), experts=dict(experts),
            sha256=_optional(doc, "sha256", str),
        )  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """Kept expert ids (original numbering, ascending) per MoE layer, and how they were chosen.

    ``scores[layer][j]`` is the criterion's score of original expert ``j`` (higher is kept first).
    """

    model_type: str
    num_experts: int
    top_k: int  # top-k of the pruned model
    kept: dict[int, tuple[int, ...]]
    criterion: str
    seed: int | None = None
    scores: dict[int, tuple[float, ...]] = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)  # data, token count, hash, settings; empty when data-free
    correction: Correction = field(default_factory=Correction)  # how the kept experts were refit, or why not

    @property
    def keep(self) -> int:
        """Experts kept per layer: the count most layers keep (``check_plan`` refuses a plan where they differ)."""
        return Counter(len(k) for k in self.kept.values()).most_common(1)[0][0]

    def to_json(self) -> str:
        layers = [
            {"layer": i, "kept": list(kept), **({"scores": list(self.scores[i])} if i in self.scores else {})}
            for i, kept in sorted(self.kept.items())
        ]
        doc = {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model_type": self.model_type,
            "num_experts": self.num_experts,
            "keep": self.keep,
            "top_k": self.top_k,
            "criterion": self.criterion,
            "seed": self.seed,
            **({"calibration": self.calibration} if self.calibration else {}),
            **({"correction": self.correction.to_dict()} if self.correction else {}),
            "layers": layers,
        }
        return jsonio.dumps(doc, indent=2) + "\n"


def load_plan(path: Path) -> Plan:
    """Read a plan JSON written by moeslim, checking every field's type; its fit to a checkpoint is checked by
    ``check_plan``."""
    if not path.is_file():
        raise MissingFileError(f"plan file {path} does not exist")
    try:
        doc = jsonio.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError covers bad UTF-8, bad JSON, NaN/Infinity
        raise PlanError(f"{path} is not valid JSON ({e}); pass a plan written by moeslim") from e
    if (
        not isinstance(doc, dict)
        or doc.get("format") != PLAN_FORMAT
        or not (jsonio.is_whole(version := doc.get("version")) and version == PLAN_VERSION)
    ):
        raise PlanError(f"{path} is not a moeslim plan (format {PLAN_FORMAT} version {PLAN_VERSION})")
    try:
        return _plan_of(doc)
    except _Invalid as e:
        raise PlanError(f"{path} is not a valid moeslim plan: {e}; fix it or make the plan again") from e


class _Invalid(ValueError):
    """What is wrong inside a plan document; ``load_plan`` adds the file name."""


def _plan_of(doc: dict) -> Plan:
    num_experts = _int_field(doc, "num_experts")
    entries = _field(doc, "layers", list, "a list")
    if not entries:
        raise _Invalid("layers is empty")
    kept, scores = _layers(entries, num_experts)
    plan = Plan(
        model_type=_field(doc, "model_type", str, "a string"),
        num_experts=num_experts,
        top_k=_int_field(doc, "top_k"),
        kept=kept,
        criterion=_field(doc, "criterion", str, "a string"),
        seed=None if doc.get("seed") is None else _int_field(doc, "seed"),
        scores=scores,
        calibration={} if doc.get("calibration") is None else dict(_field(doc, "calibration", dict, "an object")),
        correction=Correction()
        if doc.get("correction") is None
        else Correction.of(_field(doc, "correction", dict, "an object")),
    )
    if odd := uneven_layer(kept):
        raise _Invalid(f"layer {odd[0]} keeps {odd[1]} experts, other layers {odd[2]}")
    if "keep" in doc and _int_field(doc, "keep") != plan.keep:
        raise _Invalid(f"keep is {doc['keep']}, but the layers keep {plan.keep}")
    return plan


def _layers(entries: list, num_experts: int) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[float, ...]]]:
    kept: dict[int, tuple[int, ...]] = {}
    scores: dict[int, tuple[float, ...]] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise _Invalid(f"layers holds {_show(entry)}, not an object with layer and kept")
        index = _int_field(entry, "layer")
        if index in kept:
            raise _Invalid(f"layer {index} is listed twice")
        ids = _field(entry, "kept", list, "a list", f"layer {index}: ")
        if not ids or not all(jsonio.is_whole(j) for j in ids):
            raise _Invalid(f"layer {index}: kept must list expert ids (whole numbers), not {_show(ids)}")
        kept[index] = tuple(ids)
        if "scores" in entry:
            scores[index] = _scores(entry["scores"], index, num_experts)
    return kept, scores


def _scores(values: object, index: int, num_experts: int) -> tuple[float, ...]:
    if not isinstance(values, list) or not all(jsonio.is_number(v) for v in values):
        raise _Invalid(f"layer {index}: scores must list finite numbers, not {_show(values)}")
    if len(values) != num_experts:
        raise _Invalid(f"layer {index}: {len(values)} scores, but the plan has {num_experts} experts")
    return tuple(float(v) for v in values)


def _field(doc: dict, key: str, kind: type[T], what: str, where: str = "") -> T:
    if key not in doc:
        raise _Invalid(f"{where}{key} is missing")
    if not isinstance(doc[key], kind):
        raise _Invalid(f"{where}{key} must be {what}, not {_show(doc[key])}")
    return doc[key]


def _int_field(doc: dict, key: str) -> int:
    if key not in doc:
        raise _Invalid(f"{key} is missing")
    if not jsonio.is_whole(doc[key]):
        raise _Invalid(f"{key} must be a whole number, not {_show(doc[key])}")
    return doc[key]


def _show(value: object) -> str:
    text = jsonio.dumps(value, indent=None)
    return text if len(text) <= 40 else text[:37] + "..."


def check_feasible(layout: Routing, keep: int, top_k: int) -> None:
    """Fail fast, before any work, when keeping ``keep`` experts with ``top_k`` routing cannot be served."""
    e, k0 = layout.num_experts, layout.top_k
    if e < 2:
        raise PlanError(f"the model has {e} expert per MoE layer: there is nothing to prune")
    if not 1 <= keep < e:
        raise PlanError(f"--keep {keep} must be between 1 and {e - 1}: the model has {e} experts per MoE layer")
    if not 1 <= top_k <= k0:
        raise PlanError(f"--top-k {top_k} must be between 1 and the model's top-k {k0}")
    if keep < top_k:
        raise PlanError(
            f"--keep {keep} is below the router's top-k {top_k}; keep at least {top_k} or lower it with --top-k"
        )
    g = layout.n_group
    if g > 1:
        per_group = keep // g
        if keep % g or per_group < layout.family.min_per_group:
            raise PlanError(
                f"--keep {keep} does not fit grouped routing ({g} groups): keep a multiple of {g}"
                f" with at least {layout.family.min_per_group} per group"
            )
        if top_k > layout.topk_group * per_group:
            raise PlanError(
                f"--keep {keep} leaves {layout.topk_group} chosen groups × {per_group} experts, fewer than"
                f" top-k {top_k}; keep more experts or lower --top-k"
            )


def select(layout: Layout, scores: dict[int, np.ndarray], keep: int) -> dict[int, tuple[int, ...]]:
    """Keep the ``keep`` highest-scoring experts per layer, the same number from every routing group.

    Ties go to the lower expert id; the result is in ascending original order.
    """
    return {index: select_one(layout, scores[index], keep, layer=index) for index in layout.moe_indices}


def select_one(routing: Routing, scores: np.ndarray, keep: int, *, layer: int | None = None) -> tuple[int, ...]:
    """One layer's kept experts: the best ``keep // n_group`` of every group, ascending.

    ``scores`` ``(experts,)`` must be finite: an ``inf`` would always be kept and a ``NaN`` sorts arbitrarily.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (routing.num_experts,):
        raise PlanError(f"{_layer(layer)}{s.size} scores for {routing.num_experts} experts; the statistics are corrupt")
    check_finite_scores(s, layer)
    group = routing.num_experts // routing.n_group
    chosen: list[int] = []
    for start in range(0, routing.num_experts, group):
        order = np.argsort(-s[start : start + group], kind="stable")  # stable: ties keep lower ids first
        chosen.extend(int(start + j) for j in order[: keep // routing.n_group])
    return tuple(sorted(chosen))


def check_finite_scores(scores: np.ndarray, layer: int | None, criterion: str | None = None) -> None:
    """Refuse scores ``(experts,)`` holding ``inf`` or ``NaN``, naming the layer and the first such expert."""
    s = np.asarray(scores, dtype=np.float64)
    if bad := np.flatnonzero(~np.isfinite(s)).tolist():
        under = f" under {criterion}" if criterion else ""
        raise PlanError(
            f"{_layer(layer)}expert {bad[0]} scores {s[bad[0]]}{under}; the checkpoint has non-finite weights there"
            " (re-download it) or the statistics are corrupt"
        )


def _layer(index: int | None) -> str:
    return "" if index is None else f"layer {index}: "


def jaccard(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """|a ∩ b| / |a ∪ b|: 1.0 when two calibrations keep the same experts."""
    return len(set(a) & set(b)) / len(set(a) | set(b))


def check_plan(plan: Plan, layout: Layout) -> None:
    """A plan must name exactly this checkpoint's MoE layers and keep a valid, uniform, group-balanced set."""
    model_type = layout.family.model_types
    if plan.model_type not in model_type or plan.num_experts != layout.num_experts:
        raise PlanError(
            f"the plan is for a {plan.model_type} model with {plan.num_experts} experts, but this checkpoint is"
            f" {layout.family.name} with {layout.num_experts}; make a plan for this model"
        )
    if sorted(plan.kept) != layout.moe_indices:
        raise PlanError(f"the plan names layers {sorted(plan.kept)} but the MoE layers are {layout.moe_indices}")
    if odd := uneven_layer(plan.kept):
        raise PlanError(f"layer {odd[0]}: the plan keeps {odd[1]} experts, other layers {odd[2]}")
    check_feasible(layout, plan.keep, plan.top_k)
    group = layout.num_experts // layout.n_group
    for index, kept in plan.kept.items():
        if list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= layout.num_experts:
            raise PlanError(f"layer {index}: kept ids must be distinct, ascending, in 0..{layout.num_experts - 1}")
        counts = np.bincount(np.asarray(kept) // group, minlength=layout.n_group)
        if len(set(counts.tolist())) > 1:
            raise PlanError(f"layer {index}: the plan keeps {counts.tolist()} experts per routing group; keep equal")
    for index, scores in plan.scores.items():
        check_finite_scores(np.asarray(scores), index, plan.criterion)


def uneven_layer(kept: dict[int, tuple[int, ...]]) -> tuple[int, int, int] | None:
    """``(layer, its count, the majority's count)`` for the first layer (by number) keeping a number of experts
    that differs from what most layers keep; None when all keep the same."""
    counts = Counter(len(k) for k in kept.values())
    majority = counts.most_common(1)[0][0] if counts else 0
    odd = [(index, len(k)) for index, k in sorted(kept.items()) if len(k) != majority]
    return (*odd[0], majority) if odd else None


def _optional(doc: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    """``doc[key]`` when present and of ``kind`` (None when absent or null)."""
    value = doc.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise _Invalid(f"correction: {key} is {_show(value)}, of the wrong type")
    return value
