"""Export (installed as edgebc.export): checkpoints to ONNX with an embedded model card, FP16,
INT8 with an accuracy budget and latency evidence, TensorRT engines and a Triton repository.
Like training, it may import torch and onnx; the runtime never imports it.
"""
