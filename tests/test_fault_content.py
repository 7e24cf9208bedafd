"""Untrusted and stale content: an output holds only what its own run made, and a tokenizer that runs its own code
is run only when the user says so.

- ``slim`` of a folder that is itself a pruned output (with its plan, validation report, expert map and card)
  copies none of those into the new output: with ``--no-validate`` the new output has no ``validation.json``, its
  card says it was not validated, and the list of written files does not name one.
- A tokenizer that needs its own code (``auto_map`` in ``tokenizer_config.json`` and a ``tiktoken.model``, as
  Kimi's) is refused without ``--trust-remote-code`` in one line naming the flag and the code file, and is loaded
  (its code run) with it. Before, it was "no tokenizer in ..." with or without the flag.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import run_cli, tree_digest
from tests.hostile import outcome_table, record  # noqa: F401

SRC = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-qwen3-moe"
WORDS = " ".join(f"w{i % 90}" for i in range(4000))  # words the fixture tokenizer knows


def test_a_pruned_source_passes_on_none_of_its_runs_files(tmp_path: Path, capsys) -> None:
    (tmp_path / "calib.txt").write_text(WORDS)
    first, second = tmp_path / "first", tmp_path / "second"
    code, _, err = run_cli(["slim", str(SRC), "--keep", "4", "--out", str(first), "--criterion", "router-norm",
                            "--no-validate"], capsys)  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(["validate", str(SRC), str(first), "--calib", str(tmp_path / "calib.txt"), "--samples", "4",
                            "--seq-len", "16", "--generations", "0"], capsys)  # fmt: skip
    assert code == 0, err
    assert {"validation.json", "moeslim_plan.json", "expert_map.png", "README.md"} <= {p.name for p in first.iterdir()}
    before = tree_digest(first)
    code, out, err = run_cli(["slim", str(first), "--keep", "2", "--out", str(second), "--criterion", "router-norm",
                              "--no-validate"], capsys)  # fmt: skip
    assert code == 0, err
    assert tree_digest(first) == before
    copied = {"chat_template.jinja", "custom_helper.py", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json"}  # the source's own files  # fmt: skip
    written = {"config.json", "model.safetensors", "moeslim_plan.json", "README.md", "expert_map.png"}
    assert {p.name for p in second.iterdir()} == copied | written  # no validation.json of the first run
    assert json.loads((second / "moeslim_plan.json").read_text())["keep"] == 2
    card = (second / "README.md").read_text()
    assert "Not validated yet: no `validation.json`" in card, card
    assert "validation " not in out.split("written:")[1]
    assert (second / "expert_map.png").read_bytes() != (first / "expert_map.png").read_bytes()  # drawn anew
    record("stale results", "slim", "only this run's files")


TOKENIZER_CODE = '''
from transformers import PreTrainedTokenizer


class TinyTokenizer(PreTrainedTokenizer):
    """Words separated by spaces; the vocabulary one word a line in tiktoken.model."""

    vocab_files_names = {"vocab_file": "tiktoken.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, **kwargs):
        with open(vocab_file) as f:
            self.words = f.read().split()
        self.ids = {w: i for i, w in enumerate(self.words)}
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return len(self.words)

    def get_vocab(self):
        return dict(self.ids)

    def _tokenize(self, text):
        return text.split()

    def _convert_token_to_id(self, token):
        return self.ids.get(token, 0)

    def _convert_id_to_token(self, index):
        return self.words[index]
'''


def _model_with_tokenizer_code(tmp_path: Path) -> Path:
    """The fixture with its tokenizer replaced by one that needs its own code, as Kimi-K2's."""
    model = Path(shutil.copytree(SRC, tmp_path / "model"))
    (model / "tokenizer.json").unlink()
    (model / "tokenization_tiny.py").write_text(TOKENIZER_CODE)
    (model / "tiktoken.model").write_text("\n".join(["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(90))]) + "\n")
    (model / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TinyTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_tiny.TinyTokenizer", None]},
        "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
    }))  # fmt: skip
    return model


def test_a_tokenizer_with_its_own_code_needs_the_flag_and_runs_with_it(tmp_path: Path, capsys) -> None:
    model = _model_with_tokenizer_code(tmp_path)
    (tmp_path / "calib.txt").write_text(WORDS)
    args = ["calibrate", str(model), "--out", str(tmp_path / "stats"), "--calib", str(tmp_path / "calib.txt"),
            "--samples", "4", "--seq-len", "16"]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "runs its own code (tokenization_tiny.py" in err and "pass --trust-remote-code" in err, err
    assert not (tmp_path / "stats").exists()
    record("tokenizer with own code", "calibrate", "refused naming the flag")
    code, _, err = run_cli([*args, "--trust-remote-code"], capsys)
    assert code == 0, err
    stats = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert stats["calibration"]["tokens"] == 4 * 16  # tokenized by the model's own code
    record("tokenizer with own code", "calibrate", "loaded with --trust-remote-code")
