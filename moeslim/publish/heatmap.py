"""The expert map image: MoE layers × experts, coloured by score, kept experts marked.

Optional: matplotlib comes with ``pip install 'moeslim[plot]'``. Without it nothing is drawn and the card
says so; the kept-expert table in the card carries the same information.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moeslim.plan import Plan


def expert_grid(plan: Plan) -> np.ndarray:
    """``(layers, experts)`` in [0, 1]: each layer's scores min-max scaled (criteria differ in scale across
    layers), or 1 for kept and 0 for dropped experts when the plan carries no scores."""
    rows = []
    for index in sorted(plan.kept):
        if index in plan.scores:
            s = np.asarray(plan.scores[index], dtype=np.float64)  # (experts,)
            span = s.max() - s.min()
            rows.append((s - s.min()) / span if span > 0 else np.full_like(s, 0.5))
        else:
            rows.append(np.isin(np.arange(plan.num_experts), plan.kept[index]).astype(np.float64))
    return np.stack(rows)


def draw_expert_map(plan: Plan, path: Path) -> bool:
    """Save the expert map to ``path`` as PNG; ``False`` (and no file) when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display backend
    except ImportError:
        return False
    grid = expert_grid(plan)
    layers, experts = grid.shape
    width, height = min(4 + experts / 12, 16), min(2 + layers / 4, 12)  # inches
    # Fixed margins (inches) instead of a layout engine: constrained layout measured every label twice over and
    # took most of the drawing time; these fit the labels below at any size (layer labels have at most 3 digits).
    left, right, bottom, top, bar = 0.75, 1.2, 0.55, 0.35, 0.18
    fig = Figure(figsize=(width, height), dpi=100)
    plot_w = width - left - right
    ax = fig.add_axes((left / width, bottom / height, plot_w / width, (height - bottom - top) / height))
    cax = fig.add_axes(((left + plot_w + 0.2) / width, bottom / height, bar / width, (height - bottom - top) / height))
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    kept = [(row, j) for row, index in enumerate(sorted(plan.kept)) for j in plan.kept[index]]
    ax.scatter([j for _, j in kept], [row for row, _ in kept], s=max(2, 400 / max(experts, layers)), c="white",
               edgecolors="black", linewidths=0.4, label="kept")  # fmt: skip
    step = -(-layers // 32)  # at most 32 layer labels
    ax.set_yticks(range(0, layers, step), [str(i) for i in sorted(plan.kept)][::step])
    ax.set_xlabel("expert (original id)")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{plan.keep} of {plan.num_experts} experts kept per layer ({plan.criterion})")
    label = "score, scaled within each layer" if plan.scores else "kept (no scores in the plan)"
    fig.colorbar(image, cax=cax, label=label)
    fig.savefig(path, format="png", metadata={"Software": None})
    return True
