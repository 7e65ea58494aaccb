"""Merging into bitsandbytes-quantized (QLoRA) bases, on the CPU backend (CUDA variants skip without a GPU)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import loramerge
from loramerge.numerics.quantized import checked_dequantize, dequantize, quantized_layers
from loramerge.numerics.tolerance import ulp
from loramerge.proof.model_runs import make_probes, run_model

bnb = pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Sizes are multiples of 64 (bitsandbytes' block) and output features multiples of 32 (its CPU layout).
SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)

FORMATS: dict[str, dict[str, Any]] = {
    "nf4-dq-bf16": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
    "nf4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4-dq-fp16": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float16,
    ),
    "fp4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    "nf4-storage-bf16": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    ),
    "int8": dict(load_in_8bit=True),
}

ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qlora")
    out = {}
    for arch, (config_cls, model_cls) in ARCHS.items():
        torch.manual_seed(0)
        model = model_cls(config_cls(**SIZES))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
        model.to(torch.bfloat16).save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def load_quantized(path: Path, fmt: str, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=BitsAndBytesConfig(**FORMATS[fmt]), device_map="cpu", dtype=dtype
        )


def qlora(model: nn.Module, seed: int = 1) -> Any:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=PROJ, init_lora_weights=False))


def independent_dequant(layer: nn.Module) -> torch.Tensor:
    """The layer's weight from its own forward on the identity (eval mode, as inference runs it):
    exact for 4-bit layers, whose compute dtype here holds their dequantized values."""
    layer.eval()
    n_in = int(layer.in_features)
    with torch.no_grad():
        out = layer(torch.eye(n_in, dtype=torch.float32))
    if getattr(layer, "bias", None) is not None:
        out = out - layer.bias.float()
    return out.T.float()


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dequantizing_merge_matches_qlora_adapter_mode(checkpoints: dict[str, Path], arch: str, fmt: str) -> None:
    pm = qlora(load_quantized(checkpoints[arch], fmt))
    probes = make_probes(pm, seed=3)
    adapter_out = run_model(pm, probes).double()
    # independent expectation of each merged weight: the layer's own weight + ΔW, rounded once to bf16
    expected = {}
    for name, module in pm.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A and fmt != "int8":
            base = module.base_layer
            if base.bias is None:
                delta = module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float()
                expected[name] = (independent_dequant(base) + module.scaling["default"] * delta).to(torch.bfloat16)

    result = loramerge.merge(pm)

    merged = result.model
    assert result.passed and result.report.outputs is not None and result.report.outputs.passed
    assert not quantized_layers(merged), "every bitsandbytes layer must be gone"
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    assert getattr(merged.config, "quantization_config", None) is None
    assert "dequantized to bfloat16" in result.base_format
    for name, want in expected.items():
        got = merged.get_submodule(name.removeprefix("base_model.model.")).weight
        assert torch.equal(got, want), name
    merged_out = run_model(merged, probes).double()
    rel = float((merged_out - adapter_out).norm() / adapter_out.norm())
    assert rel < 0.02, rel  # bf16-level agreement with the QLoRA model it came from
    no_adapter = float(result.report.outputs.merged_error)
    assert math.isfinite(no_adapter)


def test_merge_into_original_weights_fails_verification_against_qlora(checkpoints: dict[str, Path]) -> None:
    """Adding ΔW to the original 16-bit weights is not what the QLoRA adapter was trained against:
    verify() with the quantized base must say so; the dequantizing merge passes the same check."""
    adapter_pm = qlora(load_quantized(checkpoints["llama"], "nf4-dq-bf16"))
    adapter_dir = checkpoints["llama"].parent / "nf4-adapter"
    adapter_pm.save_pretrained(adapter_dir)
    adapter = loramerge.load_adapter(adapter_dir)

    original = loramerge.load_base(checkpoints["llama"])
    wrong = loramerge.merge(original, adapter).model
    right = loramerge.merge(load_quantized(checkpoints["llama"], "nf4-dq-bf16"), adapter).model

    base = load_quantized(checkpoints["llama"], "nf4-dq-bf16")
    bad = loramerge.verify(base, adapter, wrong)
    assert not bad.passed
    assert bad.outputs is not None and not bad.outputs.passed
    assert any("differs from the adapter's update" in c.reason for c in bad.layers)
    good = loramerge.verify(base, adapter, right)
    assert good.passed, good.failures
    assert not good.unexpected_changes


@pytest.mark.parametrize("history", ["train-step", "eval-forward", "no-grad-inference", "device-round-trip"])
def test_merge_is_right_whatever_the_model_went_through(checkpoints: dict[str, Path], history: str) -> None:
    pm = qlora(load_quantized(checkpoints["llama"], "nf4-dq-bf16"))
    probes = make_probes(pm, seed=5)
    if history == "train-step":
        pm.train()
        opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        loss = pm(**probes, labels=probes["input_ids"]).loss
        loss.backward()
        opt.step()
    elif history == "eval-forward":
        pm.eval()
        pm(**probes)
    elif history == "no-grad-inference":
        with torch.no_grad():
            pm(**probes)
    else:
        pm.eval()
        with torch.no_grad():
            pm(**probes)  # bitsandbytes converts to its CPU layout here ...
        pm.to("cpu")  # ... and a move must not confuse the dequantization
    adapter_out = run_model(pm, probes).double()
    result = loramerge.merge(pm)
    merged_out = run_model(result.model, probes).double()
    assert result.passed
    assert float((merged_out - adapter_out).norm() / adapter_out.norm()) < 0.02


@pytest.mark.parametrize("fmt", ["nf4-dq-bf16", "fp4-bf16", "int8"])
def test_requantize_keeps_the_format_and_reports_the_cost(checkpoints: dict[str, Path], fmt: str) -> None:
    pm = qlora(load_quantized(checkpoints["qwen2"], fmt))
    probes = make_probes(pm, seed=2)
    adapter_out = run_model(pm, probes).double()
    with pm.disable_adapter():
        base_out = run_model(pm, probes).double()

    result = loramerge.merge(pm, quantized="requantize")

    merged = result.model
    assert quantized_layers(merged), "the bitsandbytes format must be kept"
    assert "re-quantized" in result.base_format
    outputs = result.report.outputs
    assert outputs is not None and outputs.passed
    # the report's numbers are the real distances
    merged_out = run_model(merged, probes).double()
    assert outputs.merged_error > outputs.adapter_error  # re-quantization costs something ...
    assert outputs.merged_error < outputs.limit  # ... but less than dropping the adapter
    assert float((merged_out - adapter_out).norm()) < float((base_out - adapter_out).norm())
    for layer in result.report.layers:
        assert 0 < layer.residual < 1 and layer.passed


def test_requantize_that_erases_the_adapter_fails(checkpoints: dict[str, Path]) -> None:
    """A tiny update vanishes when re-quantized to nf4: the merge must say so, not pass quietly."""
    pm = qlora(load_quantized(checkpoints["llama"], "nf4-dq-bf16"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(1e-4)
    with pytest.raises(loramerge.VerificationError, match="erased the adapter"):
        loramerge.merge(pm, quantized="requantize")


def test_merged_qlora_model_saves_loads_and_unmerges(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    pm = qlora(load_quantized(checkpoints["llama"], "nf4-dq-bf16"))
    pm.save_pretrained(tmp_path / "adapter")
    base_exact = {n: checked_dequantize(m, n) for n, m in quantized_layers(pm.base_model.model).items()}
    merged = loramerge.merge(pm).model
    merged.save_pretrained(tmp_path / "merged")
    reloaded = loramerge.load_base(tmp_path / "merged")
    assert not quantized_layers(reloaded)
    merged_w = {n: p.detach().float().clone() for n, p in reloaded.named_parameters()}
    result = loramerge.unmerge(reloaded, loramerge.load_adapter(tmp_path / "adapter"))
    assert result.passed
    # the dequantized base comes back within the documented bound: ½ulp(W_merged) + ½ulp(W_recovered)
    for name, exact in base_exact.items():
        module_name = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        got = reloaded.get_submodule(module_name).weight.float()
        bound = 0.5 * ulp(merged_w[f"{module_name}.weight"], torch.bfloat16) + 0.5 * ulp(got, torch.bfloat16)
        assert bool(((got - exact).abs() <= bound).all()), module_name


def test_dequantize_self_check_catches_a_wrong_layout() -> None:
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128).to(torch.bfloat16), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    right = checked_dequantize(layer, "x")
    assert torch.equal(right, dequantize(layer))
    with pytest.raises(loramerge.UnsupportedQuantizationError, match="differs from what"):
        checked_dequantize(layer, "x", weight=right.flip(1))


def test_unsupported_quantization_is_refused(checkpoints: dict[str, Path]) -> None:
    model = loramerge.load_base(checkpoints["llama"])
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    adapter_pm = qlora(model)
    with pytest.raises(loramerge.UnsupportedQuantizationError, match="'gptq'.*unquantized base"):
        loramerge.merge(adapter_pm)


def test_dtype_applies_to_quantized_bases_only(checkpoints: dict[str, Path]) -> None:
    pm = qlora(loramerge.load_base(checkpoints["llama"]))
    with pytest.raises(ValueError, match="not quantized"):
        loramerge.merge(pm, dtype="fp16")


def test_dequantize_to_float32_on_request(checkpoints: dict[str, Path]) -> None:
    pm = qlora(load_quantized(checkpoints["llama"], "nf4-dq-bf16"))
    result = loramerge.merge(pm, dtype=torch.float32)
    assert result.passed
    assert all(p.dtype == torch.float32 for p in result.model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["nf4-dq-bf16", "fp4-bf16", "int8"])
def test_cuda_dequantizing_merge(checkpoints: dict[str, Path], fmt: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            checkpoints["llama"], quantization_config=BitsAndBytesConfig(**FORMATS[fmt]), device_map="cuda:0"
        )
    pm = qlora(model)
    probes = {k: v.cuda() for k, v in make_probes(pm, seed=4).items()}
    adapter_out = run_model(pm, probes).double()
    result = loramerge.merge(pm, probes=probes)
    assert result.passed
    merged_out = run_model(result.model, probes).double()
    assert float((merged_out - adapter_out).norm() / adapter_out.norm()) < 0.02


# --- from files: the 16-bit base checkpoint, simulated or original, and pre-quantized checkpoints ---


@pytest.fixture(scope="module")
def qlora_files(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A sharded 16-bit base, a QLoRA adapter trained (made) on its nf4 copy, and the nf4 copy saved pre-quantized."""
    root = tmp_path_factory.mktemp("qlora-files")
    model = loramerge.load_base(checkpoints["llama"])
    model.save_pretrained(root / "base", max_shard_size="60KB")
    pm = qlora(load_quantized(root / "base", "nf4-dq-bf16"))
    pm.save_pretrained(root / "adapter")
    load_quantized(root / "base", "nf4-dq-bf16").save_pretrained(root / "prequantized")
    return {"base": root / "base", "adapter": root / "adapter", "prequantized": root / "prequantized", "root": root}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def test_simulated_base_reproduces_the_qlora_model(qlora_files: dict[str, Path], tmp_path: Path) -> None:
    report = loramerge.merge_checkpoint(
        qlora_files["base"],
        qlora_files["adapter"],
        tmp_path / "sim",
        qlora_base="simulated",
        quantization="nf4",
        verify="model",  # checked against the base loaded with bitsandbytes, the real QLoRA model
        progress=False,
    )
    assert report.passed and report.verification is not None and report.verification.outputs is not None
    assert report.qlora_base.startswith("simulated (nf4, double quantization, blocks of 64)")
    assert len(report.qlora_gap) == 14 and all(0 < g < 1 for g in report.qlora_gap.values())
    # bit for bit what merging in memory into the QLoRA model gives, and what the pre-quantized checkpoint gives
    in_memory = loramerge.merge(qlora(load_quantized(qlora_files["base"], "nf4-dq-bf16"))).model
    from_file = _weights(tmp_path / "sim")
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(from_file[name], tensor), name
    pre = loramerge.merge_checkpoint(
        qlora_files["prequantized"], qlora_files["adapter"], tmp_path / "pre", progress=False
    )
    assert pre.passed and "pre-quantized" in pre.qlora_base
    from_pre = _weights(tmp_path / "pre")
    assert from_pre.keys() == from_file.keys()
    for name, tensor in from_file.items():
        assert torch.equal(from_pre[name], tensor), name
    reloaded = loramerge.load_base(tmp_path / "pre")
    assert getattr(reloaded.config, "quantization_config", None) is None and not quantized_layers(reloaded)


def test_original_and_simulated_are_told_apart(qlora_files: dict[str, Path], tmp_path: Path) -> None:
    original = loramerge.merge_checkpoint(
        qlora_files["base"], qlora_files["adapter"], tmp_path / "orig", qlora_base="original", progress=False
    )
    simulated = loramerge.merge_checkpoint(
        qlora_files["base"], qlora_files["adapter"], tmp_path / "sim", qlora_base="simulated", progress=False
    )
    assert original.qlora_gap == simulated.qlora_gap  # the same distance, measured from either side
    assert "original" in original.qlora_base
    # each output is right for its own reference and wrong for the other one
    assert loramerge.verify_checkpoint(qlora_files["base"], qlora_files["adapter"], tmp_path / "orig").passed
    wrong = loramerge.verify_checkpoint(qlora_files["base"], qlora_files["adapter"], tmp_path / "sim")
    assert not wrong.passed
    qlora_model = load_quantized(qlora_files["base"], "nf4-dq-bf16")
    adapter = loramerge.load_adapter(qlora_files["adapter"])
    assert not loramerge.verify(qlora_model, adapter, loramerge.load_base(tmp_path / "orig")).passed
    assert loramerge.verify(qlora_model, adapter, loramerge.load_base(tmp_path / "sim")).passed


def test_qlora_base_arguments_are_checked(qlora_files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qlora_base="):
        loramerge.merge_checkpoint(qlora_files["base"], qlora_files["adapter"], tmp_path / "a", quantization="nf4")
    with pytest.raises(ValueError, match="quant_type"):
        loramerge.merge_checkpoint(
            qlora_files["base"], qlora_files["adapter"], tmp_path / "b", qlora_base="simulated", quantization="nf3"
        )
    with pytest.raises(ValueError, match="already quantized"):
        loramerge.merge_checkpoint(
            qlora_files["prequantized"], qlora_files["adapter"], tmp_path / "c", qlora_base="simulated"
        )
    assert not any(p.name.startswith((".a", ".b", ".c", "a", "b", "c")) for p in tmp_path.iterdir())


def test_quant_spec_from_bitsandbytes_config() -> None:
    spec = loramerge.QuantSpec.of(BitsAndBytesConfig(**FORMATS["fp4-bf16"]))
    assert (spec.quant_type, spec.double_quant) == ("fp4", False)
    assert loramerge.QuantSpec.of(BitsAndBytesConfig(load_in_8bit=True)).quant_type == "int8"
    assert loramerge.QuantSpec.of({"quant_type": "nf4", "blocksize": 128}).blocksize == 128


def test_checkpoint_quantized_with_another_method_is_refused(qlora_files: dict[str, Path], tmp_path: Path) -> None:
    import json
    import shutil

    gptq = tmp_path / "gptq"
    shutil.copytree(qlora_files["base"], gptq)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(config))
    with pytest.raises(loramerge.UnsupportedQuantizationError, match="'gptq'"):
        loramerge.merge_checkpoint(gptq, qlora_files["adapter"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_merge_with_qlora_base_and_inspect(
    qlora_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loramerge.cli.main import main

    out = tmp_path / "cli-sim"
    code = main(
        [
            "merge",
            str(qlora_files["base"]),
            str(qlora_files["adapter"]),
            "-o",
            str(out),
            "--qlora-base",
            "simulated",
            "--quant-type",
            "nf4",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0 and out.is_dir()
    assert "QLoRA base: simulated (nf4, double quantization, blocks of 64)" in text
    assert "‖W_sim − W_orig‖ / ‖ΔW‖ per layer: median" in text
    assert (
        main(
            [
                "merge",
                str(qlora_files["base"]),
                str(qlora_files["adapter"]),
                "-o",
                str(tmp_path / "x"),
                "--blocksize",
                "128",
            ]
        )
        == 2
    )
    assert "need --qlora-base" in capsys.readouterr().err

    assert main(["inspect", str(qlora_files["prequantized"])]) == 0
    assert "quantization: bitsandbytes 4-bit nf4, double quantization" in capsys.readouterr().out
    assert main(["inspect", str(qlora_files["base"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["quantization"] == "not quantized" and data["dtypes"] == {"bfloat16": data["tensors"]}
