"""Per-expert checkpoint tensors straight into transformers' fused expert parameters, one expert at a time.

transformers 5 keeps a layer's experts as fused parameters (``experts.gate_up_proj`` ``[E, 2I, H]``,
``experts.down_proj`` ``[E, H, I]``) and builds them at load time from the per-expert tensors on disk with
``WeightConverter``s: ``MergeModulelist(dim=0)`` (stack the experts), then for gate/up ``Concatenate(dim=1)``.
Its conversion holds every source tensor, their converted copies, the stack and the result at once: about
3.6 × the layer's size. Here the fused parameter is allocated once and each expert's tensor is read
straight from the file's pages (a map of that one tensor, closed after it) into its slot, converted there: the
peak is the layer plus one expert's pages. The values are those transformers builds (same order, same dtype
conversion); a converter of any other shape, or a name or shape that does not fit, is left to transformers.
A quantised expert weight (``dequant.Packed``) is dequantised here as it is read, one expert at a time too.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from moeslim.stream.dequant import TORCH_DTYPES, Item, Reader


@dataclass(frozen=True)
class Fusion:
    """One fused parameter: ``parts[k][j]`` is the tensor of source pattern k for expert j (on disk, or a
    quantised weight dequantised when read)."""

    target: str
    parts: tuple[tuple[Item, ...], ...]


def plan_fusions(converters: Iterable[object], tensors: list[Item]) -> tuple[list[Fusion], list[Item]]:
    """Split ``tensors`` into the fused parameters built here and the rest (left to transformers)."""
    converters = list(converters)
    renamings = [c for c in converters if type(c).__name__ == "WeightRenaming"]
    fusions: list[Fusion] = []
    taken: set[str] = set()
    for converter in converters:
        if not _stack_then_concat(converter):
            continue
        sources = list(getattr(converter, "source_patterns", []))
        target = getattr(converter, "target_patterns", [""])[0]
        groups: dict[str, dict[int, dict[int, Item]]] = defaultdict(lambda: defaultdict(dict))
        for k, pattern in enumerate(sources):
            regex = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)") + "$")
            for info in tensors:
                if info.name not in taken and (m := regex.search(info.name)):
                    groups[info.name[: m.start()]][k][int(m.group(1))] = info
        for prefix, by_pattern in groups.items():
            parts = _complete(by_pattern, len(sources))
            if parts is not None:
                fusions.append(Fusion(_renamed(prefix + target, renamings), parts))
                taken.update(info.name for part in parts for info in part)
    return fusions, [info for info in tensors if info.name not in taken]


def _renamed(name: str, renamings: list[object]) -> str:
    """``name`` after transformers' key renamings (regular expressions, e.g. ``.block_sparse_moe.`` → ``.mlp.``)."""
    for renaming in renamings:
        targets = list(getattr(renaming, "target_patterns", []))
        for i, source in enumerate(getattr(renaming, "source_patterns", [])):
            name = re.sub(source, targets[0] if len(targets) == 1 else targets[i], name)
    return name


def _stack_then_concat(converter: object) -> bool:
    """A converter that stacks experts on dim 0 and, with several sources, concatenates them on dim 1."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in getattr(converter, "operations", None) or []]
    sources = getattr(converter, "source_patterns", [])
    expected = [("MergeModulelist", 0)] + ([("Concatenate", 1)] if len(sources) > 1 else [])
    return ops == expected and len(getattr(converter, "target_patterns", [])) == 1


def _complete(by_pattern: dict[int, dict[int, Item]], patterns: int) -> tuple[tuple[Item, ...], ...] | None:
    """Experts 0..E-1 for every pattern, each a 2-D tensor of one dtype and width; else None."""
    experts = set(by_pattern.get(0, {}))
    if not experts or experts != set(range(len(experts))):
        return None
    if any(set(by_pattern.get(k, {})) != experts for k in range(patterns)):
        return None
    parts = tuple(tuple(by_pattern[k][j] for j in range(len(experts))) for k in range(patterns))
    first = parts[0][0]
    for part in parts:
        if any(len(i.shape) != 2 or i.shape != part[0].shape or i.dtype not in TORCH_DTYPES for i in part):
            return None
        if part[0].shape[1] != first.shape[1] or part[0].dtype != first.dtype:
            return None
    return parts


def fused_shape(fusion: Fusion) -> tuple[int, int, int]:
    """``[E, rows of all parts, width]``: experts stacked, parts concatenated on their first dimension."""
    return (len(fusion.parts[0]), sum(part[0].shape[0] for part in fusion.parts), fusion.parts[0][0].shape[1])


def fill(fusion: Fusion, out: torch.Tensor) -> None:
    """Write each expert's tensors into their slice of ``out`` (``fused_shape``), converted to its dtype and device
    on the way (``Reader.dense_into``: from the file's pages, no copy of the expert in between)."""
    with Reader() as reader:
        for j in range(out.shape[0]):
            row = 0
            for part in fusion.parts:
                info = part[j]
                reader.dense_into(info, out[j, row : row + info.shape[0]])
                row += info.shape[0]
