"""Complete validation before use: corrupt shard headers, adapter tensors and configs are refused
with loramerge's own errors (CLI exit 2), and a hostile regular expression cannot hang a merge."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramerge as lm
from conftest import CASES, make_base, save_adapter
from loramerge.cli.main import main


def _checkpoint(tmp: Path) -> tuple[Path, Path]:
    case = next(c for c in CASES if c.id == "llama-linear-patterns")
    base = make_base(case, torch.bfloat16)
    base.save_pretrained(tmp / "base", max_shard_size="20KB")
    return tmp / "base", save_adapter(base, case.lora, tmp / "adapter")


def _edit_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + length :])


def _first_tensor(header: dict[str, Any]) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _second_tensor(header: dict[str, Any]) -> str:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[1]


HEADER_FAULTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "shape-not-integers": lambda h: h[_first_tensor(h)].__setitem__("shape", ["x"]),
    "negative-dimension": lambda h: h[_first_tensor(h)].__setitem__("shape", [-1, *h[_first_tensor(h)]["shape"][1:]]),
    "offsets-as-strings": lambda h: h[_first_tensor(h)].__setitem__(
        "data_offsets", [str(o) for o in h[_first_tensor(h)]["data_offsets"]]
    ),
    "overlapping-offsets": lambda h: h[_second_tensor(h)].__setitem__(
        "data_offsets", [o - 2 for o in h[_second_tensor(h)]["data_offsets"]]
    ),
    "metadata-a-string": lambda h: h.__setitem__("__metadata__", "format=pt"),
    "unknown-dtype": lambda h: h[_first_tensor(h)].__setitem__("dtype", "F8_E4M3X"),
    "entry-a-list": lambda h: h.__setitem__(_first_tensor(h), [1, 2]),
}


@pytest.mark.parametrize("shard", [0, -1], ids=["first-shard", "last-shard"])
@pytest.mark.parametrize("fault", list(HEADER_FAULTS))
def test_corrupt_shard_headers_are_refused_before_anything_is_written(tmp_path: Path, fault: str, shard: int) -> None:
    base, adapter = _checkpoint(tmp_path)
    path = sorted(base.glob("model-*.safetensors"))[shard]
    _edit_header(path, HEADER_FAULTS[fault])
    with pytest.raises(lm.AdapterConfigError, match="not a valid safetensors file") as e:
        lm.merge_checkpoint(base, adapter, tmp_path / "merged", progress=False)
    assert path.name in str(e.value)
    assert not (tmp_path / "merged").exists()
    assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "merged")]) == 2


def test_a_header_that_is_a_json_list_is_refused(tmp_path: Path) -> None:
    base, adapter = _checkpoint(tmp_path)
    path = sorted(base.glob("model-*.safetensors"))[0]
    raw = b"[1, 2, 3]"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(lm.AdapterConfigError, match="JSON list, not an object"):
        lm.merge_checkpoint(base, adapter, tmp_path / "merged", progress=False)


def test_a_header_length_beyond_the_file_is_refused(tmp_path: Path) -> None:
    base, adapter = _checkpoint(tmp_path)
    path = sorted(base.glob("model-*.safetensors"))[0]
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(lm.AdapterConfigError, match="exceeds the file"):
        lm.merge_checkpoint(base, adapter, tmp_path / "merged", progress=False)


def test_integer_lora_weights_are_refused(tmp_path: Path) -> None:
    _, adapter = _checkpoint(tmp_path)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(lm.AdapterConfigError, match="int32; LoRA weights are floating point"):
        lm.load_adapter(adapter)


def test_the_audit_pattern_no_longer_hangs_a_merge(tmp_path: Path) -> None:
    """``([a-z_.0-9]*)*!`` never returned with Python's re; matched with a time limit it is answered at once."""
    _, adapter = _checkpoint(tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {**config.get("rank_pattern", {}), "([a-z_.0-9]*)*!": 8}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    loaded = lm.load_adapter(adapter)
    assert time.perf_counter() - started < 10
    assert all(m.rank in (4, 8) for m in loaded.modules.values())


def test_a_slow_pattern_is_caught_on_a_long_module_name() -> None:
    from loramerge.formats.adapter_config import pattern_value

    with pytest.raises(lm.AdapterConfigError, match="did not finish"):
        pattern_value({"(a|aa)+$": 4}, "a" * 60 + "b", 8)
    assert pattern_value({"q_proj": 4}, "model.layers.0.self_attn.q_proj", 8) == 4


@pytest.mark.parametrize("size", ["1e400GB", "abc", "nanGB", "-5GB", "0", "inf"])
def test_bad_shard_sizes_are_refused_before_anything_is_written(tmp_path: Path, size: str) -> None:
    base, adapter = _checkpoint(tmp_path)
    with pytest.raises(ValueError, match="max_shard_size"):
        lm.merge_checkpoint(base, adapter, tmp_path / "merged", max_shard_size=size, progress=False)
    assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "merged"), f"--max-shard-size={size}"]) == 2
    assert not (tmp_path / "merged").exists()


LINEAGE_FAULTS: dict[str, str] = {
    "record-a-list": "[1, 2]",
    "record-not-json": "{not json",
    "lineage-not-a-list": '{"lineage": {"adapter": 1}}',
    "round-without-adapter": '{"lineage": [{"receipt": null}]}',
    "source-not-a-string": '{"lineage": [{"adapter": {"source": 5}}]}',
}


@pytest.mark.parametrize("fault", list(LINEAGE_FAULTS))
def test_a_malformed_record_is_named_and_refused(
    tmp_path: Path, fault: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = _checkpoint(tmp_path)
    (base / "loramerge.json").write_text(LINEAGE_FAULTS[fault])
    with pytest.raises(lm.LoraMergeError, match="loramerge.json"):
        lm.merge_checkpoint(base, adapter, tmp_path / "merged", progress=False)
    capsys.readouterr()
    assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "merged")]) == 2
    assert "loramerge.json" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_invalid_json_in_config_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = _checkpoint(tmp_path)
    (base / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],,}')
    assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "not valid JSON" in err


def test_an_overflowing_scale_is_refused_before_any_change(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == "llama-linear-patterns")
    base = make_base(case, torch.bfloat16)
    directory = save_adapter(base, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, tmp_path / "a")
    config = json.loads((directory / "adapter_config.json").read_text())
    config["lora_alpha"] = 1e308
    (directory / "adapter_config.json").write_text(json.dumps(config))
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    with pytest.raises(lm.NonFiniteMergeError, match="check lora_alpha"):
        lm.merge(base, lm.load_adapter(directory))
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())


@pytest.mark.parametrize("verify", [True, False])
def test_a_nan_in_the_adapter_fails_a_checkpoint_merge_with_or_without_verification(
    tmp_path: Path, verify: bool
) -> None:
    """Without verification the merge does not measure the rounding residual; a non-finite result
    must still stop it, name the layer and leave nothing on disk."""
    base, adapter_dir = _checkpoint(tmp_path)
    adapter = lm.load_adapter(adapter_dir)
    bad = next(iter(adapter.modules))
    adapter.modules[bad].update.lora_B[0, 0] = float("nan")
    with pytest.raises(lm.NonFiniteMergeError, match=bad):
        lm.merge_checkpoint(base, adapter, tmp_path / "merged", progress=False, verify=verify)
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")], "no temporary directory left"
