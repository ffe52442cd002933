"""Synthetic phantoms for tests, demos and CI: B-mode breast ultrasound, scanner screens, cine, mammograms.

No real patient data is needed to exercise the pipeline: the phantoms are deterministic by seed,
carry masks and BI-RADS descriptors, and are hard enough that a classifier has to learn shape,
margin, orientation and posterior features rather than one trivial cue.
"""

from edgebc.synth.cine import make_cine
from edgebc.synth.mammo import MammoPhantom, make_mammo_phantom
from edgebc.synth.mammogram import Mammogram, draw_breast, make_mammogram
from edgebc.synth.screen import render_scanner_screen
from edgebc.synth.ultrasound import LesionDescriptors, UltrasoundPhantom, make_ultrasound_phantom

__all__ = [
    "LesionDescriptors",
    "MammoPhantom",
    "Mammogram",
    "UltrasoundPhantom",
    "draw_breast",
    "make_cine",
    "make_mammo_phantom",
    "make_mammogram",
    "make_ultrasound_phantom",
    "render_scanner_screen",
]
