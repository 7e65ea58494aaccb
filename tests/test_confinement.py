"""Untrusted input stays inside: file names read from files are confined to their directory, side
files come from an explicit list, and a receipt the lineage names must exist."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import loramerge as lm
from conftest import CASES, make_base, save_adapter
from loramerge.cli.main import main
from loramerge.errors import AdapterConfigError, UnsafePathError
from loramerge.formats.confine import confined_file, plain_name, side_files

INDEX = "model.safetensors.index.json"


def _checkpoint(tmp: Path) -> tuple[Path, Path]:
    case = next(c for c in CASES if c.id == "llama-linear-patterns")
    base = make_base(case, torch.bfloat16)
    base.save_pretrained(tmp / "base", max_shard_size="20KB")
    (tmp / "base" / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    return tmp / "base", save_adapter(base, case.lora, tmp / "adapter")


def _retarget(base: Path, new_file: str) -> None:
    """Point the index's first shard at ``new_file`` (a name an attacker wrote)."""
    index = json.loads((base / INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (new_file if v == first else v) for k, v in index["weight_map"].items()}
    (base / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize(
    "name", ["../outside/model-00001-of-00009.safetensors", "/etc/hostname", "sub/../x.safetensors", "..", ""]
)
def test_plain_names_only(name: str) -> None:
    with pytest.raises(UnsafePathError):
        plain_name(name, "test")


def test_index_naming_a_file_outside_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    base, adapter = _checkpoint(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    first = sorted(p.name for p in base.glob("model-*.safetensors"))[0]
    shutil.copy(base / first, outside / first)
    for hostile in (f"../outside/{first}", str(outside / first)):
        _retarget(base, hostile)
        with pytest.raises(UnsafePathError, match="not a plain file name"):
            lm.merge_checkpoint(base, adapter, tmp_path / "merged", progress=False)
        assert not (tmp_path / "merged").exists()
        assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "merged")]) == 2


def test_a_shard_that_links_out_of_the_checkpoint_is_refused(tmp_path: Path) -> None:
    base, adapter = _checkpoint(tmp_path)
    first = sorted(p.name for p in base.glob("model-*.safetensors"))[0]
    (tmp_path / "elsewhere").mkdir()
    shutil.move(base / first, tmp_path / "elsewhere" / first)
    os.symlink(tmp_path / "elsewhere" / first, base / first)
    with pytest.raises(UnsafePathError, match="outside that directory"):
        lm.merge_checkpoint(base, adapter, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("weight_map", [[1, 2], 7, {}, {"a": 3}])
def test_a_malformed_weight_map_is_a_clear_error(tmp_path: Path, weight_map: object) -> None:
    base, adapter = _checkpoint(tmp_path)
    (base / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(AdapterConfigError, match="weight_map"):
        lm.merge_checkpoint(base, adapter, tmp_path / "merged", progress=False)


def test_invalid_json_in_the_index_names_the_file(tmp_path: Path) -> None:
    base, adapter = _checkpoint(tmp_path)
    (base / INDEX).write_text("{not json")
    with pytest.raises(AdapterConfigError, match="not valid JSON"):
        lm.merge_checkpoint(base, adapter, tmp_path / "merged", progress=False)


def test_huggingface_cache_links_into_the_repos_blobs_are_followed(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "deadbeef").write_text("{}")
    os.symlink("../../blobs/deadbeef", snapshot / "config.json")
    assert confined_file(snapshot, "config.json", "test") == snapshot / "config.json"
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", snapshot / "tokenizer.json")
    with pytest.raises(UnsafePathError):
        confined_file(snapshot, "tokenizer.json", "test")


def test_only_checkpoint_side_files_are_copied_and_the_rest_is_reported(tmp_path: Path) -> None:
    base, adapter = _checkpoint(tmp_path)
    (base / "checkpoint-500").mkdir()
    (base / "checkpoint-500" / "optimizer.pt").write_bytes(b"optimizer state")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "id_rsa").write_text("secret key")
    os.symlink(tmp_path / "private", base / "linked")
    os.symlink(tmp_path / "private" / "id_rsa", base / "README.md")  # an allowed name, but a link out
    (base / "notes.txt").write_text("not part of a checkpoint")
    (base / "generation_config.json").write_text("{}")
    report = lm.merge_checkpoint(base, adapter, tmp_path / "merged", progress=False)
    out = tmp_path / "merged"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= names
    assert not {"checkpoint-500", "linked", "README.md", "notes.txt"} & names
    assert all(p.is_file() and not p.is_symlink() for p in out.iterdir())
    assert "tokenizer.json" in report.side_files
    skipped = " ".join(report.skipped)
    for name in ("checkpoint-500/", "linked/", "README.md", "notes.txt"):
        assert name in skipped
    carried, _ = side_files(base)
    assert {p.name for p in carried} == set(report.side_files)


def _record_receipt_name(merged: Path, name: str) -> None:
    record = merged / "loramerge.json"
    data = json.loads(record.read_text())
    data["lineage"][-1]["receipt"] = name
    record.write_text(json.dumps(data))


def test_a_receipt_name_that_leaves_the_checkpoint_is_refused(tmp_path: Path) -> None:
    base, adapter = _checkpoint(tmp_path)
    lm.merge_checkpoint(base, adapter, tmp_path / "m1", receipt=True, progress=False)
    _record_receipt_name(tmp_path / "m1", "../payload.sh")
    (tmp_path / "payload.sh").write_text("#!/bin/sh\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UnsafePathError):  # the next merge carries earlier receipts along
        lm.merge_checkpoint(tmp_path / "m1", adapter, tmp_path / "m2", progress=False)
    with pytest.raises(UnsafePathError):
        lm.unmerge_checkpoint(tmp_path / "m1", adapter, tmp_path / "back", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing written outside"


def test_a_missing_receipt_the_lineage_names_is_an_error(tmp_path: Path) -> None:
    base, adapter = _checkpoint(tmp_path)
    lm.merge_checkpoint(base, adapter, tmp_path / "merged", receipt=True, progress=False)
    receipt = next((tmp_path / "merged").glob("loramerge-receipt*.safetensors"))
    receipt.unlink()
    with pytest.raises(lm.ReceiptError, match="missing"):
        lm.unmerge_checkpoint(tmp_path / "merged", adapter, tmp_path / "back", progress=False)
    assert not (tmp_path / "back").exists()
    assert main(["unmerge", str(tmp_path / "merged"), str(adapter), "-o", str(tmp_path / "back")]) == 2
    back = lm.unmerge_checkpoint(tmp_path / "merged", adapter, tmp_path / "back", receipt=False, progress=False)
    assert back.passed
