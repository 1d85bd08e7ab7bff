"""Build only the compiled modules; everything else is declared in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "fastws._fanout",
        ["src/fastws/_fanout.pyx"],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "fastws._wire",
        ["src/fastws/_wire.pyx"],
        extra_compile_args=["-O3"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "initializedcheck": False,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
)
