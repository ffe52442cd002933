"""TensorRT for the export bundle: the runtime's own engine builder and runner, re-exported.

Building an engine needs TensorRT, not torch, so it lives with the runtime in
edgebc/backends/tensorrt/ (build, sidecar, cache, run), where a device builds its own engines;
`edgebc export --tensorrt` uses the same code through this name.
"""

from edgebc.backends.tensorrt import build_engine, run_engine

__all__ = ["build_engine", "run_engine"]
