"""Quantised checkpoints, as far as moeslim needs to know without torch: the config's quantisation block and
the names of the tensors a quantiser stores beside (or instead of) a weight."""

from __future__ import annotations

from moeslim.families import text_config

# scales of FP8 blocks, MXFP4 blocks and scales, GPTQ / AWQ packs, compressed-tensors scales
QUANT_SUFFIXES = ("_scale_inv", "_blocks", "_scales", ".qweight", ".qzeros", ".scales", ".g_idx", ".weight_scale")


def quantization_config(config: dict) -> dict:
    """The ``quantization_config`` of a raw ``config.json`` (of the language model, or of its wrapper); ``{}``
    when the checkpoint is not quantised."""
    found = text_config(config).get("quantization_config") or config.get("quantization_config") or {}
    return found if isinstance(found, dict) else {}
