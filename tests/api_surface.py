"""The public API surface of loramerge, as data: every name in ``loramerge.__all__`` with its kind,
signature, dataclass fields and public methods.

``tests/test_api_surface.py`` compares it with ``tests/api_snapshot.json``. After a deliberate
change to the public API, regenerate the snapshot and say what changed in CHANGELOG.md::

    python tests/api_surface.py --update
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from pathlib import Path
from typing import Any

SNAPSHOT = Path(__file__).with_name("api_snapshot.json")


def _signature(obj: Any) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "<no signature>"


def _methods(cls: type) -> dict[str, str]:
    out = {}
    for name, member in vars(cls).items():
        if name.startswith("_") and name not in ("__init__", "__str__"):
            continue
        if isinstance(member, property):
            out[name] = "property"
        elif isinstance(member, (classmethod, staticmethod)):
            out[name] = f"{type(member).__name__} {_signature(member.__func__)}"
        elif inspect.isfunction(member):
            out[name] = _signature(member)
    return dict(sorted(out.items()))


def surface() -> dict[str, Any]:
    """The public surface, JSON-safe and deterministic."""
    import loramerge

    out: dict[str, Any] = {}
    for name in sorted(loramerge.__all__):
        obj = getattr(loramerge, name)
        if name == "__version__":
            out[name] = {"kind": "str"}
        elif inspect.isclass(obj):
            kind = "exception" if issubclass(obj, BaseException) else "class"
            entry: dict[str, Any] = {
                "kind": kind,
                "bases": [b.__name__ for b in obj.__bases__],
            }
            if dataclasses.is_dataclass(obj):
                params = getattr(obj, "__dataclass_params__", None)
                entry["frozen"] = bool(getattr(params, "frozen", False))
                entry["fields"] = [f"{f.name}: {f.type}" for f in dataclasses.fields(obj)]
            entry["methods"] = _methods(obj)
            out[name] = entry
        elif callable(obj):
            out[name] = {"kind": "function", "signature": _signature(obj)}
        else:
            out[name] = {"kind": type(obj).__name__}
    return out


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        print(json.dumps(surface(), indent=2))
        sys.exit(0)
    SNAPSHOT.write_text(json.dumps(surface(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {SNAPSHOT}; describe the API change in CHANGELOG.md")
