"""Atomic publish: OUT is always the old complete directory or the new one; a lock refuses a second
writer at once; signals clean up; temporaries of dead processes are removed; normal permissions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import loramerge.formats.publish as publish
from loramerge.errors import LoraMergeError, OutputWriteError
from loramerge.formats.publish import OutputBusyError, atomic_directory

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from loramerge.formats.publish import atomic_directory
    out = Path(sys.argv[1])
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "weights").write_text("new, partial")
        print("ready", flush=True)
        time.sleep(60)
    """
)


def _complete(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "weights").write_text(content)
    (path / "config.json").write_text("{}")
    return path


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_overwrite_is_one_exchange_and_out_is_always_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _complete(tmp_path / "out", "old")
    seen = []
    real = publish._exchange

    def watching(a: Path, b: Path) -> bool:
        seen.append(((a / "weights").read_text(), (b / "weights").read_text()))
        done = real(a, b)
        if done:  # right after the exchange: the new one is OUT, the old one is complete under the temporary name
            seen.append(((b / "weights").read_text(), (a / "weights").read_text()))
        return done

    monkeypatch.setattr(publish, "_exchange", watching)
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "new"
    assert seen[0] == ("new", "old")
    if sys.platform == "linux":
        assert len(seen) == 2 and seen[1] == ("new", "old"), "one renameat2(RENAME_EXCHANGE) on Linux"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["exchange", "second-rename"])
def test_a_failed_publication_leaves_the_old_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    out = _complete(tmp_path / "out", "old")
    if where == "exchange":

        def fail(a: Path, b: Path) -> bool:
            raise OSError(28, "No space left on device", str(b))

        monkeypatch.setattr(publish, "_exchange", fail)
    else:  # the fallback where renameat2 is missing: fail the rename that brings the new one in
        monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
        real = os.rename
        calls = []

        def flaky(src: object, dst: object) -> None:
            calls.append(src)
            if len(calls) == 2:
                raise OSError(5, "Input/output error", str(dst))
            real(src, dst)  # type: ignore[arg-type]

        monkeypatch.setattr(publish.os, "rename", flaky)
    with (
        pytest.raises(OutputWriteError, match="previous output is unchanged"),
        atomic_directory(out, overwrite=True) as tmp,
    ):
        (tmp / "weights").write_text("new")
    monkeypatch.undo()
    assert (out / "weights").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_a_second_writer_is_refused_at_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "weights").write_text("first")
        with pytest.raises(OutputBusyError, match=f"pid {os.getpid()}"), atomic_directory(out, overwrite=True):
            pass
    assert (out / "weights").read_text() == "first"
    with pytest.raises(LoraMergeError, match="already exists"), atomic_directory(out):
        pass
    assert (out / "weights").read_text() == "first"
    assert _leftovers(tmp_path) == []


def test_out_gets_normal_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_a_parent_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputWriteError, match="is a file"), atomic_directory(tmp_path / "file" / "out"):
        pass


def _child(out: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signals_clean_up_and_leave_the_old_output(tmp_path: Path, sig: signal.Signals) -> None:
    out = _complete(tmp_path / "out", "old")
    proc = _child(out)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert (out / "weights").read_text() == "old"
    assert _leftovers(tmp_path) == [], "temporary directory and lock removed"


def test_temporaries_of_a_killed_process_are_removed_by_the_next_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _child(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    left = [n for n in _leftovers(tmp_path) if ".tmp-" in n]
    assert left, "SIGKILL cannot clean up"
    (tmp_path / f".other.tmp-{os.getpid()}-alive").mkdir()  # a live process's temporary is left alone
    (tmp_path / ".tool.tmp-999999999-x").mkdir()  # a dead process's, but another tool's: left alone
    with atomic_directory(out) as tmp:
        (tmp / "weights").write_text("next")
    assert (out / "weights").read_text() == "next"
    assert not (out / publish.MARKER).exists()
    assert _leftovers(tmp_path) == [f".other.tmp-{os.getpid()}-alive", ".tool.tmp-999999999-x"]


STREAMING_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import loramerge as lm
    import loramerge.engine.checkpoint_steps as ckpt
    real = ckpt.merge_tensor_
    def slow(*args, **kwargs):
        print("streaming", flush=True)
        time.sleep(0.5)
        return real(*args, **kwargs)
    ckpt.merge_tensor_ = slow
    lm.merge_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_mid_stream_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    import torch

    from conftest import CASES, make_base, save_adapter

    case = next(c for c in CASES if c.id == "llama-linear-patterns")
    base = make_base(case, torch.bfloat16)
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    adapter = save_adapter(base, case.lora, tmp_path / "adapter")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    args = [str(tmp_path / "base"), str(adapter), str(tmp_path / "out")]
    proc = subprocess.Popen([sys.executable, "-c", STREAMING_CHILD, *args], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "streaming"
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")], "the merge is writing its temporary"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == [], "temporary directory and lock removed"
