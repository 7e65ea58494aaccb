"""``release_pages``: an adapter's file pages are handed back during a streaming merge, and no value
ever changes (formats.shard_writer.release_pages)."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramerge.formats.shard_writer import release_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")


def _rss_file_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


def _pageout_supported() -> bool:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    buf = ctypes.create_string_buffer(2 * page)
    start = -(-ctypes.addressof(buf) // page) * page
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(page), 21) == 0 or ctypes.get_errno() != 22


def test_values_never_change(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(512, 1024, generator=gen), "b": torch.randn(333, 77, generator=gen)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    mapped = load_file(str(tmp_path / "t.safetensors"))
    changed = load_file(str(tmp_path / "t.safetensors"))
    changed["a"].mul_(2)  # written in place: its pages are the process's own now, not the file's
    own = torch.randn(700, 900, generator=gen)  # not from a file at all
    expected = {"mapped": mapped["a"].clone(), "changed": changed["a"].clone(), "own": own.clone()}
    release_pages([mapped["a"], mapped["b"], changed["a"], own, torch.empty(0)])
    assert torch.equal(mapped["a"], expected["mapped"]) and torch.equal(mapped["b"], tensors["b"])
    assert torch.equal(changed["a"], expected["changed"]) and torch.equal(changed["a"], tensors["a"] * 2)
    assert torch.equal(own, expected["own"])


def test_a_mapped_files_pages_are_handed_back(tmp_path: Path) -> None:
    if not _pageout_supported():
        pytest.skip("this kernel does not know MADV_PAGEOUT (Linux < 5.4): release_pages is a no-op here")
    save_file({"w": torch.ones(64, 1 << 18)}, str(tmp_path / "w.safetensors"))  # 64 MiB
    w = load_file(str(tmp_path / "w.safetensors"))["w"]
    before = _rss_file_mib()
    assert float(w.sum()) == 64 * (1 << 18)  # every page read
    touched = _rss_file_mib()
    release_pages([w])
    after = _rss_file_mib()
    assert touched - before > 32, (before, touched)  # (the tensor is mapped from the file, as the merge relies on)
    assert touched - after > 32, (touched, after)
    assert float(w.sum()) == 64 * (1 << 18)
