"""The embedded demo model: a small classifier trained on synthetic phantoms, shipped in the package.

It exists so `edgebc` can be tried on a fresh machine with no data and no download. It was made by
`tools/make_demo_model.py` (reproducible: fixed seeds, phantoms only) and knows nothing about real
patients: anything that shows its results must label them "DEMO — synthetic phantom model".
"""

from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "demo-phantom.onnx"
DEMO_BANNER = "DEMO — synthetic phantom model"
