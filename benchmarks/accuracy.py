"""Accuracy per backend alongside benchmarks/latency.py: the same labelled frames through every
available backend, with AUC (95% CI), decisions at the operating threshold and agreement.

    python benchmarks/accuracy.py [--model m.onnx --int8 m-int8.onnx --checkpoint m.pt]
                                  [--data manifest.csv --split test] [--make-int8] [--out results/acc]

Without arguments: the embedded demo model on synthetic phantoms (torch-free). The code lives in
edgebc/bench/accuracy.py.
"""

import sys

from edgebc.bench.accuracy import main

if __name__ == "__main__":
    sys.exit(main())
