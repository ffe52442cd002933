"""Latency benchmarks of every stage, backend and the full pipeline (`edgebc bench`,
`python benchmarks/latency.py`). Torch and the exporters are imported only when models are made
here; with `--model` it runs torch-free on a device."""
