"""End to end, for every architecture/variant and fp32/bf16/fp16: merge equals PEFT's merge within
rounding, verification passes, and merge -> save -> NEW PROCESS load -> unmerge recovers the base
within the documented bound."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramerge as lm
from conftest import CASES, DTYPES, Case, make_base, peft_merge, save_adapter
from loramerge.numerics.tolerance import ulp

UNMERGE_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    from pathlib import Path
    warnings.simplefilter("ignore")
    from safetensors.torch import load_file, save_file
    import loramerge as lm
    root = Path(sys.argv[1])
    for case_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        model = lm.load_base(case_dir / "merged")
        adapters = sorted(case_dir.glob("adapter*"))
        norms = load_file(case_dir / "dora_norms.safetensors") if (case_dir / "dora_norms.safetensors").exists() else {}
        originals = load_file(case_dir / "originals.safetensors") if (case_dir / "originals.safetensors").exists() else {}
        info = []
        for adapter_dir in reversed(adapters):
            result = lm.unmerge(model, lm.load_adapter(adapter_dir), dora_norms=norms, originals=originals)
            info.append({"passed": result.passed, "bound": result.max_error_bound,
                         "exact": list(result.restored_exactly), "report": result.report.to_dict()})
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(case_dir / "recovered.safetensors"))
        (case_dir / "unmerge.json").write_text(json.dumps(info))
    """
)


@dataclass
class Prepared:
    case: Case
    dtype: torch.dtype
    dir: Path
    base: dict[str, torch.Tensor]
    peft: dict[str, torch.Tensor]
    result: lm.MergeResult
    adapters: list[lm.Adapter]
    warnings: list[str]


KEYS = [f"{c.id}-{d}" for c in CASES for d in DTYPES]


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Prepared]:
    root = tmp_path_factory.mktemp("lifecycle")
    prepared: dict[str, Prepared] = {}
    for case in CASES:
        for dname, dtype in DTYPES.items():
            key = f"{case.id}-{dname}"
            d = root / key
            base = make_base(case, dtype)
            base.save_pretrained(d / "base")
            dirs = [save_adapter(base, case.lora, d / "adapter0", perturb=case.perturb)]
            for i, extra in enumerate(case.extra_adapters, start=1):
                dirs.append(save_adapter(base, extra, d / f"adapter{i}", seed=1 + 7 * i))
            peft_state = {k: v.clone() for k, v in peft_merge(base, dirs).state_dict().items()}
            adapters = [lm.load_adapter(x) for x in dirs]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = lm.merge(lm.load_base(d / "base"), adapters)
            result.model.save_pretrained(d / "merged")
            if result.dora_norms:
                save_file({k: v.contiguous() for k, v in result.dora_norms.items()}, str(d / "dora_norms.safetensors"))
            if case.needs_originals:
                state = base.state_dict()
                names = [
                    n for a in adapters for n, k in a.replaced_kinds.items() if k in ("modules_to_save", "trained_bias")
                ]
                save_file({n: state[n].contiguous() for n in names}, str(d / "originals.safetensors"))
            base_state = {k: v.clone() for k, v in base.state_dict().items()}
            messages = [str(w.message) for w in caught if issubclass(w.category, lm.LoraMergeWarning)]
            prepared[key] = Prepared(case, dtype, d, base_state, peft_state, result, adapters, messages)
    subprocess.run([sys.executable, "-c", UNMERGE_SCRIPT, str(root)], check=True, timeout=600)
    return prepared


@pytest.mark.parametrize("key", KEYS)
def test_merge_verified_and_reported(lifecycle: dict[str, Prepared], key: str) -> None:
    p = lifecycle[key]
    report = p.result.report
    assert report.passed, str(report)
    assert report.outputs is not None and report.outputs.passed
    n_modules = len({m for a in p.adapters for m in a.modules})
    assert len(report.layers) == n_modules
    assert all(c.passed and c.probe_error <= c.limit for c in report.layers)
    assert json.loads(json.dumps(p.result.to_dict()))["report"]["passed"] is True
    assert "PASSED" in str(report)


@pytest.mark.parametrize("key", KEYS)
def test_merge_equals_peft_within_rounding(lifecycle: dict[str, Prepared], key: str) -> None:
    p = lifecycle[key]
    ours = p.result.model.state_dict()
    fp32_slack = 64 * 2.0**-24
    for name, theirs in p.peft.items():
        if "tied" in p.case.tags and name == "lm_head.weight":
            continue  # PEFT changes the tied lm_head too; see test_tied_embeddings_untied
        mine, theirs = ours[name].detach(), theirs.detach()
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, name
        module = name.rsplit(".", 1)[0]
        updates = [a.modules[module] for a in p.adapters if module in a.modules and name.endswith(".weight")]
        slack = fp32_slack * float(theirs.double().abs().max())
        if not updates or any(m.use_dora for m in updates):
            # PEFT rounds ΔW (or the DoRA weight) to the dtype before adding: one ulp of each side.
            delta = theirs.double() - p.base[name].double()
            allowed = ulp(theirs.double(), p.dtype) + ulp(delta, p.dtype) + slack
            assert bool(((mine.double() - theirs.double()).abs() <= allowed).all()), f"{name} differs from PEFT"
            continue
        # Exact value in fp64; loramerge is correctly rounded, PEFT rounds once per adapter (and ΔW first).
        partial = p.base[name].double().clone()
        peft_allowed = torch.full_like(partial, slack)
        # fp32 error of computing ΔW (standard matmul bound: (r + 2) u |s| |B| |A|)
        arithmetic = p.base[name].double().abs() * 2.0**-24
        for mod in updates:
            step = mod.update.delta(partial.shape, torch.float64)
            partial += step
            peft_allowed += ulp(partial, p.dtype).double() + ulp(step, p.dtype).double()
            left, right = mod.update.factors(torch.float64)
            arithmetic += (mod.rank + 2) * 2.0**-24 * abs(mod.scale) * (left.abs() @ right.abs()).reshape(partial.shape)
        mine_gap = (mine.double() - partial).abs()
        assert bool((mine_gap <= 0.5 * ulp(partial, p.dtype).double() + arithmetic).all()), name
        assert bool(((theirs.double() - partial).abs() <= peft_allowed).all()), (
            f"PEFT's {name} is off by more than its rounding"
        )
        assert not torch.equal(mine, p.base[name]), f"{name} did not change: zero delta?"


def test_several_adapters_rounded_once_where_peft_is_not(lifecycle: dict[str, Prepared]) -> None:
    """Where two adapters cancel on a module, PEFT's per-adapter rounding loses many ulps; loramerge does not."""
    p = lifecycle["llama-two-adapters-bf16"]
    name = "model.layers.0.self_attn.v_proj.weight"
    exact = p.base[name].double() + sum(a.modules[name[:-7]].update.delta((16, 32), torch.float64) for a in p.adapters)
    spacing = ulp(exact, torch.bfloat16).double()
    ours = float(((p.result.model.state_dict()[name].double() - exact).abs() / spacing).max())
    peft = float(((p.peft[name].double() - exact).abs() / spacing).max())
    assert ours <= 0.5 + 1e-6
    assert peft > 2 * ours


@pytest.mark.parametrize("key", [k for k in KEYS if not any(c.extra_adapters for c in CASES if k.startswith(c.id))])
def test_verify_accepts_the_merge(lifecycle: dict[str, Prepared], key: str) -> None:
    p = lifecycle[key]
    base = lm.load_base(p.dir / "base")
    merged = lm.load_base(p.dir / "merged")
    report = lm.verify(base, p.adapters[0], merged)
    assert report.passed, str(report)
    assert report.unchanged_checked > 0 and not report.unexpected_changes
    assert all(c.max_ulp <= 0.5 + 1e-6 for c in report.layers)
    # verify() put the base back exactly after using it in adapter mode
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, p.base[name]), name


@pytest.mark.parametrize("key", KEYS)
def test_unmerge_in_new_process_recovers_base(lifecycle: dict[str, Prepared], key: str) -> None:
    p = lifecycle[key]
    info = json.loads((p.dir / "unmerge.json").read_text())
    assert all(step["passed"] for step in info), info
    recovered = load_file(str(p.dir / "recovered.safetensors"))
    merged = load_file(str(p.dir / "merged" / "model.safetensors"))
    exact = {n for step in info for n in step["exact"]}
    adapted = {f"{m}.weight" for a in p.adapters for m in a.modules}
    steps = len(info)
    for name, original in p.base.items():
        if name not in recovered:
            assert "tied" in p.case.tags, name
            continue
        got = recovered[name]
        if name in exact or name not in adapted:
            assert torch.equal(got, original), f"{name} should be restored bit for bit"
            continue
        gap = (got.double() - original.double()).abs()
        if steps == 1 and not any(
            a.modules[name[: -len(".weight")]].use_dora for a in p.adapters if name[:-7] in a.modules
        ):
            # documented elementwise bound: ½ulp(W_merged) + ½ulp(W_recovered)
            bound = (0.5 * ulp(merged[name].double(), p.dtype) + 0.5 * ulp(got.double(), p.dtype)).double()
            assert bool((gap <= bound + 1e-12).all()), name
        else:
            # one adapter at a time out of a jointly rounded merge: the steps' bounds add up
            assert float(gap.max()) <= sum(step["bound"] for step in info) + 1e-12, name
        assert max(step["bound"] for step in info) > 0


def test_tied_embeddings_untied(lifecycle: dict[str, Prepared]) -> None:
    for dname in DTYPES:
        p = lifecycle[f"llama-tied-embedding-{dname}"]
        assert p.result.untied == ("lm_head.weight",)
        assert any("untied" in m for m in p.warnings)
        model = p.result.model
        assert model.lm_head.weight is not model.model.embed_tokens.weight
        assert torch.equal(model.lm_head.weight, p.base["lm_head.weight"]), "lm_head keeps the original embedding"
        assert not torch.equal(p.peft["lm_head.weight"], p.base["lm_head.weight"]), "PEFT's merge changed lm_head too"
        reloaded = lm.load_base(p.dir / "merged")
        assert reloaded.config.tie_word_embeddings is False
        assert torch.equal(reloaded.lm_head.weight, p.base["lm_head.weight"])
        assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_dora_norms_recorded(lifecycle: dict[str, Prepared]) -> None:
    p = lifecycle["llama-dora-bf16"]
    assert set(p.result.dora_norms) == set(p.adapters[0].modules)
    assert all(v.dtype == torch.float32 and bool((v > 0).all()) for v in p.result.dora_norms.values())
