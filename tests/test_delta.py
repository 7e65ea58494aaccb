"""Property-based tests of the pure delta math against independent formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from loramerge.numerics import delta as delta_mod
from loramerge.numerics.delta import LoraUpdate, dora_norms, merge_tensor_, unmerge_tensor_
from loramerge.numerics.layer_outputs import apply_weight
from loramerge.numerics.tolerance import reference_dtype, ulp, unit_roundoff
from loramerge.numerics.update_checks import check_updates

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
dims = st.integers(min_value=1, max_value=24)
ranks = st.integers(min_value=1, max_value=6)
seeds = st.integers(min_value=0, max_value=2**16)
dtypes = st.sampled_from(list(DT))
scales = st.floats(min_value=-4, max_value=4, allow_nan=False).filter(lambda x: abs(x) > 1e-3)


def _rand(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


@settings(max_examples=60, deadline=None)
@given(out=dims, inp=dims, r=ranks, scale=scales, seed=seeds)
def test_linear_and_transposed_kinds(out: int, inp: int, r: int, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a, b = _rand(gen, r, inp), _rand(gen, out, r)
    expected = scale * (b @ a)
    assert torch.allclose(LoraUpdate("linear", a, b, scale).delta((out, inp), torch.float64), expected)
    # GPT-2 Conv1D stores [in, out]; PEFT transposes the delta (fan_in_fan_out)
    assert torch.allclose(LoraUpdate("conv1d", a, b, scale).delta((inp, out), torch.float64), expected.t())
    # Embedding: lora_embedding_A [r, num], lora_embedding_B [dim, r]; ΔW = (B @ A)^T
    assert torch.allclose(LoraUpdate("embedding", a, b, scale).delta((inp, out), torch.float64), expected.t())


@settings(max_examples=30, deadline=None)
@given(out=dims, inp=st.integers(1, 6), r=ranks, k=st.integers(1, 3), scale=scales, seed=seeds)
def test_conv_delta_matches_peft_conv_formula(out: int, inp: int, r: int, k: int, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a, b = _rand(gen, r, inp, k, k), _rand(gen, out, r, 1, 1)
    # PEFT's formula: conv2d(A^T, B), transposed, scaled
    expected = F.conv2d(a.transpose(0, 1), b).transpose(0, 1) * scale
    got = LoraUpdate("conv", a, b, scale).delta((out, inp, k, k), torch.float64)
    assert torch.allclose(got, expected)


@settings(max_examples=60, deadline=None)
@given(out=dims, inp=dims, r=ranks, scale=scales, seed=seeds, dt=dtypes, w_scale=st.sampled_from([0.02, 1.0, 30.0]))
def test_merge_is_correctly_rounded_and_unmerge_within_bound(
    out: int, inp: int, r: int, scale: float, seed: int, dt: str, w_scale: float
) -> None:
    dtype = DT[dt]
    gen = torch.Generator().manual_seed(seed)
    base = _rand(gen, out, inp, scale=w_scale).to(dtype)
    up = LoraUpdate("linear", _rand(gen, r, inp).float(), _rand(gen, out, r).float(), scale)
    exact = base.double() + up.delta((out, inp), torch.float64)
    w = base.clone()
    assert check_updates([up], w) == []
    stats = merge_tensor_(w, [up])
    arithmetic = (
        (r + 2) * unit_roundoff(torch.float32) * abs(scale) * (up.lora_B.double().abs() @ up.lora_A.double().abs())
    )
    if dtype == torch.float32:
        arithmetic = arithmetic * 0  # fp32 weights merge in fp64: exact up to fp64 error
    gap = (w.double() - exact).abs()
    assert bool((gap <= 0.5 * ulp(exact, dtype).double() + arithmetic + 1e-300).all())
    assert stats.delta_norm == pytest.approx(float(up.delta((out, inp), torch.float64).norm()), rel=1e-5)
    merged = w.clone()
    back = unmerge_tensor_(w, [up])
    bound = 0.5 * ulp(merged.double(), dtype).double() + 0.5 * ulp(w.double(), dtype).double() + 2 * arithmetic
    assert bool(((w.double() - base.double()).abs() <= bound + 1e-300).all())
    assert back.error_bound >= 0 and back.remerge_gap <= 1.0 + 1e-6


@settings(max_examples=40, deadline=None)
@given(out=dims, inp=dims, r=ranks, scale=scales, seed=seeds, dt=dtypes, kind=st.sampled_from(["linear", "conv1d"]))
@example(out=8, inp=1, r=3, scale=0.890625, seed=412, dt="bf16", kind="linear")  # a row norm from cancellation
def test_dora_merge_and_unmerge_with_norms(
    out: int, inp: int, r: int, scale: float, seed: int, dt: str, kind: str
) -> None:
    dtype = DT[dt]
    gen = torch.Generator().manual_seed(seed)
    a, b = _rand(gen, r, inp).float(), _rand(gen, out, r).float()
    mag = (_rand(gen, out).abs() + 0.5).float()
    shape = (out, inp) if kind == "linear" else (inp, out)
    base = _rand(gen, *shape).to(dtype)
    up = LoraUpdate(kind, a, b, scale, magnitude=mag)  # type: ignore[arg-type]
    # independent formula in the [out, in] orientation: W' = m * (W + ΔW) / ‖W + ΔW‖ (row norms)
    w_oi = base.double() if kind == "linear" else base.double().t()
    v = w_oi + scale * (b.double() @ a.double())
    expected_oi = mag.double().unsqueeze(1) * v / v.norm(dim=1, keepdim=True)
    expected = expected_oi if kind == "linear" else expected_oi.t()
    norms = dora_norms(up, base)
    # computed in fp32: each element of W + ΔW carries fp32 error relative to |W| + |s|·|B||A|, which
    # matters when the two cancel and the row norm is small
    magnitude_rows = (w_oi.abs() + abs(scale) * (b.double().abs() @ a.double().abs())).norm(dim=1)
    fp32_slack = 4 * (r + 2) * unit_roundoff(torch.float32) * magnitude_rows
    assert bool(((norms.double() - v.norm(dim=1)).abs() <= 1e-5 * v.norm(dim=1) + fp32_slack).all())
    w = base.clone()
    stats = merge_tensor_(w, [up])
    tol = ulp(expected, dtype).double() * 0.5 + 1e-5 * expected.abs().max()
    assert bool(((w.double() - expected).abs() <= tol).all())
    with pytest.raises(ValueError, match="norms"):
        unmerge_tensor_(w.clone(), [up])
    merged = w.clone()
    back = unmerge_tensor_(w, [up], stats.extras["dora_norms"])
    # |W_u - W| <= ½ulp(W_merged) * ‖W + ΔW‖ / |m| + ½ulp(W_u), plus fp32 arithmetic
    factor_oi = (mag.double() / v.norm(dim=1)).unsqueeze(1)
    factor = factor_oi if kind == "linear" else factor_oi.t()
    bound = 0.5 * ulp(merged.double(), dtype).double() / factor.abs() + 0.5 * ulp(w.double(), dtype).double()
    arithmetic = 1e-5 * (v.abs().max() + 1)
    assert bool(((w.double() - base.double()).abs() <= bound + arithmetic).all())
    assert back.error_bound >= float(bound.max()) * (1 - 1e-3)


def test_chunked_merge_equals_single_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(37, 29, generator=gen).to(torch.bfloat16)
    up = LoraUpdate("conv1d", torch.randn(3, 37, generator=gen), torch.randn(29, 3, generator=gen), 0.7)
    whole = base.clone()
    merge_tensor_(whole, [up])
    monkeypatch.setattr(delta_mod, "CHUNK_ELEMENTS", 50)  # forces 2-row chunks
    chunked = base.clone()
    merge_tensor_(chunked, [up])
    assert torch.equal(whole, chunked)


def test_several_updates_are_summed_before_rounding() -> None:
    base = torch.tensor([[1.0]], dtype=torch.bfloat16)
    # +0.003 then -0.003: rounded separately, each step would round to 1.0 and lose nothing... or not;
    # summed first, the result is exactly 1.0.
    ups = [
        LoraUpdate("linear", torch.ones(1, 1), torch.full((1, 1), 0.003), 1.0),
        LoraUpdate("linear", torch.ones(1, 1), torch.full((1, 1), 0.0045), -1.0),
    ]
    w = base.clone()
    merge_tensor_(w, ups)
    exact = 1.0 + 0.003 - 0.0045
    assert float(w) == float(torch.tensor(exact).to(torch.bfloat16))


def test_check_updates_finds_overflow_and_non_finite() -> None:
    w = torch.full((2, 2), 60000.0, dtype=torch.float16)
    big = LoraUpdate("linear", torch.ones(1, 2), torch.full((2, 1), 8000.0), 1.0)
    problems = check_updates([big], w)
    assert len(problems) == 1 and "overflows torch.float16" in problems[0]
    small = LoraUpdate("linear", torch.ones(1, 2), torch.full((2, 1), 1.0), 1.0)
    assert check_updates([small], w) == []  # the cheap bound cannot exclude overflow; the exact pass can
    nan = LoraUpdate("linear", torch.tensor([[math.nan, 1.0]]), torch.ones(2, 1), 1.0)
    assert any("non-finite values in the adapter's lora_A" in p for p in check_updates([nan], w))
    inf_base = torch.tensor([[math.inf, 0.0]], dtype=torch.bfloat16)
    assert check_updates([small.__class__("linear", torch.ones(1, 2), torch.ones(1, 1), 1.0)], inf_base) == [
        "the base weight itself contains non-finite values"
    ]


@pytest.mark.parametrize("dt", list(DT))
def test_ulp_matches_nextafter(dt: str) -> None:
    dtype = DT[dt]
    x = torch.tensor([1.0, 3.0, -2.5, 0.1, 1e-3, 100.0]).to(dtype)
    up = torch.nextafter(x, torch.tensor(math.inf, dtype=dtype))
    assert torch.equal(ulp(x.float(), dtype), (up.float() - x.float()))


def test_apply_weight_matches_modules() -> None:
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(7, 5)
    x = torch.randn(3, 7, generator=gen)
    assert torch.allclose(apply_weight("linear", lin.weight, x) + lin.bias, lin(x))
    assert torch.allclose(
        apply_weight("linear", lin.weight, x, torch.float64, None).float(), lin(x) - lin.bias, atol=1e-6
    )
    emb = torch.nn.Embedding(11, 4)
    ids = torch.tensor([0, 3, 10])
    assert torch.equal(apply_weight("embedding", emb.weight, ids), emb(ids))
    conv = torch.nn.Conv2d(3, 6, 2, bias=False)
    patches = torch.randn(4, 3, 2, 2, generator=gen)
    assert torch.allclose(
        apply_weight("conv", conv.weight, patches.reshape(4, -1)), conv(patches).reshape(4, 6), atol=1e-6
    )
    assert reference_dtype(torch.bfloat16) == torch.float32


@pytest.mark.parametrize("dt", list(DT))
def test_a_merge_without_the_residual_is_the_same_merge(dt: str) -> None:
    """``residual=False`` (a checkpoint merge without verification) skips measuring the rounding
    residual, not any of the merge: the weight is bit-identical."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(67, 45, generator=gen).to(DT[dt])
    ups = [
        LoraUpdate("linear", torch.randn(4, 45, generator=gen), torch.randn(67, 4, generator=gen), 0.5),
        LoraUpdate("linear", torch.randn(2, 45, generator=gen), torch.randn(67, 2, generator=gen), -1.5),
    ]
    measured, unmeasured = base.clone(), base.clone()
    full = merge_tensor_(measured, ups)
    quick = merge_tensor_(unmeasured, ups, residual=False)
    assert full.residual_norm > 0 and quick.residual_norm == 0.0
    assert quick.delta_norm == full.delta_norm
    assert torch.equal(measured, unmeasured) and not torch.equal(measured, base)


def test_a_merge_without_the_residual_still_sees_overflow_and_nan() -> None:
    """Negative controls: a result that overflows the weight's dtype, or is NaN, makes the
    residual infinite (what the checkpoint merge turns into NonFiniteMergeError)."""
    w = torch.full((2, 2), 60000.0, dtype=torch.float16)
    big = LoraUpdate("linear", torch.ones(1, 2), torch.full((2, 1), 8000.0), 1.0)
    assert merge_tensor_(w.clone(), [big], residual=False).residual_norm == math.inf
    nan = LoraUpdate("linear", torch.tensor([[math.nan, 1.0]]), torch.ones(2, 1), 1.0)
    assert merge_tensor_(w.clone(), [nan], residual=False).residual_norm == math.inf
    fits = LoraUpdate("linear", torch.ones(1, 2), torch.full((2, 1), 1.0), 1.0)
    assert merge_tensor_(w.clone(), [fits], residual=False).residual_norm == 0.0


@pytest.mark.parametrize("dt", list(DT))
@pytest.mark.parametrize("use_dora", [False, True])
def test_an_unmeasured_unmerge_is_the_same_unmerge(dt: str, use_dora: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``measure=False`` (a checkpoint unmerge without verification, a receipt's recovery) skips the
    error bound and the re-merge check, not any of the arithmetic: the weight is bit-identical, also
    across chunk boundaries. A receipt made with one and applied after the other depends on that."""
    gen = torch.Generator().manual_seed(2)
    base = (torch.randn(61, 37, generator=gen) * 0.05).to(DT[dt])
    mag = torch.rand(61, generator=gen) + 0.5 if use_dora else None
    up = LoraUpdate("linear", torch.randn(4, 37, generator=gen), torch.randn(61, 4, generator=gen), 0.7, magnitude=mag)
    norms = dora_norms(up, base) if use_dora else None
    merge_tensor_(base, [up], norms)
    for chunk in (delta_mod.CHUNK_ELEMENTS, 50):
        monkeypatch.setattr(delta_mod, "CHUNK_ELEMENTS", chunk)
        measured, unmeasured = base.clone(), base.clone()
        full = unmerge_tensor_(measured, [up], norms)
        quick = unmerge_tensor_(unmeasured, [up], norms, measure=False)
        assert torch.equal(measured, unmeasured) and not torch.equal(measured, base)
        assert full.error_bound > 0 and math.isfinite(full.remerge_gap)
        assert math.isnan(quick.error_bound) and math.isnan(quick.remerge_gap)


@pytest.mark.parametrize("dt", list(DT))
def test_unmerge_checks_match_their_element_by_element_definitions(dt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The unmerge's bound and re-merge gap are computed per chunk from extremes and bit patterns
    (numerics.unmerge_checks); here they are recomputed element by element from their definitions.
    The "merged" weight is random, not a merge of this delta, and the delta as large as the weights:
    recovered values then land in other binades, and some re-merges miss, so the gap is not 0."""
    dtype = DT[dt]
    gen = torch.Generator().manual_seed(5)
    base = (torch.randn(53, 41, generator=gen) * 0.05).to(dtype)
    up = LoraUpdate("linear", torch.randn(3, 41, generator=gen) * 0.2, torch.randn(53, 3, generator=gen) * 0.2, 1.0)
    merged = base.clone()
    monkeypatch.setattr(delta_mod, "CHUNK_ELEMENTS", 400)  # several chunks
    stats = unmerge_tensor_(base, [up])
    recovered = base
    cdt = torch.float64 if dtype == torch.float32 else torch.float32
    spacing = ulp(recovered, dtype).to(torch.float64) + ulp(merged, dtype).to(torch.float64)
    assert stats.error_bound >= 0.5 * float(spacing.max())  # no element's own bound is larger
    assert stats.error_bound <= float(spacing.max())  # and it is not looser than twice the largest
    delta = (up.lora_B.to(cdt) @ up.lora_A.to(cdt)) * up.scale
    remerged = (recovered.to(cdt) + delta).to(dtype)
    gaps = (remerged.to(torch.float64) - merged.to(torch.float64)).abs() / spacing
    if dtype != torch.float32:  # (fp32 weights are unmerged in fp64: their re-merges land)
        assert float(gaps.max()) > 0  # the case exercises the measured path
    assert stats.remerge_gap == pytest.approx(float(gaps.max()), rel=1e-6)


def test_a_remerge_that_misses_fails_the_check() -> None:
    """Negative control: a merged fp16 weight near the top of its range, with a delta that takes the
    unmerged value past it, cannot be re-merged (the recovered value is infinite)."""
    merged = torch.full((4, 4), 60000.0, dtype=torch.float16)
    up = LoraUpdate("linear", torch.ones(1, 4), -torch.full((4, 1), 10000.0), 1.0)  # W − ΔW = 70000 > 65504
    stats = unmerge_tensor_(merged, [up])
    assert stats.remerge_gap > 1.0


def test_ulp_of_bf16_values_is_the_same_from_their_own_bits() -> None:
    """``ulp`` of a bf16 tensor is computed from its 2-byte bits (a faster path); it must equal the
    fp32 path for every one of the 65,536 bf16 bit patterns."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    assert torch.equal(ulp(every, torch.bfloat16), ulp(every.to(torch.float32), torch.bfloat16))
