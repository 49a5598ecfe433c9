"""Sphinx configuration.

Build the site with ``sphinx-build -W -b html docs docs/_build/html`` and run every example
in the pages and in the public docstrings with ``sphinx-build -W -b doctest docs
docs/_build/doctest``.
"""

from __future__ import annotations

import contextlib
import io
import os
from unittest import mock

from docutils import nodes
from docutils.parsers.rst import Directive
from sphinx.util import logging

import batchnorm

project = "batchnorm"
author = "the batchnorm developers"
copyright = "the batchnorm developers"
release = version = batchnorm.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "numpydoc",
]

exclude_patterns = ["_build"]
html_theme = "pydata_sphinx_theme"
html_static_path = ["_static"]
html_title = f"batchnorm {release}"
html_theme_options = {"navigation_with_keys": False, "show_toc_level": 2}

autodoc_typehints = "none"  # numpydoc's Parameters sections already give the types
autosummary_generate = False  # the API page documents each name itself; no stub files
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

doctest_global_setup = """
import numpy as np
import batchnorm as bn
cupy_backend_runs = "cupy" in bn.available_backends()
"""

logger = logging.getLogger(__name__)


class CliHelp(Directive):
    """``.. cli-help:: SUBCOMMAND``: the ``--help`` text of ``python -m batchnorm``.

    Taken from the parser at build time, so the page cannot drift from the code.
    """

    optional_arguments = 1

    def run(self):
        from batchnorm.__main__ import main

        argv = [*self.arguments, "--help"]
        text = io.StringIO()
        # argparse wraps to the terminal width; fix it so the page is the same everywhere.
        with (
            mock.patch.dict(os.environ, {"COLUMNS": "88"}),
            contextlib.redirect_stdout(text),
            contextlib.suppress(SystemExit),
        ):
            main(argv)
        if not text.getvalue():
            raise self.error(f"`python -m batchnorm {' '.join(argv)}` printed nothing")
        return [nodes.literal_block(text=text.getvalue().rstrip(), language="text")]


def check_api_reference_is_complete(app, env):
    """Warn (an error under -W) for a name ``batchnorm`` exports that the API page misses."""
    documented = env.get_domain("py").objects
    missing = [
        name
        for name in batchnorm.__all__
        if not name.startswith("__") and f"batchnorm.{name}" not in documented
    ]
    if missing:
        logger.warning(
            "batchnorm exports names the API reference does not document: %s", ", ".join(missing)
        )


def setup(app):
    app.add_directive("cli-help", CliHelp)
    app.connect("env-check-consistency", check_api_reference_is_complete)
