"""``moeslim inspect``: what a checkpoint holds, and what it would weigh after pruning."""

from __future__ import annotations

from collections import Counter

from moeslim.families.table import text_config
from moeslim.layout import Layout, MoeLayer
from moeslim.quant import FORMAT_MARKS, quantization_config
from moeslim.source import Checkpoint
from moeslim.surgery.mapping import plan_outputs
from moeslim.units import human_bytes


def inspect_report(ckpt: Checkpoint, layout: Layout, keep: int | None = None) -> dict:
    """A JSON-ready description of the checkpoint; ``projected_bytes`` is exact, computed by the surgery map."""
    cfg = text_config(ckpt.config)
    moe = layout.moe_indices
    trunk = range(layout.num_hidden_layers)
    routed = sum(_routed_bytes(ckpt, layer) for layer in layout.layers)
    report = {
        "family": layout.family.name,
        "model_type": cfg.get("model_type"),
        "layers": layout.num_hidden_layers,
        "moe_layers": [i for i in moe if i < layout.num_hidden_layers],
        "dense_layers": [i for i in trunk if i not in moe],
        "mtp_layers": [layer.index for layer in layout.layers if layer.mtp],
        "experts_per_layer": layout.num_experts,
        "top_k": layout.top_k,
        "n_group": layout.n_group,
        "topk_group": layout.topk_group,
        "shared_experts": _shared(ckpt, layout),
        "layout": "fused" if layout.family.fused else "per-expert",
        "dtypes": dict(Counter(t.dtype for t in ckpt.tensors.values()).most_common()),
        "quantisation": _quantisation(ckpt),
        "shards": len(ckpt.shards),
        "total_bytes": ckpt.total_bytes,
        "routed_expert_bytes": routed,
    }
    if keep is not None:
        kept = {i: tuple(range(keep)) for i in moe}
        report["keep"] = keep
        report["projected_bytes"] = sum(t.nbytes for t in plan_outputs(ckpt, layout, kept))
    return report


def _routed_bytes(ckpt: Checkpoint, layer: MoeLayer) -> int:
    names = list(layer.fused) + [n for names in layer.per_expert for n in names]
    return sum(ckpt.tensors[n].nbytes for n in names)


def _shared(ckpt: Checkpoint, layout: Layout) -> int:
    """Shared-expert modules found in the first MoE layer (0 when the family has none)."""
    layer = layout.layers[0]
    shared = [s for s in layout.family.shared if not s.endswith("_gate.")]  # a shared expert's gate is no expert
    return sum(any(n.startswith(layer.block + s) for n in ckpt.tensors) for s in shared)


def _quantisation(ckpt: Checkpoint) -> list[str]:
    found = {kind for marker, kind in FORMAT_MARKS.items() for n in ckpt.tensors if marker in n.rsplit(".", 1)[-1]}
    method = quantization_config(ckpt.config)
    if method.get("quant_method"):
        found.add(str(method["quant_method"]))
    return sorted(found)


def format_report(r: dict) -> str:
    lines = [
        f"family        {r['family']} (model_type {r['model_type']}, {r['layout']} experts)",
        f"layers        {r['layers']}: MoE {format_ranges(r['moe_layers'])};"
        f" dense {format_ranges(r['dense_layers']) or '-'}; MTP {format_ranges(r['mtp_layers']) or '-'}",
        f"experts       {r['experts_per_layer']} per MoE layer, top-{r['top_k']}"
        + (f", {r['n_group']} groups (top {r['topk_group']})" if r["n_group"] > 1 else "")
        + (f", {r['shared_experts']} shared" if r["shared_experts"] else ""),
        f"dtypes        {', '.join(f'{k} ×{v}' for k, v in r['dtypes'].items())}",
        f"quantisation  {', '.join(r['quantisation']) or 'none'}",
        f"size          {human_bytes(r['total_bytes'])} in {r['shards']} shard(s);"
        f" routed experts {human_bytes(r['routed_expert_bytes'])}",
    ]
    if "projected_bytes" in r:
        lines.append(f"--keep {r['keep']:<7}{human_bytes(r['projected_bytes'])}")
    return "\n".join(lines)


def format_ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] → '0-2, 5'."""
    runs: list[list[int]] = []
    for x in xs:
        if runs and x == runs[-1][-1] + 1:
            runs[-1].append(x)
        else:
            runs.append([x])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
