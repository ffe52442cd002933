"""The device's latency benchmark (`edgebc bench`): stages, backends, the full pipeline and
real-time headroom on exported models, torch-free. benchmarks/latency.py and
benchmarks/accuracy.py extend it on the development side with PyTorch rows, the notebook
pipeline and models made from the registry."""
