"""PEFT's trainable tokens (``trainable_token_indices``): the embedding rows of chosen token ids
replaced by trained rows, which a tied output head scores with too. Merged in memory and on files
as PEFT's own merge writes them, and judged on files by PEFT's own wrapper."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import loramerge as lm
from conftest import tiny_llama

TOKENS = [3, 5, 7, 90]


def _adapter(base: nn.Module, out: Path) -> Path:
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False, trainable_token_indices=TOKENS
        )
        pm = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():  # trained rows: far from the base's
            for name, p in pm.named_parameters():
                if "trainable_tokens_delta" in name:
                    p.add_(torch.randn(p.shape).to(p.dtype))
        pm.save_pretrained(out)
    return out


def _adapter_mode(base: nn.Module, adapter: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()


def _ids() -> torch.Tensor:
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[0, : len(TOKENS)] = torch.tensor(TOKENS)  # the trained tokens are looked up (and scored)
    return ids


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_trainable_tokens_merge_as_peft_merges_them(tmp_path: Path, tie: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    base = tiny_llama(tie=tie).to(dtype).eval()
    adapter_dir = _adapter(base, tmp_path / "adapter")
    adapter = lm.load_adapter(adapter_dir)
    assert adapter.token_rows["model.embed_tokens.weight"][0].tolist() == TOKENS
    result = lm.merge(copy.deepcopy(base), adapter)
    assert result.passed, str(result.report)
    assert "model.embed_tokens (trainable tokens)" in {c.name for c in result.report.layers}
    merged = result.model
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tie
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = _adapter_mode(base, adapter_dir).merge_and_unload()
    assert torch.equal(merged.model.embed_tokens.weight, peft_merged.model.embed_tokens.weight)
    assert not torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    with torch.no_grad():
        got = merged(input_ids=_ids()).logits.double()
        want = _adapter_mode(base, adapter_dir)(input_ids=_ids()).logits.double()
    assert float((got - want).norm() / want.norm()) < (1e-5 if dtype == torch.float32 else 2e-2)
    assert lm.verify(base, adapter, merged).passed


def test_a_peft_model_with_trainable_tokens_merges(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tiny_llama().eval()
    adapter_dir = _adapter(base, tmp_path / "adapter")
    result = lm.merge(_adapter_mode(base, adapter_dir))
    assert result.passed and not isinstance(result.model, PeftModel)
    assert not any("token_adapter" in n for n, _ in result.model.named_modules())


def test_a_wrong_token_row_fails_verification(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tiny_llama().eval()
    adapter = lm.load_adapter(_adapter(base, tmp_path / "adapter"))
    merged = lm.merge(copy.deepcopy(base), adapter).model
    with torch.no_grad():
        merged.model.embed_tokens.weight[5, 0] += 0.5
    report = lm.verify(base, adapter, merged)
    assert not report.passed and "model.embed_tokens.weight" in report.unexpected_changes


def test_unmerging_trainable_tokens_needs_the_original_rows(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tiny_llama().eval()
    adapter = lm.load_adapter(_adapter(base, tmp_path / "adapter"))
    merged = lm.merge(copy.deepcopy(base), adapter).model
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    with pytest.raises(lm.UnmergeImpossibleError, match=r"model\.embed_tokens\.weight.*trainable-token"):
        lm.unmerge(merged, adapter)
    assert all(torch.equal(before[k], v) for k, v in merged.state_dict().items())
    original = {"model.embed_tokens.weight": base.model.embed_tokens.weight.detach().clone()}
    back = lm.unmerge(merged, adapter, originals=original)
    assert back.passed
    assert torch.equal(back.model.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_in_memory_receipts_refuse_trainable_tokens(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tiny_llama().eval()
    adapter_dir = _adapter(base, tmp_path / "adapter")
    with pytest.raises(lm.InvalidArgumentError, match="trainable tokens"):
        lm.merge(copy.deepcopy(base), lm.load_adapter(adapter_dir), receipt=True)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_trainable_tokens_merge_on_files_as_in_memory(tmp_path: Path, tie: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    base = tiny_llama(tie=tie).to(dtype).eval()
    base.save_pretrained(tmp_path / "base")
    adapter_dir = _adapter(base, tmp_path / "adapter")
    report = lm.merge_checkpoint(tmp_path / "base", adapter_dir, tmp_path / "merged", progress=False, receipt=True)
    assert report.passed and report.verification is not None
    assert any("judged against PEFT's own LoRA layers" in n for n in report.verification.notes)
    assert "model.embed_tokens.weight" in report.changed
    in_memory = lm.merge(copy.deepcopy(base), lm.load_adapter(adapter_dir)).model.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_files = lm.load_base(tmp_path / "merged").state_dict()
    for name, tensor in from_files.items():
        assert torch.equal(tensor, in_memory[name]), name
    assert lm.verify_checkpoint(tmp_path / "base", adapter_dir, tmp_path / "merged").passed
    # undone byte for byte with the receipt; without it, the original rows are needed
    back = lm.unmerge_checkpoint(tmp_path / "merged", adapter_dir, tmp_path / "back", progress=False)
    assert back.passed
    from safetensors.torch import load_file

    original, restored = (
        load_file(tmp_path / "base" / "model.safetensors"),
        load_file(tmp_path / "back" / "model.safetensors"),
    )
    assert torch.equal(restored["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    with pytest.raises(lm.UnmergeImpossibleError, match="embed_tokens"):
        lm.unmerge_checkpoint(tmp_path / "merged", adapter_dir, tmp_path / "x", progress=False, receipt=False)
    plain = lm.unmerge_checkpoint(
        tmp_path / "merged",
        adapter_dir,
        tmp_path / "plain",
        progress=False,
        receipt=False,
        originals={"model.embed_tokens.weight": original["model.embed_tokens.weight"]},
    )
    assert plain.passed
    rows = load_file(tmp_path / "plain" / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(rows, original["model.embed_tokens.weight"])


def test_a_wrong_token_row_on_files_fails_against_peft(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    base = tiny_llama().eval()
    base.save_pretrained(tmp_path / "base")
    adapter_dir = _adapter(base, tmp_path / "adapter")
    assert lm.merge_checkpoint(tmp_path / "base", adapter_dir, tmp_path / "merged", progress=False).passed
    path = tmp_path / "merged" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.embed_tokens.weight"][7, 3] += 0.25
    save_file(tensors, path, metadata={"format": "pt"})
    report = lm.verify_checkpoint(tmp_path / "base", adapter_dir, tmp_path / "merged")
    assert not report.passed and "model.embed_tokens.weight" in report.unexpected_changes
    assert any("not PEFT's trainable-tokens rows" in n for n in report.notes)


def test_wrong_rows_written_in_memory_fail_against_peft_s_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-memory check compares the embedding with what PEFT's trainable-tokens layer computes,
    not with the rows loramerge wrote."""
    import loramerge.plan.peft_plans as glue

    real = glue.TokenPlan.rows
    monkeypatch.setattr(glue.TokenPlan, "rows", lambda self: (real(self)[0], real(self)[1] * 1.5))
    torch.manual_seed(0)
    base = tiny_llama().eval()
    adapter = lm.load_adapter(_adapter(base, tmp_path / "adapter"))
    with pytest.raises(lm.VerificationError) as info:
        lm.merge(copy.deepcopy(base), adapter, check_outputs=False)
    failed = [c for c in info.value.report.layers if not c.passed]
    assert [c.name for c in failed] == ["model.embed_tokens (trainable tokens)"]
    assert "PEFT's trainable-tokens layer" in failed[0].reason
