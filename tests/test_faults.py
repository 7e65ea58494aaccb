"""Verification catches real faults, and merge refuses non-finite results before changing anything."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

import loramerge as lm
import loramerge.engine.inmemory_merge as merge_mod
from conftest import CASES, make_base, save_adapter, tiny_llama
from loramerge.numerics.delta import LoraUpdate

Q = "model.layers.0.self_attn.q_proj"  # 32 x 32: a transposed delta still fits


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[request.param]
    root = tmp_path_factory.mktemp(f"faults-{request.param}")
    torch.manual_seed(0)
    base = tiny_llama().to(dtype).eval()
    adapter_dir = save_adapter(
        base, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]}, root / "a"
    )
    adapter = lm.load_adapter(adapter_dir)
    merged = lm.merge(copy.deepcopy(base), adapter).model
    return {"base": base, "adapter": adapter, "merged": merged, "dtype": dtype, "root": root}


def _tamper(setup: dict[str, object], fn: object) -> torch.nn.Module:
    merged = copy.deepcopy(setup["merged"])
    assert isinstance(merged, torch.nn.Module)
    with torch.no_grad():
        fn(merged)  # type: ignore[operator]
    return merged


def _assert_fails_naming(report: lm.VerificationReport, layer: str) -> None:
    assert not report.passed
    assert any(layer in line for line in report.failures), report.failures
    assert "FAILED" in str(report)


def _delta(setup: dict[str, object], name: str = Q) -> torch.Tensor:
    adapter = setup["adapter"]
    assert isinstance(adapter, lm.Adapter)
    return adapter.modules[name].delta()


def test_correct_merge_passes(setup: dict[str, object]) -> None:
    report = lm.verify(setup["base"], setup["adapter"], setup["merged"])  # type: ignore[arg-type]
    assert report.passed, str(report)


def test_wrong_scale_is_caught(setup: dict[str, object]) -> None:
    base = setup["base"]
    assert isinstance(base, torch.nn.Module)
    w = base.get_parameter(f"{Q}.weight")

    def wrong(m: torch.nn.Module) -> None:
        m.get_parameter(f"{Q}.weight").copy_((w.double() + 1.25 * _delta(setup).double()).to(w.dtype))

    report = lm.verify(base, setup["adapter"], _tamper(setup, wrong))  # type: ignore[arg-type]
    _assert_fails_naming(report, Q)
    bad = [c for c in report.layers if not c.passed]
    assert [c.name for c in bad] == [Q]


def test_transposed_delta_is_caught(setup: dict[str, object]) -> None:
    base = setup["base"]
    assert isinstance(base, torch.nn.Module)
    w = base.get_parameter(f"{Q}.weight")

    def transposed(m: torch.nn.Module) -> None:
        m.get_parameter(f"{Q}.weight").copy_((w.double() + _delta(setup).double().t()).to(w.dtype))

    report = lm.verify(base, setup["adapter"], _tamper(setup, transposed))  # type: ignore[arg-type]
    _assert_fails_naming(report, Q)
    assert report.outputs is not None and not report.outputs.passed


def test_corrupted_merged_tensor_is_caught(setup: dict[str, object]) -> None:
    name = "model.layers.1.self_attn.v_proj"

    def corrupt(m: torch.nn.Module) -> None:
        m.get_parameter(f"{name}.weight")[3, :5] += 0.05

    report = lm.verify(setup["base"], setup["adapter"], _tamper(setup, corrupt))  # type: ignore[arg-type]
    _assert_fails_naming(report, name)


def test_changed_untouched_tensor_is_caught(setup: dict[str, object]) -> None:
    def corrupt(m: torch.nn.Module) -> None:
        m.get_parameter("model.layers.0.mlp.up_proj.weight")[0, 0] += 1.0

    report = lm.verify(setup["base"], setup["adapter"], _tamper(setup, corrupt))  # type: ignore[arg-type]
    assert not report.passed
    assert report.unexpected_changes == ("model.layers.0.mlp.up_proj.weight",)


def test_merge_into_the_wrong_base_is_caught(setup: dict[str, object]) -> None:
    torch.manual_seed(123)
    other = tiny_llama().to(setup["dtype"]).eval()  # type: ignore[arg-type]
    report = lm.verify(other, setup["adapter"], setup["merged"])  # type: ignore[arg-type]
    assert not report.passed
    assert {c.name for c in report.layers if not c.passed} == set(setup["adapter"].modules)  # type: ignore[attr-defined]


def test_stricter_tolerance_is_honoured(setup: dict[str, object]) -> None:
    if setup["dtype"] == torch.float32:
        pytest.skip("fp32 merges are exact enough that the example is bf16-only")
    strict = lm.Tolerance(factor=0.05, floor=0.0)
    report = lm.verify(setup["base"], setup["adapter"], setup["merged"], tolerance=strict)  # type: ignore[arg-type]
    assert not report.passed and report.tolerance is strict


def test_merge_own_verification_catches_a_broken_merge(
    setup: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = merge_mod.merge_tensor_

    def wrong_scale(weight: torch.Tensor, updates: list[LoraUpdate], norms: object = None) -> object:
        return real(weight, [LoraUpdate(u.kind, u.lora_A, u.lora_B, u.scale * 1.3) for u in updates])

    monkeypatch.setattr(merge_mod, "merge_tensor_", wrong_scale)
    with pytest.raises(lm.VerificationError) as info:
        lm.merge(copy.deepcopy(setup["base"]), setup["adapter"])  # type: ignore[arg-type]
    assert Q in str(info.value)
    assert isinstance(info.value.result, lm.MergeResult) and not info.value.report.passed


def test_nan_in_adapter_refused_before_any_change(tmp_path: Path) -> None:
    case = CASES[0]
    base = make_base(case, torch.float32)
    adapter_dir = save_adapter(base, case.lora, tmp_path / "a")
    adapter = lm.load_adapter(adapter_dir)
    bad_name = "model.layers.1.mlp.down_proj"
    adapter.modules[bad_name].update.lora_B[0, 0] = float("nan")
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = lm.attach(model, adapter)
    with pytest.raises(lm.NonFiniteMergeError, match=bad_name) as info:
        lm.merge(peft_model)
    assert "nothing was changed" in str(info.value)
    assert "non-finite" in str(info.value)
    for name, p in peft_model.base_model.model.named_parameters():
        key = name.replace(".base_layer", "")
        if key in before:
            assert torch.equal(p, before[key]), name


def test_fp16_overflow_refused_before_any_change(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tiny_llama().to(torch.float16).eval()
    with torch.no_grad():
        base.get_parameter(f"{Q}.weight")[0, 0] = 65000.0
    adapter = lm.load_adapter(
        save_adapter(base, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, tmp_path / "a")
    )
    module = adapter.modules[Q]
    with torch.no_grad():
        module.update.lora_A.fill_(1.0)
        module.update.lora_B.fill_(500.0)
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lm.NonFiniteMergeError, match="overflows torch.float16") as info:
        lm.merge(model, adapter)
    assert Q in str(info.value) and "float32" in str(info.value)
    inner = model  # attach wrapped it in place; the base weights must be untouched
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = {k.replace(".base_layer", ""): v for k, v in inner.state_dict().items() if "lora_" not in k}
    for name, value in before.items():
        assert torch.equal(state[name], value), name


def test_sampled_output_features_still_judge_correctly(
    setup: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """merge() probes a sample of output features per layer; force a small sample on the tiny model."""
    monkeypatch.setattr(merge_mod, "MAX_PROBE_OUTPUTS", 8)
    good = lm.merge(copy.deepcopy(setup["base"]), setup["adapter"])  # type: ignore[arg-type]
    assert good.passed
    real = merge_mod.merge_tensor_

    def wrong_scale(weight: torch.Tensor, updates: list[LoraUpdate], norms: object = None) -> object:
        return real(weight, [LoraUpdate(u.kind, u.lora_A, u.lora_B, u.scale * 1.3) for u in updates])

    monkeypatch.setattr(merge_mod, "merge_tensor_", wrong_scale)
    with pytest.raises(lm.VerificationError, match=Q):
        lm.merge(copy.deepcopy(setup["base"]), setup["adapter"])  # type: ignore[arg-type]
