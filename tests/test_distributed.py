"""Several processes under torch.distributed (gloo on the CPU) compute what one process computes.

In-process: two ranks spawned with ``torch.multiprocessing`` run ``calibrate_layers`` on their shares; each
holds only its own batches, and both end with the single-process statistics. End to end: ``torchrun
--nproc-per-node 2 -m moeslim`` for calibrate, validate and slim gives the single-process files.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.numpy import load_file

from moeslim.calibrate.capture import FIELDS, HALVES
from moeslim.calibrate.collect import Collector, Statistics, calibrate_layers
from moeslim.layout import resolve_layout
from moeslim.source import open_checkpoint
from moeslim.stream.ranks import Ranks
from moeslim.stream.runner import LayerRunner
from tests.conftest import tree_digest

pytestmark = pytest.mark.slow

TOKENS = torch.randint(3, 128, (10, 20), generator=torch.Generator().manual_seed(3))  # 5 batches of 2
SMALL = ["--samples", "10", "--seq-len", "16", "--batch-size", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _calibrate(src: Path, ranks: Ranks, seen: list[int], widest: list[int] | None = None) -> Statistics:
    """Statistics of ``src`` on this rank; ``widest`` collects how many experts' weights the experts module holds
    whenever it computes (its parameters' first dimension: one slice per expert)."""
    ckpt = open_checkpoint(src)
    layout = resolve_layout(ckpt)
    runner = LayerRunner(ckpt, layout, ranks=ranks)
    if widest is not None:
        cls = type(next(iter(runner.parts.values())).experts)
        forward = cls.forward

        def recording(module: torch.nn.Module, hidden: object, index: object, weight: object, *args: object) -> object:
            # three named arguments, as the experts module's own (moeslim tells routed experts by them)
            widest.append(max((p.shape[0] for p in module.parameters() if not p.is_meta), default=0))
            return forward(module, hidden, index, weight, *args)

        cls.forward = recording  # type: ignore[method-assign]  # a spawned process of its own: not undone
    try:
        collector = Collector(
            Statistics(layout.num_experts), reconstruction_tokens=16,
            on_layer=lambda index, stats, store: seen.append(len(store)),
        )  # fmt: skip
        return calibrate_layers(runner, TOKENS, 2, collector, ranks=ranks)
    finally:
        runner.close()


def _rank(rank: int, world: int, port: int, src: str, out: str, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MOESLIM_PARALLEL=mode)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        seen: list[int] = []
        widest: list[int] = []
        stats = _calibrate(Path(src), Ranks(rank, world), seen, widest)
        arrays = {f"{i}.{h}.{f}": stats.halves[i][h][f] for i in stats.layers for h in HALVES for f in FIELDS}
        arrays |= {f"{i}.{h}.tokens": np.array([stats.halves[i][h].tokens]) for i in stats.layers for h in HALVES}
        arrays |= {f"{i}.reconstruction": v for i, v in stats.reconstruction.items()}
        np.savez(Path(out) / f"rank{rank}.npz", seen=np.array(seen), widest=np.array(widest), **arrays)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("mode", ["experts", "batches"])
def test_two_ranks_share_the_batches_and_sum_to_one_process(
    name: str, mode: str, built: Callable[[str], Path], tmp_path: Path
) -> None:
    """Each rank runs its share of the batches; with ``experts`` (the default) each also holds and runs only half
    of every layer's experts, with ``batches`` every expert."""
    src = built(name)
    mp.spawn(_rank, args=(2, _free_port(), str(src), str(tmp_path), mode), nprocs=2, join=True)
    seen: list[int] = []
    single = _calibrate(src, Ranks(), seen)
    assert seen == [5] * len(single.layers)  # one process holds all 5 batches
    experts = resolve_layout(open_checkpoint(src)).num_experts
    for rank, share in ((0, 3), (1, 2)):  # batches 0, 2, 4 and 1, 3
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert got["seen"].tolist() == [share] * len(single.layers)  # each rank held only its share
        assert got["widest"].max() == (experts // 2 if mode == "experts" else experts)
        for i in single.layers:
            for h in HALVES:
                part = single.halves[i][h]
                assert got[f"{i}.{h}.tokens"][0] == part.tokens  # halves by global batch: 3 batches | 2
                assert np.array_equal(got[f"{i}.{h}.count"], part["count"])  # counts exactly
                for f in FIELDS:
                    np.testing.assert_allclose(got[f"{i}.{h}.{f}"], part[f], rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(got[f"{i}.reconstruction"], single.reconstruction[i], rtol=1e-5, atol=1e-7)


def _moeslim(args: list[str], ranks: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
              str(_free_port()), "-m", "moeslim"] if ranks > 1 else [sys.executable, "-m", "moeslim"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_calibrate_validate_and_slim_equal_one_process(built: Callable[[str], Path], tmp_path: Path) -> None:
    src = built("qwen3_moe")
    for ranks in (1, 2):
        work = tmp_path / str(ranks)
        work.mkdir()
        _moeslim(["calibrate", str(src), *SMALL, "--out", "stats"], ranks, work)
        done = _moeslim(["slim", str(src), "--keep", "4", *SMALL, "--out", "pruned"], ranks, work)
        assert done.stdout.count("wrote") == 1  # rank 0 alone reports
        _moeslim(["validate", str(src), "pruned", "--samples", "6", "--seq-len", "16", "--batch-size", "2",
                  "--generations", "0", "--json", "report.json"], ranks, work)  # fmt: skip
    one, two = tmp_path / "1", tmp_path / "2"
    assert sorted(p.name for p in (two / "stats").iterdir()) == ["stats.json", "stats.safetensors"]  # no resume left
    a, b = load_file(str(one / "stats/stats.safetensors")), load_file(str(two / "stats/stats.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-9, err_msg=key)
    meta = [json.loads((w / "stats/stats.json").read_text()) for w in (one, two)]
    assert meta[0]["calibration"] == meta[1]["calibration"]
    # the same kept experts and tensors; scores, measured KLs, the corrected experts (their least-squares sums are
    # added across the ranks) and the validation inside slim agree to rounding
    digests = [tree_digest(w / "pruned") for w in (one, two)]
    for d in digests:
        d.pop("README.md"), d.pop("validation.json"), d.pop("moeslim_plan.json"), d.pop("model.safetensors")
    assert digests[0] == digests[1]
    plans = [json.loads((w / "pruned/moeslim_plan.json").read_text()) for w in (one, two)]
    assert "method" in plans[0]["correction"] and plans[0]["correction"]["experts"] == plans[1]["correction"]["experts"]
    tensors = [load_file(str(w / "pruned/model.safetensors")) for w in (one, two)]
    assert tensors[0].keys() == tensors[1].keys()
    differ = [k for k in tensors[0] if not np.array_equal(tensors[0][k], tensors[1][k])]
    assert len(differ) <= sum(plans[0]["correction"]["experts"].values())  # only corrected experts may differ
    for key in differ:
        np.testing.assert_allclose(tensors[1][key], tensors[0][key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert [layer["kept"] for layer in plans[0]["layers"]] == [layer["kept"] for layer in plans[1]["layers"]]
    assert plans[0]["criterion"] == plans[1]["criterion"]
    for a_layer, b_layer in zip(plans[0]["layers"], plans[1]["layers"], strict=True):
        np.testing.assert_allclose(b_layer["scores"], a_layer["scores"], rtol=1e-5)
    kl = [p["calibration"]["auto"]["kl"] for p in plans]
    # the ranks divide the experts: each token's expert outputs are summed in another order. These plans' KLs are
    # about 1e-6 per token, where float32 logits' rounding alone moves a KL by about 1e-8
    for name in kl[0]:
        assert kl[1][name] == pytest.approx(kl[0][name], rel=1e-5, abs=5e-8), name
    reports = [json.loads((w / "report.json").read_text()) for w in (one, two)]
    for key in ("kl_mean", "kl_p95", "top1_agreement", "perplexity_original", "perplexity_pruned"):
        assert reports[1][key] == pytest.approx(reports[0][key], rel=1e-5, abs=5e-8), key  # rounding, as above
    assert reports[0]["scored_tokens"] == reports[1]["scored_tokens"] == 6 * 15
    np.testing.assert_allclose(reports[1]["per_sequence"]["kl"], reports[0]["per_sequence"]["kl"], rtol=1e-5, atol=5e-8)


def _resume_rank(rank: int, world: int, port: int, model: str, out: str, result: str) -> None:
    from tests.test_resume import calibrate, poison_layers_before

    # resuming is what is tested: the ranks split the batches only, so the statistics equal one process's to the
    # bit of the reconstruction order (divided experts sum each token's outputs in another order, and experts whose
    # removal errors tie to rounding may swap places in it)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      MOESLIM_PARALLEL="batches")  # fmt: skip
    try:
        first = calibrate(Path(model), Path(out), stop_after=1)
        dist.barrier()  # both ranks stopped
        saved = sorted(p.name for p in Path(out).iterdir() if p.name.startswith("resume"))
        dist.barrier()  # both ranks have looked before either resumes
        if rank == 0:  # layers 0-1 can no longer run: resuming must start from the saved boundaries
            poison_layers_before(Path(model), 2)
        dist.barrier()
        second = calibrate(Path(model), Path(out))
        Path(result, f"rank{rank}.json").write_text(json.dumps({"first": first, "saved": saved, "second": second}))
    finally:
        dist.destroy_process_group()


def test_two_ranks_resume_after_the_last_saved_layer(tmp_path: Path) -> None:
    from tests.test_resume import MIXTRAL, arrays, calibrate

    out, model = tmp_path / "stats", tmp_path / "model"
    shutil.copytree(MIXTRAL, model)
    mp.spawn(_resume_rank, args=(2, _free_port(), str(model), str(out), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["first"] == [0, 1] and seen["second"] == [2, 3]  # resumed at layer 2, on both ranks
        assert seen["saved"] == ["resume.rank0of2", "resume.rank1of2"]  # each rank's own boundary
    assert not [p.name for p in out.iterdir() if p.name.startswith("resume")]  # dropped once complete
    calibrate(MIXTRAL, tmp_path / "single")
    got, want = arrays(out), arrays(tmp_path / "single")
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-9, err_msg=key)
