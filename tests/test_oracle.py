"""The checkpoint path is judged by PEFT's own LoRA layers (loramerge.proof.oracle), not by its own plan.

Each negative control injects a mistake into loramerge's checkpoint planning (a layout, a scale, a
tie) so that loramerge's own checks, made from the same plan, still pass: the oracle must fail it
and name the layer. The positive cases of every architecture run through the same oracle in
test_checkpoint.py and test_matrix.py."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import loramerge as lm
import loramerge.engine.checkpoint_steps as steps
import loramerge.operations.checkpoint as ckpt
import loramerge.plan.checkpoint_plan as checkpoint_plan
from loramerge.numerics.delta import LoraUpdate
from loramerge.proof.oracle import check_merged_checkpoint
from test_layout import _gpt2_with_mixed_targets, _t5


def _verified_merge_fails(base: Path, adapter: Path, out: Path) -> str:
    with pytest.raises(lm.VerificationError) as info:
        lm.merge_checkpoint(base, adapter, out, progress=False)
    assert not out.exists(), "a failed merge left its output behind"
    return str(info.value)


def test_a_transposed_layout_passes_loramerges_own_check_but_not_peft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, base, adapter = _gpt2_with_mixed_targets(tmp_path)
    right = checkpoint_plan._weight_layout
    monkeypatch.setattr(
        checkpoint_plan, "_weight_layout", lambda *args: "linear" if args[3][0] == args[3][1] else right(*args)
    )
    message = _verified_merge_fails(base, adapter, tmp_path / "merged")
    assert "transformer.h.0.attn.c_proj" in message and "PEFT's own LoRA layer" in message
    assert "c_attn: output error" not in message, "the non-square layers were merged right and must pass"
    # the same merge without the oracle: loramerge's own checks share the mistake and pass it
    monkeypatch.setattr(ckpt, "_judged", lambda report, *args, **kwargs: report)
    assert lm.merge_checkpoint(base, adapter, tmp_path / "unjudged", progress=False).passed


def test_a_wrong_scale_fails_against_peft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, base, adapter = _gpt2_with_mixed_targets(tmp_path)
    right = steps._updates_for

    def five_percent_off(mod: Any, kind: Any) -> LoraUpdate:
        up = right(mod, kind)
        return LoraUpdate(up.kind, up.lora_A, up.lora_B, up.scale * 1.05, up.magnitude, up.bias)

    monkeypatch.setattr(steps, "_updates_for", five_percent_off)
    message = _verified_merge_fails(base, adapter, tmp_path / "merged")
    # one layer of each family is run through PEFT's layer inside merge_checkpoint
    for layer in ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj", "lm_head"):
        assert f"layer {layer}: output error" in message and "PEFT's own LoRA layer" in message, layer


@pytest.mark.filterwarnings("ignore::loramerge.LoraMergeWarning")
def test_a_broken_tie_fails_and_names_the_tied_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """T5 stores one ``shared`` tensor for both embed_tokens and lm_head. Without the untie plan
    the delta would reach all of them; adapter mode adds it to ``shared`` only."""
    torch.manual_seed(0)
    base = _t5().eval()
    base.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["shared", "q"], init_lora_weights=False)
        pm = get_peft_model(copy.deepcopy(base), lora)
        pm.save_pretrained(tmp_path / "adapter")
    monkeypatch.setattr(ckpt, "_untie_plan", lambda *args: {})
    message = _verified_merge_fails(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    for tied in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        assert tied in message, tied


def _merged(tmp_path: Path) -> tuple[Path, Path, Path]:
    _, _, base, adapter = _gpt2_with_mixed_targets(tmp_path)
    assert lm.merge_checkpoint(base, adapter, tmp_path / "merged", progress=False).passed
    return base, adapter, tmp_path / "merged"


def _edit(path: Path, name: str, change: Any) -> None:
    tensors = load_file(path)
    tensors[name] = change(tensors[name]).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def test_verify_checkpoint_is_judged_by_peft_and_says_so(tmp_path: Path) -> None:
    base, adapter, merged = _merged(tmp_path)
    report = lm.verify_checkpoint(base, adapter, merged)
    assert report.passed
    assert any("judged against PEFT's own LoRA layers (all 7)" in n for n in report.notes), report.notes
    merged_report = lm.merge_checkpoint(base, adapter, tmp_path / "again", progress=False).verification
    assert merged_report is not None
    assert any("(4 of 7 (one per layer family" in n for n in merged_report.notes), merged_report.notes


def test_a_corrupted_layer_fails_by_name(tmp_path: Path) -> None:
    base, adapter, merged = _merged(tmp_path)
    _edit(merged / "model.safetensors", "transformer.h.1.attn.c_proj.weight", lambda t: t * 1.01)
    report = lm.verify_checkpoint(base, adapter, merged)
    assert not report.passed
    assert [c.name for c in report.layers if not c.passed] == ["transformer.h.1.attn.c_proj"]


def test_a_changed_tensor_adapter_mode_leaves_alone_fails_by_name(tmp_path: Path) -> None:
    base, adapter, merged = _merged(tmp_path)
    _edit(merged / "model.safetensors", "transformer.h.0.mlp.c_fc.weight", lambda t: t + 1e-3)
    report = lm.verify_checkpoint(base, adapter, merged)
    assert not report.passed and "transformer.h.0.mlp.c_fc.weight" in report.unexpected_changes


def test_the_wrong_base_fails(tmp_path: Path) -> None:
    base, adapter, merged = _merged(tmp_path)
    other = tmp_path / "other"
    torch.manual_seed(1)
    type(lm.load_base(base))(lm.load_base(base).config).save_pretrained(other)
    assert not lm.verify_checkpoint(other, adapter, merged).passed


def test_the_oracle_itself_fails_a_delta_merged_with_the_wrong_sign(tmp_path: Path) -> None:
    """The oracle alone, on a checkpoint built by hand: W - ΔW instead of W + ΔW."""
    base, adapter, merged = _merged(tmp_path)
    base_tensors = load_file(base / "model.safetensors")
    name = "transformer.h.0.attn.c_attn.weight"
    _edit(merged / "model.safetensors", name, lambda t: 2 * base_tensors[name] - t)
    result = check_merged_checkpoint(base, merged, lm.load_adapter(adapter), lm.Tolerance())
    assert not isinstance(result, str)
    assert [c.name for c in result.layers if not c.passed] == ["transformer.h.0.attn.c_attn"]


def test_a_model_transformers_cannot_build_is_not_judged_and_the_report_says_so(tmp_path: Path) -> None:
    base, adapter, merged = _merged(tmp_path)
    for root in (base, merged):
        config = json.loads((root / "config.json").read_text())
        config["model_type"], config["architectures"] = "custom-code-model", ["CustomModel"]
        (root / "config.json").write_text(json.dumps(config))
    result = check_merged_checkpoint(base, merged, lm.load_adapter(adapter), lm.Tolerance())
    assert isinstance(result, str) and "cannot build" in result


def test_merging_does_not_change_the_adapter_it_was_given(tmp_path: Path) -> None:
    """A saved base layer (PEFT saves lm_head's when it is a target) used to be merged into in
    place: a second merge with the same Adapter object then added the delta twice."""
    _, _, base, adapter_dir = _gpt2_with_mixed_targets(tmp_path)
    adapter = lm.load_adapter(adapter_dir)
    before = {k: v.clone() for k, v in adapter.tensors.items()}
    assert lm.merge_checkpoint(base, adapter, tmp_path / "m1", progress=False).passed
    assert lm.merge_checkpoint(base, adapter, tmp_path / "m2", progress=False).passed
    assert all(torch.equal(before[k], v) for k, v in adapter.tensors.items())
    first, second = load_file(tmp_path / "m1" / "model.safetensors"), load_file(tmp_path / "m2" / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_one_layer_merged_unlike_its_family_is_run_through_peft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside merge_checkpoint PEFT's layer runs for one layer per family; a layer the merge gave
    another scale than its family (as a misread alpha_pattern would) is its own family."""
    _, _, base, adapter = _gpt2_with_mixed_targets(tmp_path)
    odd = "transformer.h.1.attn.c_attn"

    def misread(mod: Any) -> Any:
        return dataclasses.replace(mod, scale=mod.scale * 1.05) if mod.name == odd else mod

    original_map = ckpt.map_adapter

    def mapping(reader: Any, adapter: Any) -> Any:
        found = original_map(reader, adapter)
        found.modules = {k: (misread(m), kind) for k, (m, kind) in found.modules.items()}
        return found

    monkeypatch.setattr(ckpt, "map_adapter", mapping)
    message = _verified_merge_fails(base, adapter, tmp_path / "merged")
    assert f"layer {odd}: output error" in message and "PEFT's own LoRA layer" in message


def test_an_unmerge_with_a_wrong_scale_fails_against_peft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The unmerge's own check re-merges with the same update it subtracted, so it passes a wrong
    scale; PEFT's adapter mode on the restored base must reproduce the merged input, and does not."""
    _, adapter, merged = _merged(tmp_path)
    restored = lm.unmerge_checkpoint(merged, adapter, tmp_path / "restored", progress=False)
    assert restored.passed and restored.verification is not None
    assert any("judged against PEFT's own LoRA layers" in n for n in restored.verification.notes)
    right = steps._updates_for

    def five_percent_off(mod: Any, kind: Any) -> LoraUpdate:
        up = right(mod, kind)
        return LoraUpdate(up.kind, up.lora_A, up.lora_B, up.scale * 1.05, up.magnitude, up.bias)

    monkeypatch.setattr(steps, "_updates_for", five_percent_off)
    with pytest.raises(lm.VerificationError, match="PEFT's own LoRA layer"):
        lm.unmerge_checkpoint(merged, adapter, tmp_path / "wrong", progress=False)
    assert not (tmp_path / "wrong").exists()
