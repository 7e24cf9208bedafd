"""A DeepSeek-V3-width checkpoint (hidden 7168, 256 routed experts of width 2048, top-8 in 8 groups, MLA; 2 layers:
one dense, one MoE) written as a sparse bf16 safetensors file: headers at real widths, zeros that take no disk.

For the paths that read headers (inspect, surgery, the memory check) at real size in a second:

    python benchmarks/make_sparse_deepseek.py /tmp/dsv3
    /usr/bin/time -f "%e s, %M KB" moeslim calibrate /tmp/dsv3 --out /tmp/dsv3-stats --samples 4 --seq-len 32
"""

import json
import shutil
import struct
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]

src, out = ROOT / "fixtures" / "trained" / "tiny-deepseek-16e", Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
shutil.copytree(src, out)
cfg = json.loads((out / "config.json").read_text())
cfg.update(
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    n_routed_experts=256,
    n_group=8,
    topk_group=4,
    num_experts_per_tok=8,
    num_hidden_layers=2,
    num_attention_heads=128,
    num_key_value_heads=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    qk_head_dim=192,
    v_head_dim=128,
    head_dim=64,
    dtype="bfloat16",
)
(out / "config.json").write_text(json.dumps(cfg, indent=2))
config = AutoConfig.from_pretrained(out)
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config)
shapes = {}
for name, p in model.named_parameters():
    if ".mlp.experts." in name:
        continue
    shapes[name] = list(p.shape)
for name, b in model.named_buffers():
    if "e_score_correction_bias" in name:
        shapes[name] = list(b.shape)
EXPERTS, WIDTH, HIDDEN = 256, 2048, 7168
for j in range(EXPERTS):
    for part, shape in (("gate_proj", [WIDTH, HIDDEN]), ("up_proj", [WIDTH, HIDDEN]), ("down_proj", [HIDDEN, WIDTH])):
        shapes[f"model.layers.1.mlp.experts.{j}.{part}.weight"] = shape
entries, offset = {}, 0
for name in sorted(shapes):
    n = 1
    for d in shapes[name]:
        n *= d
    dtype, size = ("F32", 4 * n) if "e_score_correction_bias" in name else ("BF16", 2 * n)
    entries[name] = {"dtype": dtype, "shape": shapes[name], "data_offsets": [offset, offset + size]}
    offset += size
entries["__metadata__"] = {"format": "pt"}
text = json.dumps(entries).encode()
text += b" " * (-len(text) % 8)
shard = out / "model.safetensors"
shard.unlink()
with open(shard, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    f.truncate(8 + len(text) + offset)
print(f"{out}: {offset / 1e9:.1f} GB declared (sparse)")
