"""The wide-dtype reference: module-by-module widening equals whole-model widening, changes nothing."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import CASE_IDS, CASES, make_base
from loramerge.proof.model_runs import make_probes, run_model
from loramerge.proof.output_checks import storage_baseline
from loramerge.proof.widened_runs import run_widened, widened


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_run_widened_equals_whole_model_widening(case, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    model = make_base(case, torch.bfloat16)
    probes = make_probes(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="loramerge"):
        jit = run_widened(model, probes, torch.float32)
    fell_back = [r for r in caplog.records if "widening the whole model" in r.message]
    # ViT casts pixel_values to its projection's dtype before calling it: the whole-model fallback is used
    assert bool(fell_back) == (case.id == "vit-conv2d")
    wide_probes = {k: (v.float() if v.is_floating_point() else v) for k, v in probes.items()}
    with widened(model, torch.float32):
        whole = run_model(model, wide_probes)
    assert jit.dtype == torch.float32
    assert torch.equal(jit, whole)
    assert not torch.equal(jit, run_model(model, probes).float()), "the reference must differ from the bf16 run"
    for name, value in model.state_dict().items():
        assert value.dtype == torch.bfloat16 or not value.is_floating_point() or "inv_freq" in name
        assert torch.equal(value, before[name]), name


def test_storage_baseline_changes_no_weight() -> None:
    model = make_base(CASES[0], torch.bfloat16)
    probes = make_probes(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = [m.weight for n, m in model.named_modules() if n.endswith("q_proj")]
    rms, mx = storage_baseline(model, probes, weights)
    assert 0 < rms < 0.05 and rms <= mx
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
