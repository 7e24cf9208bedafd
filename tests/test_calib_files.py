"""Calibration files are read as they are consumed (a huge file costs a block of memory, not its size, and gives
the same pieces, so the same tokens and digest, as reading it whole), and only regular files are read: a named
pipe, socket or device in a ``--calib`` folder is skipped with one note instead of blocking the run forever."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from moeslim.stream import textfiles
from moeslim.stream.textfiles import NotText, file_pieces, pieces, read_text
from moeslim.stream.tokens import CalibrationDataError, load_calibration

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "fixtures" / "tiny-qwen3-moe"


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(TOKENIZER)


# Text as files hold it: words, newlines of every kind, multi-byte characters (split across blocks), a BOM, and now
# and then a NUL byte or bytes that are not UTF-8.
CHUNKS = st.sampled_from(["the ", "of ", "\n", "\r\n", "é", "€", "𝄞", "\u2028", "word\n", "\ufeff"])
FILES = st.builds(
    lambda bom, parts, bad: (b"\xef\xbb\xbf" if bom else b"") + "".join(parts).encode() + bad,
    st.booleans(),
    st.lists(CHUNKS, max_size=60),
    st.sampled_from([b"", b"", b"", b"\0", b"\xff", b"\xe2\x82"]),  # mostly text; a NUL, a bad byte, a cut-off €
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(content=FILES, size=st.integers(1, 12), block=st.integers(1, 9))
def test_pieces_read_as_consumed_are_those_of_the_whole_text(tmp_path: Path, content: bytes, size: int, block: int):
    """Whatever the block and piece sizes: the same pieces as ``pieces(read_text(path))``, or NotText where that is
    None (the file is binary or not UTF-8)."""
    path = tmp_path / "doc.txt"
    path.write_bytes(content)
    saved, textfiles.READ_BYTES = textfiles.READ_BYTES, block
    try:
        whole = read_text(path)
        if whole is None:
            with pytest.raises(NotText):
                list(file_pieces(path, size))
        else:
            assert list(file_pieces(path, size)) == list(pieces(whole, size))
    finally:
        textfiles.READ_BYTES = saved


def test_a_huge_file_is_read_no_further_than_needed(tmp_path: Path) -> None:
    """128 tokens of a 256 MB file: the reading's peak memory (tracemalloc, in a fresh process) is its working set, a
    block of bytes and their text (about 20 MiB), whatever the file's size. Reading it whole took twice its size
    (its bytes, then its text). The tokenizer's own memory for one 1M-character piece is not Python's, nor counted."""
    big = tmp_path / "big.txt"
    line = b"the quick brown fox jumps over the lazy dog and then some more words of text\n"
    with big.open("wb") as f:
        f.write(line * (256 * 2**20 // len(line)))
    size = big.stat().st_size
    script = textwrap.dedent(f"""
        import tracemalloc
        from transformers import AutoTokenizer
        from moeslim.stream.tokens import load_calibration
        tok = AutoTokenizer.from_pretrained({str(TOKENIZER)!r})
        tracemalloc.start()
        data = load_calibration({str(big)!r}, tok, samples=2, seq_len=64, seed=0)
        print(tracemalloc.get_traced_memory()[1], data.digest)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    peak, digest = done.stdout.split()
    assert int(peak) < 64 * 2**20, f"peak {int(peak) / 2**20:.0f} MiB while reading a {size / 2**20:.0f} MiB file"
    small = tmp_path / "small.txt"  # the same first megabyte: the tokens come from it alone
    small.write_bytes(line * (2**20 // len(line)))
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    assert load_calibration(str(small), tok, samples=2, seq_len=64, seed=0).digest == digest


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail, rather than hang, when the block blocks (a read of a named pipe nobody writes to)."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))  # the name stays after the socket is closed; opening it fails (ENXIO)
    server.close()


def _device(path: Path) -> None:
    path.symlink_to("/dev/null")  # a character device (/dev/zero would never end, and fill memory)


def _broken_link(path: Path) -> None:
    path.symlink_to(path.parent / "gone.txt")


ODD = {"a named pipe": _fifo, "a socket": _socket, "a device": _device, "a broken link": _broken_link}


@pytest.mark.parametrize("kind", ODD)
def test_a_folder_entry_that_is_not_a_regular_file_is_skipped_with_one_note(
    tok, tmp_path: Path, kind: str, capsys
) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    for c in "abcd":
        (folder / f"{c}.txt").write_text(f"{c} {c} {c}\n")
    plain = load_calibration(str(folder), tok, samples=2, seq_len=8, seed=0)
    capsys.readouterr()
    for name in ("odd.txt", "sub/odd.txt"):  # every listed file is read in some seeded order: one of them first
        (folder / name).parent.mkdir(exist_ok=True)
        ODD[kind](folder / name)
    with within(20):
        got = load_calibration(str(folder), tok, samples=2, seq_len=8, seed=0)
    assert got.digest == plain.digest  # the same files were read
    err = capsys.readouterr().err
    assert err == (
        f"moeslim: note: calibration reads only regular files; skipped in {folder}: odd.txt ({kind}),"
        f" sub/odd.txt ({kind})\n"
    )


@pytest.mark.parametrize("kind", [k for k in ODD if k != "a broken link"])  # that one is "not found"
def test_a_calib_path_that_is_not_a_regular_file_is_refused(tok, tmp_path: Path, kind: str) -> None:
    odd = tmp_path / "odd.txt"
    ODD[kind](odd)
    with within(20), pytest.raises(CalibrationDataError, match=f"is {kind}, not a regular file; save the text to"):
        load_calibration(str(odd), tok, samples=1, seq_len=2, seed=0)


@pytest.mark.slow
def test_calibrate_finishes_with_a_named_pipe_in_its_folder(tmp_path: Path) -> None:
    """The real command, as a user runs it: it ends, with the note, and holds no lock afterwards."""
    folder = tmp_path / "docs"
    folder.mkdir()
    stdlib = Path(tempfile.__file__).parent
    for name in ("argparse.py", "typing.py", "inspect.py"):
        (folder / name).write_bytes((stdlib / name).read_bytes())
    os.mkfifo(folder / "pipe")
    cmd = [sys.executable, "-m", "moeslim", "calibrate", str(ROOT / "fixtures" / "trained" / "tiny-mixtral-16e"),
           "--out", str(tmp_path / "stats"), "--calib", str(folder), "--samples", "4", "--seq-len", "32"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)  # before: blocked for good
    assert done.returncode == 0, done.stderr
    assert (
        f"moeslim: note: calibration reads only regular files; skipped in {folder}: pipe (a named pipe)" in done.stderr
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "stats"]
