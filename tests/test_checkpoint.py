"""Out-of-core checkpoint merge: round trips on sharded checkpoints, bit-identical to the in-memory
merge, complete outputs, unmerge within the bound, and every fault leaving nothing behind."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import loramerge as lm
import loramerge.engine.checkpoint_steps as ckpt_mod
from conftest import CASES, make_base, save_adapter
from loramerge.cli.main import main
from loramerge.formats import directio
from loramerge.formats.shard_writer import ShardWriter
from loramerge.formats.shards import CheckpointReader
from loramerge.numerics.delta import LoraUpdate
from loramerge.numerics.tolerance import ulp

STREAM_CASES = [c for c in CASES if c.id != "llama-two-adapters"]
DT = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Move data in 8 KiB blocks, so that the tiny test checkpoints cross block boundaries (tensors
    split between blocks, padded tails) as real ones do with 16 MiB blocks."""
    monkeypatch.setattr(directio, "BLOCK", 8192)


def _prepare(tmp: Path, case_id: str, dtype: torch.dtype) -> tuple[torch.nn.Module, Path, Path]:
    case = next(c for c in CASES if c.id == case_id)
    base = make_base(case, dtype)
    base.save_pretrained(tmp / "base", max_shard_size="20KB")
    (tmp / "base" / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    adapter = save_adapter(base, case.lora, tmp / "adapter", perturb=case.perturb)
    return base, tmp / "base", adapter


@pytest.mark.filterwarnings("ignore::loramerge.errors.LoraMergeWarning")  # asserted in the tied-embedding test
@pytest.mark.parametrize("dt", list(DT))
@pytest.mark.parametrize("case_id", [c.id for c in STREAM_CASES])
def test_merge_checkpoint_equals_in_memory_merge(tmp_path: Path, case_id: str, dt: str) -> None:
    base, base_dir, adapter_dir = _prepare(tmp_path, case_id, DT[dt])
    assert len(list(base_dir.glob("model-*.safetensors"))) > 1, "the test needs a sharded base"
    report = lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", max_shard_size="30KB", progress=False)
    assert report.passed and report.verification is not None
    out = tmp_path / "merged"
    # a complete checkpoint: side files, index, shard names, metadata
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= {p.name for p in out.iterdir()}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.startswith("model-0000") and "-of-" in s for s in shards)
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            meta = f.metadata()
            assert set(meta) == {"format", "loramerge_lineage"} and meta["format"] == "pt"
            # records name a local source by its directory name only: no user names or directory layout
            assert json.loads(meta["loramerge_lineage"])[-1]["adapter"]["source"] == adapter_dir.name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.tmp")], "temporary directory left behind"
    # bit for bit what the in-memory merge gives, and loadable with from_pretrained
    in_memory = lm.merge(copy.deepcopy(base), lm.load_adapter(adapter_dir)).model.state_dict()
    loaded = lm.load_base(out).state_dict()
    for name, tensor in in_memory.items():
        assert torch.equal(loaded[name], tensor), name
    assert set(report.changed) <= set(index["weight_map"])


@pytest.mark.parametrize(
    "case_id", ["llama-linear-patterns", "gpt2-conv1d-biasloraonly", "llama-dora", "bert-seqcls-modules-to-save"]
)
def test_unmerge_checkpoint_recovers_base(tmp_path: Path, case_id: str) -> None:
    base, base_dir, adapter_dir = _prepare(tmp_path, case_id, torch.bfloat16)
    merged = lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", max_shard_size="30KB", progress=False)
    adapter = lm.load_adapter(adapter_dir)
    state = base.state_dict()
    originals = {n: state[n] for n, k in adapter.replaced_kinds.items() if k in ("modules_to_save", "trained_bias")}
    back = lm.unmerge_checkpoint(
        tmp_path / "merged",
        adapter,
        tmp_path / "back",
        dora_norms=merged.dora_norms,
        originals=originals,
        progress=False,
    )
    assert back.passed
    recovered = lm.load_base(tmp_path / "back").state_dict()
    merged_state = lm.load_base(tmp_path / "merged").state_dict()
    for name, original in state.items():
        got = recovered[name]
        if name not in merged.changed:
            assert torch.equal(got, original), name
        elif adapter.modules.get(name[: -len(".weight")]) is not None and not adapter.uses_dora:
            bound = (
                0.5 * ulp(merged_state[name].double(), got.dtype).double() + 0.5 * ulp(got.double(), got.dtype).double()
            )
            assert bool(((got.double() - original.double()).abs() <= bound + 1e-12).all()), name
        else:
            assert torch.allclose(got.float(), original.float(), atol=0.05), name


def test_refuses_existing_output_and_overwrites_when_asked(tmp_path: Path) -> None:
    _, base_dir, adapter_dir = _prepare(tmp_path, "llama-linear-patterns", torch.bfloat16)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(lm.LoraMergeError, match="already exists"):
        lm.merge_checkpoint(base_dir, adapter_dir, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    lm.merge_checkpoint(base_dir, adapter_dir, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_corrupt_and_missing_shards(tmp_path: Path) -> None:
    _, base_dir, adapter_dir = _prepare(tmp_path, "llama-linear-patterns", torch.bfloat16)
    shard = sorted(base_dir.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(lm.AdapterConfigError, match="truncated or corrupt"):
        lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "out", progress=False)
    shard.unlink()
    with pytest.raises(lm.AdapterNotFoundError, match="missing"):
        lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unmatched_adapter_keys_listed(tmp_path: Path) -> None:
    _, base_dir, _ = _prepare(tmp_path, "llama-linear-patterns", torch.bfloat16)
    gpt2 = next(c for c in CASES if c.id == "gpt2-conv1d-biasloraonly")
    other = save_adapter(make_base(gpt2, torch.bfloat16), gpt2.lora, tmp_path / "gpt2-adapter")
    with pytest.raises(lm.AdapterMismatchError) as info:
        lm.merge_checkpoint(base_dir, other, tmp_path / "out", progress=False)
    names = [line[4:].split(": ")[0] for line in str(info.value).splitlines() if line.startswith("  - ")]
    assert len(names) >= 6 and names == sorted(names)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["compute", "write", "copy", "flush"])
def test_merge_killed_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Ctrl-C in the merge arithmetic (main thread), while writing a merged tensor, while copying an
    untouched one, or while a block goes to disk (the writer's threads): no output is left."""
    _, base_dir, adapter_dir = _prepare(tmp_path, "llama-linear-patterns", torch.bfloat16)
    target, attr = {
        "compute": (ckpt_mod, "merge_tensor_"),
        "write": (ShardWriter, "write"),
        "copy": (ShardWriter, "copy"),
        "flush": (directio, "pwrite_all"),
    }[where]
    real = getattr(target, attr)
    calls = {"n": 0}

    def dying(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attr, dying)
    with pytest.raises(KeyboardInterrupt):
        lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "out", max_shard_size="30KB", progress=False)
    assert calls["n"] >= 3  # the writer may finish a queued job before the failure reaches the main thread
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_failed_verification_publishes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, base_dir, adapter_dir = _prepare(tmp_path, "llama-linear-patterns", torch.bfloat16)
    real = ckpt_mod.merge_tensor_

    def wrong(weight: torch.Tensor, updates: list[LoraUpdate], *args: object, **kwargs: object) -> object:
        return real(weight, [type(u)(u.kind, u.lora_A, u.lora_B, u.scale * 1.5) for u in updates], *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "merge_tensor_", wrong)
    with pytest.raises(lm.VerificationError, match="model.layers.0.self_attn.q_proj"):
        lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_tied_embeddings_untied_like_the_in_memory_merge(tmp_path: Path) -> None:
    base, base_dir, adapter_dir = _prepare(tmp_path, "llama-tied-embedding", torch.bfloat16)
    assert "lm_head.weight" not in json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    with pytest.warns(lm.LoraMergeWarning, match="lm_head"):
        report = lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", max_shard_size="30KB", progress=False)
    assert report.passed
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    with pytest.warns(lm.LoraMergeWarning):
        in_memory = lm.merge(copy.deepcopy(base), lm.load_adapter(adapter_dir)).model.state_dict()
    loaded = lm.load_base(tmp_path / "merged").state_dict()
    for name, tensor in in_memory.items():
        assert torch.equal(loaded[name], tensor), name
    assert torch.equal(loaded["lm_head.weight"], base.state_dict()["lm_head.weight"])
    assert lm.verify_checkpoint(base_dir, adapter_dir, tmp_path / "merged").passed


def test_dtype_conversion_and_model_check(tmp_path: Path) -> None:
    _, base_dir, adapter_dir = _prepare(tmp_path, "llama-linear-patterns", torch.float32)
    report = lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "out", dtype="bf16", verify="model", progress=False)
    assert report.passed and report.verification is not None and report.verification.outputs is not None
    loaded = lm.load_base(tmp_path / "out")
    assert loaded.dtype == torch.bfloat16
    # verifying the converted output against the fp32 base detects the conversion and says so
    check = lm.verify_checkpoint(base_dir, adapter_dir, tmp_path / "out")
    assert check.passed and any("compared after converting the base to torch.bfloat16" in n for n in check.notes)


def test_dtype_mismatch_is_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _, base_dir, adapter_dir = _prepare(tmp_path, "llama-linear-patterns", torch.bfloat16)
    lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "out", progress=False)
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"].float()  # one tensor in another dtype
    save_file(state, str(tmp_path / "out" / "model.safetensors"), metadata={"format": "pt"})
    report = lm.verify_checkpoint(base_dir, adapter_dir, tmp_path / "out")
    assert not report.passed and "model.norm.weight" in report.unexpected_changes
    assert any(
        "dtype mismatch" in n and "model.norm.weight (torch.bfloat16 expected, torch.float32 found)" in n
        for n in report.notes
    )


def test_cli_merge_verify_unmerge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, base_dir, adapter_dir = _prepare(tmp_path, "qwen2-rslora-lorabias", torch.bfloat16)
    out = tmp_path / "merged"
    assert main(["merge", str(base_dir), str(adapter_dir), "-o", str(out), "--max-shard-size", "30KB"]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert main(["merge", str(base_dir), str(adapter_dir), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["verify", str(base_dir), str(adapter_dir), str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True
    assert main(["unmerge", str(out), str(adapter_dir), "-o", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "victim",
    [
        "model.layers.1.post_attention_layernorm.weight",  # untouched: copied byte for byte
        "model.layers.0.self_attn.q_proj.weight",  # merged
    ],
)
def test_corruption_on_the_way_to_disk_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, victim: str) -> None:
    """One bit flipped between the writer's buffer and the disk (after the bytes were hashed) fails
    the verification, names the tensor, and publishes nothing."""
    _, base_dir, adapter_dir = _prepare(tmp_path, "llama-linear-patterns", torch.bfloat16)
    lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "clean", progress=False)
    file, offset = CheckpointReader(tmp_path / "clean").location(victim)  # the layout is deterministic
    real = directio.pwrite_all
    flipped = {"n": 0}

    def flipping(fd: int, data: torch.Tensor, at: int) -> None:
        if at <= offset < at + data.numel():
            data[offset - at] ^= 1  # one bit of one element, in the (already hashed) staging block
            flipped["n"] += 1
        real(fd, data, at)

    monkeypatch.setattr(directio, "pwrite_all", flipping)
    with pytest.raises(lm.VerificationError, match=victim.split(".")[-2]) as info:
        lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "out", progress=False)
    assert flipped["n"] == 1 and file.name == "model.safetensors"
    assert victim in info.value.report.unexpected_changes
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("at_call", [1, 4])
def test_disk_full_is_a_clear_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at_call: int
) -> None:
    import errno

    _, base_dir, adapter_dir = _prepare(tmp_path, "llama-linear-patterns", torch.bfloat16)
    real = directio.pwrite_all
    calls = {"n": 0}

    def full(fd: int, data: torch.Tensor, at: int) -> None:
        calls["n"] += 1
        if calls["n"] == at_call:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, at)

    monkeypatch.setattr(directio, "pwrite_all", full)
    with pytest.raises(lm.LoraMergeError, match="disk is full") as info:
        lm.merge_checkpoint(base_dir, adapter_dir, tmp_path / "out", progress=False)
    assert isinstance(info.value, OSError) and "another output directory" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_shard_truncated_after_opening_is_a_clear_error(tmp_path: Path) -> None:
    """A shard cut short after its header was read (reading a tensor, or copying it through) is
    named as truncated, not a bare EOFError."""
    _, base_dir, _ = _prepare(tmp_path, "llama-linear-patterns", torch.bfloat16)
    reader = CheckpointReader(base_dir)
    name = reader.names[-1]
    path, offset = reader.location(name)
    with path.open("r+b") as f:
        f.truncate(offset + 1)
    with pytest.raises(lm.AdapterConfigError, match="shorter than its header says"):
        reader.read_into(name, torch.empty(reader.tensors[name].nbytes, dtype=torch.uint8))
    writer = ShardWriter(tmp_path, [[reader.tensors[name]]])
    with pytest.raises(lm.AdapterConfigError, match="truncated while in use"):
        writer.copy(name, path, offset, reader.tensors[name].nbytes)
    writer.abort()
