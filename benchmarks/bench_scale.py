"""Real widths on this machine: synthetic MoE checkpoints of a few layers written tensor by tensor (never a model in
memory), then moeslim's commands on them, each measured for wall time, CPU time, bytes read and peak RSS.

Shapes (one dense layer, then MoE layers, as the real models start):

- ``deepseek-v3``: hidden 7168, 256 routed experts of width 2048, top-8 in 8 groups, MLA, FP8 with 128 × 128 block
  scales (DeepSeek-V3's release format).
- ``kimi-k2``: DeepSeek-V3's layout with 384 routed experts (Kimi-K2), FP8 as above.
- ``qwen3-235b``: Qwen3-235B-A22B: hidden 4096, 128 experts of width 1536, top-8, bf16.

Weights are random (a pool of distinct expert matrices reused across experts, so writing is fast; routers and
everything else are drawn per tensor), so routing is spread over the experts as in a trained model.

    python benchmarks/bench_scale.py --work /tmp/scale --model deepseek-v3 [--layers 2] [--keep-files]

prints one Markdown row per command: calibrate, default slim (calibration, ``auto``'s trials, correction,
validation, write) and surgery from a data-free criterion; then one row per stage of each command (load, forward,
statistics, trials, correction, validation, write, other: ``STAGES`` says which functions make each one), measured
by wrapping those functions in the measured process (``--staged``), not by anything in moeslim itself.

    python benchmarks/bench_scale.py --work /tmp/scale --model olmoe-wide --load-rate 0   # or 8 (experts a chunk)

measures loading alone: each MoE layer's bytes on disk over the CPU seconds of loading it from a warm page cache
(1 thread), and the peak RSS over what the layer holds at once. After the commands (not after this), ``--work`` is
deleted unless ``--keep-files``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FROM = ROOT / "fixtures" / "trained" / "tiny-deepseek-16e"

SHAPES = {
    "deepseek-v3": dict(family="deepseek_v3", hidden=7168, experts=256, width=2048, top_k=8, groups=8, fp8=True),
    "kimi-k2": dict(family="deepseek_v3", hidden=7168, experts=384, width=2048, top_k=8, groups=1, fp8=True),
    "qwen3-235b": dict(family="qwen3_moe", hidden=4096, experts=128, width=1536, top_k=8, groups=1, fp8=False),
    "olmoe-wide": dict(family="olmoe", hidden=4096, experts=64, width=2048, top_k=8, groups=1, fp8=False),
}
POOL = 8  # distinct expert matrices per kind
BLOCK = 128


def config(shape: dict, layers: int) -> dict:
    base = json.loads((TOKENIZER_FROM / "config.json").read_text())
    vocab = base["vocab_size"]
    if shape["family"] == "deepseek_v3":
        cfg = dict(base)
        cfg.update(
            hidden_size=shape["hidden"], intermediate_size=18432, moe_intermediate_size=shape["width"],
            n_routed_experts=shape["experts"], n_shared_experts=1, n_group=shape["groups"],
            topk_group=max(1, shape["groups"] // 2), num_experts_per_tok=shape["top_k"], num_hidden_layers=layers,
            first_k_dense_replace=1, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
            kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, qk_head_dim=192, v_head_dim=128,
            head_dim=64, dtype="bfloat16", tie_word_embeddings=False,
        )  # fmt: skip
    elif shape["family"] == "olmoe":
        cfg = {
            "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": vocab,
            "hidden_size": shape["hidden"], "intermediate_size": shape["width"], "num_experts": shape["experts"],
            "num_experts_per_tok": shape["top_k"], "num_hidden_layers": layers, "num_attention_heads": 16,
            "num_key_value_heads": 16, "norm_topk_prob": False, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 4096, "hidden_act": "silu", "dtype": "bfloat16", "tie_word_embeddings": False,
            "bos_token_id": base.get("bos_token_id"), "eos_token_id": base.get("eos_token_id"),
        }  # fmt: skip
    else:
        cfg = {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": vocab,
            "hidden_size": shape["hidden"], "intermediate_size": 12288, "moe_intermediate_size": shape["width"],
            "num_experts": shape["experts"], "num_experts_per_tok": shape["top_k"], "num_hidden_layers": layers,
            "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128, "mlp_only_layers": [0],
            "decoder_sparse_step": 1, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "max_position_embeddings": 4096, "hidden_act": "silu", "dtype": "bfloat16",
            "tie_word_embeddings": False, "bos_token_id": base.get("bos_token_id"),
            "eos_token_id": base.get("eos_token_id"),
        }  # fmt: skip
    if shape["fp8"]:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [BLOCK, BLOCK]}  # fmt: skip
    return cfg


def write(out: Path, shape: dict, layers: int) -> int:
    """The checkpoint in ``out``, one shard per decoder layer, tensor by tensor; returns bytes written."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in os.listdir(TOKENIZER_FROM):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json",):
            shutil.copy(TOKENIZER_FROM / name, out / name)
    (out / "config.json").write_text(json.dumps(config(shape, layers), indent=2))
    cfg = AutoConfig.from_pretrained(out)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if ".mlp.experts." not in n}
    shapes |= {n: tuple(b.shape) for n, b in model.named_buffers() if "e_score_correction_bias" in n}
    e, width, hidden = shape["experts"], shape["width"], shape["hidden"]
    gen = torch.Generator().manual_seed(0)
    pool = {
        kind: [(torch.randn(rows, cols, generator=gen) * 0.02) for _ in range(POOL)]
        for kind, (rows, cols) in (("gate_proj", (width, hidden)), ("up_proj", (width, hidden)),
                                   ("down_proj", (hidden, width)))
    }  # fmt: skip
    shards: dict[str, list[str]] = {}
    for name in shapes:
        layer = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(layer, []).append(name)
    for i in range(0 if shape["family"] == "olmoe" else 1, layers):  # the others start with a dense layer
        shards.setdefault(str(i), []).extend(
            f"model.layers.{i}.mlp.experts.{j}.{kind}.weight" for j in range(e) for kind in pool
        )
    weight_map, total = {}, 0
    for k, (_, names) in enumerate(sorted(shards.items())):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"

        def tensor(name: str) -> torch.Tensor:
            if ".mlp.experts." in name:
                j, kind = int(name.split(".")[5]), name.split(".")[6]
                return pool[kind][(j * 7 + int(name.split(".")[2])) % POOL]
            dims = shapes[name]
            if "norm" in name or "e_score_correction_bias" in name:
                return torch.ones(dims) if "norm" in name else torch.zeros(dims)
            fan_in = dims[-1] if len(dims) > 1 else 1
            return torch.randn(dims, generator=gen) / math.sqrt(fan_in)

        def dims_of(name: str) -> tuple[int, ...]:
            if ".mlp.experts." in name:
                return tuple(pool[name.split(".")[6]][0].shape)
            return shapes[name]

        total += _write_shard(out / file, names, tensor, dims_of, shape["fp8"])
        weight_map.update({n: file for n in names} | {f"{n}_scale_inv": file for n in names if _fp8(n, shape["fp8"])})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def _fp8(name: str, fp8: bool) -> bool:
    """DeepSeek-V3's release stores the linear layers of its decoder layers in FP8 (not norms, router, embeddings)."""
    return fp8 and name.startswith("model.layers.") and name.endswith("proj.weight")


def _write_shard(path: Path, names: list[str], tensor, dims_of, fp8: bool) -> int:  # noqa: ANN001
    """Header first (shapes known), then each tensor's bytes in order: one tensor in memory at a time."""
    entries, offset, plan = {}, 0, []
    for name in names:
        dims = dims_of(name)
        is_fp8 = _fp8(name, fp8)
        plan.append((name, dims, is_fp8))
        n = math.prod(dims)
        size = n if is_fp8 else 2 * n
        entries[name] = {"dtype": "F8_E4M3" if is_fp8 else "BF16", "shape": list(dims),
                         "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
        if is_fp8:
            scales = [math.ceil(dims[0] / BLOCK), math.ceil(dims[1] / BLOCK)]
            size = 4 * math.prod(scales)
            entries[name + "_scale_inv"] = {"dtype": "F32", "shape": scales, "data_offsets": [offset, offset + size]}
            offset += size
    text = json.dumps(entries | {"__metadata__": {"format": "pt"}}).encode()
    text += b" " * (-len(text) % 8)
    encoded: dict[int, bytes] = {}  # the expert pool's matrices, converted once
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, dims, is_fp8 in plan:
            t = tensor(name)
            if id(t) not in encoded:
                data = t.to(torch.float8_e4m3fn).view(torch.uint8) if is_fp8 else t.to(torch.bfloat16).view(torch.int16)
                if ".mlp.experts." not in name:
                    f.write(data.numpy().tobytes())
                    data = None
                else:
                    encoded[id(t)] = data.numpy().tobytes()
            if id(t) in encoded:
                f.write(encoded[id(t)])
            if is_fp8:
                f.write(torch.ones(math.ceil(dims[0] / BLOCK), math.ceil(dims[1] / BLOCK)).numpy().tobytes())
    return offset


#: Each stage is the time spent in these functions, less that of other stages' functions called inside them (the
#: innermost wins), except that a trial's, a correction's or validation's own forwards (and statistics hooks) are
#: theirs. Time in none of them (start-up, tokenising, embedding, the routers' scoring) is "other".
STAGES = {
    "load": ["stream.runner:LayerRunner._load_layer", "stream.runner:LayerRunner._unload_layer",
             "stream.runner:LayerRunner._load", "stream.chunks:ExpertChunks._fill",
             "stream.chunks:ExpertChunks._unload"],
    "forward": ["stream.runner:LayerRunner.run", "stream.chunks:ExpertChunks.sweep"],
    "statistics": ["calibrate.capture:_routed_outputs", "calibrate.capture:_add_routed",
                   "calibrate.capture:_dense_expert", "calibrate.capture:_scatter",
                   "calibrate.collect:Collector.after"],
    "trials": ["calibrate.trials:PlanTrials.after", "calibrate.trials:PlanTrials.finish"],
    "correction": ["correct.run:run_correction", "correct.fit:Fitter.after", "correct.fit:LayerFit.solve"],
    "validation": ["validate.run:validate"],
    "write": ["surgery.writer:write_checkpoint", "calibrate.stats_file:save_stats"],
}  # fmt: skip
ABSORB = {"trials", "correction", "validation"}  # stages whose forwards are their own


class Stages:
    """Wall and CPU seconds (the process's: torch's threads and the read-ahead thread included), bytes read and peak
    RSS of each stage, accounted at every entry to and exit from a stage function. Bytes read: ``read`` system calls
    (``rchar``, the read-ahead thread's included) plus the tensor bytes moeslim maps to convert them in place
    (``Reader._mapped``); safetensors' own maps (transformers' conversion of non-expert tensors) are not counted.
    Peak RSS: the kernel's high-water mark, reset at each switch (``/proc/self/clear_refs``)."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.totals: dict[str, dict[str, float]] = {}
        self.mapped = 0
        self.last = self._now()

    def _now(self) -> tuple[float, float, int]:
        io = Path("/proc/self/io").read_text().split()
        return time.perf_counter(), time.process_time(), int(io[io.index("rchar:") + 1]) + self.mapped

    def switch(self) -> None:
        now, top = self._now(), self.stack[-1] if self.stack else "other"
        t = self.totals.setdefault(top, dict.fromkeys(("wall", "cpu", "read", "peak", "calls"), 0.0))
        for k, key in enumerate(("wall", "cpu", "read")):
            t[key] += now[k] - self.last[k]
        status = Path("/proc/self/status").read_text()
        t["peak"] = max(t["peak"], int(status.split("VmHWM:")[1].split()[0]) * 1024)
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from the current RSS
        self.last = self._now()

    def wrap(self, stage: str, fn):  # noqa: ANN001, ANN201
        import functools

        @functools.wraps(fn)
        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            top = self.stack[-1] if self.stack else None
            if top == stage or (top in ABSORB and stage in ("forward", "statistics")):
                return fn(*args, **kwargs)
            self.switch()
            self.stack.append(stage)
            self.totals.setdefault(stage, dict.fromkeys(("wall", "cpu", "read", "peak", "calls"), 0.0))["calls"] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.switch()
                self.stack.pop()

        return timed


def run_staged(out: Path, args: list[str]) -> None:
    """``moeslim ARGS`` in this process with the ``STAGES`` functions wrapped; the stages' figures into ``out``."""
    import importlib

    from moeslim import cli
    from moeslim.stream import dequant

    stages = Stages()
    for stage, targets in STAGES.items():
        for target in targets:
            module_name, _, qualname = target.partition(":")
            module = importlib.import_module(f"moeslim.{module_name}")
            owner, _, attr = qualname.rpartition(".")
            holder = getattr(module, owner) if owner else module
            original = getattr(holder, attr)
            setattr(holder, attr, stages.wrap(stage, original))
            if not owner:  # modules that imported the function by name
                for other in list(sys.modules.values()):
                    if getattr(other, "__name__", "").startswith("moeslim") and getattr(other, attr, None) is original:
                        setattr(other, attr, getattr(holder, attr))
    mapped = dequant.Reader._mapped

    @contextlib.contextmanager
    def counted(self, info):  # noqa: ANN001, ANN202
        stages.mapped += info.nbytes
        with mapped(self, info) as tensor:
            yield tensor

    dequant.Reader._mapped = counted
    sys.argv = ["moeslim", *args]
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        stages.switch()
        out.write_text(json.dumps(stages.totals))
    sys.exit(code)


def measure(args: list[str]) -> dict:
    """Run a moeslim command; wall and CPU seconds, peak RSS (its own) and bytes read (from /proc while it runs)."""
    start = time.perf_counter()
    staged = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-scale-stages-{os.getpid()}.json"
    command = [sys.executable, __file__, "--staged", str(staged), "--", *args]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    read = 0
    while True:
        try:
            io = Path(f"/proc/{proc.pid}/io").read_text()
            read = max(read, int(next(line.split()[1] for line in io.splitlines() if line.startswith("rchar"))))
        except (OSError, StopIteration, ValueError):
            pass
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.2)
    wall = time.perf_counter() - start
    err = proc.stderr.read() if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    stages = json.loads(staged.read_text()) if staged.exists() else {}
    staged.unlink(missing_ok=True)
    peak = max([usage.ru_maxrss * 1024, *(t["peak"] for t in stages.values())])  # the stages reset the kernel's
    return {"code": code, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": peak / 2**20,
            "read_gb": read / 1e9, "err": err.strip().splitlines()[-1:] if code else [], "stages": stages}  # fmt: skip


def load_rate(src: Path, chunk: int | None) -> None:
    """Load every MoE layer of ``src`` as a calibration pass does (whole, or with ``chunk`` experts at a time, every
    chunk once), from a warm page cache, and print one line each: the layer's bytes on disk, the main thread's CPU
    seconds of loading it (read, dequantise, place, finite check) and their ratio, and the process's peak RSS over
    what the layer holds at once in float32 (its resident part and one chunk of experts): what
    ``memory.LOAD_FACTOR`` estimates. Runs in this process: call it in a fresh one per setting so that the peak is
    this setting's."""
    import resource

    from moeslim.layout import resolve_layout
    from moeslim.source import open_checkpoint
    from moeslim.stream.chunks import ExpertChunks, expert_names
    from moeslim.stream.dequant import dense_items
    from moeslim.stream.runner import LayerRunner, _warm

    torch.set_num_threads(1)
    ckpt = open_checkpoint(src)
    layout = resolve_layout(ckpt)
    runner = LayerRunner(ckpt, layout, expert_chunk=chunk)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    moe = sorted(layer.index for layer in layout.layers)
    for i in moe:
        names = runner._layer_names(i)
        disk = sum(ckpt.tensors[n].nbytes for n in names)
        routed = expert_names(next(layer for layer in layout.layers if layer.index == i))
        f32 = {item.name: math.prod(item.shape) * 4 for item in dense_items(ckpt, names)}  # the default dtype
        on_disk = sum(v for n, v in f32.items() if n in routed)  # the routed experts', in float32
        share = min(chunk or layout.num_experts, layout.num_experts) / layout.num_experts
        held = sum(f32.values()) - on_disk * (1 - share)  # what it holds at once: resident part and one chunk
        _warm(ckpt, names)
        cpu = time.thread_time()  # the main thread's: the read-ahead thread is not loading
        layer = runner._load_layer(i)
        experts = runner.experts_of(i)
        if isinstance(experts, ExpertChunks):
            for _ in experts.chunks(range(layout.num_experts)):
                pass
        cpu = time.thread_time() - cpu
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        runner._unload_layer(i, layer, recycle=i + 1 in moe)  # as ``LayerRunner.layers`` does
        print(f"| {src.name} | {i} | {chunk or 'whole'} | {disk / 1e9:.2f} | {cpu:.2f} | {disk / 1e9 / cpu:.2f} |"
              f" {(peak - base) / 1e9:.2f} | {(peak - base) / held:.2f} |", flush=True)  # fmt: skip
    runner.close()


def main() -> None:
    if sys.argv[1:2] == ["--staged"]:  # the measured child: python bench_scale.py --staged OUT -- ARGS
        run_staged(Path(sys.argv[2]), sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--model", choices=sorted(SHAPES), default="deepseek-v3")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--commands", default="calibrate,slim,surgery")
    parser.add_argument("--keep-files", action="store_true")
    parser.add_argument("--load-rate", metavar="CHUNK", type=int, help="only measure loading (0: whole layers)")
    args = parser.parse_args()
    if args.load_rate is not None:
        load_rate(args.work / args.model, args.load_rate or None)
        return
    src = args.work / args.model
    if not (src / "model.safetensors.index.json").exists():
        t = time.perf_counter()
        size = write(src, SHAPES[args.model], args.layers)
        print(f"wrote {src}: {size / 1e9:.1f} GB in {time.perf_counter() - t:.0f} s", flush=True)
    data = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    keep = str(SHAPES[args.model]["experts"] // 2)
    runs = {
        # the reconstruction criterion (not a default) is left out: its greedy search is measured on its own
        "calibrate": ["calibrate", str(src), "--out", str(args.work / "stats"), *data, "--reconstruction-tokens", "0"],
        "slim": ["slim", str(src), "--keep", keep, "--out", str(args.work / "slim"), *data],
        "surgery": ["slim", str(src), "--keep", keep, "--criterion", "router-norm", "--out",
                    str(args.work / "surgery"), "--no-validate"],
    }  # fmt: skip
    stage_rows: list[tuple[str, dict]] = []
    print("| model | command | exit | wall s | CPU s | peak RSS MB | read GB |")
    print("|---|---|---|---|---|---|---|")
    for name in filter(None, args.commands.split(",")):
        for out in ("stats", "slim", "surgery"):
            shutil.rmtree(args.work / out, ignore_errors=True)
        r = measure(runs[name])
        print(f"| {args.model} | {name} | {r['code']} | {r['wall']:.0f} | {r['cpu']:.0f} | {r['rss_mb']:.0f} |"
              f" {r['read_gb']:.1f} | {' '.join(r['err'])}", flush=True)  # fmt: skip
        stage_rows.append((name, r["stages"]))
    print("\n| model | command | stage | calls | wall s | CPU s | read GB | peak RSS MB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, stages in stage_rows:
        for stage in [*STAGES, "other"]:
            if stage in stages:
                t = stages[stage]
                print(f"| {args.model} | {name} | {stage} | {t['calls']:.0f} | {t['wall']:.1f} | {t['cpu']:.1f} |"
                      f" {t['read'] / 1e9:.2f} | {t['peak'] / 2**20:.0f} |")  # fmt: skip
    if not args.keep_files:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
