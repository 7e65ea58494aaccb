"""A checkpoint command with nothing quantized does not import bitsandbytes, and gives the process
back able to use it (loramerge.cli.lean_imports)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import save_adapter, tiny_llama
from loramerge.cli.lean_imports import nothing_quantized

pytest.importorskip("bitsandbytes")

# Run in a fresh interpreter: the test process has imported PEFT (and with it bitsandbytes) already.
AFTER_MERGE = """
import sys, warnings
import torch
from loramerge.cli.main import main
base, adapter, out, first = sys.argv[1:5]
if first == "peft":
    import peft
assert main(["merge", base, adapter, "-o", out]) == 0
module = sys.modules.get("bitsandbytes")
print("bitsandbytes:", type(module).__name__ if module is not None else None)
if first == "peft":
    sys.exit(0)
# The process uses bitsandbytes afterwards as if nothing had happened: PEFT and transformers see it,
# PEFT's helpers hold it, and a quantized model gets PEFT's 8-bit layer and merges.
import bitsandbytes, peft.helpers
from peft import LoraConfig, get_peft_model
from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from transformers.utils.import_utils import is_bitsandbytes_available
import loramerge as lm
assert is_bnb_available() and is_bnb_4bit_available() and is_bitsandbytes_available() and peft.helpers.bnb is bitsandbytes
quant = BitsAndBytesConfig(load_in_8bit=True)  # (tiny rows are shorter than a 4-bit block)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, device_map="cpu", dtype=torch.bfloat16)
    qlora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
layer = qlora.base_model.model.model.layers[0].self_attn.q_proj
print("layer:", type(layer).__module__, type(layer).__name__)
print("qlora merge passed:", lm.merge(qlora).passed)
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lean")
    torch.manual_seed(0)
    base = tiny_llama().to(torch.bfloat16).eval()
    base.save_pretrained(root / "base")
    adapter = save_adapter(base, {"r": 4, "target_modules": ["q_proj", "v_proj"]}, root / "adapter")
    return root / "base", adapter


def _run(checkpoint: tuple[Path, Path], out: Path, first: str) -> str:
    base, adapter = checkpoint
    proc = subprocess.run(
        [sys.executable, "-c", AFTER_MERGE, str(base), str(adapter), str(out), first],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_verified_merge_runs_without_bitsandbytes_and_gives_it_back(
    checkpoint: tuple[Path, Path], tmp_path: Path
) -> None:
    out = _run(checkpoint, tmp_path / "out", first="loramerge")
    # After a verified merge (PEFT imported and injected for the judgement), bitsandbytes is
    # registered but was never executed: the lazy module has not loaded yet.
    assert "bitsandbytes: _LazyModule" in out
    assert "layer: peft.tuners.lora.bnb Linear8bitLt" in out
    assert "qlora merge passed: True" in out


def test_nothing_is_hidden_when_peft_is_already_imported(checkpoint: tuple[Path, Path], tmp_path: Path) -> None:
    """The negative control: the same command in a process that imported PEFT first finds bitsandbytes
    imported as usual (the marker above tells the two apart)."""
    out = _run(checkpoint, tmp_path / "out", first="peft")
    assert "bitsandbytes: module" in out


def _args(tmp_path: Path, config: object, **extra: object) -> argparse.Namespace:
    (tmp_path / "config.json").write_text(json.dumps(config))
    fields: dict[str, object] = {"command": "merge", "base": str(tmp_path), "qlora_base": None}
    fields.update(extra)
    return argparse.Namespace(**fields)


def test_what_counts_as_nothing_quantized(tmp_path: Path) -> None:
    assert nothing_quantized(_args(tmp_path, {"model_type": "llama"}))
    assert not nothing_quantized(_args(tmp_path, {"quantization_config": {"quant_method": "bitsandbytes"}}))
    assert not nothing_quantized(_args(tmp_path, {"text_config": {"quantization_config": {"load_in_4bit": True}}}))
    assert not nothing_quantized(_args(tmp_path, {"model_type": "llama"}, qlora_base="simulated"))
    assert not nothing_quantized(_args(tmp_path, ["not", "an", "object"]))
    (tmp_path / "config.json").write_text("{not json")
    assert not nothing_quantized(argparse.Namespace(command="merge", base=str(tmp_path), qlora_base=None))
    hub = argparse.Namespace(command="verify", hub="org/model", base=None)
    assert not nothing_quantized(hub)
