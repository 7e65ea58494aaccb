"""Output faults: a full disk (a real small tmpfs), a read-only filesystem, and a full disk at the
exact moment loramerge.json or the index is written. Each is an OutputWriteError (CLI exit 2) and
leaves nothing behind."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import loramerge as lm
from conftest import CASES, make_base, save_adapter
from loramerge.cli.main import main


def _checkpoint(tmp: Path) -> tuple[Path, Path]:
    case = next(c for c in CASES if c.id == "llama-linear-patterns")
    base = make_base(case, torch.float32)
    base.save_pretrained(tmp / "base", max_shard_size="40KB")
    return tmp / "base", save_adapter(base, case.lora, tmp / "adapter")


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[object]:
    mounted: list[Path] = []

    def do(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); needs root")
        mounted.append(point)
        return point

    yield do
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def test_a_full_disk_is_an_output_write_error_and_nothing_is_left(tmp_path: Path, mount: object) -> None:
    base, adapter = _checkpoint(tmp_path)
    small = mount("small", "size=64k")  # type: ignore[operator]
    with pytest.raises(lm.OutputWriteError, match="disk is full|No space left on device"):
        lm.merge_checkpoint(base, adapter, small / "merged", progress=False)
    assert list(small.iterdir()) == []
    assert main(["merge", str(base), str(adapter), "-o", str(small / "merged")]) == 2
    assert list(small.iterdir()) == []


def test_a_read_only_filesystem_is_a_clear_error(tmp_path: Path, mount: object) -> None:
    base, adapter = _checkpoint(tmp_path)
    frozen = mount("frozen", "ro,size=1m")  # type: ignore[operator]
    with pytest.raises(lm.OutputWriteError, match="not writable"):
        lm.merge_checkpoint(base, adapter, frozen / "merged", progress=False)
    assert main(["merge", str(base), str(adapter), "-o", str(frozen / "merged")]) == 2


@pytest.mark.parametrize("name", ["loramerge.json", "model.safetensors.index.json", "config.json"])
def test_a_full_disk_while_writing_a_small_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    base, adapter = _checkpoint(tmp_path)
    real = Path.write_text

    def full(self: Path, *args: object, **kwargs: object) -> int:
        if self.name == name and ".merged.tmp-" in str(self):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", full)
    if name == "config.json":  # config.json is copied, not written: fail the copy
        import shutil

        real_copy = shutil.copyfile

        def full_copy(src: object, dst: object, **kwargs: object) -> object:
            if Path(str(dst)).name == name:
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
            return real_copy(src, dst, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(shutil, "copyfile", full_copy)
    with pytest.raises(lm.OutputWriteError, match=f"{name}.*No space left on device"):
        lm.merge_checkpoint(base, adapter, tmp_path / "merged", max_shard_size="20KB", progress=False)
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]
