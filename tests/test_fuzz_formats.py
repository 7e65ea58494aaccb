"""Fuzzing the parsers of untrusted files (safetensors headers, sharded-checkpoint indexes) with
mutations of real files: every input is either accepted, and then safetensors' own loader agrees
and every invariant holds, or refused with loramerge's own error, never anything else."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from loramerge.errors import AdapterConfigError, LoraMergeError, UnsafePathError
from loramerge.formats.confine import confined_file
from loramerge.formats.safetensors_header import parse_header
from loramerge.formats.shards import _read_weight_map

WILD: list[Any] = [
    None,
    True,
    -1,
    0,
    3,
    2**70,
    1.5,
    float("inf"),
    "",
    "F32",
    "x",
    [],
    [1],
    [-2, 3],
    {},
    {"a": 1},
    [1.0, 2.0],
]


def _real_header(tmp: Path) -> tuple[dict[str, Any], int]:
    tensors = {
        "a.weight": torch.randn(4, 3),
        "b.bias": torch.randn(5).to(torch.bfloat16),
        "c.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    path = tmp / "real.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), len(raw) - 8 - length


@st.composite
def mutated_headers(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    header = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        names = sorted(header)
        name = draw(st.sampled_from(names))
        action = draw(st.sampled_from(["set", "delete", "replace", "offset", "shape", "duplicate"]))
        entry = header[name]
        if action == "replace" or not isinstance(entry, dict):
            header[name] = draw(st.sampled_from(WILD))
        elif action == "set":
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(st.sampled_from(WILD))
        elif action == "delete":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif action == "offset" and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2:
            i = draw(st.integers(0, 1))
            entry["data_offsets"][i] = entry["data_offsets"][i] + draw(st.integers(-64, 64))
        elif action == "shape" and isinstance(entry.get("shape"), list) and entry["shape"]:
            entry["shape"][draw(st.integers(0, len(entry["shape"]) - 1))] = draw(st.integers(-3, 12))
        elif action == "duplicate" and name != "__metadata__":
            header[name + ".copy"] = json.loads(json.dumps(entry))
    return header


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], int]:
    return _real_header(tmp_path_factory.mktemp("fuzz"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_header_parser_accepts_only_what_safetensors_accepts(
    real: tuple[dict[str, Any], int], data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base, data_len = real
    header = data.draw(mutated_headers(base))
    raw = json.dumps(header).encode()
    size = 8 + len(raw) + data.draw(st.sampled_from([data_len, data_len - 1, data_len + 8, 0]))
    try:
        _, entries = parse_header(raw, size, "fuzzed")
    except AdapterConfigError:
        return
    # accepted: the invariants hold, and safetensors' own loader reads the same file
    position = 0
    for _name, _code, shape, begin, end in entries:
        assert begin == position and end >= begin and all(d >= 0 for d in shape)
        position = end
    assert 8 + len(raw) + position == size
    path = tmp_path_factory.mktemp("accepted") / "f.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(size - 8 - len(raw)))
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(e[0] for e in entries)
        for name, _, shape, _, _ in entries:
            assert tuple(f.get_slice(name).get_shape()) == shape


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200))
def test_header_parser_never_raises_anything_else_on_garbage(raw: bytes) -> None:
    with contextlib.suppress(AdapterConfigError):
        parse_header(raw, 10**6, "garbage")


NAMES = st.sampled_from(
    [
        "model-00001-of-00002.safetensors",
        "../model-00001-of-00002.safetensors",
        "/etc/passwd",
        "sub/x.safetensors",
        "..",
        "",
        "a\\b",
        "C:x",
        "ok.safetensors",
        "x\x00y",
    ]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | NAMES,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(NAMES, children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    weight_map=st.one_of(st.dictionaries(st.text(max_size=8), st.one_of(NAMES, JSON_VALUES), max_size=4), JSON_VALUES),
    wrap=st.booleans(),
)
def test_index_parser_and_confinement(tmp_path_factory: pytest.TempPathFactory, weight_map: Any, wrap: bool) -> None:
    root = tmp_path_factory.mktemp("index")
    (root / "model-00001-of-00002.safetensors").write_bytes(b"x")
    (root / "ok.safetensors").write_bytes(b"x")
    index = root / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map} if wrap else weight_map))
    try:
        parsed = _read_weight_map(index)
        for file in parsed.values():
            path = confined_file(root, file, "fuzz")
            assert path.parent == root and path.is_file()
    except (AdapterConfigError, UnsafePathError) as e:
        assert isinstance(e, LoraMergeError)
