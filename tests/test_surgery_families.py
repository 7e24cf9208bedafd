"""Surgery on every family, proven through transformers itself.

The pruned checkpoint must load with no missing, unexpected or mismatched keys, and its logits must equal
those of the *original* model whose routers are told the dropped experts do not exist (tests/routing_mask.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from moeslim.families.table import family_of
from moeslim.layout import resolve_layout
from moeslim.names import PLAN_NAME
from moeslim.pipeline import SlimOptions, slim
from moeslim.source import open_checkpoint
from moeslim.stream.masking import drop_experts_of

pytestmark = pytest.mark.slow

# fixture name → experts kept (half; deepseek_v3 has 16 experts in 4 groups: 8 keeps 2 per group)
LOADABLE = {
    "mixtral": 4, "phimoe": 4, "minimax_m2": 4, "qwen2_moe": 4, "qwen3_moe": 4, "olmoe": 4, "deepseek_v2": 4,
    "deepseek_v3": 8, "kimi_k2": 4, "glm4_moe": 4, "gpt_oss": 4, "granitemoe": 4, "llama4_text": 4,
    "qwen3_moe_multishard": 4,
}  # fmt: skip


def _slim(src: Path, out: Path, keep: int, **kw: object) -> Path:
    slim(SlimOptions(src, keep=keep, out=out, criterion="random", seed=7, **kw))  # type: ignore[arg-type]
    return out


def _kept(out: Path) -> dict[int, tuple[int, ...]]:
    plan = json.loads((out / PLAN_NAME).read_text())
    return {entry["layer"]: tuple(entry["kept"]) for entry in plan["layers"]}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", sorted(LOADABLE))
def test_pruned_model_equals_original_with_dropped_experts_unroutable(
    name: str, built: Callable[[str], Path], tmp_path: Path
) -> None:
    src = built(name)
    out = _slim(src, tmp_path / "out", LOADABLE[name], max_shard_size="40KB" if "multishard" in name else "5GB")
    kept = _kept(out)
    n_layers = AutoConfig.from_pretrained(src).num_hidden_layers
    assert any(len(set(k)) == len(k) and k != tuple(range(len(k))) for k in kept.values())  # renumbering happens

    pruned, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    mtp_prefix = f"model.layers.{n_layers}."
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    assert all(k.startswith(mtp_prefix) for k in info["unexpected_keys"])  # transformers does not model MTP

    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    trunk_kept = {i: k for i, k in kept.items() if i < n_layers}
    with drop_experts_of(original, resolve_layout(open_checkpoint(src)), trunk_kept):
        expected = _logits(original)
    actual = _logits(pruned.eval())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(original), actual, atol=1e-4)  # pruning did change the model


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "gpt_oss", "llama4_text", "qwen2_moe"])
def test_untouched_tensors_are_byte_identical_and_sliced_ones_exact(
    name: str, built: Callable[[str], Path], tmp_path: Path
) -> None:
    src = built(name)
    out = _slim(src, tmp_path / "out", LOADABLE[name])
    kept = _kept(out)
    before, after = open_checkpoint(src), open_checkpoint(out)
    layout = resolve_layout(before)
    routed = {n for layer in layout.layers for n in layer.router + layer.fused}
    routed |= {n for layer in layout.layers for names in layer.per_expert for n in names}
    untouched = [n for n in before.tensors if n not in routed]
    assert untouched and all(_raw(before, n) == _raw(after, n) for n in untouched)
    for layer in layout.layers:
        rows = list(kept[layer.index])
        for n in layer.router + layer.fused:  # sliced on dim 0 = original rows, in kept order
            assert torch.equal(_tensor(after, n), _tensor(before, n)[rows])
        for new, old in enumerate(rows):  # per-expert tensors: renamed, bytes unchanged
            for n in layer.per_expert[old] if layer.per_expert else ():
                renamed = n.replace(f"experts.{old}.", f"experts.{new}.")
                assert _raw(after, renamed) == _raw(before, n)
    per_expert_kept = sum(
        len(layer.per_expert[j]) for layer in layout.layers if layer.per_expert for j in kept[layer.index]
    )
    expected_names = len(untouched) + per_expert_kept + sum(len(layer.router + layer.fused) for layer in layout.layers)
    assert len(after.tensors) == expected_names


def _raw(ckpt, name: str) -> bytes:
    info = ckpt.tensors[name]
    with open(info.file, "rb") as f:
        f.seek(info.start)
        return f.read(info.nbytes)


def _tensor(ckpt, name: str) -> torch.Tensor:
    with safe_open(ckpt.tensors[name].file, framework="pt") as f:
        return f.get_tensor(name)


@pytest.mark.parametrize("name", ["qwen3_moe", "glm4_moe", "gpt_oss", "llama4_text"])
def test_config_round_trip_and_plan_reproduces_output(name: str, built: Callable[[str], Path], tmp_path: Path) -> None:
    src = built(name)
    out = _slim(src, tmp_path / "a", LOADABLE[name])
    raw_src, raw_out = (json.loads((p / "config.json").read_text()) for p in (src, out))
    family = family_of(raw_src)
    changed = {k for k in raw_src if raw_src[k] != raw_out.get(k)}
    assert changed <= set(family.count_keys) and changed  # nothing else in the file moved
    cfg = AutoConfig.from_pretrained(out)
    present = [k for k in family.count_keys if k in raw_src]
    assert present and all(getattr(cfg, k) == LOADABLE[name] for k in present)

    again = tmp_path / "b"
    slim(SlimOptions(src, out=again, plan=out / PLAN_NAME))
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    same = [f for f in files if f != "README.md"]  # the model card records each run's own command
    assert "model.safetensors" in same or "model.safetensors.index.json" in same
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in same)


def test_repo_files_copied_base_card_not(built: Callable[[str], Path], tmp_path: Path) -> None:
    src = built("mixtral")
    out = _slim(src, tmp_path / "out", 4)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "custom_helper.py",
    ):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    card = (out / "README.md").read_text()  # the pruned model's own card replaces the base card
    assert (src / "README.md").read_text() not in card and "moeslim" in card


def test_mtp_layer_is_pruned_with_the_trunk(built: Callable[[str], Path], tmp_path: Path) -> None:
    src = built("deepseek_v3")
    out = _slim(src, tmp_path / "out", 8)
    kept = _kept(out)
    assert 3 in kept  # the MTP layer sits at num_hidden_layers = 3
    after = open_checkpoint(out)
    experts = {n.split(".")[5] for n in after.tensors if n.startswith("model.layers.3.mlp.experts.")}
    assert experts == {str(j) for j in range(8)}
    assert after.tensors["model.layers.3.mlp.gate.weight"].shape[0] == 8
    assert after.tensors["model.layers.3.mlp.gate.e_score_correction_bias"].shape == (8,)
    assert after.tensors["model.layers.3.eh_proj.weight"] == after.tensors["model.layers.3.eh_proj.weight"]


def test_quantised_siblings_travel_as_raw_bytes(built: Callable[[str], Path], tmp_path: Path) -> None:
    for name, keep in (("deepseek_v3_fp8", 8), ("gpt_oss_mxfp4", 4), ("qwen3_moe_int4", 4)):
        src = built(name)
        out = _slim(src, tmp_path / name, keep)
        kept = _kept(out)
        before, after = open_checkpoint(src), open_checkpoint(out)
        for layer in resolve_layout(before).layers:
            rows = kept[layer.index]
            for n in layer.fused:  # MXFP4 blocks/scales: rows of raw bytes
                row = before.tensors[n].nbytes // before.tensors[n].shape[0]
                assert _raw(after, n) == b"".join(_raw(before, n)[j * row : (j + 1) * row] for j in rows)
            for new, old in enumerate(rows if layer.per_expert else ()):
                for n in layer.per_expert[old]:  # FP8 weight and weight_scale_inv (int4: packed, scale, shape)
                    renamed = n.replace(f"experts.{old}.", f"experts.{new}.")
                    assert after.tensors[renamed].dtype == before.tensors[n].dtype
                    assert _raw(after, renamed) == _raw(before, n)
        suffixes = {n.rsplit(".", 1)[-1] for n in after.tensors if ".experts." in n}
        assert (
            suffixes
            >= {
                "deepseek_v3_fp8": {"weight", "weight_scale_inv"},
                "gpt_oss_mxfp4": {"gate_up_proj_blocks", "down_proj_scales"},
                "qwen3_moe_int4": {"weight_packed", "weight_scale", "weight_shape"},
            }[name]
        )


def test_output_shards_are_bounded_and_indexed(built: Callable[[str], Path], tmp_path: Path) -> None:
    src = built("qwen3_moe_multishard")
    out = _slim(src, tmp_path / "out", 4, max_shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    total = 0
    for f in files:
        with safe_open(out / f, framework="pt") as st:
            sizes = [st.get_tensor(k).nbytes for k in st.keys()]  # noqa: SIM118 - safe_open is not a dict
            assert set(st.keys()) == {k for k, v in index["weight_map"].items() if v == f}
        assert sum(sizes) <= 30_000 or len(sizes) == 1
        total += sum(sizes)
    assert len(files) > 1 and index["metadata"]["total_size"] == total
