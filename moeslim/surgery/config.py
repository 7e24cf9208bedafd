"""Rewrite config.json for the pruned model: only the keys the source file actually uses are changed."""

from __future__ import annotations

import copy
import json

from moeslim.families.table import Family, set_config_value, text_config


def rewrite_config(config: dict, family: Family, keep: int, top_k: int) -> dict:
    """A copy of ``config`` with the routed expert count set to ``keep`` and top-k to ``top_k``.

    Every alias of the count that the file contains is rewritten (transformers 5.x may write
    ``num_local_experts`` where Hub files have ``num_experts``); everything else is kept as it was.
    """
    out = copy.deepcopy(config)
    scope = text_config(out)
    for key in family.count_keys:
        set_config_value(scope, key, keep)
    for key in family.top_k_keys:
        set_config_value(scope, key, top_k)
    return out


def dump_config(config: dict) -> str:
    """JSON in the layout transformers writes (2-space indent, trailing newline), key order preserved."""
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"
