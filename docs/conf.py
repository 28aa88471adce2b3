"""Sphinx configuration: the documentation is built from the docstrings (autodoc + napoleon)
and the hand-written pages in this folder, whose ``>>>`` examples run as doctests."""

import curvops

project = "curvops"
author = "The curvops developers"
copyright = "2026, The curvops developers"
version = release = curvops.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "alabaster"
html_theme_options = {
    "description": "Curvature matrices of neural networks as PyTorch linear operators",
    "fixed_sidebar": True,
}
html_sidebars = {"**": ["about.html", "navigation.html", "relations.html", "searchbox.html"]}
exclude_patterns = ["_build"]
