"""One error contract: every bad input through the API raises a LoraMergeError subclass (that names
the thing), never a raw exception from Python, torch, json or safetensors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import loramerge as lm
from conftest import CASES, make_base, save_adapter
from loramerge.formats.shards import parse_size


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    case = next(c for c in CASES if c.id == "llama-linear-patterns")
    base = make_base(case, torch.bfloat16)
    base.save_pretrained(root / "base", max_shard_size="20KB")
    adapter = save_adapter(base, case.lora, root / "adapter")
    (root / "a-file").write_text("not a directory")
    (root / "empty").mkdir()
    bad_json = root / "bad-json"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{oops")
    listed = root / "config-list"
    listed.mkdir()
    (listed / "adapter_config.json").write_text("[1, 2]")
    (listed / "config.json").write_text("[1, 2]")
    return {"root": root, "base": root / "base", "adapter": adapter}


def _adapter_with(files: dict[str, Path], name: str, **changes: Any) -> Path:
    import shutil

    target = files["root"] / name
    if not target.exists():
        shutil.copytree(files["adapter"], target)
        config = json.loads((target / "adapter_config.json").read_text())
        config.update(changes)
        (target / "adapter_config.json").write_text(json.dumps(config))
    return target


BAD: dict[str, Callable[[dict[str, Path]], object]] = {
    "adapter: missing directory": lambda f: lm.load_adapter(f["root"] / "nope"),
    "adapter: a file": lambda f: lm.load_adapter(f["root"] / "a-file"),
    "adapter: no config": lambda f: lm.load_adapter(f["root"] / "empty"),
    "adapter: invalid JSON": lambda f: lm.load_adapter(f["root"] / "bad-json"),
    "adapter: config a list": lambda f: lm.load_adapter(f["root"] / "config-list"),
    "adapter: r = 0": lambda f: lm.load_adapter(_adapter_with(f, "r0", r=0)),
    "adapter: alpha a string": lambda f: lm.load_adapter(_adapter_with(f, "alpha-str", lora_alpha="8")),
    "adapter: bias unknown": lambda f: lm.load_adapter(_adapter_with(f, "bias", bias="some")),
    "adapter: patterns a list": lambda f: lm.load_adapter(_adapter_with(f, "patterns", rank_pattern=[1])),
    "adapter: pattern not a regex": lambda f: lm.load_adapter(_adapter_with(f, "regex", rank_pattern={"(": 2})),
    "adapter: peft type": lambda f: lm.load_adapter(_adapter_with(f, "ia3", peft_type="IA3")),
    "base: missing directory": lambda f: lm.load_base(f["root"] / "nope"),
    "base: no weights": lambda f: lm.load_base(f["root"] / "empty"),
    "base: config a list": lambda f: lm.load_base(f["root"] / "config-list"),
    "merge_checkpoint: base missing": lambda f: lm.merge_checkpoint(f["root"] / "nope", f["adapter"], f["root"] / "o1"),
    "merge_checkpoint: output parent a file": lambda f: lm.merge_checkpoint(
        f["base"], f["adapter"], f["root"] / "a-file" / "out", progress=False
    ),
    "merge_checkpoint: existing output": lambda f: lm.merge_checkpoint(f["base"], f["adapter"], f["adapter"]),
    "merge_checkpoint: shard size": lambda f: lm.merge_checkpoint(
        f["base"], f["adapter"], f["root"] / "o2", max_shard_size="abc"
    ),
    "merge_checkpoint: qlora_base": lambda f: lm.merge_checkpoint(
        f["base"], f["adapter"], f["root"] / "o3", qlora_base="x"
    ),
    "unmerge_checkpoint: merged missing": lambda f: lm.unmerge_checkpoint(
        f["root"] / "nope", f["adapter"], f["root"] / "o4"
    ),
    "verify_checkpoint: merged missing": lambda f: lm.verify_checkpoint(f["base"], f["adapter"], f["root"] / "nope"),
    "lineage: record a list": lambda f: lm.lineage(f["root"] / "config-list"),
    "load_receipt: missing": lambda f: lm.load_receipt(f["root"] / "nope.safetensors"),
    "load_receipt: not safetensors": lambda f: lm.load_receipt(f["root"] / "a-file"),
    "Tolerance: factor 0": lambda f: lm.Tolerance(factor=0),
    "Tolerance: floor nan": lambda f: lm.Tolerance(floor=float("nan")),
    "QuantSpec: quant type": lambda f: lm.QuantSpec(quant_type="nf3"),
    "QuantSpec: from an int": lambda f: lm.QuantSpec.of(3),
    "parse_size: negative": lambda f: parse_size("-5GB"),
    "merge: a plain model and no adapter": lambda f: lm.merge(torch.nn.Linear(2, 2)),
    "unmerge: wrong model": lambda f: lm.unmerge(torch.nn.Linear(2, 2), lm.load_adapter(f["adapter"])),
    "make_probes: a plain module": lambda f: lm.make_probes(torch.nn.Linear(2, 2)),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_bad_input_is_a_loramerge_error(files: dict[str, Path], case: str) -> None:
    with pytest.raises(lm.LoraMergeError) as e:
        BAD[case](files)
    assert str(e.value), "the error says what is wrong"
