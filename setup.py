"""Builds the optional C extension (`make native`); everything else is plain Python.

`detector._forest` walks the tree model in C. Without it `detector.model` walks in generated
Python with the same results, as a Cloud Functions upload does.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "detector._forest",
            ["detector/_forest.c"],
            # Plain IEEE double arithmetic, as in Python: no fused multiply-add.
            extra_compile_args=["-O2", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
