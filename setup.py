"""Build memwatchd's Cython extension (ext/_memread.pyx -> memwatchd._memread).

Project metadata lives in pyproject.toml; this file only declares the extension.
"""
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("memwatchd._memread", ["ext/_memread.pyx"], extra_compile_args=["-O2"])],
        compiler_directives={"language_level": "3"},
    ),
)
