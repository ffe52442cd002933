"""The one thing pyproject.toml cannot say: the native area kernel (edgebc/_native/area_kernel.c), built
as a plain shared library that edgebc.area_native loads with ctypes. It is optional: where no C
compiler is present the build goes on without it and edgebc.area's numpy path gives the same
downscales (edgebc.area.native_kernel_status says which one answers)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            # in a folder that is no Python package: nothing walking edgebc's modules imports it
            "edgebc._native.area_kernel",
            sources=["edgebc/_native/area_kernel.c"],
            # numpy's arithmetic, rounding for rounding: no fused multiply-adds, no fast-math
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"],
            optional=True,
        )
    ]
)
