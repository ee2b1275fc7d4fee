"""Compiles the hot path with mypyc; everything else is in pyproject.toml.

mypyc type-checks what it compiles against the installed dependencies, so
the compiled build needs them first (``make setup`` installs them, then
builds with ``--no-build-isolation``). ``CLOVISOR_COMPILE=0`` builds the
pure-Python package: the same code, interpreted. At run time
``CLOVISOR_PURE_PYTHON=1`` ignores compiled modules that are installed
(:mod:`clovisor.build`); ``clovisor doctor`` says which build runs.
"""

import os

from setuptools import setup

# What every traced session goes through: span building and encoding.
COMPILED = [
    "src/clovisor/export/record.py",
    "src/clovisor/export/spans.py",
    "src/clovisor/export/paircache.py",
    "src/clovisor/export/otlp_json.py",
]

ext_modules = []
if os.environ.get("CLOVISOR_COMPILE", "1") != "0":
    from mypyc.build import mypycify

    ext_modules = mypycify(COMPILED, opt_level="3", group_name="clovisor_native")

setup(ext_modules=ext_modules)
