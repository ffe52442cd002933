"""Latency and throughput of every pipeline stage, every available backend and the full pipeline.

    python benchmarks/latency.py [--quick] [--out results/bench] [--compare previous.json]

The same as `edgebc bench` (see `--help`; the code lives in edgebc/bench/). Each call is warmed
up, then timed with perf_counter (with a device sync on GPUs) over enough iterations for stable
tails: p50/p90/p99/max, throughput, process CPU time per call, peak RSS, and real-time headroom at
30 fps, with a machine description. Compare ratios measured in one run across machines, not
absolute numbers.
"""

import sys

from edgebc.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
