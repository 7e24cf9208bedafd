"""Generated faults: malformed inputs made systematically, each run through the real ``moeslim`` entry point.

Every class mutates one kind of input (safetensors headers, the shard index, config.json, plan JSON, statistics
folders, weights, size options) with hypothesis, derandomized so CI sees the same cases every run. Each case must
either succeed (the mutation left a valid input, e.g. a no-op or a swap of two same-sized tensors) or fail
cleanly: exit code 2, exactly one line ``moeslim: error: ...`` on stderr, no traceback, the inputs byte-identical,
nothing at the target and no temporary folder beside it. Classes where the mutation must be refused say so.

The table of classes, cases and outcomes is printed in pytest's summary; at the last change it read (``refused``:
a clean one-line exit 2, ``succeeded``: exit 0 on a mutation that left the input valid; no case crashed):

    class                     cases  refused  succeeded
    header vs safetensors       250      192         58   (read_header vs safetensors' own parser, no CLI)
    safetensors header           60       51          9
    shard index                  50       39         11
    config.json                  60       43         17
    config.json (named)          39       39          0   (slim, inspect and calibrate, message checked)
    plan JSON                    70       58         12
    plan JSON (named)            13       13          0
    statistics folder            70       56         14
    statistics (named)            7        7          0
    non-finite weights           24        9         15   (refused whenever the criterion reads the bad tensor)
    --max-shard-size             30       27          3
    --max-memory                  5        5          0
    parse_size (direct)         300      270         30   (any text: ValueError or a size ≥ 1 byte)
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from moeslim.errors import CheckpointError
from moeslim.shards import DTYPE_BITS, read_header
from moeslim.units import parse_size
from tests.conftest import run_cli, tree_digest

OUTCOMES: dict[str, Counter[str]] = {}  # fault class → {"refused": n, "succeeded": n}


def generated(examples: int) -> Callable:
    """Hypothesis settings of this suite: reproducible (derandomized, no example database), no deadline."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


class FaultTable:
    """A plugin registered while this module runs: prints the table of fault classes in pytest's summary."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not OUTCOMES:
            return
        terminalreporter.write_sep("-", "generated fault classes (every case: exit 0, or one clean line and exit 2)")
        terminalreporter.write_line(f"{'class':<24}{'cases':>7}{'refused':>9}{'succeeded':>11}")
        for name, seen in OUTCOMES.items():
            terminalreporter.write_line(f"{name:<24}{sum(seen.values()):>7}{seen['refused']:>9}{seen['succeeded']:>11}")


@pytest.fixture(scope="module", autouse=True)
def fault_table(request: pytest.FixtureRequest) -> None:
    if not request.config.pluginmanager.has_plugin("moeslim-fault-table"):
        request.config.pluginmanager.register(FaultTable(), "moeslim-fault-table")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def fresh(work: Path) -> Callable[[], tempfile.TemporaryDirectory]:
    """A new empty folder per generated case (hypothesis cannot use the function-scoped ``tmp_path``)."""
    return lambda: tempfile.TemporaryDirectory(dir=work)


def check_case(
    fault: str, args: list[str], target: Path, inputs: list[Path], capsys, *, must_fail: bool = False
) -> tuple[int, str]:
    """Run ``moeslim args``; assert a success or a clean refusal, and the ``inputs`` trees unchanged."""
    before = [tree_digest(p) if p.is_dir() else p.read_bytes() for p in inputs]
    code, out, err = run_cli(args, capsys)
    assert "Traceback" not in out + err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("moeslim: error: "), err
        assert not target.exists()
    else:
        assert not must_fail, f"{fault}: accepted although it must be refused\n{out}"
        assert all(safetensors_accepts(f) for f in target.glob("*.safetensors"))  # an output safetensors can read
    assert not [p for p in target.parent.iterdir() if "moeslim-tmp" in p.name]
    assert [tree_digest(p) if p.is_dir() else p.read_bytes() for p in inputs] == before
    OUTCOMES.setdefault(fault, Counter())["refused" if code else "succeeded"] += 1
    return code, err


def slim_args(src: Path, target: Path, *extra: str) -> list[str]:
    return ["slim", str(src), "--out", str(target), "--no-validate", *extra]


DATA_FREE = ("--keep", "4", "--criterion", "router-norm")

# JSON values of every type, nested a little; floats include NaN and ±Infinity (written as bare literals).
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
NEAR = st.integers(-3, 20)  # whole numbers around the fixtures' real values
NUMBERISH = st.one_of(NEAR, NEAR.map(float), st.sampled_from([3.7, 1e300, True, False, "4", None]))
ANY = st.one_of(NUMBERISH, JSON)


# --------------------------------------------------------------------------------------------------------------
# safetensors headers
# --------------------------------------------------------------------------------------------------------------


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_file(path: Path, header: dict, data: bytes, declared: int | None = None, text: bytes | None = None) -> None:
    text = json.dumps(header).encode() if text is None else text  # json.dumps writes NaN literals on purpose
    path.write_bytes(struct.pack("<Q", len(text) if declared is None else declared) + text + data)


OFFSETS = st.one_of(
    st.tuples(st.just("shift"), st.integers(-70, 70), st.integers(-70, 70)),  # overlap, gap, out of range
    st.tuples(st.just("copy"), st.integers(0, 99)),  # the offsets of another tensor: overlap
    st.tuples(st.just("swap"), st.integers(0, 99)),  # swapped with another: valid when both sizes match
    st.tuples(st.just("raw"), st.lists(st.integers(-(2**65), 2**65), max_size=3) | JSON),
)
SHAPES = st.one_of(
    st.sampled_from(["reverse", "flatten", "extra-1", "drop-dim"]),
    st.lists(st.integers(-2, 2**40), max_size=4),
    st.lists(st.sampled_from([1.0, True, "2", None, -1]), min_size=1, max_size=3),
    JSON,
)
HEADER_FAULTS = st.one_of(
    st.tuples(st.just("offsets"), st.integers(0, 999), OFFSETS),
    st.tuples(st.just("dtype"), st.integers(0, 999), st.sampled_from([*sorted(DTYPE_BITS), "Q7", "f32", ""]) | JSON),
    st.tuples(st.just("shape"), st.integers(0, 999), SHAPES),
    st.tuples(st.just("entry"), st.integers(0, 999), JSON),
    st.tuples(st.just("drop"), st.integers(0, 999)),
    st.tuples(st.just("rename"), st.integers(0, 999), st.text(max_size=8)),
    st.tuples(st.just("metadata"), JSON | st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2)),
    st.tuples(st.just("length"), st.integers(-16, 16) | st.integers(0, 2**64 - 1)),
    st.tuples(st.just("data"), st.integers(-64, 64)),
    st.tuples(st.just("bytes"), st.binary(max_size=48)),
)


def mutate_header(path: Path, fault: tuple) -> None:
    """Apply one generated fault to the safetensors file at ``path``."""
    header, data = split_file(path)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    kind = fault[0]
    if kind in ("length", "data", "bytes", "metadata"):
        _mutate_file(path, header, data, fault)
        return
    name = names[fault[1] % len(names)]
    entry = header[name]
    if kind == "offsets":
        entry["data_offsets"] = _offsets(header, names, name, fault[2])
    elif kind == "dtype":
        entry["dtype"] = fault[2]
    elif kind == "shape":
        entry["shape"] = _shape(entry["shape"], fault[2])
    elif kind == "entry":
        header[name] = fault[2]
    elif kind == "drop":
        del header[name]
    elif kind == "rename":
        header[fault[2]] = header.pop(name)
    join_file(path, header, data)


def _mutate_file(path: Path, header: dict, data: bytes, fault: tuple) -> None:
    kind, value = fault
    text = json.dumps(header).encode()
    if kind == "length":
        declared = len(text) + value if value in range(-16, 17) else value
        join_file(path, header, data, declared=max(declared, 0))
    elif kind == "data":
        join_file(path, header, data[:value] if value < 0 else data + b"\x00" * value)
    elif kind == "bytes":
        join_file(path, header, data, text=value)
    else:
        header["__metadata__"] = value
        join_file(path, header, data)


def _offsets(header: dict, names: list[str], name: str, how: tuple) -> Any:
    begin, end = header[name]["data_offsets"]
    if how[0] == "shift":
        return [begin + how[1], end + how[2]]
    if how[0] in ("copy", "swap"):
        other = header[names[how[1] % len(names)]]
        theirs = list(other["data_offsets"])
        if how[0] == "swap":
            other["data_offsets"] = [begin, end]
        return theirs
    return how[1]


def _shape(shape: list[int], how: Any) -> Any:
    if how == "reverse":
        return shape[::-1]
    if how == "flatten":
        return [int(np.prod(shape))]
    if how == "extra-1":
        return [*shape, 1]
    if how == "drop-dim":
        return shape[1:]
    return how


def safetensors_accepts(path: Path) -> bool:
    """Whether safetensors itself parses the file: the reference moeslim's header checks mirror."""
    try:
        safetensors.deserialize(path.read_bytes())
    except Exception:  # whatever it raises, safetensors refuses the file
        return False
    return True


def copy_fixture(built: Callable[[str], Path], name: str, tmp: str) -> Path:
    return Path(shutil.copytree(built(name), Path(tmp) / "src"))


@generated(250)
@given(fault=HEADER_FAULTS)
def test_header_checks_agree_with_safetensors(fault: tuple, built, fresh) -> None:
    """Direct, no CLI: ``read_header`` accepts a mutated file exactly when safetensors does."""
    with fresh() as tmp:
        path = Path(tmp) / "model.safetensors"
        shutil.copy(built("qwen3_moe") / "model.safetensors", path)
        mutate_header(path, fault)
        try:
            read_header(path)
            ours = True
        except CheckpointError:
            ours = False
        assert ours == safetensors_accepts(path), fault
        OUTCOMES.setdefault("header vs safetensors", Counter())["succeeded" if ours else "refused"] += 1


@generated(60)
@given(fixture=st.sampled_from(["qwen3_moe", "qwen3_moe_multishard"]), shard=st.integers(0, 6), fault=HEADER_FAULTS)
def test_mutated_safetensors_header(fixture: str, shard: int, fault: tuple, built, fresh, capsys) -> None:
    with fresh() as tmp:
        src = copy_fixture(built, fixture, tmp)
        files = sorted(src.glob("*.safetensors"))
        path = files[shard % len(files)]
        mutate_header(path, fault)
        target = Path(tmp) / "out"
        refused_by_safetensors = not safetensors_accepts(path)
        check_case("safetensors header", slim_args(src, target, *DATA_FREE), target, [src], capsys,
                   must_fail=refused_by_safetensors)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# the shard index
# --------------------------------------------------------------------------------------------------------------

SHARDS = [f"model-0000{i}-of-00007.safetensors" for i in range(1, 8)]
ELSEWHERE = ["../evil.safetensors", "/etc/hostname", "sub\\model.safetensors", "", ".", "config.json",
             "model.safetensors.index.json", "missing.safetensors", "./" + SHARDS[1]]  # fmt: skip
SHARD_NAMES = st.sampled_from(SHARDS + ELSEWHERE) | JSON
INDEX_FAULTS = st.one_of(
    st.tuples(st.just("bytes"), st.binary(max_size=40)),
    st.tuples(st.just("document"), JSON),
    st.tuples(st.just("weight_map"), JSON),
    st.tuples(st.just("drop"), st.integers(0, 999)),
    st.tuples(st.just("extra"), st.text(max_size=12), SHARD_NAMES),
    st.tuples(st.just("retarget"), st.integers(0, 999), SHARD_NAMES),
    st.tuples(st.just("metadata"), JSON),
)


def mutate_index(src: Path, fault: tuple) -> bool:
    """Apply one generated fault to the shard index; True when the result must be refused."""
    path = src / "model.safetensors.index.json"
    (src.parent / "evil.safetensors").write_bytes((src / SHARDS[0]).read_bytes())  # a readable file outside
    index = json.loads(path.read_text())
    weight_map = index["weight_map"]
    names = list(weight_map)
    kind = fault[0]
    must_fail = kind != "metadata"
    if kind == "bytes":
        path.write_bytes(fault[1])
        return True
    if kind == "document":
        index = fault[1]
    elif kind == "weight_map":
        index["weight_map"] = fault[1]
    elif kind == "drop":
        del weight_map[names[fault[1] % len(names)]]
    elif kind == "extra":
        must_fail = weight_map.get(fault[1], object()) != fault[2]
        weight_map[fault[1]] = fault[2]
    elif kind == "retarget":
        name = names[fault[1] % len(names)]
        must_fail = weight_map[name] != fault[2]
        weight_map[name] = fault[2]
    else:
        index["metadata"] = fault[1]
    path.write_text(json.dumps(index))
    return must_fail


@generated(50)
@given(fault=INDEX_FAULTS)
def test_mutated_shard_index(fault: tuple, built, fresh, capsys) -> None:
    with fresh() as tmp:
        src = copy_fixture(built, "qwen3_moe_multishard", tmp)
        must_fail = mutate_index(src, fault)
        target = Path(tmp) / "out"
        check_case("shard index", slim_args(src, target, *DATA_FREE), target, [src, Path(tmp) / "evil.safetensors"],
                   capsys, must_fail=must_fail)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------------------

CONFIG_KEYS = {
    "qwen3_moe": ["num_experts", "num_local_experts", "num_experts_per_tok", "num_hidden_layers",
                  "decoder_sparse_step", "mlp_only_layers", "model_type"],
    "mixtral": ["num_local_experts", "num_experts_per_tok", "num_hidden_layers", "model_type"],
    "deepseek_v3": ["n_routed_experts", "num_experts_per_tok", "num_hidden_layers", "n_group", "topk_group",
                    "first_k_dense_replace", "num_nextn_predict_layers", "model_type"],
}  # fmt: skip
KEEP = {"qwen3_moe": "4", "mixtral": "4", "deepseek_v3": "8"}
MODEL_TYPES = st.sampled_from(["mixtral", "qwen3_moe", "deepseek_v3", "llama4_text", "llama"])
CONFIG_FAULTS = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 99), ANY | MODEL_TYPES),
    st.tuples(st.just("delete"), st.integers(0, 99)),
    st.tuples(st.just("bytes"), st.binary(max_size=40)),
    st.tuples(st.just("document"), JSON),
    st.tuples(st.just("text_config"), JSON),
)


def mutate_config(src: Path, fixture: str, fault: tuple) -> None:
    path = src / "config.json"
    config = json.loads(path.read_text())
    keys = CONFIG_KEYS[fixture]
    kind = fault[0]
    if kind == "bytes":
        path.write_bytes(fault[1])
        return
    if kind == "set":
        config[keys[fault[1] % len(keys)]] = fault[2]
    elif kind == "delete":
        config.pop(keys[fault[1] % len(keys)], None)
    elif kind == "document":
        config = fault[1]
    else:
        config["text_config"] = fault[1]
    path.write_text(json.dumps(config))


@generated(60)
@given(fixture=st.sampled_from(sorted(CONFIG_KEYS)), fault=CONFIG_FAULTS, command=st.sampled_from(["slim", "inspect"]))
def test_mutated_config(fixture: str, fault: tuple, command: str, built, fresh, capsys) -> None:
    with fresh() as tmp:
        src = copy_fixture(built, fixture, tmp)
        mutate_config(src, fixture, fault)
        target = Path(tmp) / "out"
        args = slim_args(src, target, "--keep", KEEP[fixture], "--criterion", "router-norm")
        check_case("config.json", args if command == "slim" else ["inspect", str(src)], target, [src], capsys,
                   must_fail=fault[0] in ("bytes", "document"))  # fmt: skip


@pytest.mark.parametrize(
    ("fixture", "changes", "message"),
    [
        ("qwen3_moe", {"num_experts_per_tok": 9}, "top-k 9 of 8 experts"),
        ("qwen3_moe", {"num_experts_per_tok": 0}, "top-k 0 of 8 experts"),
        ("qwen3_moe", {"num_experts": 3.0}, "num_experts is 3.0, not a whole number"),
        ("qwen3_moe", {"num_experts": True}, "num_experts is True, not a whole number"),
        (
            "qwen3_moe",
            {"num_hidden_layers": 10**12},
            "num_hidden_layers=1000000000000, but the weights hold layers up to 2",
        ),
        ("qwen3_moe", {"mlp_only_layers": 5}, "cannot say which layers are MoE"),
        ("deepseek_v3", {"n_group": 3}, "n_group 3 does not split 16 experts"),
        ("deepseek_v3", {"n_group": 16}, "n_group 16 does not split 16 experts into equal groups of at least 2"),
        ("deepseek_v3", {"topk_group": 5}, "topk_group 5 must be between 1 and n_group 4"),
        ("deepseek_v3", {"n_group": "4"}, "n_group is '4', not a whole number"),
        ("deepseek_v3", {"num_nextn_predict_layers": "1"}, "num_nextn_predict_layers is '1', not a count"),
        ("deepseek_v3", {"first_k_dense_replace": -(10**12)}, "first_k_dense_replace is -1000000000000, not a layer"),
        ("mixtral", {"model_type": ["mixtral"]}, "model_type is not a string"),
    ],
)
@pytest.mark.parametrize("command", ["slim", "inspect", "calibrate"])
def test_bad_routing_config_is_one_line_in_every_command(
    fixture: str, changes: dict, message: str, command: str, built, tmp_path: Path, capsys
) -> None:
    src = Path(shutil.copytree(built(fixture), tmp_path / "src"))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **changes}))
    target = tmp_path / "out"
    args = {
        "slim": slim_args(src, target, "--keep", KEEP[fixture]),
        "inspect": ["inspect", str(src)],
        "calibrate": ["calibrate", str(src), "--out", str(target), "--samples", "4", "--seq-len", "16"],
    }[command]
    code, err = check_case("config.json (named)", args, target, [src], capsys, must_fail=True)
    assert message in err, err


# --------------------------------------------------------------------------------------------------------------
# plan JSON
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_plan(built, work: Path) -> dict:
    """A valid plan for the qwen3_moe fixture, written by moeslim itself."""
    from moeslim.pipeline import SlimOptions, slim

    out = work / "base-plan-out"
    slim(SlimOptions(built("qwen3_moe"), keep=4, out=out, criterion="router-norm", validation=None))
    return json.loads((out / "moeslim_plan.json").read_text())


TOP_KEYS = ["format", "version", "model_type", "num_experts", "keep", "top_k", "criterion", "seed", "calibration",
            "layers"]  # fmt: skip
LAYER_KEYS = ["layer", "kept", "scores"]
PLAN_FAULTS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(TOP_KEYS), ANY),
    st.tuples(st.just("delete"), st.sampled_from(TOP_KEYS)),
    st.tuples(st.just("set layer"), st.integers(0, 2), st.sampled_from(LAYER_KEYS), ANY),
    st.tuples(st.just("delete layer key"), st.integers(0, 2), st.sampled_from(LAYER_KEYS)),
    st.tuples(st.just("duplicate"), st.integers(0, 2)),
    st.tuples(st.just("drop layer"), st.integers(0, 2)),
    st.tuples(st.just("kept id"), st.integers(0, 2), st.integers(0, 3), NUMBERISH),
    st.tuples(st.just("kept float"), st.integers(0, 2), st.integers(0, 3)),
    st.tuples(st.just("kept length"), st.integers(0, 2), st.integers(0, 8)),
    st.tuples(st.just("score"), st.integers(0, 2), st.integers(0, 7), ANY),
    st.tuples(st.just("scores length"), st.integers(0, 2), st.integers(0, 12).filter(lambda n: n != 8)),
    st.tuples(st.just("literal"), st.sampled_from(["NaN", "Infinity", "-Infinity"])),
    st.tuples(st.just("bytes"), st.binary(max_size=40)),
    st.tuples(st.just("document"), JSON),
)
MUST_REFUSE = {"duplicate", "drop layer", "kept float", "scores length", "literal", "bytes", "document"}


def write_plan(path: Path, plan: dict, fault: tuple) -> None:
    """Write ``plan`` with one generated fault applied."""
    kind, layers = fault[0], plan["layers"]
    if kind == "bytes":
        path.write_bytes(fault[1])
        return
    if kind == "set":
        plan[fault[1]] = fault[2]
    elif kind == "delete":
        del plan[fault[1]]
    elif kind == "set layer":
        layers[fault[1]][fault[2]] = fault[3]
    elif kind == "delete layer key":
        layers[fault[1]].pop(fault[2], None)
    elif kind == "duplicate":
        layers.append(dict(layers[fault[1]]))
    elif kind == "drop layer":
        del layers[fault[1]]
    elif kind == "kept id":
        layers[fault[1]]["kept"][fault[2]] = fault[3]
    elif kind == "kept float":
        layers[fault[1]]["kept"][fault[2]] = float(layers[fault[1]]["kept"][fault[2]])  # 3 → 3.0
    elif kind == "kept length":
        layers[fault[1]]["kept"] = list(range(fault[2]))
    elif kind == "score":
        layers[fault[1]]["scores"][fault[2]] = fault[3]
    elif kind == "scores length":
        layers[fault[1]]["scores"] = [1.0] * fault[2]
    elif kind == "document":
        plan = fault[1]
    text = json.dumps(plan, indent=2)
    if kind == "literal":  # a bare NaN/Infinity in place of the first score
        text = text.replace(repr(plan["layers"][0]["scores"][0]), fault[1], 1)
    path.write_text(text)


@generated(70)
@given(fault=PLAN_FAULTS)
def test_mutated_plan(fault: tuple, base_plan: dict, built, fresh, capsys) -> None:
    with fresh() as tmp:
        plan = Path(tmp) / "plan.json"
        write_plan(plan, json.loads(json.dumps(base_plan)), fault)
        target = Path(tmp) / "out"
        src = built("qwen3_moe")
        check_case("plan JSON", slim_args(src, target, "--plan", str(plan)), target, [src, plan], capsys,
                   must_fail=fault[0] in MUST_REFUSE)  # fmt: skip


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (("duplicate", 1), "layer 1 is listed twice"),
        (("kept float", 0, 1), "layer 0: kept must list expert ids (whole numbers)"),
        (("kept id", 0, 0, 3.7), "layer 0: kept must list expert ids"),
        (("scores length", 2, 7), "layer 2: 7 scores, but the plan has 8 experts"),
        (("score", 1, 0, "x"), "layer 1: scores must list finite numbers"),
        (("literal", "NaN"), "NaN is not valid JSON"),
        (("set", "num_experts", 8.0), "num_experts must be a whole number, not 8.0"),
        (("set", "top_k", True), "top_k must be a whole number, not true"),
        (("kept length", 0, 3), "layer 0 keeps 3 experts, other layers 4"),
        (("set layer", 0, "layer", "0"), 'layer must be a whole number, not "0"'),
        (("document", [1, 2]), "is not a moeslim plan"),
        (("set", "layers", {}), "layers must be a list, not {}"),
        (("set", "keep", 3), "keep is 3, but the layers keep 4"),
    ],
)
def test_bad_plan_is_named_in_one_line(
    fault: tuple, message: str, base_plan: dict, built, tmp_path: Path, capsys
) -> None:
    plan = tmp_path / "plan.json"
    write_plan(plan, json.loads(json.dumps(base_plan)), fault)
    target = tmp_path / "out"
    src = built("qwen3_moe")
    code, err = check_case("plan JSON (named)", slim_args(src, target, "--plan", str(plan)), target, [src, plan],
                           capsys, must_fail=True)  # fmt: skip
    assert message in err, err


# --------------------------------------------------------------------------------------------------------------
# statistics folders
# --------------------------------------------------------------------------------------------------------------

WORDS = " ".join(f"w{i % 90}" for i in range(4000))  # words the fixture tokenizer knows


@pytest.fixture(scope="module")
def base_stats(built, work: Path) -> Path:
    """A valid statistics folder for the qwen3_moe fixture, written by the calibration `moeslim calibrate` runs."""
    from moeslim.calibrate.session import run_calibration
    from moeslim.layout import resolve_layout
    from moeslim.source import open_checkpoint
    from moeslim.stream.context import RunContext
    from moeslim.stream.options import CalibrationOptions

    (work / "calib.txt").write_text(WORDS)
    ckpt = open_checkpoint(built("qwen3_moe"))
    opts = CalibrationOptions(str(work / "calib.txt"), samples=4, seq_len=16, reconstruction_tokens=16)
    run_calibration(RunContext(ckpt, resolve_layout(ckpt), opts), out=work / "base-stats")
    return work / "base-stats"


STATS_PATHS = [("format",), ("version",), ("model",), ("model", "num_experts"), ("model", "fingerprint"),
               ("model", "name"), ("calibration",), ("settings",), ("settings", "progressive"), ("layers_done",)]  # fmt: skip
STATS_FAULTS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(STATS_PATHS), ANY),
    st.tuples(st.just("delete"), st.sampled_from(STATS_PATHS)),
    st.tuples(st.just("layers_done"), st.sampled_from(["append", "remove", "duplicate"]), NUMBERISH),
    st.tuples(st.just("json bytes"), st.binary(max_size=40)),
    st.tuples(st.just("json literal"), st.sampled_from(["NaN", "Infinity"])),
    st.tuples(st.just("array"), st.integers(0, 999), st.sampled_from(["drop", "F32", "I64"])),
    st.tuples(st.just("array length"), st.integers(0, 999), st.integers(0, 12).filter(lambda n: n not in (1, 8))),
    st.tuples(
        st.just("array value"), st.integers(0, 999), st.integers(0, 7), st.sampled_from([np.inf, -np.inf, np.nan])
    ),
    st.tuples(st.just("header"), HEADER_FAULTS),
)


def mutate_stats(folder: Path, fault: tuple) -> bool:
    """Apply one generated fault to a statistics folder; True when the result must be refused."""
    kind = fault[0]
    if kind == "header":
        mutate_header(folder / "stats.safetensors", fault[1])
        return not safetensors_accepts(folder / "stats.safetensors")
    if kind.startswith("array"):
        return _mutate_arrays(folder / "stats.safetensors", fault)
    meta_path = folder / "stats.json"
    if kind == "json bytes":
        meta_path.write_bytes(fault[1])
        return True
    meta = json.loads(meta_path.read_text())
    if kind in ("set", "delete"):
        *parents, key = fault[1]
        holder = meta
        for parent in parents:
            holder = holder[parent]
        if kind == "set":
            holder[key] = fault[2]
        else:
            del holder[key]
    elif kind == "layers_done":
        done = meta["layers_done"]
        {"append": lambda: done.append(fault[2]), "remove": done.pop, "duplicate": lambda: done.append(done[0])}[
            fault[1]
        ]()
    text = json.dumps(meta, indent=2)
    if kind == "json literal":
        text = text.replace('"tokens": ', f'"tokens": {fault[1]}, "was": ', 1)
    meta_path.write_text(text)
    return kind == "json literal" or (kind == "layers_done" and fault[1] == "duplicate")


def _mutate_arrays(path: Path, fault: tuple) -> bool:
    arrays = load_file(path)
    key = sorted(arrays)[fault[1] % len(arrays)]
    used = not key.endswith("reconstruction")  # every array but reconstruction is required
    if fault[0] == "array" and fault[2] == "drop":
        del arrays[key]
    elif fault[0] == "array":
        arrays[key] = arrays[key].astype(np.float32 if fault[2] == "F32" else np.int64)
        used = True
    elif fault[0] == "array length":
        arrays[key] = np.ones(fault[2])
        used = True
    else:
        arrays[key] = arrays[key].copy()
        arrays[key][fault[2] % arrays[key].size] = fault[3]
        used = key.endswith(".ean")  # the criterion below; other fields may hold anything finite or not
    save_file(arrays, path)
    return used


@generated(70)
@given(fault=STATS_FAULTS)
def test_mutated_statistics(fault: tuple, base_stats: Path, built, fresh, capsys) -> None:
    with fresh() as tmp:
        stats = Path(shutil.copytree(base_stats, Path(tmp) / "stats"))
        must_fail = mutate_stats(stats, fault)
        target = Path(tmp) / "out"
        src = built("qwen3_moe")
        args = slim_args(src, target, "--keep", "4", "--criterion", "ean", "--stats", str(stats))
        check_case("statistics folder", args, target, [src, stats], capsys, must_fail=must_fail)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (("json bytes", b"{not json"), "stats.json is not valid JSON"),
        (("layers_done", "append", 7), "stats.json lists layer 7 as done, but stats.safetensors has no layers.7.a"),
        (("set", ("model", "num_experts"), "8"), "model.num_experts is missing or not a whole number"),
        (("delete", ("layers_done",)), "layers_done must list distinct layer numbers"),
        (("array length", 0, 5), "has shape [5], expected [8]"),
        (("array value", 1, 5, np.inf), "layer 0: expert 5 scores inf under ean"),
        (("header", ("data", 8)), "8 bytes follow the last tensor"),
    ],
)
def test_bad_statistics_are_named_in_one_line(fault: tuple, message: str, base_stats: Path, built, tmp_path: Path,
                                               capsys) -> None:  # fmt: skip
    stats = Path(shutil.copytree(base_stats, tmp_path / "stats"))
    mutate_stats(stats, fault)
    target = tmp_path / "out"
    args = slim_args(built("qwen3_moe"), target, "--keep", "4", "--criterion", "ean", "--stats", str(stats))
    code, err = check_case("statistics (named)", args, target, [stats], capsys, must_fail=True)
    assert message in err, err
    if "scores" not in message:
        assert f"recalibrate (delete {stats}) or pass another --stats" in err


# --------------------------------------------------------------------------------------------------------------
# non-finite weights
# --------------------------------------------------------------------------------------------------------------

WEIGHT_FAULTS = st.tuples(
    st.integers(0, 2),  # layer
    st.sampled_from(["gate.weight", "experts.{j}.gate_proj.weight", "experts.{j}.down_proj.weight"]),
    st.integers(0, 7),  # expert
    st.integers(0, 10**6),  # element
    st.sampled_from([np.inf, -np.inf, np.nan]),
    st.sampled_from(["router-norm", "weight-norm"]),
)


@generated(24)
@given(fault=WEIGHT_FAULTS)
def test_non_finite_weights(fault: tuple, built, fresh, capsys) -> None:
    layer, tensor, j, element, value, criterion = fault
    with fresh() as tmp:
        src = copy_fixture(built, "qwen3_moe", tmp)
        name = f"model.layers.{layer}.mlp." + tensor.format(j=j)
        info = read_header(src / "model.safetensors")[0][name]
        at = info.start + 4 * (element % (info.nbytes // 4))  # F32: one element
        raw = bytearray((src / "model.safetensors").read_bytes())
        raw[at : at + 4] = struct.pack("<f", value)
        (src / "model.safetensors").write_bytes(bytes(raw))
        target = Path(tmp) / "out"
        read_by_criterion = (criterion == "router-norm") == tensor.startswith("gate.")
        code, err = check_case("non-finite weights", slim_args(src, target, "--keep", "4", "--criterion", criterion),
                               target, [src], capsys, must_fail=read_by_criterion)  # fmt: skip
        if read_by_criterion:
            assert f"layer {layer}: " in err and "non-finite" in err, err


# --------------------------------------------------------------------------------------------------------------
# size options
# --------------------------------------------------------------------------------------------------------------

ZERO_SIZES = st.from_regex(r"0{1,3}(\.0{1,2})?( ?(B|KB|GiB))?|0\.[0-4]B", fullmatch=True)
SIZES = st.one_of(
    st.text(max_size=8),
    st.from_regex(r"-?[0-9]{0,4}(\.[0-9]{0,2})?(e[0-9])? ?(B|KB|MB|GB|KiB|MiB|xB)?", fullmatch=True),
    st.sampled_from(["nan", "inf", "-1", "1e3", "0x10", "5 GB", "1B"]),
)


@generated(30)
@given(size=st.one_of(ZERO_SIZES.map(lambda s: (s, True)), SIZES.map(lambda s: (s, False))))
def test_generated_max_shard_size(size: tuple[str, bool], built, fresh, capsys) -> None:
    text, zero = size
    with fresh() as tmp:
        target = Path(tmp) / "out"
        src = built("qwen3_moe")
        code, err = check_case("--max-shard-size", slim_args(src, target, *DATA_FREE, "--max-shard-size", text),
                               target, [src], capsys, must_fail=zero)  # fmt: skip
        if code:
            assert "--max-shard-size" in err, err


@generated(300)
@given(text=st.one_of(st.text(max_size=10), SIZES, ZERO_SIZES))
def test_parse_size_is_positive_or_refused(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueError:
        OUTCOMES.setdefault("parse_size (direct)", Counter())["refused"] += 1
        return
    assert isinstance(size, int) and size >= 1
    OUTCOMES.setdefault("parse_size (direct)", Counter())["succeeded"] += 1


@pytest.mark.parametrize("size", ["0", "0GB", "0.1B", "-1", "nan"])
def test_zero_max_memory_is_refused(size: str, built, work: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "calib.txt").write_text(WORDS)
    target = tmp_path / "stats"
    src = built("qwen3_moe")
    args = ["calibrate", str(src), "--out", str(target), "--calib", str(tmp_path / "calib.txt"), "--samples", "4",
            "--seq-len", "16", "--max-memory", size]  # fmt: skip
    code, err = check_case("--max-memory", args, target, [src], capsys, must_fail=True)
    assert "--max-memory" in err, err


# --------------------------------------------------------------------------------------------------------------
# the pure checks behind the messages above
# --------------------------------------------------------------------------------------------------------------


def _layout(experts: int = 8) -> Any:
    from moeslim.families.table import FAMILIES
    from moeslim.layout import Layout, MoeLayer

    layers = tuple(MoeLayer(i, f"model.layers.{i}.mlp.", (), (), (), False) for i in (1, 2, 3))
    return Layout(FAMILIES["mixtral"], experts, 2, 1, 1, 4, layers)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_selection_refuses_non_finite_scores_naming_layer_and_expert(bad: float) -> None:
    from moeslim.errors import PlanError
    from moeslim.plan import select

    scores = {i: np.arange(8.0) for i in (1, 2, 3)}
    scores[2][5] = bad
    with pytest.raises(PlanError, match=f"layer 2: expert 5 scores {bad}; the checkpoint has non-finite weights"):
        select(_layout(), scores, 4)


def test_uneven_plan_names_the_odd_layer_even_when_it_comes_first() -> None:
    from moeslim.errors import PlanError
    from moeslim.plan import Plan, check_plan

    plan = Plan("mixtral", 8, 2, {1: (0, 1, 2), 2: (0, 1, 2, 3), 3: (4, 5, 6, 7)}, "router-norm")
    with pytest.raises(PlanError, match="layer 1: the plan keeps 3 experts, other layers 4"):
        check_plan(plan, _layout())
    assert plan.keep == 4  # the majority, whatever the file order


def test_plan_json_is_unchanged_for_finite_plans() -> None:
    """The plan file format is what ``json.dumps(indent=2)`` wrote before: saved plans reproduce outputs."""
    from moeslim.plan import Plan

    plan = Plan("mixtral", 8, 2, {1: (0, 3), 2: (1, 2)}, "random", seed=5, scores={1: (0.5, 1e-300, 3.0) + (1.0,) * 5})
    doc = json.loads(plan.to_json())
    assert plan.to_json() == json.dumps(doc, indent=2) + "\n"
