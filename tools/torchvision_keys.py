"""Write tests/data/torchvision_keys.json: torchvision's state_dict keys and shapes per architecture.

Run once where torchvision imports (a throwaway virtual environment with the CUDA build of torch
and torchvision runs it on a CPU); the test suite then holds edgebc's own definitions to it
without torchvision. Usage: python tools/torchvision_keys.py [OUT.json]
"""

import json
import sys

import torchvision

NAMES = ["mobilenet_v3_small", "mobilenet_v3_large", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
         "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "resnet18", "resnet50", "densenet121"]  # fmt: skip


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/data/torchvision_keys.json"
    table = {"torchvision": torchvision.__version__, "models": {}}
    for name in NAMES:
        model = getattr(torchvision.models, name)(weights=None)
        table["models"][name] = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    with open(out, "w") as handle:
        json.dump(table, handle, indent=0)
        handle.write("\n")


if __name__ == "__main__":
    main()
