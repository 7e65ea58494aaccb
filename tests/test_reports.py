"""Reports are frozen, JSON-safe and readable; the tolerance validates its settings."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from loramerge import LayerCheck, OutputCheck, Tolerance, VerificationReport


def _layer(name: str, error: float, limit: float) -> LayerCheck:
    return LayerCheck(
        name,
        "linear",
        "bfloat16",
        1e-3,
        0.5,
        error,
        2e-3,
        1e-3,
        limit,
        error <= limit,
        "" if error <= limit else "too far",
    )


def test_report_roundtrip_and_text() -> None:
    out = OutputCheck("bfloat16", "float32", (4, 32), 0.01, 0.009, 0.004, 0.03, 0.05, 0.04, 0.01, 0.02, 3.0, True)
    report = VerificationReport("merge", False, Tolerance(), (_layer("a", 1e-3, 2e-3), _layer("b", 5e-3, 2e-3)), out)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False and data["layers"][1]["name"] == "b"
    assert report.failures == ("layer b: too far",)
    assert report.worst(1)[0].name == "b"
    text = str(report)
    assert "FAILED" in text and "FAIL: layer b: too far" in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.passed = True  # type: ignore[misc]


def test_non_finite_numbers_serialise_as_null() -> None:
    layer = LayerCheck("a", "linear", "float32", 0.0, 0.0, math.nan, math.nan, math.nan, math.nan, True)
    assert json.loads(json.dumps(layer.to_dict()))["probe_error"] is None


def test_tolerance_rule_and_validation() -> None:
    tol = Tolerance()
    assert tol.floor_for(torch.bfloat16) == 2.0**-8 and tol.floor_for(torch.float32) == 2.0**-24
    assert tol.limit(0.01, torch.float16) == pytest.approx(0.02 + 2.0**-11)
    assert Tolerance(floor=0.0).limit(0.01, torch.bfloat16) == pytest.approx(0.02)
    for bad in ({"factor": 0}, {"factor": math.inf}, {"ulp": -1}, {"floor": -0.1}):
        with pytest.raises(ValueError, match="Tolerance"):
            Tolerance(**bad)  # type: ignore[arg-type]
