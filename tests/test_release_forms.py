"""Every family in both of its on-disk forms: the release naming ``save_pretrained`` writes (per-expert tensors
such as ``mlp.experts.3.gate_proj.weight``, which transformers fuses when it loads them; proven for every family
by ``test_every_family.py``) and the module's own parameter names (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``,
loaded as they are: Qwen3.5-MoE is released so), proven here.

A family's tiny model is written under its module names (``tiny.save_module_form``: its ``state_dict``); moeslim
reads the form from the tensor names, prunes it with a random plan and keeps each tensor in the form it found it;
the output must load strictly in the family's own class and give the logits of the original whose routers cannot
reach the dropped experts. The data-free scores and the streamed calibration statistics of one model are the same
in both forms. MTP layers may be in either form, whatever the trunk's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from moeslim.calibrate.capture import FIELDS
from moeslim.criteria import router_norm, weight_norm
from moeslim.families.table import family_of
from moeslim.families.tiny import save_module_form, tiny_model
from moeslim.layout import resolve_layout
from moeslim.names import PLAN_NAME
from moeslim.pipeline import SlimOptions, slim
from moeslim.source import open_checkpoint
from moeslim.stream.masking import drop_experts_of
from tests.conftest import distinct, installed_families, run_cli, streamed_statistics

_, TABLE = installed_families()  # under any transformers, the families it defines, as moeslim reads them there
FAMILIES = sorted(t for t, r in TABLE.items() if "refused" not in r)


def _logits(model: Any) -> torch.Tensor:
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if type(model).__name__ == "Llama4ForConditionalGeneration":  # its wrapper forward is broken in 5.24+
            return model.language_model(input_ids=ids, use_cache=False).logits
        return model(input_ids=ids, use_cache=False).logits


def _kept(out: Path) -> dict[int, tuple[int, ...]]:
    return {e["layer"]: tuple(e["kept"]) for e in json.loads((out / PLAN_NAME).read_text())["layers"]}


def _raw(ckpt: Any, name: str) -> bytes:
    info = ckpt.tensors[name]
    with open(info.file, "rb") as f:
        f.seek(info.start)
        return f.read(info.nbytes)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_module_naming_is_read_from_the_names_pruned_as_found_and_loads(model_type: str, tmp_path: Path) -> None:
    record = TABLE[model_type]
    model = distinct(tiny_model(model_type, 8))
    src, out = tmp_path / "src", tmp_path / "out"
    save_module_form(model, src)
    before = open_checkpoint(src)
    layout = resolve_layout(before)
    family = family_of(before.config)
    # the form is the one the names are in: the module naming where the family has one, else the one naming
    assert layout.family == (family.module or family)
    assert all(bool(layer.fused) == (record.get("module") or record)["fused"] for layer in layout.layers)

    slim(SlimOptions(src, keep=4, out=out, criterion="random", seed=7, validation=None))
    kept = _kept(out)
    assert sorted(kept) == layout.moe_indices and all(len(k) == 4 for k in kept.values())
    pruned, info = getattr(transformers, record["architecture"]).from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    with drop_experts_of(model, layout, kept):
        expected = _logits(model)
    actual = _logits(pruned.eval())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(model), actual, atol=1e-4)  # pruning did change the model

    after = open_checkpoint(out)
    routed = {n for layer in layout.layers for n in (*layer.router, *layer.fused)}
    routed |= {
        n for layer in layout.layers for group in (*layer.per_expert, *(g for _, g in layer.extra)) for n in group
    }
    assert all(_raw(before, n) == _raw(after, n) for n in before.tensors if n not in routed)  # untouched: the bytes
    for layer in layout.layers:  # kept as found: the same fused names, the kept experts' rows in plan order
        for name in layer.fused:
            rows = layer.rows_of(name, kept[layer.index], before.tensors[name].shape[layer.dim_of(name)])
            assert after.tensors[name].shape[layer.dim_of(name)] == len(rows)
            if layer.dim_of(name) == 0:
                row = before.tensors[name].nbytes // before.tensors[name].shape[0]
                source = _raw(before, name)
                assert _raw(after, name) == b"".join(source[r * row : (r + 1) * row] for r in rows)
    if "module" in record:  # Ergo's experts hold a norm each: a vector, left out of the weight norm in both namings
        model.save_pretrained(tmp_path / "release")
        _assert_same_scores(src, tmp_path / "release")


def _assert_same_scores(module: Path, release: Path) -> None:
    """One model, two namings: the same data-free scores (router rows exactly; weight norms summed per tensor)."""
    a, b = open_checkpoint(module), open_checkpoint(release)
    for score, exact in ((router_norm, True), (weight_norm, False)):
        ours, reference = score(a, resolve_layout(a), None), score(b, resolve_layout(b), None)
        assert ours.keys() == reference.keys() and ours
        for index, values in reference.items():
            if exact:
                np.testing.assert_array_equal(ours[index], values)
            else:
                np.testing.assert_allclose(ours[index], values, rtol=1e-6)


# a per-expert family released fused (Qwen3.5), renamed blocks (Mixtral: block_sparse_moe → mlp), a router that
# moves (PhiMoE: gate → router), extra rows of zero-computation experts (LongCat-Flash), a hand-written MTP family
@pytest.mark.parametrize("model_type", ["qwen3_5_moe", "mixtral", "phimoe", "longcat_flash", "deepseek_v3"])
def test_calibration_and_scores_of_the_module_naming_equal_the_release_naming(model_type: str, tmp_path: Path) -> None:
    model = distinct(tiny_model(model_type, 8))
    save_module_form(model, tmp_path / "module")
    model.save_pretrained(tmp_path / "release")
    _assert_same_scores(tmp_path / "module", tmp_path / "release")
    ours, reference = streamed_statistics(tmp_path / "module"), streamed_statistics(tmp_path / "release")
    assert sorted(ours.layers) == sorted(reference.layers) and ours.layers
    for index in reference.layers:
        a, b = ours.total(index), reference.total(index)
        assert np.array_equal(a["count"], b["count"]) and a["count"].sum() > 0, index  # the same routing
        for field in FIELDS:
            np.testing.assert_allclose(a[field], b[field], rtol=1e-6, atol=1e-9, err_msg=f"{index} {field}")


def _with_mtp(src: Path, trunk: dict[str, torch.Tensor], fused_mtp: bool, model: Any) -> dict[str, torch.Tensor]:
    """``src`` holding ``trunk`` plus an MTP layer under ``mtp.`` (a copy of layer 0, Qwen3.5's release naming),
    its experts fused or per-expert."""
    layer0 = "model.language_model.layers.0."
    state = model.state_dict()
    mtp = {"mtp.layers.0." + n.removeprefix(layer0): t.clone() for n, t in state.items() if n.startswith(layer0)}
    if not fused_mtp:
        gate_up, down = mtp.pop("mtp.layers.0.mlp.experts.gate_up_proj"), mtp.pop("mtp.layers.0.mlp.experts.down_proj")
        inner = gate_up.shape[1] // 2
        for j in range(gate_up.shape[0]):  # transformers' conversion: gate_up_proj[j] = cat(gate_proj, up_proj)
            mtp[f"mtp.layers.0.mlp.experts.{j}.gate_proj.weight"] = gate_up[j, :inner].clone()
            mtp[f"mtp.layers.0.mlp.experts.{j}.up_proj.weight"] = gate_up[j, inner:].clone()
            mtp[f"mtp.layers.0.mlp.experts.{j}.down_proj.weight"] = down[j].clone()
    mtp["mtp.fc.weight"] = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    for old in src.glob("*.safetensors"):
        old.unlink()
    save_file({**trunk, **mtp}, src / "model.safetensors", metadata={"format": "pt"})
    return mtp


@pytest.mark.parametrize(("trunk_fused", "mtp_fused"), [(True, True), (True, False), (False, True)])
def test_an_mtp_layer_in_either_form_is_pruned_with_the_trunk_as_found(
    trunk_fused: bool, mtp_fused: bool, tmp_path: Path
) -> None:
    model = distinct(tiny_model("qwen3_5_moe", 8))
    src, out = tmp_path / "src", tmp_path / "out"
    (save_module_form if trunk_fused else type(model).save_pretrained)(model, src)
    mtp = _with_mtp(src, load_file(src / "model.safetensors"), mtp_fused, model)

    slim(SlimOptions(src, keep=4, out=out, criterion="router-norm", validation=None))
    n = model.config.get_text_config().num_hidden_layers
    kept = _kept(out)
    assert sorted(kept) == [*range(n), n]
    after = load_file(out / "model.safetensors")
    rows = list(kept[n])
    assert torch.equal(after["mtp.layers.0.mlp.gate.weight"], mtp["mtp.layers.0.mlp.gate.weight"][rows])
    if mtp_fused:
        for name in ("mtp.layers.0.mlp.experts.gate_up_proj", "mtp.layers.0.mlp.experts.down_proj"):
            assert torch.equal(after[name], mtp[name][rows])
    else:
        for new, old in enumerate(rows):
            name = "mtp.layers.0.mlp.experts.{}.down_proj.weight"
            assert torch.equal(after[name.format(new)], mtp[name.format(old)])
        assert not any(k.startswith("mtp.layers.0.mlp.experts.4.") for k in after)
    assert ("model.language_model.layers.0.mlp.experts.gate_up_proj" in after) == trunk_fused  # trunk as found
    assert torch.equal(after["mtp.fc.weight"], mtp["mtp.fc.weight"])
    pruned, info = type(model).from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"])  # Qwen3.5's class ignores them itself


def test_an_mtp_layer_after_the_trunk_keeps_its_naming_beside_a_fused_trunk(tmp_path: Path) -> None:
    """DeepSeek-V3 releases put their MTP layer after the trunk (``model.layers.N.…``, N = num_hidden_layers): here
    per-expert as released, beside a trunk in the module naming. Each layer is pruned in its own form."""
    model = distinct(tiny_model("deepseek_v3", 8))
    src, release, out = tmp_path / "src", tmp_path / "release", tmp_path / "out"
    save_module_form(model, src)
    model.save_pretrained(release)
    n = model.config.num_hidden_layers
    last = f"model.layers.{n - 1}."
    saved = load_file(release / "model.safetensors")
    mtp = {f"model.layers.{n}." + k.removeprefix(last): t for k, t in saved.items() if k.startswith(last)}
    mtp[f"model.layers.{n}.eh_proj.weight"] = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    save_file({**load_file(src / "model.safetensors"), **mtp}, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))

    layout = resolve_layout(open_checkpoint(src))
    assert [(layer.index, bool(layer.fused), layer.mtp) for layer in layout.layers][-2:] == [
        (n - 1, True, False), (n, False, True)
    ]  # fmt: skip
    slim(SlimOptions(src, keep=4, out=out, criterion="router-norm", validation=None))
    kept = _kept(out)[n]
    after = load_file(out / "model.safetensors")
    for new, old in enumerate(kept):
        name = f"model.layers.{n}.mlp.experts.{{}}.down_proj.weight"
        assert torch.equal(after[name.format(new)], mtp[name.format(old)])
    assert torch.equal(after[f"{last}mlp.experts.gate_up_proj"], load_file(src / "model.safetensors")[
        f"{last}mlp.experts.gate_up_proj"][list(_kept(out)[n - 1])])  # fmt: skip
    _, info = type(model).from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    assert info["unexpected_keys"] and all(k.startswith(f"model.layers.{n}.") for k in info["unexpected_keys"])


def test_layers_in_two_namings_of_their_router_are_refused_in_one_line(tmp_path: Path, capsys) -> None:
    """Mixtral's layer 0 under the release naming (``block_sparse_moe.gate``), the others under the module's
    (``mlp.gate``): a checkpoint no export writes; refused, naming both, before anything is written."""
    model = distinct(tiny_model("mixtral", 8))
    src, release = tmp_path / "src", tmp_path / "release"
    save_module_form(model, src)
    model.save_pretrained(release)
    module, saved = load_file(src / "model.safetensors"), load_file(release / "model.safetensors")
    mixed = {n: t for n, t in module.items() if not n.startswith("model.layers.0.mlp.")}
    mixed |= {n: t for n, t in saved.items() if n.startswith("model.layers.0.block_sparse_moe.")}
    save_file(mixed, src / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(["slim", str(src), "--keep", "4", "--criterion", "router-norm", "--out",
                            str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "mixes two namings" in err and "block_sparse_moe" in err and ".mlp." in err, err
    assert not (tmp_path / "out").exists()
