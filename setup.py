"""The one thing pyproject.toml cannot say: the native area kernel (edgebc/_native/area_kernel.c),
built as a plain shared library that edgebc.area_native loads with ctypes. It is optional: where no
C compiler is present the build goes on without it and edgebc.area's numpy path gives the same
downscales (edgebc.area.native_kernel_status says which one answers). The source's SHA-256 is
compiled in, so a library left from another source is never loaded."""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "edgebc/_native/area_kernel.c"
SOURCE_SHA256 = hashlib.sha256(Path(__file__).parent.joinpath(SOURCE).read_bytes()).hexdigest()

setup(
    ext_modules=[
        Extension(
            # in a folder that is no Python package: nothing walking edgebc's modules imports it
            "edgebc._native.area_kernel",
            sources=[SOURCE],
            define_macros=[("EDGEBC_AREA_SOURCE_SHA256", f'"{SOURCE_SHA256}"')],
            # numpy's arithmetic, rounding for rounding: no fused multiply-adds, no fast-math
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"],
            optional=True,
        )
    ]
)
