"""The reconstruction criterion's greedy search at real widths: batched against one router call per candidate.

    python benchmarks/bench_reconstruction.py [--shape deepseek_v3 olmoe] [--tokens 256] [--probe 16] [--full]

Synthetic and standalone: ``tokens`` random hidden states, every expert's output random ``(experts, tokens,
hidden)`` float32, and a real transformers router module with random weights (normal × 0.02) and, where it has
one, a random correction bias (normal × 0.1): DeepSeek-V3's ``DeepseekV3TopkRouter`` (hidden 7168, 256 experts in
8 groups, 4 groups chosen, top-8, renormalised, × 2.5) and an OLMoE-shaped ``OlmoeTopKRouter`` (hidden 4096, 64
experts, top-8, no renormalisation). One thread. The batched search (what ``scores()`` runs) is timed over the whole
greedy removal; the sequential one (``_Sequential``: the search before batching) over ``--probe`` candidate
removals of the first step, its whole-search time extrapolated as that per-candidate time × the candidates the
greedy search weighs (counted in the batched run); ``--full`` runs it whole instead and checks that both give
the same scores. Reports wall and CPU seconds; run under ``/usr/bin/time -v`` for the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from moeslim.calibrate.reconstruction import Search, _Sequential, greedy, search_of
from moeslim.families.table import FAMILIES
from moeslim.layout import Routing
from moeslim.stream.modules import MoeParts

SHAPES = {  # model type → (hidden, experts, top-k, groups, chosen groups)
    "deepseek_v3": (7168, 256, 8, 8, 4),
    "olmoe": (4096, 64, 8, 1, 1),
}


def router_of(model_type: str) -> tuple[Any, MoeParts]:
    """The family's own router module at its real widths, with random weights, and its ``MoeParts``."""
    hidden, experts, top_k, groups, chosen = SHAPES[model_type]
    gen = torch.Generator().manual_seed(0)
    if model_type == "deepseek_v3":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

        config = DeepseekV3Config(
            hidden_size=hidden, n_routed_experts=experts, num_experts_per_tok=top_k, n_group=groups,
            topk_group=chosen, norm_topk_prob=True, routed_scaling_factor=2.5,
        )  # fmt: skip
        router = DeepseekV3TopkRouter(config)
        router.e_score_correction_bias.copy_(torch.randn(experts, generator=gen) * 0.1)
        biases = ((router, "e_score_correction_bias"),)
    else:
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

        config = OlmoeConfig(hidden_size=hidden, num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=False)
        router, biases = OlmoeTopKRouter(config), ()
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, hidden, generator=gen) * 0.02)
    return router, MoeParts(None, router, None, biases, (router, "weight"))


class Counted:
    """A search that counts the candidate removals it weighs."""

    def __init__(self, search: Search) -> None:
        self.search, self.candidates = search, 0

    def errors(self, kept: list[int], candidates: list[int]) -> list[float]:
        self.candidates += len(candidates)
        return self.search.errors(kept, candidates)

    def keep(self, kept: list[int]) -> None:
        self.search.keep(kept)


def timed(fn: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def bench(model_type: str, tokens: int, probe: int, full: bool) -> dict[str, Any]:
    hidden, experts, top_k, groups, chosen = SHAPES[model_type]
    router, parts = router_of(model_type)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, hidden, generator=gen)
    outputs = torch.randn(experts, tokens, hidden, generator=gen)  # (experts, tokens, hidden)
    routing = Routing(FAMILIES[model_type], experts, top_k, groups, chosen, 1)
    counted = Counted(search_of(parts, x, (), 2, outputs))
    batched, wall, cpu = timed(lambda: greedy(counted, routing))
    row = {
        "shape": model_type, "tokens": tokens, "hidden": hidden, "experts": experts, "top_k": top_k,
        "searched": type(counted.search).__name__, "group": getattr(counted.search, "group", None),
        "candidates": counted.candidates, "batched_wall_s": round(wall, 2), "batched_cpu_s": round(cpu, 2),
    }  # fmt: skip
    sequential = _Sequential(parts, x, ((), 2), outputs, counted.search.full)  # type: ignore[attr-defined]
    if full:
        scores, wall, cpu = timed(lambda: greedy(sequential, routing))
        row |= {"sequential_wall_s": round(wall, 2), "sequential_cpu_s": round(cpu, 2), "extrapolated": False}
        row["same_scores"] = bool((scores == batched).all())
    else:
        _, wall, cpu = timed(lambda: sequential.errors(list(range(experts)), list(range(probe))))
        row |= {"sequential_wall_s": round(wall / probe * counted.candidates, 1), "extrapolated": True,
                "sequential_cpu_s": round(cpu / probe * counted.candidates, 1), "probe": probe}  # fmt: skip
    row["speedup_cpu"] = round(row["sequential_cpu_s"] / row["batched_cpu_s"], 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--probe", type=int, default=16, help="sequential candidates timed to extrapolate from")
    parser.add_argument("--full", action="store_true", help="run the sequential search whole (slow at real widths)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for model_type in args.shape:
        print(json.dumps(bench(model_type, args.tokens, args.probe, args.full)), flush=True)


if __name__ == "__main__":
    main()
