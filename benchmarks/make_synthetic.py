"""Write a synthetic OLMoE-1B-7B-shaped checkpoint without ever holding the model in memory.

Every safetensors file is written by hand (8-byte little-endian header length, JSON header padded
with spaces to a multiple of 8, then the raw bf16 data), one tensor at a time, in bounded chunks.

Values are finite bf16 numbers (normal * 0.02, truncated from float32 bits). Large tensors are
filled by tiling a 32 MiB pool of random bf16 values, read from a per-tensor random offset, so that
writing is disk-bound rather than RNG-bound; small tensors (router, norms) are drawn directly.
Everything is derived from ``--seed``, so the output is byte-for-byte deterministic.

``--scale F`` multiplies hidden_size, intermediate_size (the expert width) and vocab_size by
``sqrt(F)`` (rounded to a multiple of 32, at least 64), which scales every matrix, hence the
checkpoint, by about ``F``; the layer count (16), the 64 experts, top-8, the 16 heads, the key names
and the number of shard files stay the same (the shard size limit is 5 GB * F).
``--layers L`` overrides the layer count.

Usage: python benchmarks/make_synthetic.py OUT_DIR [--scale F] [--layers L] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

BF16_BYTES = 2
POOL_VALUES = 16 * 1024 * 1024  # 32 MiB of bf16
CHUNK_VALUES = 32 * 1024 * 1024  # at most 64 MiB written per call
SMALL_TENSOR = 1 << 20  # tensors with fewer values are drawn directly from the RNG
FULL_SHARD_BYTES = 5_000_000_000
COMPLETE_MARKER = ".synthetic-complete"


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    experts: int = 64
    top_k: int = 8
    heads: int = 16


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * BF16_BYTES


def scaled(value: int, factor: float) -> int:
    return max(64, round(value * factor / 32) * 32)


def olmoe_dims(scale: float, layers: int | None) -> Dims:
    root = math.sqrt(scale)
    return Dims(
        layers=16 if layers is None else layers,
        hidden=scaled(2048, root),
        intermediate=scaled(1024, root),
        vocab=scaled(50304, root),
    )


def layer_specs(dims: Dims, layer: int) -> list[Spec]:
    p, h, i = f"model.layers.{layer}", dims.hidden, dims.intermediate
    specs = [Spec(f"{p}.self_attn.{m}_proj.weight", (h, h)) for m in "qkvo"]
    specs += [Spec(f"{p}.self_attn.{m}_norm.weight", (h,)) for m in "qk"]
    specs.append(Spec(f"{p}.mlp.gate.weight", (dims.experts, h)))
    for j in range(dims.experts):
        e = f"{p}.mlp.experts.{j}"
        specs += [Spec(f"{e}.gate_proj.weight", (i, h)), Spec(f"{e}.up_proj.weight", (i, h))]
        specs.append(Spec(f"{e}.down_proj.weight", (h, i)))
    specs += [Spec(f"{p}.{n}.weight", (h,)) for n in ("input_layernorm", "post_attention_layernorm")]
    return specs


def model_specs(dims: Dims) -> list[Spec]:
    specs = [Spec("model.embed_tokens.weight", (dims.vocab, dims.hidden))]
    for layer in range(dims.layers):
        specs += layer_specs(dims, layer)
    specs += [Spec("model.norm.weight", (dims.hidden,)), Spec("lm_head.weight", (dims.vocab, dims.hidden))]
    return specs


def plan_shards(specs: list[Spec], max_bytes: int) -> list[list[Spec]]:
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def to_bf16(values: np.ndarray) -> np.ndarray:
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def make_pool(seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0])
    pool = np.empty(POOL_VALUES, dtype=np.uint16)
    step = SMALL_TENSOR
    for start in range(0, POOL_VALUES, step):
        pool[start : start + step] = to_bf16(rng.standard_normal(step, dtype=np.float32) * 0.02)
    return pool


def small_values(spec: Spec, rng: np.random.Generator) -> np.ndarray:
    if len(spec.shape) == 1:  # RMSNorm weights: around 1
        return to_bf16(1.0 + 0.05 * rng.standard_normal(spec.shape[0], dtype=np.float32))
    values = rng.standard_normal(spec.shape, dtype=np.float32) * 0.02
    if spec.name.endswith("mlp.gate.weight"):  # distinct router row norms per expert
        values *= rng.uniform(0.5, 1.5, size=(spec.shape[0], 1)).astype(np.float32)
    return to_bf16(values)


def tiled_chunks(total: int, pool: np.ndarray, start: int) -> Iterator[np.ndarray]:
    pos = start
    while total > 0:
        n = min(total, CHUNK_VALUES, pool.size - pos)
        yield pool[pos : pos + n]
        total -= n
        pos = (pos + n) % pool.size


def tensor_chunks(spec: Spec, pool: np.ndarray, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    count = math.prod(spec.shape)
    if count < SMALL_TENSOR:
        yield small_values(spec, rng)
    else:
        yield from tiled_chunks(count, pool, int(rng.integers(pool.size)))


def header_bytes(specs: list[Spec]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        offsets = [offset, offset + spec.nbytes]
        header[spec.name] = {"dtype": "BF16", "shape": list(spec.shape), "data_offsets": offsets}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_tensor(out: BinaryIO, spec: Spec, pool: np.ndarray, seed: int) -> None:
    written = 0
    for chunk in tensor_chunks(spec, pool, seed):
        written += out.write(np.ascontiguousarray(chunk, dtype="<u2").data)
    if written != spec.nbytes:
        raise RuntimeError(f"{spec.name}: wrote {written} bytes, expected {spec.nbytes}")


def write_shard(path: Path, specs: list[Spec], pool: np.ndarray, seed: int) -> None:
    with open(path, "wb") as out:
        out.write(header_bytes(specs))
        for spec in specs:
            write_tensor(out, spec, pool, seed)


def config_dict(dims: Dims) -> dict[str, object]:
    return {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "attention_bias": False,
        "bos_token_id": None,
        "eos_token_id": min(50279, dims.vocab - 1),
        "pad_token_id": 1,
        "attention_dropout": 0.0,
        "clip_qkv": None,
        "hidden_act": "silu",
        "hidden_size": dims.hidden,
        "initializer_range": 0.02,
        "intermediate_size": dims.intermediate,
        "max_position_embeddings": 4096,
        "norm_topk_prob": False,
        "num_attention_heads": dims.heads,
        "num_experts": dims.experts,
        "num_experts_per_tok": dims.top_k,
        "num_hidden_layers": dims.layers,
        "num_key_value_heads": dims.heads,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "router_aux_loss_coef": 0.01,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": dims.vocab,
    }


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_checkpoint(out_dir: Path, dims: Dims, shard_bytes: int, seed: int) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    shards = plan_shards(model_specs(dims), shard_bytes)
    pool = make_pool(seed)
    weight_map: dict[str, str] = {}
    for k, specs in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_shard(out_dir / name, specs, pool, seed)
        weight_map.update({spec.name: name for spec in specs})
    total = sum(spec.nbytes for specs in shards for spec in specs)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json(out_dir / "model.safetensors.index.json", index)
    write_json(out_dir / "config.json", config_dict(dims))
    (out_dir / COMPLETE_MARKER).write_text(json.dumps({"dims": dims.__dict__, "total_size": total}) + "\n")
    return total


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--scale", type=float, default=1.0, help="model size factor (default 1 = ~14 GB)")
    parser.add_argument("--layers", type=int, default=None, help="number of layers (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-bytes", type=int, default=None, help="shard limit (default 5 GB * scale)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.scale <= 0 or (args.layers is not None and args.layers < 1):
        raise SystemExit("--scale must be > 0 and --layers >= 1")
    dims = olmoe_dims(args.scale, args.layers)
    shard_bytes = args.shard_bytes or max(1, int(FULL_SHARD_BYTES * args.scale))
    total = write_checkpoint(args.out_dir, dims, shard_bytes, args.seed)
    print(f"wrote {args.out_dir}: {total / 1e9:.3f} GB of tensors, {dims}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
