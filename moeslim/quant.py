"""Quantised checkpoints, as far as moeslim needs to know without torch: the config's quantisation block and
the names of the tensors a quantiser stores beside (or instead of) a weight."""

from __future__ import annotations

from moeslim.families.table import text_config

# scales of FP8 blocks, MXFP4 blocks and scales, GPTQ / AWQ packs, compressed-tensors scales
QUANT_SUFFIXES = ("_scale_inv", "_blocks", "_scales", ".qweight", ".qzeros", ".scales", ".g_idx", ".weight_scale")


def quantization_config(config: dict) -> dict:
    """The ``quantization_config`` of a raw ``config.json`` (of the language model, or of its wrapper); ``{}``
    when the checkpoint is not quantised."""
    found = text_config(config).get("quantization_config") or config.get("quantization_config") or {}
    return found if isinstance(found, dict) else {}


#: formats whose weights calibration and validation dequantise layer by layer (``calibrate/dequant.py``)
READABLE = "fp8 block-scaled, mxfp4 and compressed-tensors pack-, float- and int-quantized"
CT_FORMATS = ("pack-quantized", "float-quantized", "int-quantized", "naive-quantized")


def unreadable(config: dict) -> str | None:
    """The quantisation of ``config`` that calibration cannot dequantise (``"gptq"``, ``"compressed-tensors
    nvfp4-pack-quantized"``), or None when it is unquantised or readable."""
    quant = quantization_config(config)
    if not quant:
        return None
    method = str(quant.get("quant_method", "quantised"))
    if method in ("fp8", "mxfp4"):
        return None
    if method == "compressed-tensors":
        default = str(quant.get("format", ""))
        groups = [g for g in (quant.get("config_groups") or {}).values() if isinstance(g, dict)]
        formats = sorted({str(g.get("format") or default) for g in groups} or {default})
        unknown = [f for f in formats if f not in CT_FORMATS]
        return f"{method} {', '.join(unknown)}" if unknown else None
    return method
