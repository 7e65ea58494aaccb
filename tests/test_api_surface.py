"""The public API may only change deliberately: the surface must equal tests/api_snapshot.json."""

from __future__ import annotations

import difflib
import json

from api_surface import SNAPSHOT, surface


def test_public_api_matches_the_snapshot() -> None:
    live = json.dumps(surface(), indent=2, sort_keys=True).splitlines()
    recorded = SNAPSHOT.read_text(encoding="utf-8").splitlines()
    diff = "\n".join(difflib.unified_diff(recorded, live, "api_snapshot.json", "loramerge now", lineterm=""))
    assert live == recorded, (
        "the public API changed. If that is deliberate, run `python tests/api_surface.py --update`, "
        "describe the change in CHANGELOG.md (a removal or incompatible change needs a deprecation first, "
        "see the versioning policy in the docs), and commit both:\n" + diff
    )


def test_every_public_name_is_documented_with_an_example() -> None:
    import inspect

    import loramerge

    missing_doc = []
    missing_example = []
    for name in loramerge.__all__:
        if name == "__version__":
            continue
        obj = getattr(loramerge, name)
        doc = inspect.getdoc(obj) or ""
        if not doc.strip():
            missing_doc.append(name)
        elif inspect.isfunction(obj) and "Example" not in doc:
            missing_example.append(name)
    assert not missing_doc, f"public names without a docstring: {missing_doc}"
    assert not missing_example, f"public functions without an Example section: {missing_example}"


def test_every_public_name_is_in_the_api_reference() -> None:
    from pathlib import Path

    import loramerge

    text = (Path(__file__).parents[1] / "docs" / "api.rst").read_text(encoding="utf-8")
    missing = [n for n in loramerge.__all__ if n != "__version__" and f"loramerge.{n}\n" not in text]
    assert not missing, f"add these to docs/api.rst: {missing}"
