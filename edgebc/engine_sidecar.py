"""Moved: TensorRT engine sidecars live in edgebc.backends.tensorrt.sidecar, TensorRT's one home.

This name stays only while tests/test_export.py imports it; delete it once that imports
`edgebc.backends.tensorrt.sidecar`.
"""

from edgebc.backends.tensorrt.sidecar import check_engine_compatible, read_sidecar

__all__ = ["check_engine_compatible", "read_sidecar"]
