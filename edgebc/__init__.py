"""edgebc: breast-lesion classification on point-of-care ultrasound carts (research use only).

Importing this package is cheap and torch-free: the on-device runtime needs numpy, OpenCV,
ONNX Runtime and PyYAML only. Training (edgebc.train) and export (edgebc.export) are separate
subpackages that bring torch in when, and only when, they are used.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgebc")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
