"""TensorRT's one home: build an engine from an exported ONNX, describe it in a sidecar, cache it
per device, run it. Everything here is torch-free (building needs only TensorRT), so a device
builds its own engines (`edgebc model engine`) and `edgebc export --tensorrt` uses the same code.

    build.py    build_engine: ONNX (FP32, or the INT8 QDQ export) -> engine + sidecar
    sidecar.py  what built an engine (TensorRT, GPU, model card), and the check before loading
    cache.py    cached_engine: this device's engine for a model, reused while its sidecar matches
    backend.py  TensorRTBackend: the runtime backend for `.engine` files; run_engine for checks

TensorRT and cuda-python are imported inside the functions that need them, failing with their
install command; the tests that run them are marked `tensorrt` and skip without it.
"""

from edgebc.backends.tensorrt.backend import TensorRTBackend, run_engine
from edgebc.backends.tensorrt.build import build_engine
from edgebc.backends.tensorrt.cache import cached_engine

__all__ = ["TensorRTBackend", "build_engine", "cached_engine", "run_engine"]
