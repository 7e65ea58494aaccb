"""Sphinx configuration for the loramerge documentation."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath("../src"))

from loramerge import __version__

project = "loramerge"
author = "loramerge developers"
copyright = "2026, loramerge developers"
release = __version__
version = ".".join(__version__.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "myst_nb",
]
html_theme = "furo"
html_title = f"loramerge {release}"
exclude_patterns = ["_build", "jupyter_execute"]

# The example notebooks (docs/notebooks/ links to examples/) are executed on every build, on the
# CPU with tiny models, and a failing cell fails the build. `make docs` turns execution off for
# the doctest pass, which does not render them.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 600
nb_output_stderr = "remove"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_attr_annotations = True

doctest_global_setup = """
import torch
import loramerge as lm
from loramerge import *
from loramerge.numerics.tolerance import ulp, unit_roundoff, reference_dtype
"""
