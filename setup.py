"""Builds the Cython framing extension; all metadata lives in pyproject.toml."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("SCALPLE_DEBUG") == "1"

extensions = [
    Extension(
        "scalple._wire",
        ["scalple/_wire.pyx"],
        extra_compile_args=["-O2"] if not debug else ["-O0", "-g"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": debug,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    )
)
