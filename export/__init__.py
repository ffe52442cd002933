"""Export (installed as edgebc.export): checkpoints to ONNX with an embedded model card, INT8 and
TensorRT engines. Like training, it may import torch and onnx; the runtime never imports it.
It holds no code yet: the export work adds it.
"""
