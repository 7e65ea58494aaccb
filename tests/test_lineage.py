"""Lineage (which adapters a model holds) and receipts (byte-exact unmerge), in memory and on disk."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import loramerge as lm
from conftest import CASES, DTYPES, LLAMA_PROJ, Case, make_base, save_adapter, tiny_llama
from loramerge.operations.benchmark import BenchRow

RECEIPT_CASES = [c for c in CASES if not c.extra_adapters]  # a receipt is per adapter: one at a time


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


def _params(model: nn.Module) -> dict[str, bytes]:
    return {n: _bits(p) for n, p in model.named_parameters(remove_duplicate=False)}


def _replaced_originals(case: Case, base: nn.Module, adapter: lm.Adapter) -> dict[str, torch.Tensor]:
    """Trained biases: PEFT changed the base's own bias, so its original comes from the caller."""
    params = dict(base.named_parameters())
    return {n: params[n].detach().clone() for n, k in adapter.replaced_kinds.items() if k == "trained_bias"}


@pytest.mark.filterwarnings("ignore:untied:loramerge.LoraMergeWarning")
@pytest.mark.parametrize("case", RECEIPT_CASES, ids=[c.id for c in RECEIPT_CASES])
def test_receipt_restores_the_base_byte_for_byte(case: Case, dtype: torch.dtype, tmp_path: Path) -> None:
    base = make_base(case, dtype)
    adapter_dir = save_adapter(base, case.lora, tmp_path / "adapter", perturb=case.perturb)
    adapter = lm.load_adapter(adapter_dir)
    before = _params(base)
    originals = _replaced_originals(case, base, adapter)

    result = lm.merge(copy.deepcopy(base), adapter, receipt=True)
    assert result.receipt is not None and result.receipt.nbytes > 0
    path = result.receipt.save(tmp_path / "receipt.safetensors")
    merged = result.model
    assert _params(merged) != before  # the merge changed something

    plain = lm.unmerge(
        copy.deepcopy(merged),
        adapter,
        dora_norms=result.dora_norms,
        originals={**result.receipt.originals, **originals},
    )
    exact = lm.unmerge(merged, adapter, receipt=path, originals=originals)
    assert exact.passed and exact.max_error_bound == 0.0
    after = _params(merged)
    for name, data in before.items():
        assert after[name] == data, name
    # without the receipt some tensors differ (that is what the receipt is for), within the bound
    assert _params(plain.model) != before or plain.max_error_bound == 0.0


def test_lineage_in_memory_over_three_rounds(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tiny_llama().to(torch.bfloat16).eval()
    start = _params(base)
    adapters = [
        lm.load_adapter(
            save_adapter(base, {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_PROJ}, tmp_path / f"a{i}", seed=10 + i)
        )
        for i in range(3)
    ]
    model: nn.Module = base
    receipts = []
    for adapter in adapters:
        result = lm.merge(model, adapter, receipt=True)
        model = result.model
        receipts.append(result.receipt)
    rounds = lm.lineage(model)
    assert [r["adapter"]["source"] for r in rounds] == [f"a{i}" for i in range(3)]  # names, never local paths
    assert len({r["adapter"]["sha256"] for r in rounds}) == 3
    assert all(r["verification"]["passed"] and r["dtype"] == "bfloat16" for r in rounds)
    assert rounds[0]["adapter"]["config"]["r"] == 4 and rounds[0]["loramerge_version"] == lm.__version__
    assert set(rounds[0]["adapter"]["scales"]) == set(adapters[0].modules)

    # saved and read back from the checkpoint's config.json
    model.save_pretrained(tmp_path / "merged")
    assert [r["adapter"]["sha256"] for r in lm.lineage(tmp_path / "merged")] == [r["adapter"]["sha256"] for r in rounds]

    # out of order: refused, and nothing changed
    snapshot = _params(model)
    with pytest.raises(lm.LineageError, match="merged in round 1 of 3"):
        lm.unmerge(model, adapters[0])
    assert _params(model) == snapshot

    for adapter, receipt in zip(reversed(adapters), reversed(receipts), strict=True):
        assert lm.unmerge(model, adapter, receipt=receipt).passed
    assert lm.lineage(model) == []
    assert _params(model) == start


def test_forced_unmerge_out_of_order_is_noted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tiny_llama().to(torch.float32).eval()
    a = [
        lm.load_adapter(
            save_adapter(base, {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}, tmp_path / f"a{i}", seed=i)
        )
        for i in range(2)
    ]
    model = lm.merge(lm.merge(base, a[0]).model, a[1]).model
    result = lm.unmerge(model, a[0], force=True)
    assert any("forced" in n for n in result.report.notes)
    assert [r["adapter"]["source"] for r in lm.lineage(model)] == ["a1"]


def test_mismatched_and_corrupted_receipts_are_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tiny_llama().to(torch.bfloat16).eval()
    a0 = lm.load_adapter(
        save_adapter(base, {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_PROJ}, tmp_path / "a0", seed=3)
    )
    a1 = lm.load_adapter(
        save_adapter(base, {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_PROJ}, tmp_path / "a1", seed=4)
    )
    r0 = lm.merge(copy.deepcopy(base), a0, receipt=True)
    r1 = lm.merge(copy.deepcopy(base), a1, receipt=True)
    merged = r0.model
    snapshot = _params(merged)
    with pytest.raises(lm.ReceiptError, match="another adapter"):
        lm.unmerge(merged, a0, receipt=r1.receipt)
    # a corrupted correction: found before any weight changes
    name = next(iter(r0.receipt.tensors))
    entry = r0.receipt.tensors[name]
    import zlib

    steps = bytearray(zlib.decompress(entry.steps))
    steps[0] = (steps[0] + 1) % 256
    entry.steps = zlib.compress(bytes(steps))
    with pytest.raises(lm.ReceiptError, match="SHA-256 mismatch"):
        lm.unmerge(merged, a0, receipt=r0.receipt)
    assert _params(merged) == snapshot
    bad = tmp_path / "not-a-receipt.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(lm.ReceiptError, match="could not be read"):
        lm.unmerge(merged, a0, receipt=bad)
    with pytest.raises(ValueError, match="exactly one adapter"):
        lm.merge(copy.deepcopy(base), [a0, a1], receipt=True)


def _checkpoint(root: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for f in sorted(root.glob("model*.safetensors")):
        out.update({k: _bits(v) for k, v in load_file(f).items()})
    return out


DISK_CASES = [
    c
    for c in RECEIPT_CASES
    if c.id in ("llama-linear-patterns", "llama-dora", "bert-seqcls-modules-to-save", "qwen2-rslora-lorabias")
]


@pytest.mark.parametrize("case", DISK_CASES, ids=[c.id for c in DISK_CASES])
@pytest.mark.parametrize("dname", list(DTYPES))
def test_checkpoint_receipt_round_trip(case: Case, dname: str, tmp_path: Path) -> None:
    base = make_base(case, DTYPES[dname])
    base.save_pretrained(tmp_path / "base", max_shard_size="60KB")
    adapter_dir = save_adapter(base, case.lora, tmp_path / "adapter", perturb=case.perturb)
    report = lm.merge_checkpoint(tmp_path / "base", adapter_dir, tmp_path / "merged", receipt=True, progress=False)
    assert report.passed
    receipts = sorted(p.name for p in (tmp_path / "merged").glob("loramerge-receipt*"))
    assert receipts == ["loramerge-receipt-001.safetensors"]
    back = lm.unmerge_checkpoint(tmp_path / "merged", adapter_dir, tmp_path / "back", progress=False)
    assert back.passed
    assert _checkpoint(tmp_path / "back") == _checkpoint(tmp_path / "base")


def test_checkpoint_lineage_over_three_rounds(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tiny_llama().to(torch.bfloat16).eval()
    base.save_pretrained(tmp_path / "m0", max_shard_size="40KB")
    adapters = [
        save_adapter(base, {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_PROJ}, tmp_path / f"a{i}", seed=20 + i)
        for i in range(3)
    ]
    for i, adapter in enumerate(adapters):
        lm.merge_checkpoint(tmp_path / f"m{i}", adapter, tmp_path / f"m{i + 1}", receipt=True, progress=False)
    rounds = lm.lineage(tmp_path / "m3")
    assert [r["adapter"]["source"] for r in rounds] == [a.name for a in adapters]
    assert all(r["verification"]["passed"] for r in rounds)
    assert sorted(p.name for p in (tmp_path / "m3").glob("loramerge-receipt*")) == [
        f"loramerge-receipt-00{i}.safetensors" for i in (1, 2, 3)
    ]
    shard = next((tmp_path / "m3").glob("model*.safetensors"))
    with safe_open(str(shard), framework="pt") as handle:
        in_metadata = json.loads(handle.metadata()["loramerge_lineage"])
    assert [r["adapter"]["sha256"] for r in in_metadata] == [r["adapter"]["sha256"] for r in rounds]

    with pytest.raises(lm.LineageError, match="merged in round 2 of 3"):
        lm.unmerge_checkpoint(tmp_path / "m3", adapters[1], tmp_path / "wrong", progress=False)
    assert not (tmp_path / "wrong").exists()

    current = tmp_path / "m3"
    for i in reversed(range(3)):
        nxt = tmp_path / f"u{i}"
        lm.unmerge_checkpoint(current, adapters[i], nxt, progress=False)
        assert len(lm.lineage(nxt)) == i
        current = nxt
    assert _checkpoint(current) == _checkpoint(tmp_path / "m0")


def test_a_merged_checkpoint_loaded_with_load_base_keeps_its_lineage(tmp_path: Path) -> None:
    """merge_checkpoint records the lineage beside the weights, not in config.json: load_base puts it
    on the model, so that an in-memory unmerge of an adapter that was not merged last is refused."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    base.save_pretrained(tmp_path / "m0")
    adapters = [
        save_adapter(base, {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_PROJ}, tmp_path / f"a{i}", seed=40 + i)
        for i in range(2)
    ]
    lm.merge_checkpoint(tmp_path / "m0", adapters[0], tmp_path / "m1", progress=False)
    lm.merge_checkpoint(tmp_path / "m1", adapters[1], tmp_path / "m2", progress=False)
    assert "loramerge_lineage" not in json.loads((tmp_path / "m2/config.json").read_text())
    model = lm.load_base(tmp_path / "m2")
    assert [r["adapter"]["sha256"] for r in lm.lineage(model)] == [
        r["adapter"]["sha256"] for r in lm.lineage(tmp_path / "m2")
    ]
    with pytest.raises(lm.LineageError, match="merged in round 1 of 2"):
        lm.unmerge(model, lm.load_adapter(adapters[0]))
    assert len(lm.lineage(lm.unmerge(model, lm.load_adapter(adapters[1])).model)) == 1


def test_receipt_size_is_reported(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tiny_llama().to(torch.bfloat16).eval()
    adapter = lm.load_adapter(
        save_adapter(base, {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_PROJ}, tmp_path / "a")
    )
    result = lm.merge(base, adapter, receipt=True)
    assert result.to_dict()["receipt_bytes"] == result.receipt.nbytes > 0


def test_cli_receipt_lineage_and_forced_unmerge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loramerge.cli.main import main

    torch.manual_seed(0)
    base = tiny_llama().to(torch.float16).eval()
    base.save_pretrained(tmp_path / "base")
    a = [
        save_adapter(
            base, {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "o_proj"]}, tmp_path / f"a{i}", seed=i
        )
        for i in range(2)
    ]
    assert main(["merge", str(tmp_path / "base"), str(a[0]), "-o", str(tmp_path / "m1"), "--receipt"]) == 0
    assert main(["merge", str(tmp_path / "m1"), str(a[1]), "-o", str(tmp_path / "m2"), "--receipt"]) == 0
    capsys.readouterr()
    assert main(["lineage", str(tmp_path / "m2")]) == 0
    out = capsys.readouterr().out
    assert "2 round(s)" in out and f"1. {a[0].name}" in out and "loramerge-receipt-002.safetensors" in out
    assert main(["unmerge", str(tmp_path / "m2"), str(a[0]), "-o", str(tmp_path / "bad")]) == 2
    assert "not the last one merged" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["unmerge", str(tmp_path / "m2"), str(a[1]), "-o", str(tmp_path / "u1")]) == 0
    assert main(["unmerge", str(tmp_path / "u1"), str(a[0]), "-o", str(tmp_path / "u0")]) == 0
    assert _checkpoint(tmp_path / "u0") == _checkpoint(tmp_path / "base")
    assert (
        main(["unmerge", str(tmp_path / "m2"), str(a[0]), "-o", str(tmp_path / "forced"), "--force", "--no-receipt"])
        == 0
    )
    assert [r["adapter"]["source"] for r in lm.lineage(tmp_path / "forced")] == [a[1].name]


def _train(model: nn.Module, steps: int = 5, seed: int = 0) -> None:
    """A toy task: learn to continue a fixed token sequence."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (4, 16), generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_training_loop_helper_three_rounds_and_back(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny_llama().to(torch.float32).eval()
    start = _params(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for i in range(3):
        _train(model, seed=i)
        step = lm.next_round(model, tmp_path / f"round-{i}")
        assert step.merge.passed and step.round == i + 1
        assert (step.adapter_dir / "loramerge-receipt.safetensors").is_file()
        model = step.model
        # the fresh LoRA starts at zero: the model computes exactly what the merged one does
        assert all(float(p.detach().abs().max()) == 0.0 for n, p in model.named_parameters() if "lora_B" in n)
    rounds = lm.lineage(model.base_model.model)
    assert [r["adapter"]["source"] for r in rounds] == [str(tmp_path / f"round-{i}") for i in range(3)]
    assert _params(model.base_model.model) != start

    results = lm.unmerge_rounds(model, count=3)
    assert len(results) == 3 and all(r.passed for r in results)
    back = results[-1].model
    assert lm.lineage(back) == [] and _params(back) == start


def test_bench_on_a_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loramerge.cli.main import main

    torch.manual_seed(0)
    base = tiny_llama().to(torch.float32).eval()
    base.save_pretrained(tmp_path / "base")
    adapter = save_adapter(base, {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_PROJ}, tmp_path / "a")
    report = lm.bench(tmp_path / "base", adapter, dtype="fp32", prompt_len=8, new_tokens=3, batches=(1, 2), repeats=2)
    assert [(r.mode, r.batch) for r in report.rows] == [(m, b) for m in ("base", "adapter", "merged") for b in (1, 2)]
    for row in report.rows:
        assert row.prefill_tps_min <= row.prefill_tps <= row.prefill_tps_max and row.prefill_tps > 0
        assert row.decode_tps_min <= row.decode_tps <= row.decode_tps_max and row.decode_tps > 0
        assert row.first_prefill_s > 0 and row.first_decode_s > 0 and row.peak_memory_mb > 0
    assert report.ratio("adapter", 1) > 0
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            str(tmp_path / "base"),
            str(adapter),
            "--dtype",
            "fp32",
            "--prompt-len",
            "8",
            "--new-tokens",
            "2",
            "--batches",
            "1",
            "--repeats",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0 and "adapter mode / merged at batch 1" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert set(data) == {"device", "dtype", "prompt_len", "new_tokens", "repeats", "rows", "notes"}
    assert set(data["rows"][0]) == {f.name for f in __import__("dataclasses").fields(BenchRow)}


def test_checkpoint_with_a_wrong_or_corrupt_receipt_writes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tiny_llama().to(torch.bfloat16).eval()
    base.save_pretrained(tmp_path / "base")
    a0 = save_adapter(base, {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_PROJ}, tmp_path / "a0", seed=1)
    a1 = save_adapter(base, {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_PROJ}, tmp_path / "a1", seed=2)
    lm.merge_checkpoint(tmp_path / "base", a0, tmp_path / "m0", receipt=True, progress=False)
    lm.merge_checkpoint(tmp_path / "base", a1, tmp_path / "m1", receipt=True, progress=False)
    other = tmp_path / "m1" / "loramerge-receipt-001.safetensors"
    with pytest.raises(lm.ReceiptError, match="another adapter"):
        lm.unmerge_checkpoint(tmp_path / "m0", a0, tmp_path / "out", receipt=other, progress=False)
    # flip one byte of the stored corrections: detected by the SHA-256 of the restored tensor
    receipt_path = tmp_path / "m0" / "loramerge-receipt-001.safetensors"
    receipt = lm.load_receipt(receipt_path)
    name = sorted(receipt.tensors)[0]
    import zlib

    steps = bytearray(zlib.decompress(receipt.tensors[name].steps))
    steps[len(steps) // 2] = (steps[len(steps) // 2] + 3) % 256
    receipt.tensors[name].steps = zlib.compress(bytes(steps))
    receipt.save(receipt_path)
    with pytest.raises(lm.ReceiptError, match="SHA-256 mismatch"):
        lm.unmerge_checkpoint(tmp_path / "m0", a0, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bench_interleaves_the_modes_and_says_when_numbers_are_noise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import loramerge.operations.benchmark as benchmark

    torch.manual_seed(0)
    base = tiny_llama().to(torch.float32).eval()
    base.save_pretrained(tmp_path / "base")
    adapter = save_adapter(base, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, tmp_path / "a")
    order: list[tuple[str, str]] = []
    real_warm, real_run = benchmark._Case.warm_up, benchmark._Case.run_once

    def warm(self: Any) -> None:
        order.append(("warm", self.mode))
        real_warm(self)

    def run(self: Any) -> None:
        order.append(("run", self.mode))
        real_run(self)

    monkeypatch.setattr(benchmark._Case, "warm_up", warm)
    monkeypatch.setattr(benchmark._Case, "run_once", run)
    report = lm.bench(tmp_path / "base", adapter, dtype="fp32", prompt_len=8, new_tokens=2, batches=(1,), repeats=3)
    modes = ["base", "adapter", "merged"]
    assert order == [("warm", m) for m in modes] + [("run", m) for _ in range(3) for m in modes]
    assert any("too small for these throughputs to mean anything" in n for n in report.notes)

    # base and merged have the same shapes: a gap beyond their spread is reported as noise (set
    # numbers: the measured ones depend on how busy the machine is)
    def row(mode: str, tps: float) -> Any:
        r = report.rows[0]
        return dataclasses.replace(r, mode=mode, prefill_tps=tps, prefill_tps_min=tps - 1, prefill_tps_max=tps + 1)

    assert any("measurement noise" in n for n in benchmark._spread_notes([row("base", 300), row("merged", 100)], 10**9))
    assert not benchmark._spread_notes([row("base", 100), row("merged", 101)], 10**9)
    assert not benchmark._spread_notes([r for r in report.rows if r.mode == "adapter"], 10**9)


def test_unmerge_rounds_does_not_follow_a_lineage_read_from_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lineage loaded with a checkpoint is someone else's record: its ``source`` names a directory
    relative to wherever the process runs. unmerge_rounds reads only the directories it is given,
    and only if each holds the adapter the round recorded."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    adapter = save_adapter(base, lora, tmp_path / "adapter")
    other = save_adapter(base, lora, tmp_path / "other", seed=7)
    merged = lm.merge(copy.deepcopy(base), lm.load_adapter(adapter))
    merged.model.save_pretrained(tmp_path / "merged")  # the lineage travels in config.json
    model = lm.load_base(tmp_path / "merged")
    assert lm.lineage(model)[-1]["adapter"]["source"] == "adapter"  # a public name, not a path
    monkeypatch.chdir(tmp_path)  # where a directory of that name happens to exist
    with pytest.raises(lm.LoraMergeError, match="adapters="):
        lm.unmerge_rounds(model)
    with pytest.raises(lm.LineageError, match="fingerprint"):
        lm.unmerge_rounds(model, adapters=[other])
    restored = lm.unmerge_rounds(model, adapters=[adapter])[-1]
    assert restored.passed
    for name, tensor in restored.model.state_dict().items():
        assert float((tensor - base.state_dict()[name]).abs().max()) <= 1e-6, name
