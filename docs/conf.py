"""Sphinx configuration of the badexpert documentation (``python -m sphinx -W -b html docs docs/_build/html``).

Everything the site shows about the code is read from the code: the API reference from the
docstrings (autodoc, autosummary), the command line reference from ``badexpert.cli.build_parser()``
and the attack and detector catalogues from the registries (``_ext/badexpert_docs.py``). The build
reads nothing outside the repository and needs no network (no intersphinx)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent / "src"))  # the checkout's own package, installed or not
os.environ.setdefault("BADEXPERT_QUIET", "1")

import badexpert  # noqa: E402

project = "badexpert"
author = "the badexpert developers"
copyright = "the badexpert developers"
release = badexpert.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "badexpert_docs",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False  # torch.nn.Module.forward's docstring is not ours

html_theme = "furo"
html_title = f"badexpert {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
