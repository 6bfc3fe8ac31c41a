"""Builds the optional C extensions (`make native`); everything else is plain Python.

`_forest` walks the tree model in C; `_history` holds the memory store's entity histories in
C arrays. Without them the model and the state store do the same in Python with the same
results, as a Cloud Functions upload does. Every `_*.c` file under detector/ is one extension
module named after its path (`detector/model/_forest.c` is `detector.model._forest`), so the
sources can move between subpackages without an edit here. The rest of the package
(dependencies, data, commands) is declared in pyproject.toml.
"""

from pathlib import Path

from setuptools import Extension, setup

# setuptools wants source paths relative to this file, and runs with it as working directory.
SOURCES = sorted(Path("detector").glob("**/_*.c"))

setup(
    ext_modules=[
        Extension(
            ".".join(source.with_suffix("").parts),
            [source.as_posix()],
            # Plain IEEE double arithmetic, as in Python: no fused multiply-add.
            extra_compile_args=["-O2", "-ffp-contract=off"],
            optional=True,
        )
        for source in SOURCES
    ]
)
