"""The loramerge command line: exit codes, output, and the demo."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loramerge as lm
from conftest import save_adapter, tiny_llama
from loramerge.cli.main import main


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    base = tiny_llama().to(torch.bfloat16).eval()
    base.save_pretrained(root / "base")
    adapter_dir = save_adapter(
        base, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, root / "adapter"
    )
    merged = lm.merge(copy.deepcopy(base), lm.load_adapter(adapter_dir)).model
    merged.save_pretrained(root / "merged")
    with torch.no_grad():
        merged.model.layers[1].self_attn.v_proj.weight.mul_(1.1)
    merged.save_pretrained(root / "broken")
    return {"base": root / "base", "adapter": adapter_dir, "merged": root / "merged", "broken": root / "broken"}


def test_inspect_table_and_json(dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(dirs["adapter"])]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in out and "4 adapted modules" in out
    assert main(["inspect", str(dirs["adapter"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {m["name"] for m in data["modules"]} == {
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    }
    assert all(m["scale"] == 2.0 and m["rank"] == 4 for m in data["modules"])


def test_verify_exit_codes(dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(dirs["base"]), str(dirs["adapter"]), str(dirs["merged"])]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert main(["verify", str(dirs["base"]), str(dirs["adapter"]), str(dirs["broken"]), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False
    assert any("model.layers.1.self_attn.v_proj" in f for f in report["failures"])


def test_bad_input_exit_code_and_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "save_pretrained" in err


def test_console_script_version_and_demo() -> None:
    version = subprocess.run(
        [sys.executable, "-m", "loramerge.cli.main", "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("loramerge ")
    demo = subprocess.run(
        [sys.executable, "-m", "loramerge.cli.main", "demo", "--dtype", "fp16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stderr
    assert "demo: all checks passed" in demo.stdout
    assert demo.stdout.count("PASSED") >= 3
