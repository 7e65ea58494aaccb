"""A convolution padded otherwise than with zeros (reflect, replicate, circular): PEFT's adapter mode
pads its LoRA branch with zeros, so no merged weight computes what adapter mode computes at the
borders. Both engines refuse it before anything changes, naming the layer and the reason (before,
the whole-model check failed after the model had been changed in place, or a checkpoint's per-layer
check failed with a bare error). Controls: the same layer padded with zeros, or not padded at all,
merges and passes."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import UnivNetConfig, UnivNetModel

import loramerge as lm
from conftest import save_adapter

X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))


class Tiny(nn.Module):
    def __init__(self, padding: int, padding_mode: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=padding, padding_mode=padding_mode)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


def _peft(padding: int, mode: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = Tiny(padding, mode).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["conv"], init_lora_weights=False)
        return base, get_peft_model(copy.deepcopy(base), config).eval()


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_a_padded_convolution_is_refused_in_memory(mode: str, tmp_path: Path) -> None:
    base, peft_model = _peft(1, mode)
    before = {n: p.clone() for n, p in peft_model.named_parameters()}
    with pytest.raises(lm.UnsupportedAdapterError, match=rf"conv: a convolution padded with '{mode}'.*LoRA branch"):
        lm.merge(peft_model, probes={"x": X})
    assert all(torch.equal(p, before[n]) for n, p in peft_model.named_parameters())  # nothing changed
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(lm.UnsupportedAdapterError, match=rf"conv: a convolution padded with '{mode}'"):
        lm.merge(copy.deepcopy(base), lm.load_adapter(tmp_path / "adapter"), probes={"x": X})


@pytest.mark.parametrize(("padding", "mode"), [(1, "zeros"), (0, "reflect")])
def test_zero_padding_or_none_merges(padding: int, mode: str) -> None:
    _, peft_model = _peft(padding, mode)
    with torch.no_grad():
        want = peft_model(X)
    result = lm.merge(peft_model, probes={"x": X})
    assert result.passed
    with torch.no_grad():
        assert float((result.model(X) - want).norm() / want.norm()) < 1e-5


def test_a_padded_convolution_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    """UnivNet pads ``conv_pre`` and ``conv_post`` with 'reflect'; its other convolutions with zeros."""
    torch.manual_seed(0)
    config = UnivNetConfig(
        model_in_channels=8,
        model_hidden_channels=8,
        num_mel_bins=8,
        resblock_kernel_sizes=[3],
        resblock_stride_sizes=[2],
        resblock_dilation_sizes=[[1, 3]],
        kernel_predictor_num_blocks=1,
        kernel_predictor_hidden_channels=8,
    )
    base = UnivNetModel(config).eval()
    base.save_pretrained(tmp_path / "base")
    padded = save_adapter(base, {"r": 2, "lora_alpha": 4, "target_modules": ["conv_post"]}, tmp_path / "padded")
    for verify in (True, False):
        with pytest.raises(lm.UnsupportedAdapterError, match=r"conv_post: a convolution padded with other than zeros"):
            lm.merge_checkpoint(tmp_path / "base", padded, tmp_path / "merged", progress=False, verify=verify)
        assert not (tmp_path / "merged").exists()
    plain = save_adapter(base, {"r": 2, "lora_alpha": 4, "target_modules": ["input_conv"]}, tmp_path / "plain")
    assert lm.merge_checkpoint(tmp_path / "base", plain, tmp_path / "merged", progress=False).passed
