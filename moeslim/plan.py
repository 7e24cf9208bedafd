"""The plan: which original experts each MoE layer keeps. Plain data, saved as versioned JSON.

The plan is the boundary between scoring (which may use torch) and surgery (which needs none): surgery
from a saved plan reproduces the same output byte for byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeslim.errors import MissingFileError, PlanError
from moeslim.layout import Layout, Routing

PLAN_FORMAT = "moeslim.plan"
PLAN_VERSION = 1
PLAN_NAME = "moeslim_plan.json"


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

    @property
    def keep(self) -> int:
        return len(next(iter(self.kept.values())))

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
            "layers": layers,
        }
        return json.dumps(doc, indent=2) + "\n"


def load_plan(path: Path) -> Plan:
    """Read a plan JSON written by moeslim; its fit to a checkpoint is checked by ``check_plan``."""
    if not path.is_file():
        raise MissingFileError(f"plan file {path} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != PLAN_FORMAT or doc.get("version") != PLAN_VERSION:
            raise PlanError(f"{path} is not a moeslim plan (format {PLAN_FORMAT} version {PLAN_VERSION})")
        layers = doc["layers"]
        return Plan(
            model_type=str(doc["model_type"]),
            num_experts=int(doc["num_experts"]),
            top_k=int(doc["top_k"]),
            kept={int(e["layer"]): tuple(int(j) for j in e["kept"]) for e in layers},
            criterion=str(doc["criterion"]),
            seed=doc.get("seed"),
            scores={int(e["layer"]): tuple(float(s) for s in e["scores"]) for e in layers if "scores" in e},
            calibration=dict(doc.get("calibration") or {}),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, PlanError):
            raise
        raise PlanError(f"{path} is not a valid moeslim plan ({type(e).__name__}: {e})") from e


def check_feasible(layout: Routing, keep: int, top_k: int) -> None:
    """Fail fast, before any work, when keeping ``keep`` experts with ``top_k`` routing cannot be served."""
    e, k0 = layout.num_experts, layout.top_k
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
    return {index: select_one(layout, scores[index], keep) for index in layout.moe_indices}


def select_one(routing: Routing, scores: np.ndarray, keep: int) -> tuple[int, ...]:
    """One layer's kept experts: the best ``keep // n_group`` of every group, ascending."""
    group = routing.num_experts // routing.n_group
    s = np.asarray(scores, dtype=np.float64)
    chosen: list[int] = []
    for start in range(0, routing.num_experts, group):
        order = np.argsort(-s[start : start + group], kind="stable")  # stable: ties keep lower ids first
        chosen.extend(int(start + j) for j in order[: keep // routing.n_group])
    return tuple(sorted(chosen))


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
    check_feasible(layout, plan.keep, plan.top_k)
    group = layout.num_experts // layout.n_group
    for index, kept in plan.kept.items():
        if len(kept) != plan.keep:
            raise PlanError(f"layer {index}: the plan keeps {len(kept)} experts, other layers {plan.keep}")
        if list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= layout.num_experts:
            raise PlanError(f"layer {index}: kept ids must be distinct, ascending, in 0..{layout.num_experts - 1}")
        counts = np.bincount(np.asarray(kept) // group, minlength=layout.n_group)
        if len(set(counts.tolist())) > 1:
            raise PlanError(f"layer {index}: the plan keeps {counts.tolist()} experts per routing group; keep equal")
