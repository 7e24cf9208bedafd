"""Quantised checkpoints, as far as moeslim needs to know without torch: the config's quantisation block and
the names of the tensors a quantiser stores beside (or instead of) a weight."""

from __future__ import annotations

from moeslim.families.table import text_config

#: What a quantiser stores of a weight ``<module>.weight``, by format: the suffixes of those tensors' names. The one
#: home of this knowledge: dequantisation (``stream/dequant.py``), the structural check and ``inspect`` read it here.
FP8_SCALE = ("_scale_inv",)  # <module>.weight_scale_inv: a scale per block, beside the F8 weight
FP8_EXTRA = (".activation_scale", ".input_scale")  # activation scales of FP8 layers: not needed to dequantise
MXFP4_PARTS = ("_blocks", "_scales")  # <module>.<name>_blocks and _scales stand for <module>.<name>
PACKED_PARTS = (".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point")  # compressed-tensors ints
SCALED_PARTS = (".weight", ".weight_scale", ".weight_zero_point", ".input_scale")  # compressed-tensors float/int
GPTQ_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")  # GPTQ / AWQ packs
NVFP4_PARTS = (".weight_scale", ".weight_scale_2", ".input_scale")  # ModelOpt NVFP4, beside the U8 <module>.weight

#: what follows ``<fused expert tensor>_`` in the name of a tensor that quantises it, in the module naming
#: (``experts.gate_up_proj_scale_inv``, ``_weight_scale``, ``_weight_scale_2``, ``_input_scale``): no public
#: release ships them (FP8 and NVFP4 MoE releases are per-expert), transformers' quantisers name them so in memory
FUSED_SCALES = ("scale", "scale_inv", "scale_2", "zero_point")
#: what is gone once a weight is dequantised: its scales, zero points, shapes and activation scales
DROPPED_WHEN_DENSE = (*FP8_SCALE, *FP8_EXTRA, "_scales", ".weight_scale", ".weight_zero_point", ".weight_shape",
                      ".qzeros", ".scales", ".g_idx", ".weight_scale_2")  # fmt: skip
#: packed codes and how many dense values one stored element holds, by stored dtype, for 4-bit codes where the
#: width varies (``packed_codes`` gives them for a checkpoint's bits); a U8 ``.weight`` is NVFP4's two codes a byte
PACKED_CODES = {".weight_packed": {"I32": 8, "I64": 16}, ".qweight": {"I32": 8}, "_blocks": {"U8": 2},
                ".weight": {"U8": 2}}  # fmt: skip
#: tensors that only mean something beside a quantised weight
COMPANIONS = (*FP8_SCALE, *MXFP4_PARTS, *PACKED_PARTS, ".weight_scale_2")
#: names a quantiser stores instead of, or beside, a weight transformers would expect
QUANT_SUFFIXES = (*FP8_SCALE, *MXFP4_PARTS, *GPTQ_PARTS, *NVFP4_PARTS)
#: a mark of each format in a tensor's last name part → the format, for ``inspect``
FORMAT_MARKS = {
    "weight_scale_inv": "fp8-block",
    "_blocks": "mxfp4",
    "qweight": "gptq/awq",
    "weight_packed": "compressed",
    "weight_scale_2": "nvfp4",
}


def quantization_config(config: dict) -> dict:
    """The ``quantization_config`` of a raw ``config.json`` (of the language model, or of its wrapper); ``{}``
    when the checkpoint is not quantised."""
    found = text_config(config).get("quantization_config") or config.get("quantization_config") or {}
    return found if isinstance(found, dict) else {}


def packed_codes(config: dict) -> dict[str, dict[str, int]]:
    """``PACKED_CODES`` for the checkpoint of ``config``: a word holds ``32 / bits`` codes at the bits its
    quantisation config gives (GPTQ/AWQ ``bits``; compressed-tensors' ``num_bits``, the fewest where its groups
    differ, so that a layer is never counted below its dense size), 4 where it gives none. A GPTQ 8-bit weight is
    4 codes an int32, not 8: counted at 4-bit, its dense size would be twice what it is."""
    quant, codes = quantization_config(config), dict(PACKED_CODES)
    bits = quant.get("bits") or quant.get("w_bit")
    if isinstance(bits, int) and 0 < bits <= 32:
        codes[".qweight"] = {"I32": 32 // bits}
    groups = quant.get("config_groups")
    weights = [g.get("weights") for g in groups.values() if isinstance(g, dict)] if isinstance(groups, dict) else []
    widths = [w["num_bits"] for w in weights if isinstance(w, dict) and isinstance(w.get("num_bits"), int)]
    if widths and 0 < min(widths) <= 32:
        codes[".weight_packed"] = {"I32": 32 // min(widths), "I64": 64 // min(widths)}
    return codes


#: formats whose weights calibration and validation dequantise layer by layer (``stream/dequant.py``, ``packs.py``)
READABLE = (
    "fp8 block-scaled, mxfp4, compressed-tensors pack-, float- and int-quantized, modelopt NVFP4, gptq 2/4/8-bit"
    " and awq gemm 4-bit"
)
CT_FORMATS = ("pack-quantized", "float-quantized", "int-quantized", "naive-quantized")


def unreadable(config: dict) -> str | None:
    """The quantisation of ``config`` that calibration cannot dequantise (``"gptq 3-bit"``, ``"compressed-tensors
    nvfp4-pack-quantized"``), or None when it is unquantised or readable."""
    quant = quantization_config(config)
    if not quant:
        return None
    method = str(quant.get("quant_method", "quantised"))
    if method in ("fp8", "mxfp4"):
        return None
    if method == "modelopt":
        algo = str(quant.get("quant_algo", "?"))
        return None if algo.upper() == "NVFP4" else f"modelopt {algo}"
    if method == "gptq":  # 3-bit codes straddle words in GPTQ's own layout: not read
        bits = quant.get("bits", 4)
        return None if bits in (2, 4, 8) else f"gptq {bits}-bit"
    if method == "awq":  # the GEMM layout; GEMV and others order their words otherwise
        bits, version = quant.get("bits", quant.get("w_bit", 4)), str(quant.get("version", "gemm")).lower()
        return None if bits == 4 and version == "gemm" else f"awq {version} {bits}-bit"
    if method == "compressed-tensors":
        default = str(quant.get("format", ""))
        groups = [g for g in (quant.get("config_groups") or {}).values() if isinstance(g, dict)]
        formats = sorted({str(g.get("format") or default) for g in groups} or {default})
        unknown = [f for f in formats if f not in CT_FORMATS]
        return f"{method} {', '.join(unknown)}" if unknown else None
    return method
