"""Builds the optional C extension (`make native`); everything else is plain Python.

`detector.model._forest` walks the tree model in C; `detector.state._history` holds the memory store's
entity histories in C arrays. Without them `detector.model` and `detector.state` do the same
in Python with the same results, as a Cloud Functions upload does.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "detector.model._forest",
            ["detector/model/_forest.c"],
            # Plain IEEE double arithmetic, as in Python: no fused multiply-add.
            extra_compile_args=["-O2", "-ffp-contract=off"],
            optional=True,
        ),
        Extension(
            "detector.state._history",
            ["detector/state/_history.c"],
            extra_compile_args=["-O2", "-ffp-contract=off"],
            optional=True,
        ),
    ]
)
