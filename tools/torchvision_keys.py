"""Write tests/data/torchvision_keys.json: torchvision's state_dict keys and shapes per architecture.

Run once where torchvision's Python files import (a throwaway virtual environment with the CUDA
build of torch and torchvision runs it on a CPU; so does the torchvision wheel unpacked onto
PYTHONPATH beside the project's CPU torch, see below); the test suite then holds edgebc's own
definitions to it without torchvision. Usage: python tools/torchvision_keys.py [OUT.json]
"""

import json
import sys
import types

# torchvision registers fake kernels for its compiled detection ops (nms, roi_align) on import;
# with a torch its compiled library was not built for, those ops do not exist and the import
# fails. The classification models never use them, so that registration is skipped.
sys.modules.setdefault(
    "torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations")
)

import torchvision  # noqa: E402

NAMES = ["mobilenet_v3_small", "mobilenet_v3_large", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
         "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "resnet18", "resnet50", "densenet121",
         "resnext50_32x4d", "vgg16", "vgg16_bn", "googlenet", "inception_v3"]  # fmt: skip
# edgebc's GoogLeNet and Inception-v3 have no auxiliary classifiers (they only add training loss
# terms)
OPTIONS = {"googlenet": {"aux_logits": False, "init_weights": True},
           "inception_v3": {"aux_logits": False, "init_weights": True}}  # fmt: skip


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/data/torchvision_keys.json"
    table = {"torchvision": torchvision.__version__, "models": {}}
    for name in NAMES:
        model = getattr(torchvision.models, name)(weights=None, **OPTIONS.get(name, {}))
        table["models"][name] = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    with open(out, "w") as handle:
        json.dump(table, handle, indent=0)
        handle.write("\n")


if __name__ == "__main__":
    main()
