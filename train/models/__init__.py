"""Model architectures, registered by name, with torchvision-identical state_dict keys.

Importing this package registers every architecture; `create_model(name, ...)` builds one.
"""

from edgebc.train.models import (  # noqa: F401
    cnn17,
    densenet,
    googlenet,
    inception,
    mobilenetv3,
    resnet,
    shufflenetv2,
    simple_cnn,
    vgg,
)
from edgebc.train.models.registry import ModelSpec, create_model, list_models, model_spec

__all__ = ["ModelSpec", "create_model", "list_models", "model_spec"]
