"""Calibrating a quantised checkpoint against the same checkpoint unquantised: time and peak RSS.

    python benchmarks/bench_quantised.py --work /tmp/bench-quant [--layers 4] [--samples 16] [--seq-len 256]

The synthetic OLMoE-shaped model (``make_synthetic.py``, bf16) is quantised here, one tensor at a time, two
ways: FP8 E4M3 with 128×128 block scales (DeepSeek-V3 / Qwen3-FP8 style), and int4 packed by compressed-tensors
(``pack-quantized``, symmetric, groups of 128, bf16 scales: W4A16 style). Every projection of the decoder
layers is quantised; routers, norms, embeddings and the head stay bf16. Each model is then calibrated by
``bench_calibrate.py``'s streaming child (its own process, ``ru_maxrss``), computing in ``--dtype``.
The quantised runs should need about what the unquantised one needs: one dense layer plus activations.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).parent
PROJECTION = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp\.experts\.\d+)\.\w+_proj\.weight$")
BLOCK = 128
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def fp8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    w = weight.float()
    rows, cols = w.shape
    tiles = w.reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)
    scale_inv = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    codes = (tiles / scale_inv[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
    return {"weight": codes, "weight_scale_inv": scale_inv.contiguous()}


def int4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    scale = (weight.float().reshape(weight.shape[0], -1, BLOCK).abs().amax(-1) / 7).to(torch.bfloat16)
    return dict(PackedQuantizationCompressor.compress({"weight": weight, "weight_scale": scale}, _int4_scheme()))


def _int4_scheme():  # type: ignore[no-untyped-def]
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=BLOCK)
    return QuantizationScheme(targets=["Linear"], weights=args)


QUANT_CONFIG = {
    "fp8": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]},
    "int4": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "format": "pack-quantized",
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": BLOCK},
        }},
        "ignore": ["lm_head", "re:.*mlp\\.gate$"],
    },
}  # fmt: skip


def quantise(src: Path, out: Path, method: str) -> None:
    """Write ``src`` quantised by ``method`` into ``out``: one shard per source shard, a tensor at a time."""
    if (out / "config.json").exists():
        return
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(src / shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = f.get_tensor(name)
                if not PROJECTION.match(name):
                    tensors[name] = tensor
                    continue
                prefix = name.removesuffix(".weight")
                for key, value in (fp8 if method == "fp8" else int4)(tensor).items():
                    tensors[f"{prefix}.{key}"] = value.contiguous()
        save_file(tensors, tmp / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps({**config, "quantization_config": QUANT_CONFIG[method]}, indent=2))
    tmp.rename(out)


def calibrate(model: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(HERE / "bench_calibrate.py"), "--child", "stream", "--model", str(model),
           "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--device", args.device, "--dtype", args.dtype]  # fmt: skip
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-quant"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    base = args.work / f"olmoe-{args.layers}layers"
    if not (base / "config.json").exists():
        gen = HERE / "make_synthetic.py"
        subprocess.run([sys.executable, str(gen), str(base), "--layers", str(args.layers)], check=True)
    models = {"bf16": base}
    for method in ("fp8", "int4"):
        models[method] = args.work / f"olmoe-{args.layers}layers-{method}"
        quantise(base, models[method], method)

    from moeslim.source import open_checkpoint

    per = torch.finfo(getattr(torch, args.dtype)).bits // 8
    dense_layer = sum(
        t.nbytes // 2 * per for n, t in open_checkpoint(base).tensors.items() if n.startswith("model.layers.0.")
    )
    hidden = json.loads((base / "config.json").read_text())["hidden_size"]
    activations = args.samples * args.seq_len * hidden * 4  # the cached hidden states, float32 on CPU
    print(f"one dense layer in {args.dtype}: {dense_layer / 2**20:.0f} MB; hidden states: {activations / 2**20:.0f} MB")
    print("| checkpoint | on disk | time | peak RSS | checksum |")
    print("| --- | --- | --- | --- | --- |")
    for label, model in models.items():
        size = open_checkpoint(model).total_bytes
        result = calibrate(model, args)
        print(
            f"| {label} | {size / 2**30:.2f} GB | {result['seconds']:.1f} s | {result['peak_rss_mb']:.0f} MB"
            f" | {result['checksum']:.4f} |"
        )


if __name__ == "__main__":
    main()
