"""bitsandbytes' CPU kernel paths, forced one by one, so the suite covers every path on any CPU.

bitsandbytes 0.50 picks its 4-bit CPU path from two switches that it reads in Python: whether the
CPU has AVX512-BF16 (``has_avx512bf16``: eval-mode forwards then repack the weight and compute in
bf16) and whether torch runs AVX-512 kernels (``_has_avx512``: blocks of 2048 or more are then
dequantized by its pure-PyTorch code instead of the native kernel). The native kernel itself also
checks the CPU (its AVX-512 path reads block scales per row; its scalar path over flat blocks),
which only matters when a row is not a whole number of blocks; those tests accept either outcome
and check that it is the right one for the kernel that actually ran.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import loramerge
from conftest import within_ulp
from loramerge.errors import UnsupportedQuantizationError
from loramerge.numerics.quantized import compute_dtype, dequantize, keep_layout

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.backends.default import ops as default_ops  # noqa: E402
from bitsandbytes.backends.utils import _get_4bit_code  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NATIVE_BF16 = bool(bnb.functional.has_avx512bf16())
PATHS = {
    # name: (has_avx512bf16, _has_avx512)
    "avx2": (False, False),
    "avx512": (False, True),
    "avx512bf16": (True, True),
}


@pytest.fixture(params=list(PATHS))
def cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Make bitsandbytes take the path of another CPU (its own switches, patched)."""
    bf16, avx512 = PATHS[request.param]
    if bf16 and not NATIVE_BF16:
        pytest.skip("the AVX512-BF16 kernel is registered only on CPUs that have it (layout tested by the data test)")
    monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: bf16)
    monkeypatch.setattr("bitsandbytes.backends.cpu.ops._has_avx512", avx512)
    yield request.param


def quant_layer(
    out_f: int,
    in_f: int,
    *,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double: bool = True,
    compute: torch.dtype | None = torch.bfloat16,
    dtype: torch.dtype = torch.bfloat16,
    bias: bool = False,
) -> nn.Module:
    gen = torch.Generator().manual_seed(out_f * 1000 + in_f)
    layer = bnb.nn.Linear4bit(
        in_f, out_f, bias=bias, compute_dtype=compute, compress_statistics=double, quant_type=quant_type
    )
    w = (torch.randn(out_f, in_f, generator=gen) * 0.05).to(dtype)
    layer.weight = bnb.nn.Params4bit(
        w, requires_grad=False, quant_type=quant_type, blocksize=blocksize, compress_statistics=double
    )
    if bias:
        layer.bias = nn.Parameter((torch.randn(out_f, generator=gen) * 0.1).to(dtype), requires_grad=False)
    return layer.to("cpu")


class Net(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def layer_weight(layer: nn.Module) -> torch.Tensor:
    """The weight the layer computes with, from its own eval-mode forward on the identity (in its
    compute dtype, which holds the dequantized values exactly), bias removed."""
    dtype = layer.compute_dtype or torch.bfloat16
    eye = torch.eye(int(layer.in_features), dtype=dtype)
    was, bias = layer.training, layer.bias
    layer.eval()
    layer.bias = None
    try:
        with torch.no_grad(), keep_layout(layer):
            out = layer(eye).float()
    finally:
        layer.train(was)
        layer.bias = bias
    return out.T


def flat_reference(layer: nn.Module) -> torch.Tensor:
    """bitsandbytes' own pure-PyTorch dequantization (flat blocks), in the layer's compute dtype."""
    state = layer.weight.quant_state
    absmax = (
        bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    )
    code = _get_4bit_code(state.quant_type, torch.device("cpu"))
    raw = layer.weight.data.view(torch.uint8).reshape(-1)
    return default_ops._dequantize_4bit_compute(
        raw, absmax.float(), code, state.blocksize, state.shape, compute_dtype(layer)
    ).float()


def qlora_net(layer: nn.Module) -> Any:
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(
            Net(layer), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False)
        )


FORMATS = {
    "nf4-dq-bf16": dict(quant_type="nf4", double=True, compute=torch.bfloat16),
    "nf4-fp32": dict(quant_type="nf4", double=False, compute=torch.float32),
    "fp4-dq-fp16": dict(quant_type="fp4", double=True, compute=torch.float16),
    "nf4-bias-bf16": dict(quant_type="nf4", double=True, compute=torch.bfloat16, bias=True),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_merge_is_exact_on_every_cpu_path(cpu_path: str, fmt: str) -> None:
    layer = quant_layer(64, 128, **FORMATS[fmt])
    pm = qlora_net(layer)
    pm.eval()
    with torch.no_grad():  # an inference forward first: on AVX512-BF16 CPUs this repacks the weight
        pm(torch.randn(3, 128, dtype=torch.bfloat16))
    packed = bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
    assert packed == (cpu_path == "avx512bf16")
    base = layer_weight(layer)
    lora = pm.base_model.model.proj
    b_f, a_f = lora.lora_B["default"].weight.detach().float(), lora.lora_A["default"].weight.detach().float()
    delta, magnitudes = lora.scaling["default"] * (b_f @ a_f), b_f.abs() @ a_f.abs()
    bias = None if layer.bias is None else layer.bias.detach().float().clone()

    result = loramerge.merge(pm)

    assert result.passed
    merged = result.model.proj
    assert isinstance(merged, nn.Linear)
    # fp32 target: the merged weight is the layer's weight plus ΔW, to fp32 rounding of that sum only
    assert merged.weight.dtype == torch.bfloat16
    # one rounding of the exact sum, up to the fp32 arithmetic of ΔW
    exact = base.double() + delta.double()
    fp32_error = 4 * 2.0**-24 * (base.double().abs() + (lora.scaling["default"] * magnitudes).double())
    assert within_ulp(merged.weight, exact, 0.5, torch.bfloat16, slack=fp32_error)
    if bias is not None:
        assert torch.equal(merged.bias.detach(), bias.to(torch.bfloat16))


@pytest.mark.parametrize(("in_f", "blocksize"), [(128, 64), (96, 64), (96, 2048), (4096, 2048)])
def test_rows_that_are_not_whole_blocks(cpu_path: str, in_f: int, blocksize: int) -> None:
    """Where bitsandbytes' native AVX-512 kernel reads a misaligned layer differently from every
    other backend, loramerge refuses and says why; everywhere else it merges what the layer computes."""
    layer = quant_layer(32, in_f, blocksize=blocksize, double=False)
    computes = layer_weight(layer)
    portable = torch.equal(computes, flat_reference(layer))
    pm = qlora_net(layer)
    if portable:
        result = loramerge.merge(pm, dtype=torch.float32)
        assert result.passed
        assert torch.equal(dequantize(layer), computes)
    else:
        assert in_f % blocksize != 0, "only a row that is not a whole number of blocks may read differently"
        with pytest.raises(UnsupportedQuantizationError, match="AVX-512") as e:
            loramerge.merge(pm, dtype=torch.float32)
        assert f"in_features ({in_f})" in str(e.value) and "qlora_base='simulated'" in str(e.value)
        assert isinstance(pm.base_model.model.proj.base_layer, bnb.nn.Linear4bit), "nothing may change"


def test_fp32_compute_is_not_rounded_to_the_storage_dtype(cpu_path: str) -> None:
    """A bf16 model with fp32 compute dequantizes in fp32: the values are not bf16 numbers."""
    layer = quant_layer(64, 128, quant_type="nf4", double=False, compute=torch.float32)
    if cpu_path == "avx512bf16":
        pytest.skip("the AVX512-BF16 layout is only used after an eval forward; here the standard one is tested")
    weight = dequantize(layer)
    assert compute_dtype(layer) == torch.float32
    assert torch.equal(weight, layer_weight(layer))
    assert not torch.equal(weight, weight.to(torch.bfloat16).float()), "some values need fp32"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
def test_avx512bf16_layout_is_read_on_any_cpu(quant_type: str, double: bool) -> None:
    """The repacked layout (bitsandbytes' own conversion, pure PyTorch) is decoded to
    ``bf16(bf16(code) * bf16(scale))`` per element, on any CPU."""
    layer = quant_layer(64, 128, quant_type=quant_type, double=double)
    state = layer.weight.quant_state
    codes = torch.stack(
        [layer.weight.data.view(torch.uint8).reshape(-1) >> 4, layer.weight.data.view(torch.uint8).reshape(-1) & 0xF],
        -1,
    )
    codes = codes.reshape(64, 128).long()
    scales = (
        (bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset) if double else state.absmax
    )
    per_element = scales.float().to(torch.bfloat16).float().reshape(64, 2).repeat_interleave(64, dim=1)
    table = _get_4bit_code(quant_type, torch.device("cpu")).to(torch.bfloat16).float()
    want = (table[codes] * per_element).to(torch.bfloat16).float()
    data, new_state = bnb.functional._convert_weight_packed_for_cpu(layer.weight.data, state)
    layer.weight.data, layer.weight.quant_state = data, new_state
    assert new_state.packing_format_for_cpu
    assert compute_dtype(layer) == torch.bfloat16
    assert torch.equal(dequantize(layer), want)


def test_a_wrong_dequantization_is_refused_on_every_path(cpu_path: str) -> None:
    from loramerge.numerics.quantized import checked_dequantize

    layer = quant_layer(64, 128)
    pm = qlora_net(layer)
    pm.eval()
    with torch.no_grad():
        pm(torch.randn(2, 128, dtype=torch.bfloat16))
    right = dequantize(layer)
    wrong = right.clone()
    wrong[3, 5] = wrong[3, 5] * 1.01 + 1e-3
    with pytest.raises(UnsupportedQuantizationError, match="differs from what the Linear4bit layer computes"):
        checked_dequantize(layer, "proj", columns=128, weight=wrong)
    assert torch.equal(checked_dequantize(layer, "proj", columns=128), right)


def test_the_check_leaves_the_layer_as_it_was(cpu_path: str) -> None:
    """bitsandbytes fixes a layer's compute dtype on its first forward and converts its bias in place;
    loramerge's check must not do either to the caller's layer."""
    from loramerge.numerics.quantized import checked_dequantize

    layer = quant_layer(64, 128, compute=None, bias=True, dtype=torch.float16)
    layer.bias.data = layer.bias.data.to(torch.float32)
    before = (layer.compute_dtype, layer.compute_type_is_set, layer.bias.dtype, layer.training)
    checked_dequantize(layer, "proj")
    assert (layer.compute_dtype, layer.compute_type_is_set, layer.bias.dtype, layer.training) == before
