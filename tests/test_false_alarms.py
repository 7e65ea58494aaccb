"""No false alarms: verify() accepts every merge as faithful as a correctly rounded one, whichever tool
made it (PEFT's merge_and_unload included), and still fails one that changes what the model computes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import loramerge
from conftest import CASES, DTYPES, Case, make_base, peft_merge, save_adapter, tiny_bert, tiny_llama
from loramerge.proof.model_runs import MIN_JUDGED_OUTPUTS, make_probes, run_model

UNTIED_EMBEDDING = Case(
    "llama-untied-embedding", tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}
)
FAITHFUL = [c for c in CASES if "tied" not in c.tags and not c.extra_adapters] + [UNTIED_EMBEDDING]


@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", FAITHFUL, ids=[c.id for c in FAITHFUL])
def test_verify_accepts_peft_merge_and_unload(case: Case, dtype_name: str, seed: int, tmp_path: Path) -> None:
    base = make_base(case, DTYPES[dtype_name], seed=seed)
    directory = save_adapter(base, case.lora, tmp_path / "a", seed=seed + 1, perturb=case.perturb)
    merged = peft_merge(base, [directory])
    report = loramerge.verify(copy.deepcopy(base), loramerge.load_adapter(directory), merged)
    assert report.passed, report.failures


@pytest.mark.parametrize("dtype_name", ["bf16", "fp16"])
def test_peft_embedding_merge_rounds_the_delta_first_and_still_passes(dtype_name: str, tmp_path: Path) -> None:
    """The rule for embeddings: PEFT rounds ΔW to the weight's dtype before adding it, so a few
    elements where W and ΔW cancel are many ulps of W + ΔW away; that is still faithful."""
    dtype = DTYPES[dtype_name]
    base = make_base(UNTIED_EMBEDDING, dtype, seed=5)
    directory = save_adapter(base, UNTIED_EMBEDDING.lora, tmp_path / "a", seed=6)
    adapter = loramerge.load_adapter(directory)
    merged = peft_merge(base, [directory])
    embed = "model.embed_tokens"
    exact = base.get_submodule(embed).weight.double() + adapter.delta(embed).double().to(torch.float64)
    spacing = loramerge.numerics.tolerance.ulp(exact, dtype).double()
    off = ((merged.get_submodule(embed).weight.double() - exact).abs() / spacing).max()
    report = loramerge.verify(copy.deepcopy(base), adapter, merged)
    assert report.passed, report.failures
    assert float(off) > 0.5, "PEFT's rounding of ΔW first is visible here (else this test shows nothing)"


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_verify_still_fails_peft_merge_of_a_tied_embedding(dtype_name: str, tmp_path: Path) -> None:
    """PEFT merges ΔW into the tensor embed_tokens shares with lm_head, so lm_head changes too:
    outputs hundreds of times off. A true alarm, and it names the tensor."""
    case = next(c for c in CASES if "tied" in c.tags)
    base = make_base(case, DTYPES[dtype_name], seed=0)
    directory = save_adapter(base, case.lora, tmp_path / "a", seed=1)
    merged = peft_merge(base, [directory])
    report = loramerge.verify(copy.deepcopy(base), loramerge.load_adapter(directory), merged)
    assert not report.passed
    assert "lm_head.weight" in report.unexpected_changes
    assert report.outputs is not None and not report.outputs.passed


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_verify_fails_a_merge_with_a_slightly_wrong_scale(dtype_name: str, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == "llama-linear-patterns")
    base = make_base(case, DTYPES[dtype_name], seed=0)
    directory = save_adapter(base, case.lora, tmp_path / "a", seed=1)
    adapter = loramerge.load_adapter(directory)
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name in adapter.modules:
            w = merged.get_submodule(name).weight
            w.copy_((w.double() + 1.05 * adapter.delta(name).double()).to(w.dtype))
    report = loramerge.verify(copy.deepcopy(base), adapter, merged)
    assert not report.passed
    assert any(not c.passed for c in report.layers)


def test_a_small_head_is_judged_with_its_hidden_states(tmp_path: Path) -> None:
    """A sequence classifier has a handful of logits: the output check also judges the last hidden
    state, so it is a distribution of thousands of errors, not six numbers."""
    model = tiny_bert().eval()
    probes = make_probes(model)
    logits = model(**probes).logits
    assert logits.numel() < MIN_JUDGED_OUTPUTS
    judged = run_model(model, probes)
    assert judged.numel() > MIN_JUDGED_OUTPUTS
    assert torch.equal(judged[: logits.numel()], logits.detach().reshape(-1))


@pytest.mark.parametrize("seed", range(6))
def test_bert_classifier_fp32_merge_passes(seed: int, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == "bert-seqcls-modules-to-save")
    base = make_base(case, torch.float32, seed=seed)
    directory = save_adapter(base, case.lora, tmp_path / "a", seed=seed + 1, perturb=case.perturb)
    result = loramerge.merge(copy.deepcopy(base), loramerge.load_adapter(directory))
    assert result.passed and result.report.outputs is not None


class _SumAndStates(torch.nn.Module):
    """A module of one's own whose first output is one number (a sum), the second its states."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 16)
        self.lin0 = torch.nn.Linear(16, 32)
        self.lin1 = torch.nn.Linear(32, 32)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin1(torch.relu(self.lin0(self.emb(ids))))
        return h.sum(), h


def test_a_single_number_first_output_is_judged_with_the_other_outputs(tmp_path: Path) -> None:
    """One summed number is one sample of adapter mode's rounding error, which can be near zero by
    luck: judged alone, correct fp32 merges of this model failed (3 of 20 seeds in a first
    measurement; here, before the change, this test failed too). The largest tensor the model
    returns is judged instead. Negative control: 1 % off in one layer still fails the model."""
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["lin0", "lin1"]}
    ids = {"ids": torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))}
    for seed in range(20):
        torch.manual_seed(seed)
        base = _SumAndStates().eval()
        adapter = loramerge.load_adapter(save_adapter(base, lora, tmp_path / f"a{seed}", seed=seed))
        result = loramerge.merge(copy.deepcopy(base), adapter, probes=ids)
        assert result.passed and result.report.outputs is not None, seed
        assert result.report.outputs.probe_shape == (2, 5)
    with torch.no_grad():
        result.model.lin1.weight.mul_(1.01)
    report = loramerge.verify(base, adapter, result.model, probes=ids)
    assert report.outputs is not None and not report.outputs.passed
