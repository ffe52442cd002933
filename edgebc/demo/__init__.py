"""The embedded demo model: a small classifier trained on synthetic phantoms, shipped in the package.

It exists so `edgebc` can be tried on a fresh machine with no data and no download. It was made by
`tools/make_demo_model.py` (reproducible: fixed seeds, phantoms only) and knows nothing about real
patients: anything that shows its results must label them "DEMO — synthetic phantom model".
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEMO_MODEL = Path(__file__).parent / "demo-phantom.onnx"
DEMO_BANNER = "DEMO — synthetic phantom model"
# The card's own mark (its lineage), so a copy of the file under another name is still a demo.
DEMO_LINEAGE_KEY = "demo"
DEMO_LINEAGE = "trained on synthetic phantoms only (tools/make_demo_model.py); not for real images"


def is_demo_card(lineage: Mapping[str, Any]) -> bool:
    """Whether a card's lineage marks its model as the demo (trained on phantoms only)."""
    return DEMO_LINEAGE_KEY in lineage
