"""A few greedy generations of both models on short prompts, when one whole model fits in memory.

The models are loaded one after the other with ``from_pretrained`` (never both at once) and only when the
larger one takes at most half the memory available now; otherwise the report says why they were skipped.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import torch

from moeslim.quant import quantization_config
from moeslim.source import Checkpoint

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Explain in one sentence what a mixture of experts is.")
NEW_TOKENS = 20


def available_memory() -> int:
    """Bytes of memory available now (Linux ``MemAvailable``), else the free physical pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def model_bytes(ckpt: Checkpoint, dtype: torch.dtype) -> int:
    """Bytes of the model's weights in ``dtype`` (from the headers: elements × element size)."""
    per = torch.empty((), dtype=dtype).element_size()
    return sum(int(torch.Size(t.shape).numel()) * per for t in ckpt.tensors.values())


def skip_reason(original: Checkpoint, pruned: Checkpoint, dtype: torch.dtype, count: int) -> str | None:
    """Why generations are skipped, or None to run them."""
    if count <= 0:
        return "skipped: --generations 0"
    if quantization_config(original.config):  # from_pretrained would need the quantiser's package or a GPU
        return "skipped: generations load the whole model with from_pretrained, which needs the quantiser's package"
    window = original.fetcher.window if original.fetcher is not None else None
    if window is not None and original.total_bytes > window:
        return (
            "skipped: the original is read from the Hub a window at a time (--cache-window), generations load it whole"
        )
    need, have = model_bytes(original, dtype), available_memory()
    if need > have // 2:
        gib = 2**30
        return f"skipped: the original model needs {need / gib:.1f} GiB, over half the {have / gib:.1f} GiB available"
    return None


def prompt_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    """Token ids ``(1, length)`` of ``prompt``, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    return torch.tensor([tokenizer(prompt)["input_ids"]])


@torch.no_grad()
def greedy(folder: Path, tokenizer: Any, prompts: list[str], dtype: torch.dtype, device: str) -> list[str]:
    """``NEW_TOKENS`` greedy tokens after each prompt, decoded; the model is freed before returning."""
    from transformers import AutoConfig

    from moeslim.stream.build import model_class
    from moeslim.stream.runner import no_progress_bars

    with no_progress_bars():
        model: Any = model_class(AutoConfig.from_pretrained(folder)).from_pretrained(folder, dtype=dtype)
    model = model.to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    try:
        for prompt in prompts:
            ids = prompt_ids(tokenizer, prompt).to(device)
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                pad_token_id=pad, top_p=None, top_k=None, temperature=None,
            )  # fmt: skip
            texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    finally:
        del model
        gc.collect()
    return texts


def generations(
    original: Path, pruned: Path, tokenizer: Any, dtype: torch.dtype, device: str, count: int
) -> list[dict[str, str]]:
    """Side-by-side greedy continuations of the first ``count`` prompts."""
    prompts = list(PROMPTS[:count])
    a = greedy(original, tokenizer, prompts, dtype, device)
    b = greedy(pruned, tokenizer, prompts, dtype, device)
    return [{"prompt": p, "original": x, "pruned": y} for p, x, y in zip(prompts, a, b, strict=True)]
