"""Rewrite config.json for the pruned model: only the keys the source file actually uses are changed."""

from __future__ import annotations

import copy
import json

from moeslim.families.table import Family, config_value, set_config_value, text_config


def rewrite_config(config: dict, family: Family, keep: int, top_k: int) -> dict:
    """A copy of ``config`` with the routed expert count set to ``keep`` and top-k to ``top_k``.

    Every alias of the count that the file contains is rewritten (transformers 5.x may write
    ``num_local_experts`` where Hub files have ``num_experts``); a per-layer list (Hunyuan-A13B's ``moe_topk``)
    stays a list, every entry rewritten; everything else is kept as it was.
    """
    out = copy.deepcopy(config)
    scope = text_config(out)
    for keys, value in ((family.count_keys, keep), (family.top_k_keys, top_k)):
        for key in keys:
            old = config_value(scope, key)
            set_config_value(scope, key, [value] * len(old) if isinstance(old, list) else value)
    return out


def dump_config(config: dict) -> str:
    """JSON in the layout transformers writes (2-space indent, trailing newline), key order preserved."""
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"
